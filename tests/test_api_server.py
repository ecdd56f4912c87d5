"""`apexmtp run` as a user runs it (a subprocess on 127.0.0.1), driven with the official `openai` client.

Two servers per module: the offline demo (SmolLM2 on real llama.cpp, embeddings on) and `demo-mtp` (the synthetic
qwen35moe with an MTP head), each started once. Generations are short and greedy so outputs can be compared.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import openai
import pytest
from conftest import ROOT, free_port, wait_until
from synth_models import write_qwen3

from backend.core.process import stop_process
from backend.proto import backend_pb2 as pb
from backend.proto import backend_pb2_grpc as pb_grpc

GREEDY = {"temperature": 0, "max_tokens": 16}
HELLO = [{"role": "user", "content": "Write one sentence about the sea."}]


class RunProcess:
    """`apexmtp run ARGS --port P` as a subprocess, ready once /health answers 200."""

    def __init__(self, *args: str, env: dict[str, str], timeout: float = 120.0) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        cmd = [sys.executable, "-m", "backend.cli", "run", *args, "--port", str(self.port), "--threads", "1"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=self.log,
                                     stderr=subprocess.STDOUT)

        def healthy() -> bool:
            assert self.proc.poll() is None, f"apexmtp run exited {self.proc.returncode}:\n{self.output()}"
            return self.request("GET", "/health")[0] == 200

        try:
            wait_until(healthy, timeout, 0.2)
        except TimeoutError:
            raise TimeoutError(f"apexmtp run did not become healthy:\n{self.output()}") from None

    def request(self, method: str, path: str, body: bytes | None = None, timeout: float = 60,
                headers: dict[str, str] | None = None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            sent = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, body, {**sent, **(headers or {})})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read() or b"{}")
        except OSError:
            return 0, {}
        finally:
            conn.close()

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key="unused", max_retries=0, **kw)

    def backend(self) -> dict:
        return self.request("GET", "/health")[1]["backend"]

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode("utf-8", "replace")

    def stop(self) -> int:
        code = stop_process(self.proc, 30)
        self.log.close()
        return code


@pytest.fixture(scope="module")
def run_env(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("apexmtp-run")
    return {"APEXMTP_MODELS_DIR": str(root / "models"), "APEXMTP_CACHE_DIR": str(root / "cache")}


@pytest.fixture(scope="module")
def smol(run_env):
    server = RunProcess("--context", "1024", "--embeddings", env=run_env)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mtp(run_env):
    server = RunProcess("demo-mtp", "--context", "512", env=run_env)
    yield server
    server.stop()


def backend_state(addr: str) -> int:
    with grpc.insecure_channel(addr) as channel:
        return pb_grpc.BackendStub(channel).Status(pb.HealthMessage(), timeout=5).state


def last_generated(addr: str) -> int:
    """Tokens the backend's most recent generation produced (GetMetrics)."""
    with grpc.insecure_channel(addr) as channel:
        return pb_grpc.BackendStub(channel).GetMetrics(pb.MetricsRequest(), timeout=5).tokens_generated


# ------------------------------------------------------------------------------------------ basics


def test_health_and_models(smol):
    status, body = smol.request("GET", "/health")
    assert status == 200 and body["status"] == "ok"
    client = smol.client()
    ids = [m.id for m in client.models.list()]
    assert ids == [body["model"]]
    assert client.models.retrieve(ids[0]).id == ids[0]


def test_chat_non_stream(smol):
    r = smol.client().chat.completions.create(model="demo", messages=HELLO, **GREEDY)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert r.usage.completion_tokens == 16 and r.usage.prompt_tokens > 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    t = r.model_extra["timings"]
    assert t["predicted_n"] == 16 and t["prompt_n"] + t["cache_n"] == r.usage.prompt_tokens
    assert r.usage.prompt_tokens_details.cached_tokens == t["cache_n"]
    assert t["predicted_ms"] > 0 and t["predicted_per_second"] > 0 and t["prompt_per_second"] > 0
    assert t["draft_n"] == 0 and t["draft_n_accepted"] == 0


