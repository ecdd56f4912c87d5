"""A model split across hosts with llama.cpp's RPC backend, on loopback: `apexmtp worker` processes and the backend.

Real parts only: the workers are `apexmtp worker` subprocesses, the backend is `backend/run.sh` over gRPC and
`apexmtp run` over HTTP. A worker is killed for real (SIGKILL) in the middle of a generation: the request must fail
with UNAVAILABLE / 503 naming it, the backend must stay up, and a reload must work once the worker is back.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
from pathlib import Path

import grpc
import pytest
from conftest import BackendProcess, WorkerProcess, endpoints, free_port, smollm2_options, wait_until
from test_api_server import RunProcess

from backend.core.endpoints import is_loopback, parse_endpoints
from backend.core.errors import InvalidRequestError, WorkerUnreachableError
from backend.engine.generation import GenerationRequest, Result
from backend.engine.llama import Engine, EngineConfig
from backend.engine.sampling import SamplingParams
from backend.engine.scheduler import Scheduler, collect
from backend.engine.speculative import SpecConfig
from backend.proto import backend_pb2 as pb
from backend.proto import backend_pb2_grpc as pb_grpc
from backend.rpc import protocol
from backend.rpc.client import parse_tensor_split

MiB = 2**20


@pytest.fixture(scope="module")
def workers():
    """Two workers shared by the tests that leave them running."""
    ws = [WorkerProcess(), WorkerProcess()]
    yield ws
    for w in ws:
        w.stop()


@pytest.fixture
def spare_workers():
    """Two workers of one test's own (it may kill one)."""
    ws = [WorkerProcess(), WorkerProcess()]
    yield ws
    for w in ws:
        w.stop()


def load(path: Path, *, rpc: tuple[str, ...] = (), n_max: int = 0, **kw) -> Scheduler:
    cfg = EngineConfig(n_ctx=512, n_batch=64, n_ubatch=64, n_threads=1, mtp=n_max > 0, n_draft_max=n_max,
                       rpc_servers=rpc, **kw)
    return Scheduler(Engine(path, cfg), SpecConfig(n_max=n_max, adaptive=False))


def generate(s: Scheduler, text: str, n: int = 48) -> Result:
    return collect(s, GenerationRequest(prompt=s.engine.tokenize(text), max_tokens=n, sampling=SamplingParams()))


def device_memory(s: Scheduler) -> dict[str, dict[str, int]]:
    """engine.memory's `device:<name>:<what>` entries as {name: {what: bytes}}."""
    out: dict[str, dict[str, int]] = {}
    for key, n in s.engine.memory.items():
        if key.startswith("device:"):
            name, what = key.removeprefix("device:").rsplit(":", 1)
            out.setdefault(name, {})[what] = n
    return out


# ----------------------------------------------------------------------------------------- pure parts


def test_stand_in_replies_are_well_formed():
    get_tensor = bytes(protocol.HEADER.size) + protocol.U64.pack(12345)
    for cmd in range(protocol.N_COMMANDS):
        payload = get_tensor if cmd == protocol.GET_TENSOR else bytes(64)
        reply, size = protocol.stand_in(cmd, payload), protocol.reply_size(cmd, payload)
        if size is None:
            assert reply == b""
        else:
            assert protocol.U64.unpack_from(reply)[0] == size == len(reply) - 8
    assert protocol.reply_size(protocol.GET_TENSOR, get_tensor) == 12345
    hello = protocol.stand_in(protocol.HELLO, bytes(protocol.CONN_CAPS))[8:]
    assert (hello[0], hello[1]) == (protocol.PROTO_MAJOR, protocol.PROTO_MINOR)
    assert protocol.U64.unpack_from(protocol.stand_in(protocol.BUFFER_GET_BASE, bytes(8)), 8)[0] != 0


def test_endpoint_and_split_parsing():
    assert parse_endpoints(" 10.0.0.2:50052, host-b:1,10.0.0.2:50052 ,") == ("10.0.0.2:50052", "host-b:1")
    assert parse_endpoints("[::1]:50052") == ("::1:50052",)
    for bad in ("host", "host:", ":80", "host:0", "host:65536", "host:http"):
        with pytest.raises(InvalidRequestError, match="HOST:PORT"):
            parse_endpoints(bad)
    assert parse_tensor_split("3,1") == parse_tensor_split("3/1") == (3.0, 1.0)
    for bad in ("a,b", "0,0", "-1,2", ""):
        with pytest.raises(InvalidRequestError, match="tensor_split"):
            parse_tensor_split(bad)
    assert is_loopback("127.0.0.2") and is_loopback("::1") and not is_loopback("0.0.0.0")


# ----------------------------------------------------------------------------------------- the worker


