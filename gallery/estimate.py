"""Memory model for qwen35moe GGUFs (and plain transformers), per tier, context and runtime options.

What llama.cpp allocates, component by component (hardware-fit.md §5, §9; checked against llama.cpp's own
`no_alloc` dry run in tests/test_gallery_estimate.py and bench/bench_estimate.py):

* weights, split by tensor role: `token_embd` (llama.cpp keeps the input embedding in host memory), routed experts
  (`ffn_*_exps`, which `--n-cpu-moe` can leave in RAM), the MTP layer (loaded only with MTP on), everything else;
* KV cache only for full-attention layers (10 of 40 on Qwen3.5/3.6-35B-A3B): cells x per-layer K and V row bytes of
  the cache type (q8_0 = 34 bytes per 32 values);
* the recurrent state of the Gated-DeltaNet layers, f32, per sequence, times (1 + n_rs_seq) when MTP keeps rollback
  snapshots (n_rs_seq = spec_n_max);
* the compute buffer: the largest of the graph's phases. With this vocabulary the logits phase dominates
  (n_ubatch x (4 x n_vocab + 12 x n_embd) bytes, exact on the real layout); the in-layer phases (attention with its
  f16 mask of n_ctx x n_ubatch, MoE, DeltaNet) are linear in n_ubatch with coefficients fitted to llama.cpp's dry
  runs on synthetic layouts (CPU backend, flash attention on);
* the MTP draft context: its own one-layer KV (f16 by default) and compute buffer;
* logits output buffers, an optional mmproj, and the margins the selector adds.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass, field, fields
from itertools import accumulate
from typing import Any

from backend.core.errors import InvalidRequestError
from backend.core.units import ctx_label, gib

from .catalog import WeightBytes

# ggml block sizes: (values per block, bytes per block) for KV cache types.
CACHE_TYPES: dict[str, tuple[int, int]] = {
    "f32": (1, 4),
    "f16": (1, 2),
    "bf16": (1, 2),
    "q8_0": (32, 34),
    "q5_1": (32, 24),
    "q5_0": (32, 22),
    "q4_1": (32, 20),
    "q4_0": (32, 18),
    "iq4_nl": (32, 18),
}
KV_CELL_PAD = 256  # llama.cpp pads the context to a multiple of 256 cells
_FLOAT_TYPES = ("F32", "F16", "BF16")
_EXPERT_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down|gate_up)_exps\.")
_LAYER_RE = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class ArchFacts:
    """The hyperparameters the memory model reads, from a GGUF header or from architectures.yaml."""

    architecture: str
    n_layer: int  # trunk layers (block_count minus nextn)
    n_nextn: int
    n_embd: int
    n_vocab: int
    n_ctx_train: int
    attn_kv_elems: tuple[int, ...]  # per full-attention trunk layer: n_head_kv * (key_length + value_length)
    mtp_kv_elems: int  # the MTP layer's KV elements per token (0 without one)
    n_recurrent: int  # DeltaNet / SSM layers
    rs_elems: int  # recurrent state per layer and sequence: n_embd_r + n_embd_s (f32)
    q_elems: int  # n_head * key_length (attention width, for the compute phases)
    conv_dim: int  # DeltaNet conv channels: 2 * state * groups + inner
    ssm_inner: int
    ssm_s2r: int  # state_size^2 * time_step_rank
    ff_used: int  # expert_feed_forward_length * expert_used_count (dense: feed_forward_length)
    experts_used: int
    ff_shared: int
    n_expert: int = 1  # routed experts per layer (1 for dense models)
    kv_head_dims: tuple[int, int] = (0, 0)  # attention key_length, value_length

    @classmethod
    def from_keys(cls, arch: str, get: Any, n_vocab: int) -> ArchFacts:
        """Build from a key getter `get(key, default)` over `<arch>.`-less GGUF keys."""
        block_count = int(get("block_count", 0))
        nextn = int(get("nextn_predict_layers", 0) or 0)
        n_layer = block_count - nextn
        n_embd = int(get("embedding_length", 0))
        n_head = _per_layer(get("attention.head_count", 0), block_count)
        n_head_kv = _per_layer(get("attention.head_count_kv", None) or n_head, block_count)
        k_len = int(get("attention.key_length", 0) or (n_embd // max(n_head[0], 1)))
        v_len = int(get("attention.value_length", 0) or k_len)
        s, g, inner = int(get("ssm.state_size", 0) or 0), int(get("ssm.group_count", 0) or 0), int(get("ssm.inner_size", 0) or 0)
        rank, kc = int(get("ssm.time_step_rank", 0) or 0), int(get("ssm.conv_kernel", 0) or 0)
        # hybrid models: every `interval`-th layer is full attention (llama.cpp default 4); plain ones have no SSM
        interval = int(get("full_attention_interval", 4) or 4)
        recurrent = [il for il in range(n_layer) if inner and (il + 1) % interval != 0]
        attn = [il for il in range(n_layer) if il not in set(recurrent)]
        experts_used = int(get("expert_used_count", 0) or 0)
        ff = int(get("expert_feed_forward_length", 0) or 0) if experts_used else int(get("feed_forward_length", 0) or 0)
        return cls(
            architecture=arch,
            n_layer=n_layer,
            n_nextn=nextn,
            n_embd=n_embd,
            n_vocab=n_vocab,
            n_ctx_train=int(get("context_length", 0) or 0),
            attn_kv_elems=tuple(n_head_kv[il] * (k_len + v_len) for il in attn),
            mtp_kv_elems=n_head_kv[n_layer] * (k_len + v_len) if nextn else 0,
            n_recurrent=len(recurrent),
            rs_elems=((kc - 1) * (inner + 2 * g * s) + s * inner) if recurrent else 0,
            q_elems=n_head[0] * k_len,
            conv_dim=2 * s * g + inner,
            ssm_inner=inner,
            ssm_s2r=s * s * rank,
            ff_used=ff * max(experts_used, 1),
            experts_used=max(experts_used, 1),
            ff_shared=int(get("expert_shared_feed_forward_length", 0) or 0),
            n_expert=max(int(get("expert_count", 0) or 0), 1),
            kv_head_dims=(k_len, v_len) if attn or nextn else (0, 0),
        )

    @classmethod
    def from_gguf(cls, info: Any) -> ArchFacts:
        """From a `backend.core.gguf_file.GGUFInfo`; the vocabulary is the row count of `token_embd`."""
        embd = next((t for t in info.tensors if t.name == "token_embd.weight"), None)
        tokens = info.metadata.get("tokenizer.ggml.tokens")
        n_vocab = embd.ne[1] if embd is not None else (tokens or {}).get("array_len", 0)
        return cls.from_keys(info.architecture, lambda k, d=None: info.arch_key(k, d), int(n_vocab))

    @classmethod
    def from_table(cls, facts: dict[str, Any], *, nextn: int) -> ArchFacts:
        """From an architectures.yaml entry; `nextn` is the file's MTP layer count (block_count grows by it)."""
        keys = dict(facts, nextn_predict_layers=nextn, block_count=facts["block_count"] + nextn)
        return cls.from_keys(facts["general.architecture"], lambda k, d=None: keys.get(k, d), facts["vocab_size"])

    @property
    def kv_elems_per_token(self) -> int:
        return sum(self.attn_kv_elems)