def test_chat_stream_equals_non_stream(smol):
    client = smol.client()
    whole = client.chat.completions.create(model="demo", messages=HELLO, **GREEDY).choices[0].message.content
    chunks = list(client.chat.completions.create(model="demo", messages=HELLO, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "length"
    assert finish[0].model_extra["timings"]["predicted_n"] == 16
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert len({c.id for c in chunks}) == 1


def test_seed_and_stop(smol):
    client = smol.client()
    kw = {"model": "demo", "messages": HELLO, "temperature": 1.0, "max_tokens": 12, "seed": 1234}
    a, b = (client.chat.completions.create(**kw).choices[0].message.content for _ in range(2))
    assert a == b
    full = client.chat.completions.create(model="demo", messages=HELLO, **GREEDY).choices[0].message.content
    stop = full.split()[2]
    r = client.chat.completions.create(model="demo", messages=HELLO, stop=[stop], **GREEDY)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == full[: full.index(stop)]


def test_chat_logprobs(smol):
    r = smol.client().chat.completions.create(model="demo", messages=HELLO, logprobs=True, top_logprobs=3,
                                              **GREEDY)
    items = r.choices[0].logprobs.content
    assert len(items) == 16
    for item in items:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob >= item.logprob - 1e-6  # greedy picks the most likely token


def test_completions_stream_and_legacy_logprobs(smol):
    client = smol.client()
    kw = {"model": "demo", "prompt": "The capital of France is", "temperature": 0, "max_tokens": 8}
    r = client.completions.create(logprobs=2, **kw)
    choice = r.choices[0]
    assert choice.text and r.object == "text_completion" and r.usage.completion_tokens == 8
    assert len(choice.logprobs.tokens) == 8 and all(len(t) <= 2 for t in choice.logprobs.top_logprobs)
    assert "".join(choice.logprobs.tokens) == choice.text
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
    assert streamed == choice.text


def test_embeddings(smol):
    client = smol.client()
    default = client.embeddings.create(model="demo", input=["the cat sat", "on the mat"])  # base64 on the wire
    floats = client.embeddings.create(model="demo", input="the cat sat", encoding_format="float")
    assert len(default.data) == 2 and len(default.data[0].embedding) == 576
    assert default.data[0].embedding == pytest.approx(floats.data[0].embedding, rel=1e-6)
    assert default.usage.prompt_tokens > 0


def test_rerank_over_http(run_env, tmp_path, smol):
    """LocalAI's /v1/rerank (Jina's shape) on a reranker served with --reranking: every document scored, best
    first, cut to top_n, documents as strings or {"text": ...}; bad bodies name their field; a model served
    without reranking refuses with a clear error."""
    model = write_qwen3(tmp_path / "rerank.gguf", rank_head=True)
    server = RunProcess(str(model), "--reranking", "--context", "256", "--parallel", "1", env=run_env)
    try:
        docs = ["the cat sat on the mat", "stock prices fell", "a kitten on a rug", "rain in spain"]
        status, body = server.request("POST", "/v1/rerank", json.dumps({"query": "where is the cat",
                                                                         "documents": docs}).encode())
        assert status == 200, body
        results = body["results"]
        assert sorted(r["index"] for r in results) == [0, 1, 2, 3]
        scores = [r["relevance_score"] for r in results]
        assert scores == sorted(scores, reverse=True) and all(0.0 < x < 1.0 for x in scores)
        assert [r["document"]["text"] for r in results] == [docs[r["index"]] for r in results]
        assert body["usage"]["total_tokens"] > 0
        status, top = server.request("POST", "/rerank", json.dumps({
            "query": "where is the cat", "documents": [{"text": d} for d in docs], "top_n": 2}).encode())
        assert status == 200 and top["results"] == results[:2]
        for bad, param in (({"documents": docs}, "query"), ({"query": "q", "documents": []}, "documents"),
                           ({"query": "q", "documents": ["a", 3]}, "documents[1]"),
                           ({"query": "q", "documents": docs, "top_n": -1}, "top_n")):
            status, err = server.request("POST", "/v1/rerank", json.dumps(bad).encode())
            assert status == 400 and err["error"]["param"] == param, err
        assert server.request("GET", "/health")[0] == 200
    finally:
        server.stop()
    status, err = smol.request("POST", "/v1/rerank", json.dumps({"query": "q", "documents": ["a"]}).encode())
    assert status == 503 and "Reranking" in err["error"]["message"], err


def test_tools_are_passed_through(smol):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    # A grammar makes the tiny model emit a Qwen/Hermes tool call; the backend parses it into tool_calls.
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    grammar = "root ::= " + json.dumps(call)
    r = smol.client().chat.completions.create(model="demo", messages=HELLO, tools=tools, temperature=0,
                                              max_tokens=64, extra_body={"grammar": grammar})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (tc,) = choice.message.tool_calls
    assert tc.type == "function" and tc.function.name == "get_weather"
    assert json.loads(tc.function.arguments) == {"city": "Paris"}


# ------------------------------------------------------------------------------------------ errors


def test_error_statuses(smol):
    client = smol.client()
    status, body = smol.request("POST", "/v1/chat/completions", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    assert smol.request("POST", "/v1/chat/completions", b"[]")[0] == 400
    assert smol.request("GET", "/v1/nope")[0] == 404
    assert smol.request("GET", "/v1/chat/completions")[0] == 405
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="demo", messages=HELLO, max_tokens=0)
    assert err.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="demo", messages=[])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="demo", messages=HELLO, extra_body={"top_k": -1})
    long = [{"role": "user", "content": "tell me about the sea " * 400}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="demo", messages=long, max_tokens=4)
    assert err.value.body["code"] == "context_length_exceeded" and "context window" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="demo", prompt="x " * 2000, max_tokens=4, stream=True)
    assert err.value.body["code"] == "context_length_exceeded"


