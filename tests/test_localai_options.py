"""LocalAI's llama-cpp option vocabulary: every name honoured, warned about or refused, never silently dropped.

The vocabulary is data (backend/service/localai_options.yaml); the README table is written from it. Over real gRPC
a model YAML as LocalAI's importer writes it for an MTP GGUF loads with each option honoured or named in a warning,
each refusal is a clear LoadModel failure after which the backend still serves, and the typed fields (RoPE/YaRN,
GGUF metadata Overrides, LoRA adapters, Reranking) reach llama.cpp.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import llama_cpp.llama_cpp as L
import numpy as np
import pytest
import yaml
from conftest import ROOT, BackendProcess, smollm2_options
from synth_models import write_qwen3

from backend.core.errors import InvalidOptionError, InvalidRequestError, ModelNotFoundError
from backend.core.gguf_file import read_gguf
from backend.engine.llama import Engine, EngineConfig, normalize
from backend.engine.llamalog import LLAMA_LOG
from backend.proto import backend_pb2 as pb
from backend.service.options import (
    README_MARKERS,
    parse_kv_override,
    parse_options,
    plan_load,
    vocabulary,
    vocabulary_table,
)

# Every option name LocalAI's llama-cpp backend reads (mudler/LocalAI backend/cpp/llama-cpp/grpc-server.cpp,
# params_parse), as of the project's reference notes on prompt caches and options (§2).
LOCALAI_NAMES = """
context_shift use_jinja jinja cache_ram parallel n_parallel grpc_servers rpc_servers fit_params fit fit_params_target
fit_target fit_params_min_ctx fit_ctx n_cache_reuse cache_reuse n_rs_seq rs_seq slot_prompt_similarity sps swa_full
cont_batching continuous_batching check_tensors warmup no_op_offload device devices split_mode sm kv_unified
unified_kv n_ctx_checkpoints ctx_checkpoints cache_idle_slots idle_slots_cache checkpoint_min_step
checkpoint_min_spacing checkpoint_every_nt checkpoint_every_n_tokens n_ubatch ubatch threads_batch n_threads_batch
pooling_type pooling verbosity direct_io use_direct_io embd_normalize embedding_normalize reasoning_format
enable_reasoning reasoning_budget prefill_assistant mmproj_use_gpu mmproj_offload image_min_tokens image_max_tokens
override_tensor tensor_buft_overrides spec_type speculative_type spec_n_max draft_max spec_n_min draft_min spec_p_min
draft_p_min spec_p_split spec_ngram_size_n ngram_size_n spec_ngram_size_m ngram_size_m spec_ngram_min_hits
ngram_min_hits draft_gpu_layers draft_ctx_size spec_ngram_mod_n_min spec_ngram_mod_n_max spec_ngram_mod_n_match
spec_ngram_map_k_size_n spec_ngram_map_k_size_m spec_ngram_map_k_min_hits spec_ngram_map_k4v_size_n
spec_ngram_map_k4v_size_m spec_ngram_map_k4v_min_hits spec_lookup_cache_static lookup_cache_static
spec_lookup_cache_dynamic lookup_cache_dynamic draft_cache_type_k spec_draft_cache_type_k draft_cache_type_v
spec_draft_cache_type_v draft_threads spec_draft_threads draft_threads_batch spec_draft_threads_batch draft_cpu_moe
spec_draft_cpu_moe draft_n_cpu_moe spec_draft_n_cpu_moe cpu_moe n_cpu_moe draft_override_tensor
spec_draft_override_tensor
""".split()
LOCALAI_FIELDS = ("DraftModel MainGPU LoraAdapter LoraBase LoraScale LoraAdapters LoraScales RopeScaling RopeFreqBase "
                  "RopeFreqScale YarnExtFactor YarnAttnFactor YarnBetaFast YarnBetaSlow NoKVOffload Reranking Overrides "
                  "TensorSplit MMProj").split()

# A model YAML as LocalAI's llama-cpp importer writes it for an MTP GGUF (use_jinja, then core/config/mtp.go's
# auto-MTP options), with the llama-cpp options a user adds most.
LOCALAI_YAML = """
name: qwen-mtp
backend: apexmtp
context_size: 1024
options:
  - use_jinja:true
  - spec_type:draft-mtp
  - spec_n_max:6
  - spec_p_min:0.75
  - parallel:2
  - 'grpc_servers:'  # yaml.v2 quotes a string ending in a colon
  - cache_ram:1024
  - ctx_checkpoints:8
  - checkpoint_min_step:0
  - cache_idle_slots:true
  - kv_unified:true
  - jinja:true
  - context_shift:false
  - swa_full:false
  - threads_batch:2
  - warmup:false
  - check_tensors:false
  - no_op_offload:false
  - n_ubatch:64
  - fit_params:false
  - cont_batching:true
  - n_cache_reuse:256
  - n_rs_seq:4
  - spec_p_split:0.1
  - draft_gpu_layers:99
  - fit_target:2048
  - spec_draft_n_max:6
  - reasoning_format:auto
  - reasoning_budget:-1
  - embd_normalize:2
  - --no-mmap