def test_worker_reports_devices_and_caps_memory():
    w = WorkerProcess("--mem", "1.5GiB")
    try:
        info = w.wait_ready()
        assert info.version[0] == protocol.PROTO_MAJOR
        assert info.devices == (protocol.DeviceMemory(3 * 2**29, 3 * 2**29),)
    finally:
        code, err = w.stop()
    assert code == 0 and "apexmtp worker: stopped" in err
    assert "WARNING" not in err  # loopback: no exposure warning


def test_worker_off_loopback_warns_and_stops_on_sigint():
    w = WorkerProcess(host="0.0.0.0", wait=False)
    w.wait_ready()
    w.proc.send_signal(signal.SIGINT)
    code, err = w.exited()
    assert code == 0, err
    assert f"listens on 0.0.0.0:{w.port}" in err and "NO authentication" in err


def test_worker_that_cannot_listen_says_why():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        code, err = WorkerProcess(port=port, wait=False).exited()
    assert code == 1 and f"cannot listen on 127.0.0.1:{port}" in err, err
    code, err = WorkerProcess(host="192.0.2.1", wait=False).exited()  # TEST-NET-1: not an address of this machine
    assert code == 1 and "NO authentication" in err and "cannot listen on 192.0.2.1" in err, err


def test_probe_unreachable_and_busy_workers(workers):
    with pytest.raises(WorkerUnreachableError, match=rf"127\.0\.0\.1:{(port := free_port())}: Connection refused"):
        protocol.probe(f"127.0.0.1:{port}", 1.0)
    # A worker serves one client at a time: while a connection holds it, another client gets no HELLO back.
    with socket.create_connection(("127.0.0.1", workers[0].port)) as holder:
        protocol.call(holder, protocol.HELLO, bytes(protocol.CONN_CAPS))
        with pytest.raises(WorkerUnreachableError, match="another backend"):
            protocol.probe(workers[0].endpoint, 0.5)
    assert protocol.probe(workers[0].endpoint, 2.0).devices


# ----------------------------------------------------------------------------------------- split models


def test_split_smollm2_equals_single_process_and_weights_land_in_workers(smollm2_path, workers):
    text = "The three most useful things to know about the sea are"
    want = generate(load(smollm2_path), text).token_ids
    before = [w.rss for w in workers]
    split = load(smollm2_path, rpc=endpoints(workers))
    try:
        assert generate(split, text).token_ids == want
        grown = [w.rss - b for w, b in zip(workers, before)]
        mem = device_memory(split)
        for w, g in zip(workers, grown):
            on_worker = mem[f"RPC0[{w.endpoint}]"]
            assert on_worker["model"] > 20 * MiB and on_worker["target_kv"] > 0
            assert g > on_worker["model"] * 0.8, (g, on_worker)  # the weights are in the worker's memory
        assert mem["CPU"]["model"] < sum(mem[f"RPC0[{w.endpoint}]"]["model"] for w in workers)  # embeddings only
    finally:
        split.close()


def test_mtp_over_rpc_equals_plain_decoding(synth_model, workers):
    p50 = synth_model("predictable", acceptance=0.5)
    text = "Speculation must never change the output."
    want = generate(load(p50), text, 100).token_ids
    split = load(p50, rpc=endpoints(workers), n_max=3)
    try:
        got = generate(split, text, 100)
        assert got.token_ids == want
        assert got.stats.drafted > 0 and 0 < got.stats.accepted < got.stats.drafted  # drafts over RPC, rollbacks
        last = device_memory(split)[f"RPC0[{workers[-1].endpoint}]"]
        assert last["mtp_kv"] > 0 and last["mtp_compute"] > 0  # the head's layer and its context on a worker
    finally:
        split.close()


def test_tensor_split_overrides_the_memory_split(smollm2_path, workers):
    s = load(smollm2_path, rpc=endpoints(workers), tensor_split=(1.0, 3.0))
    try:
        mem = device_memory(s)
        first, second = (mem[f"RPC0[{w.endpoint}]"]["model"] for w in workers)
        assert second > 2.5 * first  # 3:1 of the layers; the output layer rides on the last device too
    finally:
        s.close()
    with pytest.raises(InvalidRequestError, match="3 parts for 2 devices"):
        load(smollm2_path, rpc=endpoints(workers), tensor_split=(1.0, 1.0, 1.0))


# ----------------------------------------------------------------------------------------- over LocalAI's wire


def _stream_until_killed(b: BackendProcess, victim: WorkerProcess) -> tuple[int, grpc.RpcError]:
    """Stream a long generation, SIGKILL `victim` after a few chunks; returns (chunks seen, the stream's error)."""
    request = pb.PredictOptions(Prompt="Once upon a time", Tokens=4000, IgnoreEOS=True, Temperature=0)
    n = 0
    with pytest.raises(grpc.RpcError) as err:
        for _ in b.stub.PredictStream(request, timeout=120):
            n += 1
            if n == 8:
                victim.kill()
    return n, err.value


