"""Vision end to end on the synthetic VLM (a tiny qwen35moe with an MTP head + a qwen3vl_merger projector):
image chat through `apexmtp run` with the official `openai` client, `PredictOptions.Images` over LocalAI's gRPC,
MTP on == MTP off with an image in the prompt, refused inputs (the server stays up), and the projector's
lifecycle (freed with the model).
"""

from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path

import grpc
import openai
import pytest
from conftest import BackendProcess
from PIL import Image as PILImage
from synth_models import synth_model, tiny_mmproj_gguf  # noqa: F401 (fixtures)
from test_api_server import RunProcess

from backend.core.errors import InvalidRequestError
from backend.engine.generation import GenerationRequest
from backend.engine.llama import Engine, EngineConfig
from backend.engine.llamalog import LIVE
from backend.engine.sampling import SamplingParams
from backend.engine.scheduler import Scheduler, collect
from backend.engine.speculative import SpecConfig
from backend.engine.vision import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, check_image
from backend.proto import backend_pb2 as pb

MARKER = "<__media__>"


def png(width: int = 96, height: int = 64, seed: int = 0) -> bytes:
    img = PILImage.effect_noise((width, height), 40 + seed).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` pixels (a decompression bomb's shape)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def vlm(synth_model) -> Path:  # noqa: F811
    """Predictable weights: greedy ties cannot happen, so MTP on/off must agree token for token."""
    return synth_model("predictable", acceptance=1.0)


def ask(image_url: str | None, text: str = "Describe this") -> list[dict]:
    parts = [{"type": "text", "text": text}]
    if image_url is not None:
        parts.append({"type": "image_url", "image_url": {"url": image_url}})
    return [{"role": "user", "content": parts}]


# ------------------------------------------------------------------------------------ apexmtp run (HTTP)


@pytest.fixture(scope="module")
def run_vlm(vlm, tiny_mmproj_gguf, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("vision-run")
    server = RunProcess(str(vlm), "--mmproj", str(tiny_mmproj_gguf), "--context", "1024", "--parallel", "2",
                        env={"APEXMTP_MODELS_DIR": str(root / "models"), "APEXMTP_CACHE_DIR": str(root / "cache")})
    server.model = server.client().models.list().data[0].id
    yield server
    server.stop()


def test_image_chat_counts_the_image_tokens(run_vlm):
    client = run_vlm.client()
    with_image = client.chat.completions.create(model=run_vlm.model, messages=ask(data_url(png())), temperature=0,
                                                max_tokens=8)
    text_only = client.chat.completions.create(model=run_vlm.model, messages=ask(None), temperature=0, max_tokens=8)
    assert with_image.choices[0].message.content
    # 96x64 px -> a 4x2 grid of merged patches at least (plus the projector's begin/end text)
    assert with_image.usage.prompt_tokens >= text_only.usage.prompt_tokens + 8
    chunks = list(client.chat.completions.create(model=run_vlm.model, messages=ask(data_url(png())), temperature=0,
                                                 max_tokens=8, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        with_image.choices[0].message.content


@pytest.mark.parametrize("url, needle", [
    ("https://example.com/cat.png", "not fetched"),
    ("data:image/png;base64,@@@not-base64@@@", "base64"),
    (data_url(b"\x89PNG\r\n\x1a\n" + b"\0" * 64), "cannot be decoded"),
    (data_url(b"GIF89a-but-not-really"), "cannot be decoded"),
    (data_url(b"plain text, no image"), "not a PNG, JPEG"),
])
def test_bad_images_are_400_and_the_server_stays_up(run_vlm, url, needle):
    client = run_vlm.client()
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=run_vlm.model, messages=ask(url), max_tokens=4)
    assert needle in str(err.value)
    ok = client.chat.completions.create(model=run_vlm.model, messages=ask(data_url(png())), temperature=0, max_tokens=2)
    assert ok.choices[0].finish_reason in ("stop", "length")


# ----------------------------------------------------------------------------------- LocalAI gRPC


def load(backend: BackendProcess, model: Path, mmproj: Path | None, *options: str, limit: int = 0) -> None:
    fields = dict(Model=model.name, ModelPath=str(model.parent), ContextSize=1024, Threads=2, NGPULayers=0,
                  MMap=True, Options=list(options), LimitImagePerPrompt=limit)
    if mmproj is not None:  # relative to ModelPath, as LocalAI may send it
        fields["MMProj"] = str(Path("..") / mmproj.parent.name / mmproj.name)
    res = backend.stub.LoadModel(pb.ModelOptions(**fields))
    assert res.success, res.message


def predict(backend: BackendProcess, *images: bytes, markers: int | None = None) -> pb.Reply:
    n = len(images) if markers is None else markers
    prompt = "<|im_start|>user\nLook: " + " and ".join([MARKER] * n) + " now<|im_end|>\n<|im_start|>assistant\n"
    return backend.stub.Predict(pb.PredictOptions(
        Prompt=prompt, Images=[base64.b64encode(i).decode() for i in images], Tokens=24, Temperature=0, TopK=1))


@pytest.fixture(scope="module")
def grpc_backend():
    b = BackendProcess()
    yield b
    b.stop()


def test_grpc_images_mtp_on_equals_off_and_projector_freed(grpc_backend, vlm, tiny_mmproj_gguf):  # noqa: F811
    load(grpc_backend, vlm, tiny_mmproj_gguf)
    meta = grpc_backend.stub.ModelMetadata(pb.ModelOptions())
    assert meta.media_marker == MARKER
    status = grpc_backend.stub.Status(pb.HealthMessage())
    assert status.memory.breakdown["live_mtmd"] == 1 and status.memory.breakdown["mmproj"] > 0
    on = predict(grpc_backend, png(), png(64, 64, seed=1))
    assert on.tokens == 24 and on.draft_n > 0 and on.draft_n_accepted > 0  # the head drafts after the images
    load(grpc_backend, vlm, tiny_mmproj_gguf, "spec_type:none")
    off = predict(grpc_backend, png(), png(64, 64, seed=1))
    assert off.draft_n == 0
    assert off.message == on.message and off.prompt_tokens == on.prompt_tokens
    grpc_backend.stub.Free(pb.HealthMessage())
    live = grpc_backend.stub.Status(pb.HealthMessage()).memory.breakdown
    assert live["live_mtmd"] == 0 and live["live_model"] == 0 and live["live_context"] == 0


def test_grpc_refusals(grpc_backend, vlm, tiny_mmproj_gguf):  # noqa: F811
    load(grpc_backend, vlm, None)
    with pytest.raises(grpc.RpcError) as err:
        predict(grpc_backend, png())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no vision projector (mmproj)" in err.value.details()
    load(grpc_backend, vlm, tiny_mmproj_gguf, limit=1)
    for images, markers, needle in [((png(), png()), None, "at most 1"), ((b"not an image",), None, "not a PNG"),
                                    ((png(),), 2, "marker")]:
        with pytest.raises(grpc.RpcError) as err:
            predict(grpc_backend, *images, markers=markers)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details()
    bad = grpc_backend.stub.Predict
    with pytest.raises(grpc.RpcError) as err:
        bad(pb.PredictOptions(Prompt=f"x {MARKER} y", Images=["%%%"], Tokens=2))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "base64" in err.value.details()
    assert predict(grpc_backend, png()).tokens == 24  # still serving
    missing = grpc_backend.stub.LoadModel(pb.ModelOptions(Model=vlm.name, ModelPath=str(vlm.parent),
                                                          ContextSize=512, MMProj="nope.gguf"))
    assert not missing.success and "nope.gguf" in missing.message
    not_proj = grpc_backend.stub.LoadModel(pb.ModelOptions(Model=vlm.name, ModelPath=str(vlm.parent),
                                                           ContextSize=512, MMProj=vlm.name))
    assert not not_proj.success and "not a vision projector" in not_proj.message


# ------------------------------------------------------------------------------------- in process


def test_check_image_limits():
    with pytest.raises(InvalidRequestError, match="limit"):
        check_image(b"\x89PNG\r\n\x1a\n" + b"\0" * MAX_IMAGE_BYTES)
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 1
    with pytest.raises(InvalidRequestError, match="pixels"):
        check_image(huge_png_header(side, side))
    with pytest.raises(InvalidRequestError, match="empty"):
        check_image(b"")
    check_image(png())


def test_prefix_cache_never_reuses_across_images(vlm, tiny_mmproj_gguf):  # noqa: F811
    engine = Engine(vlm, EngineConfig(n_ctx=512, n_seq=1, mmproj=str(tiny_mmproj_gguf)))
    scheduler = Scheduler(engine, SpecConfig(n_max=0))
    try:
        text = f"<|im_start|>user\nA {MARKER} B<|im_end|>\n<|im_start|>assistant\n"
        first, images = engine.projector.prompt(text, [png()], add_special=False)
        collect(scheduler, GenerationRequest(prompt=first, images=images, max_tokens=1,
                                             sampling=SamplingParams(temperature=0)))
        second, _ = engine.projector.prompt(text, [png(seed=3)], add_special=False)
        start = next(i for i, t in enumerate(second) if t < 0)
        assert first[:start] == second[:start] and first[start] != second[start]
        assert engine.keep_prefix(0, second) <= start
        assert engine.seqs[0].tokens == first[:len(engine.seqs[0].tokens)]
    finally:
        scheduler.close()
    assert LIVE["mtmd"] == 0


# ------------------------------------------------------------------------------ pull (against the fake hub)


def test_pull_fetches_and_verifies_the_projector(tmp_path, tiny_mmproj_gguf):  # noqa: F811
    import hashlib
    import shutil

    import yaml
    from fakehub import FakeHub
    from test_gallery_pull import CPU_16G, REPO, TINY_ARCH, _entry

    from backend.core.errors import ChecksumMismatchError
    from backend.synth.qwen35moe import PRESETS, write_model
    from gallery.catalog import DATA_DIR, reload_catalog
    from gallery.pull import pull

    model = write_model(tmp_path / "src" / "Tiny-APEX-MTP-I-Quality.gguf", PRESETS["tiny"], dtype="f16")
    proj = tiny_mmproj_gguf.read_bytes()
    entry = _entry("tiny-vl", "I-Quality", model)
    local = f"llama-cpp/mmproj/{REPO}/mmproj-F16.gguf"
    entry["overrides"].update(mmproj=local, known_usecases=["chat", "vision"])
    entry["apexmtp"]["family"] = "tiny-vl"
    entry["files"].append({"filename": local, "uri": f"huggingface://{REPO}/mmproj-F16.gguf",
                           "sha256": hashlib.sha256(proj).hexdigest()})
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    shutil.copy(DATA_DIR / "hardware.yaml", gallery / "hardware.yaml")
    (gallery / "architectures.yaml").write_text(yaml.safe_dump({"architectures": {"synthetic-tiny": TINY_ARCH}}))
    (gallery / "index.yaml").write_text(yaml.safe_dump([entry], sort_keys=False))
    catalog = reload_catalog(gallery)
    files = {"Tiny-APEX-MTP-I-Quality.gguf": model.read_bytes(), "mmproj-F16.gguf": proj}
    with FakeHub({REPO: files}) as hub, pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_ENDPOINT", hub.url)
        pulled = pull("tiny-vl", models_dir=tmp_path / "models", profile=CPU_16G, progress=False, catalog=catalog)
        config = yaml.safe_load(pulled.config_path.read_text())
        assert config["mmproj"] == local and "vision" in config["known_usecases"]
        assert (tmp_path / "models" / local).read_bytes() == proj
        hub.serve_instead["mmproj-F16.gguf"] = proj[:-1] + bytes([proj[-1] ^ 1])
        with pytest.raises(ChecksumMismatchError):
            pull("tiny-vl", models_dir=tmp_path / "other", profile=CPU_16G, progress=False, catalog=catalog)


def test_image_positions_reach_the_mtp_context(vlm, tiny_mmproj_gguf):  # noqa: F811
    """After an image and the text behind it, the MTP context holds the same positions as the target."""
    import llama_cpp.llama_cpp as L

    engine = Engine(vlm, EngineConfig(n_ctx=512, n_seq=1, mtp=True, n_draft_max=3, mmproj=str(tiny_mmproj_gguf)))
    try:
        prompt, images = engine.projector.prompt(f"A {MARKER} B", [png()], add_special=False)
        start = prompt.index(images[0].key)
        engine.decode_tokens(prompt[:start], logits="none")
        engine.decode_image(0, images[0])
        engine.decode_tokens(prompt[start + images[0].n_pos:], logits="last")
        engine.flush_mirror([0])
        spans = [(L.llama_memory_seq_pos_min(L.llama_get_memory(ctx), 0),
                  L.llama_memory_seq_pos_max(L.llama_get_memory(ctx), 0)) for ctx in (engine.ctx, engine._dctx)]
        # the target is hybrid (its recurrent half reports only the last position); the MTP context is plain KV
        assert spans[0][1] == spans[1][1] == len(prompt) - 1 and spans[1][0] == 0
        assert not engine.seqs[0].mirror
    finally:
        engine.close()


def test_image_to_a_model_without_projector_is_400_over_http(tmp_path):
    server = RunProcess("--context", "1024", "--parallel", "1",
                        env={"APEXMTP_MODELS_DIR": str(tmp_path / "models"), "APEXMTP_CACHE_DIR": str(tmp_path / "c")})
    try:
        client = server.client()
        model = client.models.list().data[0].id
        with pytest.raises(openai.BadRequestError, match=r"no vision projector \(mmproj\)") as err:
            client.chat.completions.create(model=model, messages=ask(data_url(png())), max_tokens=2)
        assert err.value.body["param"] == "messages"
        assert client.chat.completions.create(model=model, messages=ask(None), max_tokens=2).choices
    finally:
        server.stop()