"""
# Each accepted-but-not-honoured entry above, and what the backend log must say about it.
WARNED = ("n_cache_reuse:256", "n_rs_seq:4", "spec_p_split:0.1", "--no-mmap")


# ------------------------------------------------------------------------------------------- the vocabulary


def test_readme_table_is_the_vocabulary_and_lists_every_name():
    text = (ROOT / "README.md").read_text()
    start, end = (text.index(m) for m in README_MARKERS)
    section = text[start + len(README_MARKERS[0]) + 1:end]
    assert section == vocabulary_table(), "README is stale: run `python -m backend.service.options`"
    vocab = vocabulary()
    for name in [n for spec in vocab.options for n in spec.names] + [f.name for f in vocab.fields]:
        assert f"`{name}`" in section, name


def test_every_localai_name_is_in_the_vocabulary():
    vocab = vocabulary()
    missing = [n for n in LOCALAI_NAMES if n not in vocab.by_name]
    assert not missing
    assert not [f for f in LOCALAI_FIELDS if f not in {x.name for x in vocab.fields}]
    data = yaml.safe_load((ROOT / "backend" / "service" / "localai_options.yaml").read_text())
    # honoured options set a plan field, unless they honour one value only (what this engine always does)
    for name, raw in data["options"].items():
        assert raw["status"] != "honoured" or raw.get("field") or "only" in raw, name


def test_spec_type_lists_are_normalised_and_unsupported_types_refused():
    assert parse_options(["spec_type:ngram-mod,draft-mtp"])["spec_type"] == ("ngram-mod", "draft-mtp")
    assert parse_options(["speculative_type:ngram_simple"])["spec_type"] == ("ngram-simple",)
    assert parse_options(["spec_type:draft"])["spec_type"] == ("draft-simple",)
    for value, named in (("eagle3", "draft-eagle3"), ("draft_mtp,ngram_cache", "ngram-cache")):
        with pytest.raises(InvalidOptionError, match=named):
            parse_options([f"spec_type:{value}"])
    with pytest.raises(InvalidOptionError, match="unknown speculative type"):
        parse_options(["spec_type:eagle9"])


def test_aliases_empty_values_and_unknown_names(caplog):
    opts = parse_options(["grpc_servers:", "jinja:false", "spec_draft_p_min:0.5", "--spec-draft-n-max:3", "sps:0.2",
                          "unified_kv", "n_threads_batch:3", "pooling_type:cls", "enable_reasoning:0"])
    assert opts == {"use_jinja": False, "p_min": 0.5, "n_max": 3, "similarity": 0.2, "threads_batch": 3,
                    "pooling": "cls", "reasoning": 0, "kv_unified": True}
    assert parse_options(["grpc_servers:127.0.0.1:50052"]) == {"rpc_servers": ("127.0.0.1:50052",)}
    with caplog.at_level(logging.WARNING):
        assert parse_options(["gpu", "--no-kv-offload", "kv_unified:off"]) == {"kv_unified": False}
    assert "'gpu' is not read" in caplog.text and "'--no-kv-offload' is not read" in caplog.text
    with pytest.raises(InvalidOptionError, match="did you mean 'spec_n_min'"):
        parse_options(["spec_n_mn:1"])
    for refused in ("context_shift:true", "reasoning_format:none", "pooling:none"):
        with pytest.raises(InvalidOptionError, match=refused.split(":")[0]):
            parse_options([refused])


def test_kv_overrides_parse_and_refuse_malformed_entries(smollm2_path):
    info = read_gguf(smollm2_path)
    o = parse_kv_override("tokenizer.ggml.add_bos_token=bool:true", info)
    assert (o.key, o.kind, o.value) == ("tokenizer.ggml.add_bos_token", "bool", True)
    assert parse_kv_override("llama.context_length=int:4096", info).value == 4096
    assert parse_kv_override("my.key=str:hello").value == "hello"
    for bad, why in (("no-equals", "key=type:value"), ("k=double:1", "key=type:value"), ("k=int:x", "not a int"),
                     ("k=bool:yes", "not a bool"), ("llama.context_length=str:big", "stores llama.context_length as int")):
        with pytest.raises(InvalidOptionError, match=why) as err:
            parse_kv_override(bad, info)
        assert bad in str(err.value)


def test_plan_for_ngram_rope_and_placement_refusals(smollm2_path, caplog):
    info = read_gguf(smollm2_path)

    def plan(**fields):
        return plan_load(smollm2_options(smollm2_path, **fields), info, smollm2_path)

    p = plan(Options=["spec_type:ngram-mod", "spec_ngram_mod_n_min:8", "spec_ngram_size_n:4"])
    assert p.spec.ngram == "ngram-mod" and (p.spec.ngram_mod_n_min, p.spec.ngram_size_n) == (8, 4)
    assert not p.engine.mtp and p.spec.n_max == 0
    with caplog.at_level(logging.WARNING):
        plan(ContextSize=16384)
    assert "beyond the model's training context" in caplog.text and "context_length = 8192" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        y = plan(ContextSize=16384, RopeScaling="yarn", RopeFreqScale=0.5, YarnBetaFast=32, YarnBetaSlow=1)
    assert "training context" not in caplog.text
    assert (y.engine.rope_scaling, y.engine.rope_freq_scale, y.engine.yarn_beta_fast, y.engine.yarn_ext_factor) == (
        "yarn", 0.5, 32.0, None)
    for fields, why in ((dict(RopeScaling="longrope"), "RopeScaling"), (dict(RopeFreqScale=-1), "RopeFreqScale"),
                        (dict(YarnExtFactor=2), "YarnExtFactor"), (dict(YarnBetaFast=1, YarnBetaSlow=4), "YarnBetaFast"),
                        (dict(MainGPU="first"), "MainGPU"), (dict(Options=["split_mode:row"]), "split_mode:row"),
                        (dict(Options=["device:CUDA7"]), "CUDA7"), (dict(Options=["override_tensor:blk=NoSuch0"]), "NoSuch0"),
                        (dict(Options=["override_tensor:blk"]), "tensor regex"),
                        (dict(DraftModel="draft.gguf"), "DraftModel"), (dict(Reranking=True), "no reranking head"),
                        (dict(LoraAdapter="missing-lora.gguf"), "missing-lora.gguf"),
                        (dict(LoraAdapters=["a.gguf"], LoraScales=[1, 2]), "LoraScales")):
        with pytest.raises((InvalidRequestError, ModelNotFoundError), match=why):
            plan(**fields)
    assert plan(Options=["device:none", "override_tensor:blk\\.0\\..*=CPU"]).engine.devices == ("none",)


# ------------------------------------------------------------------------------------------- engine


def test_engine_rope_overrides_and_embedding_normalisation(smollm2_path):
    cfg = EngineConfig(n_ctx=256, n_batch=64, n_ubatch=64, n_threads=2, embeddings=True, rope_scaling="linear",
                       rope_freq_scale=0.25, rope_freq_base=20000.0, swa_full=True, n_threads_batch=1, warmup=True,
                       offload_kqv=False, check_tensors=True,
                       kv_overrides=(parse_kv_override("tokenizer.ggml.add_bos_token=bool:true"),))
    with LLAMA_LOG.capture() as lines:
        e = Engine(smollm2_path, cfg)
    try:
        assert any("freq_scale" in ln and "0.25" in ln for ln in lines if ln.startswith("llama_context"))
        assert any("freq_base" in ln and "20000.0" in ln for ln in lines if ln.startswith("llama_context"))
        assert (L.llama_n_threads(e.ctx), L.llama_n_threads_batch(e.ctx)) == (2, 1)
        assert e.tokenize("hello")[0] == 1  # BOS now added: the override reached the vocabulary
        vec = np.array(e.embed(e.tokenize("the cat sat")))
        assert np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-5)
    finally:
        e.close()
    raw = np.array([3.0, -4.0])
    assert normalize(raw, 2).tolist() == pytest.approx([0.6, -0.8]) and normalize(raw, -1).tolist() == [3.0, -4.0]
    assert normalize(raw, 1).tolist() == pytest.approx([3 / 7, -4 / 7])


# ------------------------------------------------------------------------------------------- LoRA


def write_lora(path: Path, *, arch: str = "llama", n_embd: int = 576, rank: int = 4, seed: int = 0,
               layers: int = 30) -> Path:
    """A LoRA adapter GGUF for SmolLM2's attn_q of every layer, as llama.cpp's convert_lora_to_gguf writes one:
    general.type adapter, adapter.type lora, adapter.lora.alpha, `<tensor>.lora_a` [n_embd, rank] and `.lora_b`
    [rank, n_out] in ggml order (numpy shapes reversed)."""
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(rank))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_q.weight.lora_a", rng.normal(0, 0.5, (rank, n_embd)).astype(np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight.lora_b", rng.normal(0, 0.5, (n_embd, rank)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ------------------------------------------------------------------------------------------- over gRPC


@pytest.fixture(scope="module")
def opt_backend():
    b = BackendProcess()
    yield b
    b.stop()


def _predict(stub, **kw) -> pb.Reply:
    return stub.Predict(pb.PredictOptions(**{"Prompt": "The capital of France is", "Tokens": 12, "Temperature": 0.0,
                                             **kw}), timeout=120)


def test_grpc_localai_mtp_yaml_loads_with_every_option_honoured_or_warned(opt_backend, synth_model):
    config = yaml.safe_load(LOCALAI_YAML)
    model = synth_model("predictable", acceptance=0.5)
    stub = opt_backend.stub
    res = stub.LoadModel(pb.ModelOptions(ModelFile=str(model), ContextSize=config["context_size"], NBatch=64, Threads=2,
                                         MMap=True, Options=config["options"]), timeout=120)
    assert res.success, res.message
    assert "MTP self-speculation on (n_max=6" in res.message and "2 slot(s) of 1024 tokens" in res.message
    r = stub.Predict(pb.PredictOptions(Prompt="over the wire", Tokens=32, Temperature=0.0), timeout=120)
    assert r.tokens == 32 and r.draft_n > 0
    warnings = "\n".join(ln for ln in opt_backend.stderr().splitlines() if " WARNING " in ln)
    for entry in WARNED:
        assert f"option {entry!r}" in warnings, entry
    for honoured in ("kv_unified", "grpc_servers", "spec_draft_n_max", "context_shift", "jinja"):
        assert honoured not in warnings  # honoured as written: nothing to say
    assert stub.Status(pb.HealthMessage()).memory.breakdown["slots"] == 2


def test_grpc_refusals_are_clear_and_the_backend_keeps_serving(opt_backend, smollm2_path, tmp_path):
    stub = opt_backend.stub
    assert stub.LoadModel(smollm2_options(smollm2_path)).success
    want = _predict(stub).message
    refusals = {
        "split_mode:row": smollm2_options(smollm2_path, Options=["split_mode:row"]),
        "draft-simple": smollm2_options(smollm2_path, Options=["spec_type:draft"]),
        "DraftModel": smollm2_options(smollm2_path, DraftModel="draft.gguf"),
        "Overrides entry 'tokenizer.ggml.add_bos_token=true'": smollm2_options(
            smollm2_path, Overrides=["tokenizer.ggml.add_bos_token=true"]),
        "no reranking head": smollm2_options(smollm2_path, Reranking=True),
        "context_shift:true": smollm2_options(smollm2_path, Options=["context_shift:true"]),
        "RopeScaling": smollm2_options(smollm2_path, RopeScaling="longrope"),
    }
    for named, req in refusals.items():
        res = stub.LoadModel(req)
        assert not res.success and named in res.message, (named, res.message)
        assert stub.Health(pb.HealthMessage()).message == b"OK"
        assert _predict(stub).message == want  # refused before the loaded model was touched
    with pytest.raises(grpc.RpcError) as err:
        stub.Rerank(pb.RerankRequest(query="capital of France", documents=["Paris", "Berlin"]))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "this model has no reranking head" in err.value.details()


def test_grpc_typed_fields_reach_llama_cpp(opt_backend, smollm2_path):
    stub = opt_backend.stub
    assert stub.LoadModel(smollm2_options(smollm2_path)).success
    plain_tokens = list(stub.TokenizeString(pb.PredictOptions(Prompt="hello")).tokens)
    plain = _predict(stub).message
    res = stub.LoadModel(smollm2_options(smollm2_path, Overrides=["tokenizer.ggml.add_bos_token=bool:true"],
                                         RopeScaling="linear", RopeFreqScale=0.5, NoKVOffload=True, MainGPU="0",
                                         Options=["warmup", "device:none", "override_tensor:output_norm=CPU"]))
    assert res.success, res.message
    assert list(stub.TokenizeString(pb.PredictOptions(Prompt="hello")).tokens) == [1, *plain_tokens]
    assert _predict(stub).message != plain  # positions rotate at half the speed: other logits
    res = stub.LoadModel(smollm2_options(smollm2_path, Options=["spec_type:ngram-mod", "spec_ngram_mod_n_min:8"]))
    assert res.success and "ngram-mod drafting on" in res.message, res.message
    assert "ngram-mod drafting on" in opt_backend.stderr()
    assert _predict(stub).message == plain


def test_grpc_lora_load_scale_free_and_mismatch(opt_backend, smollm2_path, tmp_path):
    stub = opt_backend.stub
    write_lora(tmp_path / "q-lora.gguf")
    write_lora(tmp_path / "other-arch.gguf", arch="qwen2")
    write_lora(tmp_path / "other-width.gguf", n_embd=64, layers=1)
    base = dict(ModelPath=str(tmp_path))
    assert stub.LoadModel(smollm2_options(smollm2_path)).success
    plain = _predict(stub).message
    # scale 0 leaves the model as it is; LoraScale 0 means LocalAI's default 1, so the list form carries it
    res = stub.LoadModel(smollm2_options(smollm2_path, LoraAdapters=["q-lora.gguf"], LoraScales=[0.0], **base))
    assert res.success, res.message
    assert _predict(stub).message == plain
    assert stub.Status(pb.HealthMessage()).memory.breakdown["live_lora"] == 1
    res = stub.LoadModel(smollm2_options(smollm2_path, LoraAdapter="q-lora.gguf", LoraBase="base", LoraScale=2.0,
                                         **base))
    assert res.success, res.message
    assert _predict(stub).message != plain
    assert "ModelOptions.LoraBase is set but has no effect" in opt_backend.stderr()
    assert stub.Free(pb.HealthMessage()).success
    assert stub.Status(pb.HealthMessage()).memory.breakdown.get("live_lora", 0) == 0
    for name in ("other-arch.gguf", "other-width.gguf"):
        res = stub.LoadModel(smollm2_options(smollm2_path, LoraAdapter=name, **base))
        assert not res.success and name in res.message and "could not load this LoRA adapter" in res.message
        assert stub.Status(pb.HealthMessage()).memory.breakdown.get("live_lora", 0) == 0
    res = stub.LoadModel(smollm2_options(smollm2_path, LoraAdapter="nowhere.gguf", **base))
    assert not res.success and "nowhere.gguf" in res.message and "LoRA" in res.message
    assert stub.LoadModel(smollm2_options(smollm2_path)).success
    assert _predict(stub).message == plain


def test_grpc_prefill_assistant(opt_backend, smollm2_path):
    stub = opt_backend.stub
    msgs = [pb.Message(role="user", content="Name a colour."), pb.Message(role="assistant", content="My answer is")]
    counts = {}
    for prefill in ("true", "false"):
        assert stub.LoadModel(smollm2_options(smollm2_path, Options=[f"prefill_assistant:{prefill}"])).success
        r = stub.Predict(pb.PredictOptions(Messages=msgs, UseTokenizerTemplate=True, Tokens=4, Temperature=0.0))
        counts[prefill] = r.prompt_tokens
    # continuing the message leaves out its end-of-turn and the new assistant header
    assert counts["true"] < counts["false"]


def test_quantized_kv_cache_on_narrow_heads_is_refused_before_llama_cpp(tmp_path):
    """q8_0 blocks of 32 values cannot hold 16-wide heads: llama.cpp would fail the context without a reason."""
    model = write_qwen3(tmp_path / "narrow.gguf", rank_head=True)
    with pytest.raises(InvalidOptionError, match="cache_type_k q8_0 .* key_length 16: use f16"):
        Engine(model, EngineConfig(n_ctx=256, type_k="q8_0", reranking=True))
    Engine(model, EngineConfig(n_ctx=256, reranking=True)).close()


def test_grpc_rerank_with_a_classification_head(opt_backend, tmp_path):
    """A (random) reranker: Rerank answers LocalAI's RerankResult from llama.cpp's rank pooling, best first, cut to
    top_n. (No real reranker GGUF is available offline, so the scores are checked for range and order, not
    relevance.)"""
    stub = opt_backend.stub
    model = write_qwen3(tmp_path / "rerank.gguf", rank_head=True)
    res = stub.LoadModel(pb.ModelOptions(ModelFile=str(model), ContextSize=256, NBatch=128, Threads=2, Reranking=True))
    assert res.success, res.message
    docs = ["the cat sat on the mat", "stock prices fell", "a kitten on a rug", "rain in spain"]
    r = stub.Rerank(pb.RerankRequest(query="where is the cat", documents=docs))
    assert sorted(d.index for d in r.results) == [0, 1, 2, 3]
    scores = [d.relevance_score for d in r.results]
    assert scores == sorted(scores, reverse=True) and all(0.0 < x < 1.0 for x in scores) and len(set(scores)) > 1
    assert [d.text for d in r.results] == [docs[d.index] for d in r.results]
    assert r.usage.total_tokens == r.usage.prompt_tokens > 0
    top = stub.Rerank(pb.RerankRequest(query="where is the cat", documents=docs, top_n=2))
    assert [(d.index, d.relevance_score) for d in top.results] == [(d.index, d.relevance_score) for d in r.results[:2]]
    with pytest.raises(grpc.RpcError) as err:
        stub.Rerank(pb.RerankRequest(query="", documents=docs))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