def kv_cache_type(wanted: str, arch: ArchFacts) -> str:
    """`wanted` where its blocks divide the attention heads' key and value lengths, else f16: llama.cpp refuses to
    create a context whose quantized cache blocks would straddle heads (e.g. q8_0 on 16-wide heads)."""
    if wanted not in CACHE_TYPES:
        raise InvalidRequestError(f"unknown KV cache type {wanted!r} (known: {', '.join(CACHE_TYPES)})")
    block = CACHE_TYPES[wanted][0]
    return wanted if all(d % block == 0 for d in arch.kv_head_dims) else "f16"


def _per_layer(value: Any, n: int) -> list[int]:
    """A GGUF per-layer key (scalar or array) as a list of `n` ints."""
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value] + [int(value[-1])] * (n - len(value))
    return [int(value or 0)] * max(n, 1)


def weights_from_gguf(info: Any, arch: ArchFacts) -> WeightBytes:
    """Tensor bytes of a GGUF split by role (token_embd / routed experts / MTP layer / rest); a file without an
    `output.weight` ties its LM head to `token_embd`; `quantized` when most bytes are not f32/f16/bf16."""
    embd = experts = mtp = 0
    floats = sum(t.n_bytes for t in info.tensors if t.type_name.upper() in _FLOAT_TYPES)
    tied = not any(t.name == "output.weight" for t in info.tensors)
    for t in info.tensors:
        layer = _LAYER_RE.match(t.name)
        if t.name == "token_embd.weight":
            embd += t.n_bytes
        elif layer and int(layer.group(1)) >= arch.n_layer:
            mtp += t.n_bytes
        elif _EXPERT_RE.match(t.name):
            experts += t.n_bytes
    total = sum(t.n_bytes for t in info.tensors)
    return WeightBytes(total=total, token_embd=embd, routed_experts=experts, mtp=mtp, output_tied=tied,
                       quantized=2 * floats < total)


