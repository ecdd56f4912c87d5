"""Write synthetic qwen35moe GGUFs (with a bundled MTP layer) that llama.cpp loads and runs.

Two uses: tiny models for tests and benchmarks (`write_model`), and sparse real-size layouts whose tensor data
are file holes (`write_sparse`), so loaders and memory planners can be tested against a 35B-A3B header without
the 20 GB behind it.

`write_model` has two weight modes:

* ``random``: weights ~ N(0, 0.02), norms 1, ``ssm_a`` < 0. Exercises every kernel; greedy output is arbitrary
  and top-1 margins can be tiny, so do not test exact speculative == plain equality on it.
* ``predictable``: the trunk's greedy next token is a fixed permutation ``f`` of the normal tokens (one cycle,
  so long generations never repeat or stop early; control tokens are fixed points and never produced from text).
  Every block writes zeros into the residual (``attn_output``, ``ssm_out``, ``ffn_down_exps`` and
  ``ffn_down_shexp`` are zero), so the final hidden state is the RMS-normalised token embedding. Embedding rows
  have unit norm, and ``output`` row ``f(t)`` is the embedding of ``t``: the logit gap is about ``sqrt(n_embd)``.
  The MTP head uses ``eh_proj = [I | 0]`` (token half only), so it predicts from the token alone.
  ``nextn.shared_head_head`` is the output matrix with the rows of a random set W of tokens rotated among
  themselves, so the head predicts ``g(t) != f(t)`` exactly for ``t`` in W.

Acceptance mapping (documented because tests calibrate against it). A drafted chain starting at token ``x``
stays right while it walks through tokens outside W; the first token of W breaks it and every later draft of
the chain is wrong too. With per-token head accuracy ``q = 1 - |W|/n_normal`` and W placed at random along the
cycle, the number of accepted drafts per round of ``k`` drafts has mean ``q + q^2 + ... + q^k``, so the
acceptance rate accepted/drafted is ``(q + ... + q^k) / k``. `write_model` solves that for ``q`` given the
requested acceptance and ``n_draft`` (default 3, llama-server's ``--spec-draft-n-max``). W is spread evenly
along the cycle (random within each run of 16 tokens), so short generations stay within a few points of the
mean; of 8 such placements the one whose acceptance over a full pass of the cycle is closest to the target is
kept. The file records that simulated acceptance (``expected_acceptance``), and
`SynthInfo.speculate` gives the exact drafted/accepted counts of any greedy generation.
The mapping itself (`backend.core.acceptance`) is shared with the gallery's speed model.

The true maps are stored in the file (``apexmtp.synthetic.*`` keys, ignored by llama.cpp) and are read back
with `read_synth_info`.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np

from ..core.acceptance import accuracy_for_acceptance
from ..core.cli_errors import cli_error
from ..core.errors import ApexError, InvalidGGUFError, InvalidRequestError
from .gguf_writer import MetaValue, write_gguf
from .mmproj import write_projector

ARCH = "qwen35moe"
Mode = Literal["random", "predictable"]
DType = Literal["f32", "f16", "bf16"]
_KEY_PREFIX = "apexmtp.synthetic."
_INIT_STD = 0.02
# Control tokens appended after the byte tokens and merges, like Qwen's vocabularies.
EOS_TOKEN, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
_CONTROL_TOKENS = (EOS_TOKEN, IM_START, IM_END)
_TOKEN_NORMAL, _TOKEN_CONTROL = 1, 3  # llama.cpp LLAMA_TOKEN_TYPE_* values

# ChatML; content may be a string, None, or a list of OpenAI content parts (only text parts are kept).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- elif message['content'] is not none -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Text the byte-level BPE merges are learnt from, so common English words get multi-byte tokens.
_BPE_CORPUS = """
The quick brown fox jumps over the lazy dog. A model reads the text one token at a time and predicts the next
token from the ones before it. Speculative decoding lets a small draft head guess several tokens ahead; the main
model then checks all of them in one batch and keeps the longest prefix that it agrees with. When the guesses are
good, the model produces more than one token for each pass over its weights. When they are bad, the extra work is
wasted and the rejected tokens are rolled back. This is the reason why the acceptance rate matters so much for the
speed of generation. Mixture of experts models route every token through a few of their many experts, which keeps
the compute per token small while the number of parameters stays large. Quantization stores the weights with fewer
bits, so that the model fits into the memory of the machine and runs faster there. Hello world! How are you today?
I am fine, thank you. What is the weather like in the city this morning? It is sunny and warm, with a light wind
from the west. Please write a short story about a cat who lives in a library and reads books at night.
"""


# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class SynthConfig:
    """Hyper-parameters of a synthetic qwen35moe model (names follow the GGUF keys they become).

    ``n_layer`` counts trunk layers; with ``mtp`` the file holds one more block (``block_count = n_layer + 1``).
    ``n_vocab`` includes 256 byte tokens and 3 control tokens; the rest are learnt BPE merges.
    """

    n_embd: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 64
    n_expert: int = 8
    n_expert_used: int = 2
    n_ff_exp: int = 256
    n_ff_shexp: int = 256
    ssm_state: int = 32
    ssm_groups: int = 2
    ssm_v_heads: int = 4
    ssm_conv_kernel: int = 4
    full_attention_interval: int = 4
    n_vocab: int = 512
    context_length: int = 4096
    mtp: bool = True

    @property
    def block_count(self) -> int:
        return self.n_layer + (1 if self.mtp else 0)

    @property
    def n_rot(self) -> int:
        """Rotary dims per head: a quarter of the head, as Qwen3.5 does (64 of 256)."""
        return max(2, self.head_dim // 4)

    @property
    def rope_sections(self) -> list[int]:
        """IMROPE sections scaled from Qwen3.5's [11, 11, 10, 0] (which sums to n_rot/2 = 32)."""
        half = self.n_rot // 2
        s = max(1, round(half * 11 / 32))
        return [s, s, half - 2 * s, 0]

    def is_recurrent(self, il: int) -> bool:
        """llama.cpp's default layer kind: every `full_attention_interval`-th trunk layer is full attention."""
        return il < self.n_layer and (il + 1) % self.full_attention_interval != 0

    def validate(self) -> None:
        """Raise `InvalidRequestError` for a config llama.cpp would refuse or abort on."""
        problems = []
        if min(asdict(self)[k] for k in asdict(self) if k != "mtp") <= 0:
            problems.append("every size must be positive")
        if self.n_expert_used > self.n_expert:
            problems.append(f"n_expert_used {self.n_expert_used} > n_expert {self.n_expert}")
        if self.n_head % self.n_head_kv:
            problems.append(f"n_head {self.n_head} is not a multiple of n_head_kv {self.n_head_kv}")
        if self.ssm_v_heads % self.ssm_groups:
            problems.append(f"ssm_v_heads {self.ssm_v_heads} is not a multiple of ssm_groups {self.ssm_groups}")
        if self.head_dim % 2 or self.head_dim < 8:
            problems.append(f"head_dim {self.head_dim} must be even and >= 8 (rope sections)")
        if self.n_vocab < 256 + len(_CONTROL_TOKENS) + 1:
            problems.append(f"n_vocab {self.n_vocab} < {256 + len(_CONTROL_TOKENS) + 1} (bytes + control + 1 merge)")
        if self.full_attention_interval > self.n_layer:
            problems.append("no full-attention trunk layer: full_attention_interval > n_layer")
        if problems:
            raise InvalidRequestError("invalid SynthConfig: " + "; ".join(problems))


