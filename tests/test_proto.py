"""The committed stubs are exactly what grpcio-tools generates from proto/backend.proto."""

import subprocess
import sys

from backend.proto.generate import STUB_DIR, generate


def test_generated_stubs_match_proto(tmp_path):
    for fresh in generate(tmp_path):
        committed = STUB_DIR / fresh.name
        assert committed.read_text() == fresh.read_text(), \
            f"{committed} is stale: run `python -m backend.proto.generate`"


def test_localai_field_numbers():
    from backend.proto import backend_pb2 as pb

    f = pb.PredictOptions.DESCRIPTOR.fields_by_name
    assert (f["NDraft"].number, f["Metadata"].number, f["MinP"].number, f["ModelIdentity"].number) == (41, 52, 53, 54)
    m = pb.ModelOptions.DESCRIPTOR.fields_by_name
    assert (m["ModelFile"].number, m["DraftModel"].number, m["Options"].number, m["EnableScore"].number) == (21, 39, 62, 75)
    used = {fd.number for fd in pb.ModelOptions.DESCRIPTOR.fields}
    assert not used & {16, 22, 23, 24, 25}
    assert pb.Reply.DESCRIPTOR.fields_by_name["chat_deltas"].number == 8
    assert pb.StatusResponse.State.Value("ERROR") == -1
    assert pb.DESCRIPTOR.package == "backend"  # LocalAI's service name is backend.Backend


def test_no_top_level_proto_package(tmp_path):
    """A `proto` package of someone else's (proto-plus) beside ours: both import, neither shadows the other."""
    other = tmp_path / "proto"
    other.mkdir()
    (other / "__init__.py").write_text("OWNER = 'proto-plus'\n")
    code = ("import proto, backend.proto.backend_pb2 as pb; "
            "assert proto.OWNER == 'proto-plus'; assert pb.PredictOptions; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(tmp_path)}, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
