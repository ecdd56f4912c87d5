"""Speed model: predicted single-client decode tokens/s for a plan, plain and with MTP self-speculation.

Decoding one token is memory-bound: every weight the token touches is read once from where it lives. Per token:

* **bytes touched** = dense weights (everything but the routed experts, the input embedding and the MTP layer:
  attention, DeltaNet, shared expert, router, norms and the LM head; `token_embd` too when the LM head is tied to
  it) + the active routed experts (`routed x experts_used / n_expert`) + the KV cache read at a context of
  `speed.at_context` tokens (capped by the plan's context: a typical chat turn, so that a longer planned context
  does not lower the figure) + the recurrent state, read and written once;
* **time** = each location's bytes over its bandwidth (GPU VRAM, unified memory, or system RAM for the CPU and for
  the routed experts of `n_cpu_moe` layers kept there) times the device kind's `efficiency` (quantized weights
  count `quant_cost` times their bytes: dequantizing costs the CPU more than f16 does), plus fixed costs:
  `layer_overhead_ms` per layer on the device that runs it (kernel launches, thread barriers) and
  `token_overhead_ms` per emitted token (sampling, Python);
* **MTP**: a step drafts k tokens with the MTP layer (its dense part, one layer's active experts and the LM head,
  each draft sequential; the verified tokens are mirrored into the MTP context in the first draft's pass) and verifies k+1
  tokens in one batch: dense weights once, the union of the experts the k+1 tokens route to
  (`routed x (1 - (1 - used/n_expert)^(k+1))`, random routing), the fixed costs once, and `verify_overhead` of a
  plain step per extra token (the compute a batch adds). Drafts are kept while they match, so with a head right
  on a fraction q of tokens a step emits `1 + q + ... + q^k` tokens on average; q comes from the acceptance rate
  (`speed.mtp_acceptance`, the llama-server figure for Qwen3.6-35B-A3B; a synthetic model's recorded rate) via
  `backend.core.acceptance.accuracy_for_acceptance`. Like the engine's adaptive controller, the k with the most
  tokens per second wins, k = 0 (plain decoding) included, so MTP never predicts slower than plain.

Bandwidths: detected GPUs by name from `speed.gpu_gbps` (datasheet figures; vendor defaults otherwise), hardware
classes from hardware.yaml, and this machine's RAM as `gallery.detect` measured it (`HardwareProfile.ram_bandwidth`,
from its cached numpy probe `ram_bandwidth`); this module only computes. The constants are calibrated by
bench/bench_predict.py (this machine's CPU, measured) and against published tg128 figures (apex-method.md §3.2,
DGX Spark); see the README's Benchmarks section.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from backend.core.acceptance import accuracy_for_acceptance
from backend.core.units import GB

from .catalog import WeightBytes
from .detect import GPU, HardwareProfile, probe_ram_gbps
from .estimate import ArchFacts, RunConfig, cache_bytes
from .policy import SpeedPolicy

# bench/bench_predict.py imports the probe from here; new code takes `gallery.detect.probe_ram_gbps`.
_probe_gbps = probe_ram_gbps


@dataclass(frozen=True)
class Bandwidth:
    """Where a plan's bytes are read from: `device` runs the layers (GPU VRAM, unified memory, or RAM on the CPU),
    `host` is system RAM (routed experts kept there). Bytes/s, nominal; `kind` selects the efficiency constants."""

    kind: str  # gpu | unified | cpu
    device: float
    host: float
    source: str  # where the device figure came from, for explanations


@dataclass(frozen=True)
class Speed:
    """A plan's predicted single-client decode speed."""

    plain_tok_s: float
    tok_s: float  # with MTP at the best draft length (equals plain_tok_s without MTP, or when it does not pay)
    k: int  # the best draft length; 0 = plain decoding
    bytes_per_token: int  # bytes one plain decode step reads
    bandwidth: Bandwidth

    @property
    def mtp_gain(self) -> float:
        return self.tok_s / self.plain_tok_s if self.plain_tok_s else 1.0


@dataclass(frozen=True)
class TokenBytes:
    """What one decode step reads, by role (bytes)."""

    dense: int
    experts: int  # active routed experts, all trunk layers
    kv: int
    state: int  # recurrent state read + written
    draft: int  # one MTP draft step (0 without an MTP layer)
    routed: int  # all routed expert bytes (for the verify union)
    expert_share: float  # experts_used / n_expert

    @property
    def plain(self) -> int:
        return self.dense + self.experts + self.kv + self.state