# Tables, one model per row.
# fmt: off
PRESETS: dict[str, SynthConfig] = {
    # ~39 MB at f32, ~20 MB at f16: unit and integration tests.
    "tiny": SynthConfig(),
    # ~85 MB at f16 (~165 MB at f32): demos and longer tests; still loads in milliseconds (mmap).
    "small": SynthConfig(n_embd=512, n_layer=8, n_head=8, n_head_kv=2, head_dim=64, n_expert=8, n_expert_used=2,
                         n_ff_exp=256, n_ff_shexp=256, ssm_state=64, ssm_groups=4, ssm_v_heads=8, n_vocab=2048),
    # ~540 MB at f16: CPU benchmarks where a token costs several ms, so speculation can pay (mtp-engine.md §6).
    "bench": SynthConfig(n_embd=1024, n_layer=16, n_head=8, n_head_kv=2, head_dim=128, n_expert=16, n_expert_used=4,
                         n_ff_exp=256, n_ff_shexp=256, ssm_state=64, ssm_groups=4, ssm_v_heads=8, n_vocab=4096),
}

# Published architectures, for sparse real-size layouts only (`write_sparse_model`); values from
# tests/data/apex/architectures.yaml. Never pass these to `write_model`: that would write ~70 GB.
REAL_CONFIGS: dict[str, SynthConfig] = {
    "qwen35moe-35b-a3b": SynthConfig(
        n_embd=2048, n_layer=40, n_head=16, n_head_kv=2, head_dim=256, n_expert=256, n_expert_used=8, n_ff_exp=512,
        n_ff_shexp=512, ssm_state=128, ssm_groups=16, ssm_v_heads=32, ssm_conv_kernel=4, full_attention_interval=4,
        n_vocab=248320, context_length=262144, mtp=True),
}
# fmt: on


# ------------------------------------------------------------------------------------------ tokenizer