def test_api_keys(run_env):
    # Keys from repeated flags, a comma list and APEXMTP_API_KEY all count; /health stays open for probes.
    keyed = RunProcess("--context", "256", "--parallel", "1", "--api-key", "k1,k2", "--api-key", "k3",
                       env={**run_env, "APEXMTP_API_KEY": "k4"})
    try:
        assert keyed.request("GET", "/health")[0] == 200
        status, body = keyed.request("GET", "/v1/models")
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert keyed.request("GET", "/v1/models", headers={"Authorization": "Bearer nope"})[0] == 401
        for key in ("k1", "k3", "k4"):
            assert keyed.request("GET", "/v1/models", headers={"Authorization": f"Bearer {key}"})[0] == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{keyed.base}/v1", api_key="nope", max_retries=0).models.list()
        r = openai.OpenAI(base_url=f"{keyed.base}/v1", api_key="k2", max_retries=0).chat.completions.create(
            model="demo", messages=HELLO, temperature=0, max_tokens=4)
        assert r.usage.completion_tokens == 4
        cmd = [sys.executable, "-m", "backend.cli", "chat", "--url", keyed.base, "--max-tokens", "4"]
        done = subprocess.run(cmd, check=False, cwd=ROOT, input="hi\n", capture_output=True, text=True, timeout=60,
                              env={**os.environ, "APEXMTP_API_KEY": "k3"})
        assert done.returncode == 0 and "4 tokens" in done.stdout, done.stderr
        done = subprocess.run([*cmd, "--api-key", "nope"], check=False, cwd=ROOT, input="hi\n", capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 1 and "HTTP 401" in done.stderr
        assert "without an API key" not in keyed.output()  # loopback: no warning either way
    finally:
        keyed.stop()


def test_cli_errors_exit_nonzero(run_env, tmp_path):
    cmd = [sys.executable, "-m", "backend.cli", "run", str(tmp_path / "missing.gguf"), "--port", "0"]
    done = subprocess.run(cmd, check=False, cwd=ROOT, env={**os.environ, **run_env}, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1 and "missing.gguf" in done.stderr


def test_option_flags_reach_the_backend(run_env):
    """`--option KEY:VALUE` goes to LoadModel as a LocalAI YAML's `options:` entry: a bad value is the backend's own
    error, naming the option; a malformed flag is a usage error."""
    cmd = [sys.executable, "-m", "backend.cli", "run", "--port", "0", "--quiet", "--threads", "1"]
    done = subprocess.run([*cmd, "--option", "spec_type:bogus"], check=False, cwd=ROOT, env={**os.environ, **run_env},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "option spec_type: unknown speculative type(s) 'bogus'" in done.stderr
    done = subprocess.run([*cmd, "--option", ":true"], check=False, cwd=ROOT, env={**os.environ, **run_env},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "expected KEY or KEY:VALUE" in done.stderr


# ------------------------------------------------------------------------------------------ concurrency


def test_four_concurrent_clients(smol):
    client = smol.client()
    prompts = [[{"role": "user", "content": f"Name a colour number {i}."}] for i in range(4)]

    def ask(i: int) -> str:
        if i % 2:
            r = client.chat.completions.create(model="demo", messages=prompts[i], **GREEDY)
            return r.choices[0].message.content
        stream = client.chat.completions.create(model="demo", messages=prompts[i], stream=True, **GREEDY)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    alone = [ask(i) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(ask, range(4)))
    assert together == alone and all(together)


def test_client_disconnect_frees_backend(smol):
    addr = smol.backend()["addr"]
    t0 = time.monotonic()
    smol.client().chat.completions.create(model="demo", messages=HELLO, **GREEDY)
    baseline = time.monotonic() - t0  # a 16-token answer on an idle backend, on this machine, now
    body = json.dumps({"messages": HELLO, "stream": True, "max_tokens": 900, "ignore_eos": True, "temperature": 0})
    conn = http.client.HTTPConnection("127.0.0.1", smol.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    for _ in range(4):  # a few events: generation is under way
        assert resp.fp.readline().startswith(b"data: ")
        resp.fp.readline()
    assert backend_state(addr) == pb.StatusResponse.BUSY
    resp.close()  # the response holds the socket open: close both
    conn.close()
    # A cancelled generation stops within a token or two: fewer than the 900 asked for says it was cancelled.
    wait_until(lambda: backend_state(addr) == pb.StatusResponse.READY, 60, message="the backend kept generating")
    assert last_generated(addr) < 900
    with pytest.raises(openai.APITimeoutError):  # a non-streamed request whose client gives up: the same
        smol.client(timeout=1.0).chat.completions.create(model="demo", messages=HELLO, max_tokens=900,
                                                         extra_body={"ignore_eos": True})
    wait_until(lambda: backend_state(addr) == pb.StatusResponse.READY, 60, message="the backend kept generating")
    assert last_generated(addr) < 900
    t0 = time.monotonic()
    r = smol.client().chat.completions.create(model="demo", messages=HELLO, **GREEDY)
    # Nothing is left running ahead of it: it takes about what it took before (900 tokens would take ~50 times that).
    assert r.usage.completion_tokens == 16 and time.monotonic() - t0 < 5 * baseline + 5


# ------------------------------------------------------------------------------------------ demo-mtp


def test_demo_mtp_shows_speculation(mtp):
    client = mtp.client()
    r = client.chat.completions.create(model="demo-mtp", messages=HELLO, temperature=0, max_tokens=64)
    t = r.model_extra["timings"]
    assert t["predicted_n"] == 64 and 0 < t["draft_n_accepted"] <= t["draft_n"]
    assert t["draft_n_accepted"] / t["draft_n"] > 0.6  # the demo's head is built for ~90%
    chunks = list(client.chat.completions.create(model="demo-mtp", messages=HELLO, temperature=0, max_tokens=64,
                                                 stream=True))
    final = next(c for c in chunks if c.choices and c.choices[0].finish_reason).model_extra["timings"]
    assert final["draft_n"] == t["draft_n"] and final["draft_n_accepted"] == t["draft_n_accepted"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content


def test_chat_cli_over_running_server(mtp):
    cmd = [sys.executable, "-m", "backend.cli", "chat", "--url", mtp.base, "--max-tokens", "24", "--temperature", "0"]
    done = subprocess.run(cmd, check=False, cwd=ROOT, input="hello\n/reset\nagain\n", capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "chatting with demo-mtp" in done.stdout
    assert done.stdout.count("24 tokens") == 2 and "drafts accepted" in done.stdout
    assert "conversation cleared" in done.stdout


def test_chat_cli_starts_its_own_server(run_env):
    cmd = [sys.executable, "-m", "backend.cli", "chat", "demo-mtp", "--context", "256", "--threads", "1",
           "--max-tokens", "8", "--temperature", "0"]
    done = subprocess.run(cmd, check=False, cwd=ROOT, env={**os.environ, **run_env}, input="hi\n", capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "8 tokens" in done.stdout and "drafts accepted" in done.stdout


def test_dead_backend_is_reported(mtp):
    pid = mtp.backend()["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not Path(f"/proc/{pid}").exists() or "zombie" in _proc_state(pid), 30, 0.05,
               message="the backend outlived SIGKILL")
    t0 = time.monotonic()
    with pytest.raises(openai.InternalServerError) as err:
        mtp.client(timeout=60).chat.completions.create(model="demo-mtp", messages=HELLO, max_tokens=4)
    assert err.value.status_code == 503 and "backend exited" in err.value.message
    assert time.monotonic() - t0 < 30  # answered at once, not after the client's 60 s
    assert mtp.request("GET", "/health")[0] == 503
    assert "the backend exited with code" in mtp.output()
    assert mtp.stop() == 0


def test_sigterm_stops_server_and_backend(smol):
    pid = smol.backend()["pid"]
    body = json.dumps({"messages": HELLO, "max_tokens": 900, "ignore_eos": True, "stream": True})

    streaming = threading.Event()

    def stream() -> None:  # a request in flight must not hold up the shutdown
        conn = http.client.HTTPConnection("127.0.0.1", smol.port, timeout=60)
        try:
            conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()  # the stream's headers: its first Reply has come
            streaming.set()
            resp.read()
        except OSError:
            pass

    threading.Thread(target=stream, daemon=True).start()
    assert streaming.wait(60), "the stream never started"
    smol.proc.send_signal(signal.SIGTERM)
    assert smol.proc.wait(30) == 0
    wait_until(lambda: not Path(f"/proc/{pid}").exists() or "zombie" in _proc_state(pid), 30, 0.1,
               message="the backend outlived apexmtp run")


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"
