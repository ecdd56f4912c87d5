"""The committed stubs are exactly what grpcio-tools generates from proto/backend.proto."""


from proto.generate import PROTO_DIR, generate


def test_generated_stubs_match_proto(tmp_path):
    for fresh in generate(tmp_path):
        committed = PROTO_DIR / fresh.name
        assert committed.read_text() == fresh.read_text(), f"{committed} is stale: run `python -m proto.generate`"


def test_localai_field_numbers():
    from proto import backend_pb2 as pb

    f = pb.PredictOptions.DESCRIPTOR.fields_by_name
    assert (f["NDraft"].number, f["Metadata"].number, f["MinP"].number, f["ModelIdentity"].number) == (41, 52, 53, 54)
    m = pb.ModelOptions.DESCRIPTOR.fields_by_name
    assert (m["ModelFile"].number, m["DraftModel"].number, m["Options"].number, m["EnableScore"].number) == (21, 39, 62, 75)
    used = {fd.number for fd in pb.ModelOptions.DESCRIPTOR.fields}
    assert not used & {16, 22, 23, 24, 25}
    assert pb.Reply.DESCRIPTOR.fields_by_name["chat_deltas"].number == 8
    assert pb.StatusResponse.State.Value("ERROR") == -1
