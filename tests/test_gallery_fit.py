"""fit_params: llama.cpp's --fit with the gallery's memory model, on the exact Qwen3.6-35B-A3B facts and, end to end
over gRPC, on a synthetic qwen35moe with a what-if GPU (APEXMTP_VRAM).

Fitting changes only what a load left unset, in llama.cpp's order: an unset context first (the largest that fits
the GPU), then the routed experts of the fewest first layers to RAM; a load that fits as asked is left alone."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
from conftest import BackendProcess

from backend.core.units import GiB, MiB
from backend.proto import backend_pb2 as pb
from backend.synth.qwen35moe import PRESETS
from gallery.catalog import load_catalog
from gallery.detect import GPU, HardwareProfile
from gallery.estimate import RunConfig, estimate, place
from gallery.fit import FitRequest, fit
from gallery.select import budget_for, candidates_for, needs

CAT = load_catalog()
POLICY = CAT.policy
BALANCED = next(c for c in candidates_for(CAT, CAT.get("qwen3.6-35b-a3b-apex")) if c.tier == "I-Balanced")
ARCH, WEIGHTS = BALANCED.arch, BALANCED.weights
RUN = RunConfig(n_ctx=4096, cache_type_k="f16", cache_type_v="f16")


def _budget(vram_gib: float | None, ram_gib: float = 64):
    gpus = (GPU(0, "Test GPU", "nvidia", int(vram_gib * GiB), int(vram_gib * GiB)),) if vram_gib else ()
    return budget_for(HardwareProfile("Linux", "cpu", 8, int(ram_gib * GiB), None, gpus), POLICY)


def _fit(vram_gib: float | None, *, ctx: int = 4096, ctx_free: bool = True, experts_free: bool = True, ram: float = 64):
    req = FitRequest(replace(RUN, n_ctx=ctx), gpu=True, ctx_free=ctx_free, experts_free=experts_free)
    return fit(ARCH, WEIGHTS, _budget(vram_gib, ram), POLICY, req)


def test_an_unset_context_is_the_largest_that_fits_the_gpu():
    big = _fit(80)
    assert (big.n_ctx, big.mode, big.fits) == (ARCH.n_ctx_train, "gpu", True)  # 262144: the whole trained context
    assert big.changes == (f"context {ARCH.n_ctx_train} (unset: the largest that fits)",)
    for vram in (26, 27, 28):
        got = _fit(vram)
        assert got.fits and got.mode == "gpu" and got.n_ctx < ARCH.n_ctx_train
        larger = [c for c in (262144, 131072, 65536, 32768, 16384, 8192) if c > got.n_ctx]
        assert not _fit(vram, ctx=larger[-1], ctx_free=False, experts_free=False).fits  # the next one up does not


def test_then_the_fewest_layers_experts_move_to_ram():
    for vram, ctx_free in ((24, True), (16, True), (16, False), (8, False)):
        got = _fit(vram, ctx=32768, ctx_free=ctx_free)
        assert got.fits and got.mode == "gpu+ram" and 0 < got.n_cpu_moe < ARCH.n_layer
        assert got.n_ctx == (4096 if ctx_free else 32768)  # an unset context went to fit_params_min_ctx first
        assert f"routed experts of the first {got.n_cpu_moe} of {ARCH.n_layer} layers" in got.changes[0]
        assert got.device_need <= _budget(vram).gpu_free
        one_fewer = place(estimate(ARCH, WEIGHTS, replace(RUN, n_ctx=got.n_ctx)), "gpu+ram", got.n_cpu_moe - 1,
                          arch=ARCH, n_ubatch=RUN.n_ubatch)
        assert not needs(one_fewer, _budget(vram), 1024 * MiB, POLICY.host_margin)[2]  # the fewest layers


def test_what_was_given_is_never_changed():
    fits = _fit(80, ctx=32768, ctx_free=False)
    assert (fits.n_ctx, fits.mode, fits.changes) == (32768, "gpu", ())
    stuck = _fit(16, ctx=32768, ctx_free=False, experts_free=False)  # n_cpu_moe / override_tensor given
    assert (stuck.n_ctx, stuck.mode, stuck.fits, stuck.changes) == (32768, "gpu", False, ())
    cpu = _fit(None, ctx=8192, ram=64)  # llama.cpp fits nothing without a GPU
    assert (cpu.n_ctx, cpu.mode, cpu.fits, cpu.changes) == (8192, "cpu", True, ())
    assert not _fit(None, ram=16).fits  # 24 GiB of weights in 16 GiB: said, not hidden


@pytest.fixture(scope="module")
def long_model(synth_model):
    """The tiny preset trained for 64k tokens, so an unset context has room to be fitted."""
    return synth_model("random", config=replace(PRESETS["tiny"], context_length=65536))


def _load(stub, model, **fields) -> pb.Result:
    opts = dict(ModelFile=str(model), Threads=2, NBatch=64, MMap=True, NGPULayers=9999999)
    opts.update(fields)
    return stub.LoadModel(pb.ModelOptions(**opts), timeout=120)


def _slot_ctx(res: pb.Result) -> int:
    assert res.success, res.message
    return int(re.search(r"slot\(s\) of (\d+) tokens", res.message).group(1))


def test_grpc_load_is_fitted_to_a_what_if_gpu(long_model):
    # 1.5 GiB is the reserve the planner keeps on a card of a given size: 64 MiB are left for the model (with its
    # MTP head: about 44 MiB at 4k tokens, 59 at 16k, 79 at 32k)
    b = BackendProcess(env={"APEXMTP_VRAM": f"{1536 + 64}MiB"})
    try:
        b.wait_healthy()
        fitted = _slot_ctx(_load(b.stub, long_model, Options=["fit_target:0"]))
        assert 4096 < fitted < 65536
        assert f"fit_params: context {fitted} (unset: the largest that fits)" in b.stderr()
        assert _slot_ctx(_load(b.stub, long_model, Options=["fit_params:false"])) == 4096  # LocalAI's default
        assert _slot_ctx(_load(b.stub, long_model, ContextSize=32768, Options=["fit_target:0"])) == 32768
        assert "routed experts of the first" in b.stderr()  # a given context stays: experts go to RAM instead
        r = b.stub.Predict(pb.PredictOptions(Prompt="Hello", Tokens=8), timeout=120)
        assert r.tokens == 8
    finally:
        b.stop()