def token_bytes(arch: ArchFacts, weights: WeightBytes, run: RunConfig, at_context: int) -> TokenBytes:
    """Bytes a decode step touches with `run`'s KV types and MTP setting, at `at_context` tokens of context."""
    share = min(arch.experts_used / arch.n_expert, 1.0) if weights.routed_experts else 0.0
    dense = weights.other + (weights.token_embd if weights.output_tied else 0)
    per_token_kv = sum(cache_bytes(n // 2, run.cache_type_k) + cache_bytes(n // 2, run.cache_type_v)
                       for n in arch.attn_kv_elems)
    state = 2 * arch.n_recurrent * arch.rs_elems * 4
    draft = 0
    if run.mtp and weights.mtp:
        layer_experts = weights.routed_experts // max(arch.n_layer, 1)
        # the MTP layer: its dense part, one layer's active experts, and an LM head about token_embd's size
        draft = max(weights.mtp - layer_experts, 0) + int(layer_experts * share) + weights.token_embd
    return TokenBytes(dense=dense, experts=int(weights.routed_experts * share),
                      kv=min(at_context, run.n_ctx) * per_token_kv, state=state, draft=draft,
                      routed=weights.routed_experts, expert_share=share)


def predict(arch: ArchFacts, weights: WeightBytes, run: RunConfig, mode: str, n_cpu_moe: int, bw: Bandwidth,
            speed: SpeedPolicy, acceptance: tuple[float, int] | None = None) -> Speed:
    """Predicted decode tokens/s of one plan (see the module doc for the model).

    Args:
        arch, weights, run: the model and its runtime options (run.mtp enables the MTP part).
        mode: "gpu", "gpu+ram" or "cpu" (placement.mode); `n_cpu_moe` layers keep their experts in RAM.
        bw: the bandwidths of the device that runs the layers and of system RAM.
        speed: hardware.yaml's `policy.speed`.
        acceptance: (rate, k) the MTP head reaches, default `speed.mtp_acceptance`.
    """
    tb = token_bytes(arch, weights, run, speed.at_context)
    kind = "cpu" if mode == "cpu" else bw.kind
    dev, cpu = speed.devices[kind], speed.devices["cpu"]
    # a byte of quantized weights costs `quant_cost` bytes' time (dequantizing in the dot products); state and KV do not
    weight_cost = {k: c.quant_cost if weights.quantized else 1.0 for k, c in (("dev", dev), ("cpu", cpu))}
    dev_rate = (bw.host if mode == "cpu" else bw.device) * dev.efficiency
    host_rate = bw.host * cpu.efficiency
    moved = n_cpu_moe / max(arch.n_layer, 1) if mode == "gpu+ram" else 0.0
    token_ms = speed.token_overhead_ms
    layers_ms = arch.n_layer * dev.layer_overhead_ms + (n_cpu_moe * cpu.layer_overhead_ms if moved else 0.0)

    def read_ms(n_tokens: int) -> float:
        """Reading the weights and state one target decode of `n_tokens` tokens touches."""
        experts = tb.routed * (1 - (1 - tb.expert_share) ** n_tokens)
        weights_on_device = (tb.dense + experts * (1 - moved)) * weight_cost["dev"]
        on_device = weights_on_device + tb.kv + tb.state * (1 + n_tokens) / 2
        return 1000 * (on_device / dev_rate + experts * moved * weight_cost["cpu"] / host_rate)

    core_ms = read_ms(1) + layers_ms
    plain = 1000 / (core_ms + token_ms)

    def step_ms(n_tokens: int) -> float:
        """One verify batch of `n_tokens` tokens: the union of what they read, the fixed costs, a sampled row per
        token, and the work each extra token adds (a share of a plain step)."""
        extra = (n_tokens - 1) * dev.verify_overhead * core_ms
        return read_ms(n_tokens) + layers_ms + n_tokens * token_ms + extra

    best_k, best = 0, plain
    if run.mtp and tb.draft:
        rate, at_k = acceptance or (speed.mtp_acceptance.rate, speed.mtp_acceptance.n_draft)
        q = accuracy_for_acceptance(rate, at_k)
        # a draft reads the MTP layer; the verified step's mirror into the MTP context rides in the first draft's pass
        # (which then reads the union of its few tokens' experts of that layer: counted as one token's, a little low)
        draft_ms = 1000 * tb.draft * weight_cost["dev"] / dev_rate + dev.layer_overhead_ms + token_ms
        for k in range(1, run.spec_n_max + 1):
            expected = sum(q**i for i in range(k + 1))
            tok_s = 1000 * expected / (k * draft_ms + step_ms(k + 1))
            if tok_s > best:
                best_k, best = k, tok_s
    return Speed(plain_tok_s=plain, tok_s=best, k=best_k, bytes_per_token=tb.plain, bandwidth=bw)


def over_rpc(s: Speed, n_workers: int, speed: SpeedPolicy) -> Speed:
    """`s` on a model split across `n_workers` worker hosts: `speed.rpc_token_overhead_ms` more per emitted token
    and worker (the graph sent each step, activations and logits copied through this host; measured on loopback
    by bench/bench_rpc.py, so across real hosts it is a floor). The workers' devices are taken to read as fast as
    this host's own."""
    ms = n_workers * speed.rpc_token_overhead_ms
    if not ms:
        return s
    plain = 1000 / (1000 / s.plain_tok_s + ms)
    return replace(s, plain_tok_s=plain, tok_s=max(1000 / (1000 / s.tok_s + ms), plain))


# ----------------------------------------------------------------------------------------- bandwidths


def gpu_bandwidth(gpu: GPU, speed: SpeedPolicy) -> tuple[float, str]:
    """(bytes/s, source) of a GPU: its own figure (hardware classes), the datasheet table by name, or the
    vendor's default."""
    if gpu.bandwidth:
        return gpu.bandwidth, f"{gpu.bandwidth / GB:.0f} GB/s"
    for row in speed.gpu_gbps:
        if re.search(row.match, gpu.name, re.IGNORECASE):
            return row.gbps * GB, f"{row.gbps:g} GB/s ({row.match} datasheet)"
    gbps = speed.vendor_bandwidth(gpu.vendor)
    return gbps * GB, f"{gbps:g} GB/s (assumed for {gpu.vendor or 'an unknown'} GPU)"


def bandwidth_for(profile: HardwareProfile, gpu: GPU | None, speed: SpeedPolicy) -> Bandwidth:
    """The bandwidths a plan on `profile` runs with (`gpu` is the one the selector plans on, None for CPU)."""
    ram = profile.ram_bandwidth or speed.ram_gbps * GB
    if gpu is None:
        return Bandwidth("cpu", ram, ram, f"RAM {ram / GB:.0f} GB/s" + ("" if profile.ram_bandwidth else " (assumed)"))
    device, source = gpu_bandwidth(gpu, speed)
    return Bandwidth("unified" if gpu.unified else "gpu", device, ram, source)