def test_lost_worker_fails_the_request_and_the_backend_reloads(smollm2_path, spare_workers):
    b = BackendProcess()
    try:
        options = smollm2_options(smollm2_path, Options=[f"rpc_servers:{','.join(endpoints(spare_workers))}"])
        assert b.stub.LoadModel(options).success
        want = b.stub.Predict(pb.PredictOptions(Prompt="Hello, my name is", Tokens=12, Temperature=0)).message
        status = b.stub.Status(pb.HealthMessage()).memory.breakdown
        assert status["rpc_workers"] == 2 and status["rpc_workers_lost"] == 0
        assert {f"device:RPC0[{w.endpoint}]:model" for w in spare_workers} <= set(status)

        n, err = _stream_until_killed(b, spare_workers[1])
        assert n >= 8 and err.code() == grpc.StatusCode.UNAVAILABLE, err
        assert f"RPC worker {spare_workers[1].endpoint} was lost" in err.details()
        assert dict(err.trailing_metadata())["apexmtp-error"] == "WorkerLostError"
        # The backend is up; later requests fail the same way until the model is loaded again.
        assert b.stub.Health(pb.HealthMessage()).message == b"OK"
        with pytest.raises(grpc.RpcError) as again:
            b.stub.Predict(pb.PredictOptions(Prompt="Hi", Tokens=4))
        assert again.value.code() == grpc.StatusCode.UNAVAILABLE
        assert b.stub.Status(pb.HealthMessage()).memory.breakdown["rpc_workers_lost"] == 1
        # With the worker still down, LoadModel says which one; once it is back, the reload works.
        res = b.stub.LoadModel(options)
        assert not res.success and spare_workers[1].endpoint in res.message
        spare_workers[1] = WorkerProcess(port=spare_workers[1].port)
        assert b.stub.LoadModel(options).success
        assert b.stub.Predict(pb.PredictOptions(Prompt="Hello, my name is", Tokens=12, Temperature=0)).message == want
        assert "Traceback" not in b.stderr()  # a lost worker is an operational fault, logged as one, not a bug
    finally:
        log = b.stderr()
        assert b.stop() == 0, log[-3000:]


def test_unreachable_worker_at_load_and_the_environment_knob(smollm2_path, workers):
    dead = f"127.0.0.1:{free_port()}"
    b = BackendProcess(env={"LLAMACPP_GRPC_SERVERS": ",".join(endpoints(workers))})
    try:
        res = b.stub.LoadModel(smollm2_options(smollm2_path, Options=[f"rpc_servers:{workers[0].endpoint},{dead}"]))
        assert not res.success and f"RPC worker {dead}: Connection refused" in res.message
        res = b.stub.LoadModel(smollm2_options(smollm2_path, Options=["rpc_servers:nowhere"]))
        assert not res.success and "HOST:PORT" in res.message
        assert b.stub.LoadModel(smollm2_options(smollm2_path)).success  # LLAMACPP_GRPC_SERVERS applies
        assert b.stub.Status(pb.HealthMessage()).memory.breakdown["rpc_workers"] == 2
        assert b.stub.Predict(pb.PredictOptions(Prompt="Hi", Tokens=4, Temperature=0)).tokens == 4
    finally:
        assert b.stop() == 0


# ----------------------------------------------------------------------------------------- apexmtp run --rpc


def test_apexmtp_run_rpc_503_on_a_lost_worker_then_switches_back(smollm2_path, spare_workers):
    run = RunProcess(str(smollm2_path), "--rpc", ",".join(endpoints(spare_workers)), "--context", "4096",
                     "--parallel", "1", env={})
    try:
        body = {"model": smollm2_path.stem, "prompt": "Once upon a time", "max_tokens": 3000, "ignore_eos": True,
                "temperature": 0}
        got: list[tuple[int, dict]] = []
        t = threading.Thread(target=lambda: got.append(run.request("POST", "/v1/completions",
                                                                   json.dumps(body).encode(), timeout=120)))
        t.start()
        with grpc.insecure_channel(run.backend()["addr"]) as channel:
            stub = pb_grpc.BackendStub(channel)
            wait_until(lambda: stub.Status(pb.HealthMessage(), timeout=10).memory.breakdown["slots_busy"], 60,
                       message="the completion never reached a slot")
        spare_workers[0].kill()  # mid-request: its 3000 tokens take far longer than this
        t.join(120)
        status, reply = got[0]
        assert status == 503 and "was lost" in reply["error"]["message"], (status, reply)
        assert run.request("GET", "/health")[0] == 200  # apexmtp run and its backend are up
        spare_workers[0] = WorkerProcess(port=spare_workers[0].port)
        status, card = run.request("POST", "/api/switch", json.dumps({"name": str(smollm2_path)}).encode())
        assert status == 200, card
        status, reply = run.request("POST", "/v1/completions", json.dumps({**body, "max_tokens": 4}).encode())
        assert status == 200 and reply["usage"]["completion_tokens"] == 4
    finally:
        run.stop()