def cache_bytes(n_elems: int, cache_type: str) -> int:
    """Bytes of `n_elems` values (one row) in a KV cache of `cache_type`."""
    if cache_type not in CACHE_TYPES:
        raise InvalidRequestError(f"unknown KV cache type {cache_type!r} (known: {', '.join(CACHE_TYPES)})")
    per_block, block_bytes = CACHE_TYPES[cache_type]
    return -(-n_elems // per_block) * block_bytes


@dataclass(frozen=True)
class RunConfig:
    """Runtime options that change memory: context, micro-batch, parallel slots, KV types, MTP, mmproj.

    `n_ctx` is the context of ONE slot and `n_seq` the number of slots, as the engine builds them
    (backend/engine/llama.py `_new_context`): one unified KV buffer of `n_seq x n_ctx` cells in the target and in
    the MTP context, recurrent state (with its rollback snapshots) and a logits row per slot.
    """

    n_ctx: int
    n_ubatch: int = 512
    n_seq: int = 1  # parallel slots
    cache_type_k: str = "q8_0"
    cache_type_v: str = "q8_0"
    mtp: bool = False
    spec_n_max: int = 0  # MTP draft length; the target keeps this many recurrent-state snapshots
    draft_cache_type: str = "f16"
    mmproj_bytes: int = 0
    n_checkpoints: int = 0  # recurrent-state checkpoints per slot (the backend's ctx_checkpoints)
    checkpoint_min_step: int = 256  # their spacing in a prompt (checkpoint_min_step)

    @property
    def checkpoints_per_slot(self) -> int:
        """Checkpoints one slot can hold: one per `checkpoint_min_step` of its context plus the 3 placed at turn
        markers and the prompt's end, at most `n_checkpoints`."""
        return min(self.n_checkpoints, -(-self.n_ctx // max(self.checkpoint_min_step, 1)) + 3)

    @property
    def n_cells(self) -> int:
        """KV cells of the unified buffer: every slot's context, padded as llama.cpp pads it."""
        return -(-self.n_ctx * self.n_seq // KV_CELL_PAD) * KV_CELL_PAD


@dataclass(frozen=True)
class Breakdown:
    """Estimated bytes per component for one model + RunConfig."""

    token_embd: int
    experts: int
    mtp_weights: int
    other_weights: int
    kv: int
    rs: int
    compute: int
    output: int
    mtp_kv: int
    mtp_compute: int
    mtp_output: int
    mmproj: int
    checkpoints: int = 0  # kept for prompt reuse in host RAM: checkpoints and each slot's prompt end (kept_per_slot)
    expert_layers: int = field(default=1)  # trunk layers that hold routed experts (for --n-cpu-moe)

    @property
    def weights(self) -> int:
        return self.token_embd + self.experts + self.mtp_weights + self.other_weights

    @property
    def mtp_total(self) -> int:
        """Everything MTP adds: head weights, draft context, and the extra rollback snapshots are in `rs`."""
        return self.mtp_weights + self.mtp_kv + self.mtp_compute + self.mtp_output

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self) if f.name != "expert_layers")

    def expert_bytes(self, n_layers: int) -> int:
        """Routed-expert bytes of `n_layers` trunk layers (average per layer; APEX edge layers are larger, so
        moving the first layers frees at least this much)."""
        return self.experts * min(n_layers, self.expert_layers) // max(self.expert_layers, 1)


def layer_compute(arch: ArchFacts, run: RunConfig) -> int:
    """The in-layer phases of the target's compute buffer (attention with its mask, MoE, DeltaNet), bytes: what a
    device holding layers but not the output needs."""
    t, e = run.n_ubatch, arch.n_embd
    mask = run.n_cells * t * 2 if arch.attn_kv_elems else 0
    kv_width = max(arch.attn_kv_elems, default=0) // 2
    attn = t * (16 * arch.q_elems + 8 * kv_width + 23 * e) if arch.attn_kv_elems else 0
    moe = t * (12 * arch.ff_used + arch.experts_used * e + 4 * e + 9 * arch.ff_shared)
    gdn = t * (9 * arch.conv_dim + 3 * arch.ssm_inner + 18 * e) + 20 * arch.ssm_s2r if arch.n_recurrent else 0
    return mask + max(attn, moe, gdn)


def target_compute(arch: ArchFacts, run: RunConfig) -> int:
    """Compute buffer of the target context: the largest graph phase (see module doc), bytes."""
    logits = run.n_ubatch * (4 * arch.n_vocab + 12 * arch.n_embd)
    return max(logits, layer_compute(arch, run))


def mtp_compute(arch: ArchFacts, run: RunConfig) -> int:
    """Compute buffer of the MTP draft context (one full-attention MoE layer, one output row)."""
    t, e = run.n_ubatch, arch.n_embd
    mask = run.n_cells * t * 2
    kv_width = arch.mtp_kv_elems // 2
    attention = mask + t * max(16 * arch.q_elems + 8 * kv_width + 6 * e, 16 * e)
    moe = t * max(8 * arch.experts_used * e + e, 12 * arch.ff_used + 20 * e, 24 * e)
    return max(attention, moe)


def estimate(arch: ArchFacts, weights: WeightBytes, run: RunConfig) -> Breakdown:
    """Estimate every memory component of `weights` run with `run` (bytes).

    Raises:
        InvalidRequestError: MTP asked of a model without an MTP layer, or an unknown cache type.
    """
    if run.mtp and not arch.n_nextn:
        raise InvalidRequestError("MTP requested but the model has no MTP layer (nextn_predict_layers = 0)")
    cells = run.n_cells
    kv = cells * sum(cache_bytes(n // 2, run.cache_type_k) + cache_bytes(n // 2, run.cache_type_v)
                     for n in arch.attn_kv_elems)
    snapshots = 1 + (run.spec_n_max if run.mtp else 0)
    rs = run.n_seq * snapshots * arch.n_recurrent * arch.rs_elems * 4
    output = run.n_seq * arch.n_vocab * 4
    mtp_kv = mtp_comp = mtp_out = 0
    if run.mtp:
        half = arch.mtp_kv_elems // 2
        mtp_kv = cells * 2 * cache_bytes(half, run.draft_cache_type)
        mtp_comp = mtp_compute(arch, run)
        mtp_out = output
    return Breakdown(
        token_embd=weights.token_embd,
        experts=weights.routed_experts,
        mtp_weights=weights.mtp if run.mtp else 0,
        other_weights=weights.other,
        kv=kv,
        rs=rs,
        compute=target_compute(arch, run),
        output=output,
        mtp_kv=mtp_kv,
        mtp_compute=mtp_comp,
        mtp_output=mtp_out,
        mmproj=run.mmproj_bytes,
        checkpoints=run.n_seq * kept_per_slot(arch, run),
        expert_layers=arch.n_layer,
    )


@dataclass(frozen=True)
class Placement:
    """Where a Breakdown lives: on the GPU (`device`) and in system RAM (`host`), bytes without margins."""

    mode: str  # "gpu" (everything offloaded), "gpu+ram" (routed experts of n_cpu_moe layers in RAM), "cpu"
    n_cpu_moe: int
    device: int
    host: int


def place(b: Breakdown, mode: str, n_cpu_moe: int = 0, *, arch: ArchFacts | None = None,
          n_ubatch: int = 512) -> Placement:
    """Split `b` between GPU and host for a placement mode.

    On the GPU: every layer's weights except `token_embd` (llama.cpp keeps the input embedding on the host) and,
    in `gpu+ram`, the routed experts of the first `n_cpu_moe` layers; KV, recurrent state, compute buffers, the
    MTP context and the mmproj. On the host: token_embd, logits buffers, moved experts and, when experts run on
    the CPU, a CPU compute buffer for their MoE phase.
    """
    if mode == "cpu":
        return Placement("cpu", 0, 0, b.total)
    moved = b.expert_bytes(n_cpu_moe) if mode == "gpu+ram" else 0
    device = b.total - b.token_embd - b.output - b.mtp_output - moved - b.checkpoints
    host = b.token_embd + b.output + b.mtp_output + moved + b.checkpoints
    if moved and arch is not None:
        host += n_ubatch * (12 * arch.ff_used + arch.experts_used * arch.n_embd + 4 * arch.n_embd)
    return Placement(mode, n_cpu_moe if mode == "gpu+ram" else 0, device, host)


@dataclass(frozen=True)
class Holder:
    """Somewhere a model split across hosts keeps its part (llama.cpp's RPC split, serving-at-scale.md §5).

    `device` holders are `llama_model_params.devices` (the RPC workers' devices, then local GPUs, as the engine
    lists them) and share the offloaded layers by llama.cpp's default `tensor_split`: their free memory. The local
    CPU is no device: it holds the first layers, the ones `n_gpu_layers` leaves out. The `host` holder keeps what
    llama.cpp keeps in this process whatever the split: the input embedding, the logits buffers, an mmproj."""

    name: str  # as the plan prints it: "local RAM", the GPU's name, "RPC0[10.0.0.2:50052]"
    where: str  # "local" or the worker's endpoint: one host per distinct value
    free: int  # bytes it may use, margin included
    margin: int  # kept free on it
    device: bool = True
    takes_layers: bool = True
    host: bool = False


@dataclass(frozen=True)
class Share:
    """One holder's part of a split plan, bytes (`need` includes the holder's margin)."""

    holder: Holder
    layers: int  # llama.cpp's layer slots: trunk layers, the MTP layer(s), the output layer
    weights: int
    kv: int  # the target's KV of its attention layers and, with MTP, the draft context's
    other: int  # compute buffers, recurrent state, logits buffers, mmproj

    @property
    def need(self) -> int:
        return self.weights + self.kv + self.other + self.holder.margin

    @property
    def fits(self) -> bool:
        return self.need <= self.holder.free


def split_layers(n_slots: int, proportions: list[float]) -> list[int]:
    """Layer slots per device as llama.cpp deals them out (`llama_model::load_tensors`): slot j goes to the first
    device whose cumulative, normalised share exceeds j / n_slots (`std::upper_bound` over the split points)."""
    total = sum(proportions)
    shares = [p / total for p in proportions] if total > 0 else [1 / len(proportions)] * len(proportions)
    points = list(accumulate(shares))
    counts = [0] * len(proportions)
    for j in range(n_slots):
        counts[min(bisect_right(points, j / n_slots), len(counts) - 1)] += 1
    return counts


def split(b: Breakdown, arch: ArchFacts, run: RunConfig, holders: list[Holder], *, tied: bool) -> tuple[Share, ...]:
    """Share `b` out over `holders` by layers, as llama.cpp places a model split across RPC workers.

    llama.cpp's layer slots are the trunk layers, the MTP layer(s) (counted in its `n_layer`) and the output layer,
    in that order. The local CPU (a non-device holder that takes layers) gets the first slots in proportion to its
    free memory among all holders, at most all but the last (that count is `n_gpu_layers = slots - cpu layers`);
    the devices split the rest by their free memory. A trunk layer carries the average layer's weights, KV and
    recurrent state; the MTP slot the MTP weights, draft KV and compute; the output slot the LM head and the full
    compute buffer (logits phase); every other holder with layers the in-layer compute phases. The LM head is
    `output.weight`, the shape of `token_embd`; when `tied` to it, llama.cpp loads a copy of `token_embd` for the
    output layer (TENSOR_DUPLICATED), so the output's holder carries that copy.

    Returns:
        One share per holder, in `holders` order.
    """
    n_slots = arch.n_layer + arch.n_nextn + 1
    takers = [i for i, h in enumerate(holders) if h.takes_layers]
    devices = [i for i in takers if holders[i].device]
    cpu = [i for i in takers if not holders[i].device][:1]  # only this host's CPU is no device
    counts = [0] * len(holders)
    if cpu:
        ranked = cpu + devices
        first = split_layers(n_slots, [holders[i].free for i in ranked])[0]
        counts[cpu[0]] = min(first, n_slots - 1) if devices else n_slots
    if devices:
        for i, n in zip(devices, split_layers(n_slots - sum(counts), [holders[i].free for i in devices])):
            counts[i] = n
    output_head = b.token_embd if tied else min(b.token_embd, b.other_weights)
    trunk_w = (b.experts + b.other_weights - (0 if tied else output_head)) / max(arch.n_layer, 1)
    trunk_kv, trunk_rs = b.kv / max(arch.n_layer, 1), b.rs / max(arch.n_layer, 1)
    in_layer = layer_compute(arch, run)
    shares: dict[int, Share] = {}
    start = 0
    for i in cpu + devices + [i for i in range(len(holders)) if i not in takers]:
        slots = range(start, start + counts[i])
        start += counts[i]
        trunk = sum(1 for j in slots if j < arch.n_layer)
        mtp = any(arch.n_layer <= j < arch.n_layer + arch.n_nextn for j in slots)
        out = n_slots - 1 in slots
        weights = round(trunk_w * trunk) + (b.mtp_weights if mtp else 0) + (output_head if out else 0)
        kv = round(trunk_kv * trunk) + (b.mtp_kv if mtp else 0)
        other = round(trunk_rs * trunk) + (b.mtp_compute if mtp else 0)
        other += b.compute if out else (in_layer if slots else 0)
        if holders[i].host:
            weights += b.token_embd
            other += b.output + b.mtp_output + b.mmproj + b.checkpoints
        shares[i] = Share(holders[i], counts[i], weights, kv, other)
    return tuple(shares[i] for i in range(len(holders)))


def hosts(shares: tuple[Share, ...]) -> list[str]:
    """The distinct hosts ("local" or a worker's endpoint) holding layers of a split, in holder order."""
    return list(dict.fromkeys(s.holder.where for s in shares if s.layers))


def kept_per_slot(arch: ArchFacts, run: RunConfig) -> int:
    """Host RAM one slot keeps for prompt reuse (backend/engine/prompt_cache.py): on a hybrid model with
    checkpoints on, copies of its recurrent state (with MTP, plus the hidden row the head drafts from next) at each
    checkpoint and at its prompt's end; on any model that end's logits row (a dense one keeps only the row)."""
    h, logits = (arch.n_embd * 4 if run.mtp else 0), 4 * arch.n_vocab
    if not arch.n_recurrent:
        return logits + h
    if run.n_checkpoints <= 0:
        return 0
    return (run.checkpoints_per_slot + 1) * (arch.n_recurrent * arch.rs_elems * 4 + h) + logits


def describe(b: Breakdown, run: RunConfig, arch: ArchFacts) -> list[tuple[str, int]]:
    """Human labels for the non-zero parts of `b`, in the order the explanations print them."""
    slots = f"{run.n_seq} slots x " if run.n_seq > 1 else ""
    per_slot = f" x {run.n_seq} slots" if run.n_seq > 1 else ""
    parts = [
        ("weights", b.weights - b.mtp_weights),
        (f"KV @ {slots}{ctx_label(run.n_ctx)} {run.cache_type_k}", b.kv),
        (f"recurrent state x{1 + (run.spec_n_max if run.mtp else 0)}{per_slot}", b.rs),
        (f"compute (ubatch {run.n_ubatch})", b.compute + b.output),
        ("MTP head + draft context", b.mtp_total),
        ("mmproj", b.mmproj),
        # A dense model keeps only the prompt end's logits row: too small to name.
        (f"checkpoints x{run.checkpoints_per_slot} + prompt end{per_slot} (RAM)", b.checkpoints if arch.n_recurrent else 0),
    ]
    return [(label, n) for label, n in parts if n > 0 and (arch.n_recurrent or not label.startswith("recurrent"))]


def summary(b: Breakdown, run: RunConfig, arch: ArchFacts) -> str:
    """One line: `15.8 GiB weights + 2.7 GiB KV @ 256k q8_0 + ...` (no total, the selector adds it)."""
    return " + ".join(f"{gib(n)} {label}" for label, n in describe(b, run, arch))
