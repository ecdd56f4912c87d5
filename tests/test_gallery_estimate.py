"""The memory estimator against llama.cpp's own numbers: the published 35B-A3B figures (hardware-fit.md §9), and
llama.cpp's no_alloc dry run (`gallery.measure`) on a tiny synthetic qwen35moe and on a sparse file with the real
35B-A3B shapes and APEX-like tensor types."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from synth_models import write_qwen3

from backend.core.errors import InvalidRequestError
from backend.core.gguf_file import read_gguf
from backend.synth.qwen35moe import (
    PRESETS,
    REAL_CONFIGS,
    apex_like_type,
    model_metadata,
    tensor_layout,
    write_model,
    write_sparse,
)
from gallery.catalog import WeightBytes, load_catalog
from gallery.estimate import (
    ArchFacts,
    RunConfig,
    cache_bytes,
    estimate,
    kv_cache_type,
    place,
    weights_from_gguf,
)
from gallery.measure import ContextSpec, measure

MiB = 1024 * 1024
REAL = REAL_CONFIGS["qwen35moe-35b-a3b"]
LOG_ROUNDING = 6 * 1024  # llama.cpp logs MiB with two decimals



@pytest.fixture(scope="module")
def real_sparse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("real") / "qwen35moe-35b-a3b-sparse.gguf"
    tensors = [(n, ne, apex_like_type(n, ne)) for n, ne in tensor_layout(REAL)]
    return write_sparse(path, model_metadata(REAL), tensors)


@pytest.fixture(scope="module")
def real_info(real_sparse: Path):
    return read_gguf(real_sparse)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("tiny") / "tiny.gguf", replace(PRESETS["tiny"], mtp=True), dtype="f16")


def _table_facts(nextn: int = 1) -> ArchFacts:
    return ArchFacts.from_table(load_catalog().architectures["qwen35moe-35b-a3b"], nextn=nextn)


def test_published_35b_figures_from_the_table_alone() -> None:
    """hardware-fit.md §9: KV 20,480 B/token f16 and 10,880 q8_0 (10 layers), RS 62.81 MiB x (1+n_rs_seq),
    compute 497 MiB at ubatch 512 / 1988 MiB at 2048, MTP context 8 + 65 MiB at 4k and 512 + 296 MiB at 262k."""
    arch = _table_facts()
    w = WeightBytes(total=10**9, token_embd=0, routed_experts=0, mtp=10**8)
    assert arch.n_layer == 40 and arch.n_recurrent == 30 and len(arch.attn_kv_elems) == 10
    f16 = estimate(arch, w, RunConfig(n_ctx=4096, cache_type_k="f16", cache_type_v="f16"))
    assert f16.kv == 80 * MiB and f16.rs == 65_863_680 and f16.compute == 497 * MiB
    q8 = estimate(arch, w, RunConfig(n_ctx=262144))
    assert q8.kv == 2720 * MiB
    assert estimate(arch, w, RunConfig(n_ctx=4096, n_ubatch=2048)).compute == 1988 * MiB
    mtp = estimate(arch, w, RunConfig(n_ctx=262144, cache_type_k="f16", cache_type_v="f16", mtp=True, spec_n_max=3))
    assert mtp.rs == 4 * 65_863_680 and mtp.mtp_kv == 512 * MiB and mtp.mtp_weights == 10**8
    assert abs(mtp.mtp_compute - 296.02 * MiB) < 0.001 * mtp.mtp_compute
    assert mtp.output == mtp.mtp_output == 248320 * 4
    small = estimate(arch, w, RunConfig(n_ctx=4096, cache_type_k="f16", cache_type_v="f16", mtp=True, spec_n_max=3))
    assert small.mtp_kv == 8 * MiB and abs(small.mtp_compute - 65.02 * MiB) / (65.02 * MiB) < 0.03


def test_cache_row_sizes() -> None:
    assert cache_bytes(512, "f16") == 1024 and cache_bytes(512, "q8_0") == 544 and cache_bytes(512, "q4_0") == 288
    with pytest.raises(InvalidRequestError, match="unknown KV cache type"):
        cache_bytes(512, "q3_k")


def test_gguf_facts_equal_the_table_and_weights_split_by_role(real_info) -> None:
    info = real_info
    arch = ArchFacts.from_gguf(info)
    assert arch == _table_facts(nextn=1)
    w = weights_from_gguf(info, arch)
    assert w.total == info.tensor_bytes
    mtp = sum(t.n_bytes for t in info.tensors if t.name.startswith("blk.40."))
    experts = sum(t.n_bytes for t in info.tensors if "_exps" in t.name and not t.name.startswith("blk.40."))
    assert (w.mtp, w.routed_experts) == (mtp, experts)
    assert w.token_embd == 2048 * 248320 * 144 // 256  # Q4_K


def test_plain_transformer_facts(tiny: Path) -> None:
    """A model without SSM keys gets KV on every layer and no recurrent state (SmolLM2-like)."""
    keys = {"block_count": 30, "embedding_length": 576, "attention.head_count": 9, "attention.head_count_kv": 3,
            "context_length": 8192, "feed_forward_length": 1536}
    arch = ArchFacts.from_keys("llama", lambda k, d=None: keys.get(k, d), 49152)
    assert (len(arch.attn_kv_elems), arch.n_recurrent, arch.rs_elems) == (30, 0, 0)
    assert arch.kv_elems_per_token == 30 * 3 * 128


def test_estimate_matches_llama_cpp_on_the_real_layout(real_sparse: Path, real_info) -> None:
    arch = ArchFacts.from_gguf(real_info)
    w = weights_from_gguf(real_info, arch)
    specs = [ContextSpec(n_ctx, type_k="q8_0", type_v="q8_0", mtp=True, n_rs_seq=6) for n_ctx in (4096, 32768, 262144)]
    specs.append(ContextSpec(32768, n_seq=4, type_k="q8_0", type_v="q8_0", mtp=True, n_rs_seq=6))
    for m in measure(real_sparse, specs):
        b = estimate(arch, w, RunConfig(n_ctx=m.spec.n_ctx, n_seq=m.spec.n_seq, mtp=True, spec_n_max=6))
        assert abs(b.kv - m.kv) < LOG_ROUNDING and abs(b.rs - m.rs) < LOG_ROUNDING, m.spec
        assert abs(b.mtp_kv - m.mtp_kv) < LOG_ROUNDING, m.spec
        assert abs(b.compute - m.compute) / m.compute < 0.02, m.spec
        assert abs(b.mtp_compute - m.mtp_compute) / m.mtp_compute < 0.08, m.spec
        measured = w.total + m.kv + m.rs + m.compute + m.mtp_kv + m.mtp_compute + b.output + b.mtp_output
        assert abs(b.total - measured) / measured < 0.002, m.spec


def test_estimate_matches_llama_cpp_on_a_tiny_model(tiny: Path) -> None:
    info = read_gguf(tiny)
    arch = ArchFacts.from_gguf(info)
    w = weights_from_gguf(info, arch)
    specs = [ContextSpec(c, n_ubatch=u, type_k=k, type_v=k, mtp=mtp, n_rs_seq=3 if mtp else 0, n_seq=n)
             for c, u, k, mtp, n in ((4096, 512, "f16", True, 1), (4096, 128, "q8_0", False, 1),
                                     (65536, 512, "q8_0", True, 1), (4096, 512, "q8_0", True, 4))]
    for m in measure(tiny, specs, alloc=True):
        s = m.spec
        b = estimate(arch, w, RunConfig(n_ctx=s.n_ctx, n_ubatch=s.n_ubatch, n_seq=s.n_seq, cache_type_k=s.type_k,
                                        cache_type_v=s.type_v, mtp=s.mtp, spec_n_max=s.n_rs_seq))
        assert abs(b.kv - m.kv) < LOG_ROUNDING and abs(b.rs - m.rs) < LOG_ROUNDING, s
        assert abs(b.compute - m.compute) / m.compute < 0.10, s
        if s.mtp:
            assert abs(b.mtp_kv - m.mtp_kv) < LOG_ROUNDING and abs(b.mtp_compute - m.mtp_compute) / m.mtp_compute < 0.10
        # with real allocation the weights are one mmapped CPU buffer holding every tensor (MTP layer included)
        assert abs(m.model_buffers - w.total) < max(LOG_ROUNDING, 0.002 * w.total), s


def test_parallel_slots_multiply_kv_state_and_logits() -> None:
    """n_seq slots of n_ctx each: one unified KV of n_seq x n_ctx cells (target and MTP), per-slot recurrent state
    with its snapshots and a logits row per slot (measured against llama.cpp in the two tests above)."""
    arch, w = _table_facts(), WeightBytes(total=10**9, token_embd=0, routed_experts=0, mtp=10**8)
    one = estimate(arch, w, RunConfig(n_ctx=32768, mtp=True, spec_n_max=6))
    four = estimate(arch, w, RunConfig(n_ctx=32768, n_seq=4, mtp=True, spec_n_max=6))
    assert (four.kv, four.rs, four.mtp_kv, four.output) == (4 * one.kv, 4 * one.rs, 4 * one.mtp_kv, 4 * one.output)
    assert four.kv == 1360 * MiB and four.rs == 4 * 7 * 65_863_680  # llama.cpp: 1360.00 and 1758.75 MiB


def test_placement_splits_gpu_and_host() -> None:
    arch = _table_facts(nextn=0)
    w = WeightBytes(total=20 * 1024 * MiB, token_embd=400 * MiB, routed_experts=18 * 1024 * MiB, mtp=0)
    b = estimate(arch, w, RunConfig(n_ctx=32768))
    gpu = place(b, "gpu", arch=arch)
    assert gpu.device + gpu.host == b.total and gpu.host == b.token_embd + b.output
    part = place(b, "gpu+ram", 10, arch=arch)
    assert part.device == gpu.device - b.expert_bytes(10) and b.expert_bytes(10) == w.routed_experts // 4
    assert part.host > gpu.host + b.expert_bytes(10)  # plus a CPU compute buffer for the moved experts
    assert place(b, "cpu").host == b.total


def test_mtp_on_a_model_without_head_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match="no MTP layer"):
        estimate(_table_facts(nextn=0), WeightBytes(1, 0, 0, 0), RunConfig(n_ctx=4096, mtp=True))


def test_plans_keep_a_quantized_kv_cache_only_where_its_blocks_fit_the_heads(tmp_path):
    arch = ArchFacts.from_table(load_catalog().architectures["qwen35moe-35b-a3b"], nextn=1)
    assert arch.kv_head_dims == (256, 256) and kv_cache_type("q8_0", arch) == "q8_0"
    narrow = ArchFacts.from_gguf(read_gguf(write_qwen3(tmp_path / "narrow.gguf", rank_head=True)))
    assert narrow.kv_head_dims == (16, 16) and kv_cache_type("q8_0", narrow) == "f16"
    assert kv_cache_type("f16", narrow) == "f16"
