"""The committed stubs are what grpcio-tools generates from proto/backend.proto (up to the generator's version)."""

import re
import subprocess
import sys

from backend.proto.generate import STUB_DIR, generate

# The lines a generator stamps with its own release: a patch release of grpcio-tools or protobuf changes them and
# nothing else, so they are compared as placeholders (the runtime checks them itself on import).
_VERSION_STAMPS = [
    (re.compile(r"^GRPC_GENERATED_VERSION = '[^']*'$", re.M), "GRPC_GENERATED_VERSION = '*'"),
    (re.compile(r"^# Protobuf Python Version: .*$", re.M), "# Protobuf Python Version: *"),
    (re.compile(r"(ValidateProtobufRuntimeVersion\(\n\s+_runtime_version\.Domain\.PUBLIC,\n)\s+\d+,\n\s+\d+,\n\s+\d+,\n"),
     r"\1    *,\n"),
]


def _unstamped(text: str) -> str:
    for pattern, placeholder in _VERSION_STAMPS:
        text = pattern.sub(placeholder, text)
    return text


def test_generated_stubs_match_proto(tmp_path):
    for fresh in generate(tmp_path):
        committed = STUB_DIR / fresh.name
        assert _unstamped(committed.read_text()) == _unstamped(fresh.read_text()), \
            f"{committed} is stale: run `python -m backend.proto.generate`"


def test_each_version_stamp_is_found():
    """Every placeholder pattern matches the committed stubs once, so none silently stops hiding (or hides more)."""
    text = "".join((STUB_DIR / name).read_text() for name in ("backend_pb2.py", "backend_pb2_grpc.py"))
    assert [len(pattern.findall(text)) for pattern, _ in _VERSION_STAMPS] == [1, 1, 1]


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