@dataclass(frozen=True)
class Vocab:
    """A GPT-2 style byte-level BPE vocabulary: token strings (byte-level unicode), types and merges."""

    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    merges: tuple[str, ...]

    def id_of(self, token: str) -> int:
        return self.tokens.index(token)

    @property
    def control_ids(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.token_types) if t == _TOKEN_CONTROL)


@lru_cache(maxsize=1)
def _byte_unicode() -> tuple[str, ...]:
    """GPT-2's reversible byte -> printable character table (printable bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return tuple(table[b] for b in range(256))


def _corpus_words() -> Counter[tuple[str, ...]]:
    """Pre-tokenise the corpus like GPT-2 (words keep their leading space) into byte-level symbol tuples."""
    enc = _byte_unicode()
    words = re.findall(r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+", _BPE_CORPUS)
    return Counter(tuple(enc[b] for b in w.encode("utf-8")) for w in words)


def _merge_word(word: tuple[str, ...], a: str, b: str) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _learn_merges(n_merges: int) -> list[tuple[str, str]]:
    """Learn up to `n_merges` BPE merges from the corpus (ties broken by the pair, for determinism).

    When the corpus runs out of repeated pairs, further merges join existing tokens with a lowercase letter:
    still valid BPE (both parts are tokens), so tokenisation of any text keeps working.
    """
    words = _corpus_words()
    merges: list[tuple[str, str]] = []
    known = set(_byte_unicode())
    while len(merges) < n_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        (a, b), count = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if count < 2:
            break
        merges.append((a, b))
        known.add(a + b)
        words = Counter({_merge_word(w, a, b): c for w, c in words.items()})
    letters = "abcdefghijklmnopqrstuvwxyz"
    # Breadth-first over prefixes: every new token is itself a prefix later, so any vocabulary size is reachable.
    queue = deque(sorted(known - set(_byte_unicode())) + ["Ġ" + c for c in letters] + list(letters))
    while queue and len(merges) < n_merges:
        prefix = queue.popleft()
        for c in letters:
            if prefix in known and prefix + c not in known and len(merges) < n_merges:
                merges.append((prefix, c))
                known.add(prefix + c)
                queue.append(prefix + c)
    return merges


@lru_cache(maxsize=8)
def build_vocab(n_vocab: int) -> Vocab:
    """A byte-level BPE vocabulary of exactly `n_vocab` tokens: 256 bytes, learnt merges, 3 control tokens."""
    n_merges = n_vocab - 256 - len(_CONTROL_TOKENS)
    merges = _learn_merges(n_merges)
    tokens = [*_byte_unicode(), *(a + b for a, b in merges), *_CONTROL_TOKENS]
    types = [_TOKEN_NORMAL] * (len(tokens) - len(_CONTROL_TOKENS)) + [_TOKEN_CONTROL] * len(_CONTROL_TOKENS)
    assert len(set(tokens)) == len(tokens) == n_vocab
    return Vocab(tuple(tokens), tuple(types), tuple(f"{a} {b}" for a, b in merges))


# ------------------------------------------------------------------------------------------- metadata


def model_metadata(
    config: SynthConfig, *, name: str = "apexmtp-synthetic", file_type: int = 0
) -> dict[str, MetaValue]:
    """All GGUF keys llama.cpp's qwen35moe loader reads, with the exact value types it requires."""
    from gguf import GGUFValueType as T

    c, a = config, ARCH
    vocab = build_vocab(c.n_vocab)
    eos, im_end = vocab.id_of(EOS_TOKEN), vocab.id_of(IM_END)
    meta: dict[str, MetaValue] = {
        "general.architecture": (T.STRING, ARCH),
        "general.name": (T.STRING, name),
        "general.file_type": (T.UINT32, file_type),
        f"{a}.context_length": (T.UINT32, c.context_length),
        f"{a}.embedding_length": (T.UINT32, c.n_embd),
        f"{a}.block_count": (T.UINT32, c.block_count),
        f"{a}.nextn_predict_layers": (T.UINT32, 1 if c.mtp else 0),
        f"{a}.feed_forward_length": (T.UINT32, c.n_ff_exp),
        f"{a}.expert_count": (T.UINT32, c.n_expert),
        f"{a}.expert_used_count": (T.UINT32, c.n_expert_used),
        f"{a}.expert_feed_forward_length": (T.UINT32, c.n_ff_exp),
        f"{a}.expert_shared_feed_forward_length": (T.UINT32, c.n_ff_shexp),
        f"{a}.attention.head_count": (T.UINT32, c.n_head),
        f"{a}.attention.head_count_kv": (T.UINT32, c.n_head_kv),
        f"{a}.attention.key_length": (T.UINT32, c.head_dim),
        f"{a}.attention.value_length": (T.UINT32, c.head_dim),
        f"{a}.attention.layer_norm_rms_epsilon": (T.FLOAT32, 1e-6),
        f"{a}.rope.dimension_count": (T.UINT32, c.n_rot),
        f"{a}.rope.dimension_sections": (T.ARRAY, c.rope_sections, T.INT32),
        f"{a}.rope.freq_base": (T.FLOAT32, 1e7),
        f"{a}.ssm.conv_kernel": (T.UINT32, c.ssm_conv_kernel),
        f"{a}.ssm.state_size": (T.UINT32, c.ssm_state),
        f"{a}.ssm.group_count": (T.UINT32, c.ssm_groups),
        f"{a}.ssm.time_step_rank": (T.UINT32, c.ssm_v_heads),
        f"{a}.ssm.inner_size": (T.UINT32, c.ssm_state * c.ssm_v_heads),
        f"{a}.full_attention_interval": (T.UINT32, c.full_attention_interval),
        "tokenizer.ggml.model": (T.STRING, "gpt2"),
        "tokenizer.ggml.pre": (T.STRING, "qwen35"),
        "tokenizer.ggml.tokens": (T.ARRAY, list(vocab.tokens), T.STRING),
        "tokenizer.ggml.token_type": (T.ARRAY, list(vocab.token_types), T.INT32),
        "tokenizer.ggml.merges": (T.ARRAY, list(vocab.merges), T.STRING),
        "tokenizer.ggml.bos_token_id": (T.UINT32, eos),
        "tokenizer.ggml.eos_token_id": (T.UINT32, eos),
        "tokenizer.ggml.eot_token_id": (T.UINT32, im_end),
        "tokenizer.ggml.padding_token_id": (T.UINT32, eos),
        "tokenizer.ggml.add_bos_token": (T.BOOL, False),
        "tokenizer.chat_template": (T.STRING, CHAT_TEMPLATE),
    }
    return meta


# -------------------------------------------------------------------------------------------- tensors


def tensor_layout(config: SynthConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the model as `(name, ne)` in ggml order (ne[0] = row length), in file order.

    Mirrors the qwen35moe loader (mtp-engine.md §3.2): separate q/k/v on full-attention layers, separate
    gate/up expert tensors, and `nextn.shared_head_norm` as the only optional MTP tensor (as HF converts it).
    """
    c = config
    E, V, D = c.n_embd, c.n_vocab, c.head_dim
    key_dim, value_dim = c.ssm_state * c.ssm_groups, c.ssm_state * c.ssm_v_heads
    conv_dim = 2 * key_dim + value_dim
    out: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (E, V))]

    def attention(p: str) -> list[tuple[str, tuple[int, ...]]]:
        return [
            (f"{p}.attn_q.weight", (E, 2 * D * c.n_head)),
            (f"{p}.attn_k.weight", (E, D * c.n_head_kv)),
            (f"{p}.attn_v.weight", (E, D * c.n_head_kv)),
            (f"{p}.attn_output.weight", (D * c.n_head, E)),
            (f"{p}.attn_q_norm.weight", (D,)),
            (f"{p}.attn_k_norm.weight", (D,)),
        ]

    def linear_attention(p: str) -> list[tuple[str, tuple[int, ...]]]:
        return [
            (f"{p}.attn_qkv.weight", (E, conv_dim)),
            (f"{p}.attn_gate.weight", (E, value_dim)),
            (f"{p}.ssm_conv1d.weight", (c.ssm_conv_kernel, conv_dim)),
            (f"{p}.ssm_dt.bias", (c.ssm_v_heads,)),
            (f"{p}.ssm_a", (c.ssm_v_heads,)),
            (f"{p}.ssm_beta.weight", (E, c.ssm_v_heads)),
            (f"{p}.ssm_alpha.weight", (E, c.ssm_v_heads)),
            (f"{p}.ssm_norm.weight", (c.ssm_state,)),
            (f"{p}.ssm_out.weight", (value_dim, E)),
        ]

    def moe(p: str) -> list[tuple[str, tuple[int, ...]]]:
        X, F, Fs = c.n_expert, c.n_ff_exp, c.n_ff_shexp
        return [
            (f"{p}.ffn_gate_inp.weight", (E, X)),
            (f"{p}.ffn_gate_exps.weight", (E, F, X)),
            (f"{p}.ffn_up_exps.weight", (E, F, X)),
            (f"{p}.ffn_down_exps.weight", (F, E, X)),
            (f"{p}.ffn_gate_inp_shexp.weight", (E,)),
            (f"{p}.ffn_gate_shexp.weight", (E, Fs)),
            (f"{p}.ffn_up_shexp.weight", (E, Fs)),
            (f"{p}.ffn_down_shexp.weight", (Fs, E)),
        ]

    for il in range(c.block_count):
        p = f"blk.{il}"
        out += [(f"{p}.attn_norm.weight", (E,)), (f"{p}.post_attention_norm.weight", (E,))]
        out += linear_attention(p) if c.is_recurrent(il) else attention(p)
        out += moe(p)
        if il == c.n_layer:  # the MTP block
            out += [
                (f"{p}.nextn.eh_proj.weight", (2 * E, E)),
                (f"{p}.nextn.enorm.weight", (E,)),
                (f"{p}.nextn.hnorm.weight", (E,)),
                (f"{p}.nextn.shared_head_norm.weight", (E,)),
            ]
    out += [("output_norm.weight", (E,)), ("output.weight", (E, V))]
    return out


def _keeps_f32(name: str, ne: Sequence[int]) -> bool:
    """Tensors the HF converter keeps in F32 whatever the file type: 1-D ones, routers and the SSM conv."""
    return len(ne) < 2 or name.endswith("ffn_gate_inp.weight") or "ssm_conv1d" in name


# Output projections of every block: zero in `predictable` mode so each block is the identity on the residual.
_RESIDUAL_WRITERS = ("attn_output.weight", "ssm_out.weight", "ffn_down_exps.weight", "ffn_down_shexp.weight")


@dataclass(frozen=True)
class _Predictable:
    """The maps of a predictable model: trunk successor f, head successor g, and the weights that encode them."""

    cycle: np.ndarray  # the normal tokens in the order f visits them
    successor: np.ndarray  # f, int64[V]
    head_successor: np.ndarray  # g, int64[V]
    embedding: np.ndarray  # float32[V, E], unit rows
    output: np.ndarray  # float32[V, E]: row f(t) = embedding[t]
    head: np.ndarray | None  # float32[V, E]: row g(t) = embedding[t]; None when g == f


def _rotate_rows(successor: np.ndarray, wrong: np.ndarray) -> np.ndarray:
    """g: equal to f except on `wrong`, whose successors are rotated by one among themselves (so g != f there)."""
    g = successor.copy()
    if len(wrong) >= 2:
        g[wrong] = successor[np.roll(wrong, -1)]
    return g


def _spread_along(cycle: np.ndarray, n_pick: int, rng: np.random.Generator, block: int = 16) -> np.ndarray:
    """`n_pick` tokens of `cycle`, random within each run of `block` tokens but with the same share in every run.

    Stratifying keeps the realised acceptance of short generations close to the calibrated mean (a plain random
    choice scatters by +-8 points over 128 tokens).
    """
    edges = np.linspace(0, len(cycle), num=-(-len(cycle) // block) + 1).round().astype(int)
    quota = np.diff(np.round(edges * n_pick / len(cycle)).astype(int))
    picks = [rng.choice(np.arange(lo, hi), size=q, replace=False) for lo, hi, q in zip(edges, edges[1:], quota)]
    return cycle[np.concatenate(picks)]


_PLACEMENT_TRIES = 8


def _predictable_maps(config: SynthConfig, rng: np.random.Generator, acceptance: float, n_draft: int) -> _Predictable:
    """Draw f (one cycle over the normal tokens) and a head g whose simulated acceptance is near `acceptance`.

    The number of wrong tokens follows `accuracy_for_acceptance`; among a few random placements of them the
    one whose acceptance over a full pass of the cycle is closest to the target wins, which removes most of the
    luck of a small vocabulary.
    """
    V, E = config.n_vocab, config.n_embd
    normal = np.setdiff1d(np.arange(V), build_vocab(V).control_ids)
    cycle = rng.permutation(normal)
    f = np.arange(V)  # control tokens are fixed points: text never leads to them
    f[cycle] = np.roll(cycle, -1)
    g = f
    n_wrong = round((1.0 - accuracy_for_acceptance(acceptance, n_draft)) * len(normal)) if config.mtp else 0
    if n_wrong:
        candidates = [_rotate_rows(f, _spread_along(cycle, max(2, n_wrong), rng)) for _ in range(_PLACEMENT_TRIES)]
        g = min(candidates, key=lambda c: abs(_full_pass_acceptance(f, c, cycle, n_draft) - acceptance))
    emb = rng.standard_normal((V, E)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    out = np.empty_like(emb)
    out[f] = emb
    head = None
    if g is not f:
        head = np.empty_like(emb)
        head[g] = emb
    return _Predictable(cycle, f, g, emb, out, head)


def _full_pass_acceptance(f: np.ndarray, g: np.ndarray, cycle: np.ndarray, n_draft: int) -> float:
    drafted, accepted = simulate_speculation(f, g, int(cycle[0]), len(cycle), n_draft)
    return accepted / drafted


def _tensor_values(
    name: str, ne: tuple[int, ...], rng: np.random.Generator, pred: _Predictable | None, config: SynthConfig
) -> np.ndarray:
    """The float32 values of one tensor, numpy shape = reversed `ne`."""
    shape = tuple(reversed(ne))
    if pred is not None:
        fixed = {"token_embd.weight": pred.embedding, "output.weight": pred.output}
        if pred.head is not None:
            fixed[f"blk.{config.n_layer}.nextn.shared_head_head.weight"] = pred.head
        if name in fixed:
            return fixed[name]
        if name.endswith(_RESIDUAL_WRITERS):
            return np.zeros(shape, np.float32)
        if name.endswith("nextn.eh_proj.weight"):  # [I | 0]: keep the token half, ignore the hidden half
            return np.eye(ne[1], ne[0], dtype=np.float32)
    if name.endswith("norm.weight"):
        return np.ones(shape, np.float32)
    if name.endswith("ssm_a"):  # -exp(A_log) with A in [1, 16), as Qwen3.5 initialises it
        return -rng.uniform(1.0, 16.0, shape).astype(np.float32)
    return (rng.standard_normal(shape, dtype=np.float32) * _INIT_STD).astype(np.float32)


def _encode(values: np.ndarray, ggml_type: str) -> np.ndarray:
    """Values in the on-disk encoding of `ggml_type` (F32, F16 or BF16, round-to-nearest-even)."""
    if ggml_type == "F32":
        return np.ascontiguousarray(values, np.float32)
    if ggml_type == "F16":
        return values.astype(np.float16)
    bits = np.ascontiguousarray(values, np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


# -------------------------------------------------------------------------------------------- writing


def write_sparse(
    path: str | os.PathLike[str],
    metadata: Mapping[str, MetaValue],
    tensors: Sequence[tuple[str, tuple[int, ...], str]],
) -> Path:
    """Write a valid GGUF whose tensor data are a file hole (all zeros, almost no disk).

    Lets real-size layouts (e.g. the 35B-A3B with Q4_K/Q6_K/IQ tensors) be read by `backend.core.gguf_file` or
    loaded by llama.cpp with `vocab_only=True`, at no disk or RAM cost.

    Args:
        path: output file (parent directories are created).
        metadata: key -> `(GGUFValueType, value)`; arrays as `(GGUFValueType.ARRAY, list, item_type)`.
            `general.architecture` names the architecture (default qwen35moe).
        tensors: `(name, ne, ggml_type_name)`, `ne` in ggml order: `("output.weight", (2048, 248320), "Q6_K")`.

    Raises:
        InvalidRequestError: unknown type, a row not made of whole blocks, or an empty metadata array.
    """
    if "general.architecture" not in metadata:
        from gguf import GGUFValueType

        metadata = {"general.architecture": (GGUFValueType.STRING, ARCH), **metadata}
    return write_gguf(Path(path), metadata, tensors)


def apex_like_type(name: str, ne: tuple[int, ...], n_layer: int = 40) -> str:
    """An I-Compact-like type per tensor for sparse real-layout files (memory checks, not a real recipe).

    Edge-layer (first/last 5 of `n_layer`) experts Q4_K, middle Q3_K, shared experts Q6_K, projections Q4_K,
    output Q6_K, MTP layer Q8_0; 1-D tensors, routers and the SSM conv F32.
    """
    if len(ne) == 1 or "ffn_gate_inp" in name or "ssm_conv1d" in name:
        return "F32"
    if name == "output.weight":
        return "Q6_K"
    layer = re.match(r"blk\.(\d+)\.", name)
    if layer and int(layer.group(1)) >= n_layer:
        return "Q8_0"
    if layer and "_exps" in name:
        return "Q4_K" if int(layer.group(1)) < 5 or int(layer.group(1)) >= n_layer - 5 else "Q3_K"
    return "Q6_K" if "shexp" in name else "Q4_K"


def write_sparse_model(
    path: str | os.PathLike[str], config: SynthConfig, ggml_type: str | Callable[[str, tuple[int, ...]], str] = "Q8_0"
) -> Path:
    """A sparse file with the full qwen35moe layout of `config` (e.g. `REAL_CONFIGS["qwen35moe-35b-a3b"]`).

    Args:
        ggml_type: the type of every quantizable matrix, or a function `(name, ne) -> type name` (a recipe);
            1-D tensors, routers and the SSM conv stay F32 like in converted files.
    """
    config.validate()
    type_of = ggml_type if callable(ggml_type) else (lambda _name, _ne: ggml_type)
    tensors = [(n, ne, _ggml_type_for(n, ne, type_of(n, ne))) for n, ne in tensor_layout(config)]
    return write_sparse(path, model_metadata(config, name="apexmtp-sparse-layout"), tensors)


def _ggml_type_for(name: str, ne: tuple[int, ...], ggml_type: str) -> str:
    return "F32" if _keeps_f32(name, ne) else ggml_type.upper()


_FILE_TYPES = {"f32": 0, "f16": 1, "bf16": 32}  # llama_ftype ALL_F32, MOSTLY_F16, MOSTLY_BF16


def write_model(
    path: str | os.PathLike[str],
    config: SynthConfig = SynthConfig(),
    *,
    mode: Mode = "random",
    acceptance: float = 0.95,
    dtype: DType = "f32",
    seed: int = 0,
    n_draft: int = 3,
) -> Path:
    """Write a synthetic qwen35moe GGUF (see the module docstring for the two modes).

    Args:
        path: output file; parent directories are created.
        config: model sizes; `config.mtp` adds the MTP block.
        mode: "random" weights, or "predictable" (greedy next token = fixed permutation, tunable MTP head).
        acceptance: predictable mode with MTP only: target draft acceptance rate in [0, 1] at `n_draft` drafts
            per round (1.0 = the head always agrees with the trunk).
        dtype: storage type of the matrices (1-D tensors, routers and the SSM conv stay F32).
        seed: all randomness derives from it; equal arguments give byte-identical files.
        n_draft: draft length the acceptance is calibrated for.

    Raises:
        InvalidRequestError: bad config, mode, dtype or acceptance.
    """
    from gguf import GGUFValueType as T

    config.validate()
    if mode not in ("random", "predictable"):
        raise InvalidRequestError(f"mode must be 'random' or 'predictable', got {mode!r}")
    if dtype not in _FILE_TYPES:
        raise InvalidRequestError(f"dtype must be one of {sorted(_FILE_TYPES)}, got {dtype!r}")
    if not 0.0 <= acceptance <= 1.0 or n_draft < 1 or not 0 <= seed < 2**32:
        raise InvalidRequestError(
            f"need 0 <= acceptance <= 1, n_draft >= 1 and 0 <= seed < 2**32; got {acceptance}, {n_draft}, {seed}"
        )
    rng = np.random.default_rng(seed)
    meta = model_metadata(config, name=f"apexmtp-synthetic-{mode}", file_type=_FILE_TYPES[dtype])
    meta[_KEY_PREFIX + "mode"] = (T.STRING, mode)
    meta[_KEY_PREFIX + "seed"] = (T.UINT32, seed)
    layout = tensor_layout(config)
    pred = None
    if mode == "predictable":
        pred = _predictable_maps(config, rng, acceptance, n_draft)
        if pred.head is not None:
            at = next(i for i, (n, _) in enumerate(layout) if n.endswith("nextn.shared_head_norm.weight"))
            layout.insert(
                at + 1, (f"blk.{config.n_layer}.nextn.shared_head_head.weight", (config.n_embd, config.n_vocab))
            )
        meta[_KEY_PREFIX + "successor"] = (T.ARRAY, pred.successor.tolist(), T.UINT32)
        if config.mtp:
            rate = _full_pass_acceptance(pred.successor, pred.head_successor, pred.cycle, n_draft)
            meta[_KEY_PREFIX + "head_successor"] = (T.ARRAY, pred.head_successor.tolist(), T.UINT32)
            meta[_KEY_PREFIX + "n_draft"] = (T.UINT32, n_draft)
            meta[_KEY_PREFIX + "expected_acceptance"] = (T.FLOAT32, rate)
    typed = [(name, ne, _ggml_type_for(name, ne, dtype)) for name, ne in layout]

    def data() -> Iterator[np.ndarray]:
        for name, ne, type_name in typed:
            yield _encode(_tensor_values(name, ne, rng, pred, config), type_name)

    return write_gguf(Path(path), meta, typed, data)


def simulate_speculation(
    successor: np.ndarray, head_successor: np.ndarray, start: int, n_tokens: int, n_draft: int
) -> tuple[int, int]:
    """`(drafted, accepted)` of greedy MTP speculation on a predictable model, computed from its maps.

    Rounds as llama-server runs them: from the last emitted token x the head drafts k tokens by iterating g,
    the trunk keeps the longest prefix that matches f, then emits its own next token, so a round emits
    accepted + 1 tokens. k is `n_draft`, capped at one less than the tokens still to emit (the bonus token
    needs a slot; k = 0 is a plain step). Stops once `n_tokens` tokens are emitted.
    """
    x, emitted, drafted, accepted = start, 0, 0, 0
    while emitted < n_tokens:
        k = min(n_draft, n_tokens - emitted - 1)
        n_ok = 0
        for _ in range(k):  # while drafts are accepted the draft chain and the emitted tokens coincide
            if head_successor[x] != successor[x]:
                break
            x, n_ok = int(successor[x]), n_ok + 1
        x = int(successor[x])
        drafted, accepted, emitted = drafted + k, accepted + n_ok, emitted + n_ok + 1
    return drafted, accepted


# -------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class SynthInfo:
    """What `write_model` recorded about a predictable model: the maps tests check generations against."""

    mode: str
    successor: np.ndarray | None  # trunk greedy next token f[t]
    head_successor: np.ndarray | None  # MTP head greedy next token g[t]
    n_draft: int | None
    expected_acceptance: float | None
    control_ids: tuple[int, ...]

    @property
    def head_accuracy(self) -> float | None:
        """Fraction of normal tokens on which the MTP head agrees with the trunk."""
        if self.successor is None or self.head_successor is None:
            return None
        normal = np.setdiff1d(np.arange(len(self.successor)), self.control_ids)
        return float(np.mean(self.successor[normal] == self.head_successor[normal]))

    def continuation(self, last_token: int, n: int) -> list[int]:
        """The `n` tokens greedy decoding emits after `last_token` (the last prompt token)."""
        if self.successor is None:
            raise ValueError("not a predictable model: no successor map")
        out, t = [], last_token
        for _ in range(n):
            t = int(self.successor[t])
            out.append(t)
        return out

    def speculate(self, last_token: int, n_tokens: int, n_draft: int | None = None) -> tuple[int, int]:
        """`(drafted, accepted)` of an exact greedy MTP engine generating `n_tokens` after a prompt ending in
        `last_token`: the first token comes from the prompt's own decode, the others from draft rounds."""
        if self.successor is None or self.head_successor is None:
            raise ValueError("not a predictable model with an MTP head")
        first = int(self.successor[last_token])
        k = n_draft or self.n_draft or 3
        return simulate_speculation(self.successor, self.head_successor, first, n_tokens - 1, k)


def read_synth_info(path: str | os.PathLike[str]) -> SynthInfo:
    """Read the `apexmtp.synthetic.*` keys of a file written by `write_model`.

    Raises:
        InvalidGGUFError: the file is not a synthetic model (or not a GGUF).
    """
    from gguf import GGUFReader

    from ..core.gguf_file import check_header

    check_header(os.fspath(path))
    reader = GGUFReader(os.fspath(path), "r")
    fields = {k[len(_KEY_PREFIX) :]: f.contents() for k, f in reader.fields.items() if k.startswith(_KEY_PREFIX)}
    if "mode" not in fields or "tokenizer.ggml.token_type" not in reader.fields:
        raise InvalidGGUFError(os.fspath(path), "no apexmtp.synthetic.mode key: not written by backend.synth.qwen35moe")
    types = reader.fields["tokenizer.ggml.token_type"].contents()

    def array(key: str) -> np.ndarray | None:
        return np.asarray(fields[key], dtype=np.int64) if key in fields else None

    return SynthInfo(
        mode=str(fields["mode"]),
        successor=array("successor"),
        head_successor=array("head_successor"),
        n_draft=fields.get("n_draft"),
        expected_acceptance=fields.get("expected_acceptance"),
        control_ids=tuple(i for i, t in enumerate(types) if t == _TOKEN_CONTROL),
    )


# ------------------------------------------------------------------------------------------------ CLI


def main(argv: list[str]) -> int:
    """`apexmtp synth OUT.gguf [--preset tiny] [--mode predictable --acceptance 0.75] [--dtype f16] ...`"""
    parser = argparse.ArgumentParser(
        prog="apexmtp synth", description="Write a synthetic qwen35moe GGUF with an MTP head."
    )
    parser.add_argument("out", type=Path, help="output .gguf path")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model size (default: tiny)")
    parser.add_argument("--mode", choices=["random", "predictable"], default="random")
    parser.add_argument("--acceptance", type=float, default=0.95, help="predictable mode: target MTP acceptance")
    parser.add_argument("--n-draft", type=int, default=3, help="draft length the acceptance is calibrated for")
    parser.add_argument("--dtype", choices=sorted(_FILE_TYPES), default="f16")
    parser.add_argument("--no-mtp", action="store_true", help="write the trunk only (no MTP block)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mmproj", type=Path, metavar="PROJ.gguf",
                        help="also write a matching tiny vision projector (qwen3vl_merger) there")
    args = parser.parse_args(argv)
    config = replace(PRESETS[args.preset], mtp=not args.no_mtp)
    t0 = time.perf_counter()
    options = {k: getattr(args, k) for k in ("mode", "acceptance", "dtype", "seed", "n_draft")}
    try:
        out = write_model(args.out, config, **options)
        if args.mmproj is not None:
            write_projector(args.mmproj, config.n_embd, seed=args.seed)
    except ApexError as exc:
        return cli_error(parser.prog, exc, 2)
    size_mib, elapsed = out.stat().st_size / 2**20, time.perf_counter() - t0
    print(f"wrote {out} ({size_mib:.1f} MiB, {args.preset}, {args.mode}, {args.dtype}) in {elapsed:.1f} s")
    if args.mmproj is not None:
        print(f"wrote {args.mmproj} (vision projector for it)")
    return 0
