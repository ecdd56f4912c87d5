"""backend.synth.qwen35moe against real llama.cpp: the files load (high- and low-level, MTP contexts included),
tokenize real text, follow their permutation, and the MTP head predicts what the file says it does."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import llama_cpp
import llama_cpp._logger
import llama_cpp.llama_cpp_ext as ext
import numpy as np
import pytest

from backend.core.acceptance import acceptance_for_accuracy, accuracy_for_acceptance
from backend.core.errors import InvalidGGUFError, InvalidRequestError
from backend.core.gguf_file import check_header, read_gguf
from backend.synth.gguf_writer import tensor_nbytes
from backend.synth.qwen35moe import (
    PRESETS,
    REAL_CONFIGS,
    SynthConfig,
    build_vocab,
    main,
    model_metadata,
    read_synth_info,
    simulate_speculation,
    tensor_layout,
    write_model,
    write_sparse,
    write_sparse_model,
)

llama_cpp._logger.set_verbose(False)  # route llama.cpp's log through the quiet callback


def _llama(path: Path, **kw) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False, **kw)


@contextlib.contextmanager
def _model(path: Path, load_mtp: bool = True) -> Iterator[llama_cpp.llama_model_p]:
    mp = llama_cpp.llama_model_default_params()
    mp.load_mtp = load_mtp
    mp.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
    assert model, f"llama.cpp refused {path}"
    try:
        yield model
    finally:
        llama_cpp.llama_model_free(model)


def _context_params(n_ctx: int, *, mtp: bool = False, other=None, n_rs_seq: int = 0):
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx
    cp.n_seq_max = 1
    cp.n_threads = cp.n_threads_batch = 2
    cp.n_rs_seq = n_rs_seq
    if mtp:
        cp.ctx_type = llama_cpp.LLAMA_CONTEXT_TYPE_MTP
        cp.ctx_other = other
    return cp


@contextlib.contextmanager
def _contexts(model, n_ctx: int = 256, n_rs_seq: int = 4):
    """A target context and an MTP context on the same model, as mtp-engine.md §1.2-1.3 set them up."""
    tgt = llama_cpp.llama_init_from_model(model, _context_params(n_ctx, n_rs_seq=n_rs_seq))
    assert tgt
    dft = llama_cpp.llama_init_from_model(model, _context_params(n_ctx, mtp=True, other=tgt))
    try:
        assert dft
        yield tgt, dft
    finally:
        if dft:
            llama_cpp.llama_free(dft)
        llama_cpp.llama_free(tgt)


def _decode(ctx, tokens: list[int], rows: np.ndarray | None, all_logits: bool) -> None:
    batch = llama_cpp.llama_batch_ext_init(ctx)
    try:
        for k, tok in enumerate(tokens):
            idx = llama_cpp.llama_batch_ext_add_token(batch, 0, tok)
            assert idx == k
            assert llama_cpp.llama_batch_ext_set_pos(batch, idx, ctypes.byref(llama_cpp.llama_pos(k)))
            if rows is not None:
                row = np.ascontiguousarray(rows[k], dtype=np.float32)
                embd = llama_cpp.llama_embd(row.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), 1, row.shape[0])
                assert llama_cpp.llama_batch_ext_set_embd_token(batch, idx, embd)
            llama_cpp.llama_batch_ext_set_output_logits(batch, idx, all_logits or k == len(tokens) - 1)
        assert llama_cpp.llama_process(ctx, llama_cpp.LLAMA_PROCESS_TYPE_DECODE, batch) == 0
    finally:
        llama_cpp.llama_batch_ext_free(batch)


def _argmax_rows(ctx, n: int, n_vocab: int) -> np.ndarray:
    return np.array(
        [np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), (n_vocab,))) for i in range(n)]
    )


def _mtp_head_predictions(path: Path, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(trunk greedy next token, MTP head greedy next token) for every position of `tokens`, via llama.cpp.

    The MTP entry at position p pairs token x_p with the target's hidden state h_{p-1} (zeros at p = 0).
    """
    with _model(path) as model, _contexts(model, n_ctx=len(tokens)) as (tgt, dft):
        n_embd = llama_cpp.llama_model_n_embd_out(model)
        n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        ext.llama_set_embeddings_nextn(tgt, True, False)
        ext.llama_set_embeddings_nextn(dft, True, True)
        _decode(tgt, tokens, None, all_logits=True)
        trunk = _argmax_rows(tgt, len(tokens), n_vocab)
        h = np.ctypeslib.as_array(ext.llama_get_embeddings_nextn(tgt), (len(tokens), n_embd)).copy()
        _decode(dft, tokens, np.vstack([np.zeros((1, n_embd), np.float32), h[:-1]]), all_logits=True)
        return trunk, _argmax_rows(dft, len(tokens), n_vocab)


# ------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("fixture", ["tiny_random_gguf", "tiny_predictable_gguf", "tiny_nomtp_gguf"])
def test_high_level_llama_loads_and_generates(fixture: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(fixture)
    llm = _llama(path)
    assert llm.n_vocab() == PRESETS["tiny"].n_vocab
    out = llm.create_completion("Hello", max_tokens=8, temperature=0.0)
    assert out["usage"]["completion_tokens"] == 8


@pytest.mark.parametrize("fixture", ["tiny_random_gguf", "tiny_predictable_gguf"])
def test_low_level_mtp_contexts(fixture: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(fixture)
    with _model(path) as model:
        assert llama_cpp.llama_model_n_layer_nextn(model) == 1
        assert llama_cpp.llama_model_n_layer(model) == PRESETS["tiny"].n_layer
        with _contexts(model) as (tgt, dft):
            assert llama_cpp.llama_n_rs_seq(tgt) == 4
            assert dft


def test_mtp_file_loads_trunk_only_without_load_mtp(tiny_predictable_gguf: Path) -> None:
    """load_mtp=False skips the blk.N tensors; the trunk still decodes (what a plain `Llama` does)."""
    info = read_synth_info(tiny_predictable_gguf)
    with _model(tiny_predictable_gguf, load_mtp=False) as model:
        ctx = llama_cpp.llama_init_from_model(model, _context_params(64))
        try:
            _decode(ctx, [72, 101], None, all_logits=True)
            assert list(_argmax_rows(ctx, 2, PRESETS["tiny"].n_vocab)) == list(info.successor[[72, 101]])
        finally:
            llama_cpp.llama_free(ctx)


def test_no_mtp_model_has_no_head(tiny_nomtp_gguf: Path) -> None:
    info = read_gguf(tiny_nomtp_gguf)
    assert (info.nextn_layers, info.block_count, info.has_mtp_head) == (0, PRESETS["tiny"].n_layer, False)
    with _model(tiny_nomtp_gguf) as model:
        assert llama_cpp.llama_model_n_layer_nextn(model) == 0
        # llama.cpp refuses (NULL, no abort) an MTP context on a model without a head.
        assert not llama_cpp.llama_init_from_model(model, _context_params(64, mtp=True))


def test_header_matches_loader_contract(tiny_random_gguf: Path) -> None:
    info = read_gguf(tiny_random_gguf)
    cfg = PRESETS["tiny"]
    assert info.architecture == "qwen35moe"
    assert (info.block_count, info.nextn_layers, info.trunk_layers) == (cfg.n_layer + 1, 1, cfg.n_layer)
    assert info.has_mtp_head
    assert info.metadata["general.file_type"] == 0 and info.metadata["general.name"]
    assert info.chat_template and "<|im_start|>" in info.chat_template
    assert [t.name for t in info.tensors] == [name for name, _ in tensor_layout(cfg)]
    assert {t.type_name for t in info.tensors} == {"F32"}


# ----------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_real_text(tiny_random_gguf: Path) -> None:
    llm = _llama(tiny_random_gguf)
    texts = ["The quick brown fox jumps over the lazy dog.", "héllo wörld — 日本語 🙂\n\ttabs  and  spaces"]
    for text in texts:
        tokens = llm.tokenize(text.encode(), add_bos=False)
        assert llm.detokenize(tokens).decode() == text
    english = llm.tokenize(b"the model and the token", add_bos=False)
    assert len(english) <= 6, "learnt merges should cover common English words"
    eos = llm.token_eos()
    assert llm.detokenize([eos], special=True) == b"<|endoftext|>"


def test_chat_template_works(tiny_random_gguf: Path) -> None:
    llm = _llama(tiny_random_gguf)
    reply = llm.create_chat_completion(messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)
    assert reply["choices"][0]["message"]["role"] == "assistant"
    # <|im_start|> user \n hi <|im_end|> \n <|im_start|> assistant \n: the control tokens are single tokens
    n_prompt = reply["usage"]["prompt_tokens"]
    tokens = llm.tokenize(b"<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", False, True)
    assert n_prompt == len(tokens)
    im_start = build_vocab(PRESETS["tiny"].n_vocab).id_of("<|im_start|>")
    assert tokens.count(im_start) == 2
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert llm.create_chat_completion(messages=parts, max_tokens=1)["usage"]["prompt_tokens"] == n_prompt


def test_vocab_any_size() -> None:
    for n in (260, 512, 4096):
        vocab = build_vocab(n)
        assert len(vocab.tokens) == len(set(vocab.tokens)) == n
        assert len(vocab.control_ids) == 3 and len(vocab.merges) == n - 259


# --------------------------------------------------------------------------------------- predictable


def test_predictable_greedy_follows_permutation(tiny_predictable_gguf: Path) -> None:
    info = read_synth_info(tiny_predictable_gguf)
    assert info.mode == "predictable" and info.head_accuracy == 1.0
    llm = _llama(tiny_predictable_gguf)
    prompt = llm.tokenize(b"Hello world", add_bos=False)
    seq = [prompt[-1]]
    for tok in llm.generate(prompt, temp=0.0):
        seq.append(tok)
        if len(seq) == 21:
            break
    assert seq[1:] == info.continuation(seq[0], 20)
    # f is one cycle over the normal tokens and never reaches a control token (no early EOS).
    normal = [t for t in range(len(info.successor)) if t not in info.control_ids]
    assert sorted(info.successor[normal]) == normal
    walk, t = set(), normal[0]
    while t not in walk:
        walk.add(t)
        t = info.successor[t]
    assert len(walk) == len(normal)


@pytest.mark.parametrize("acceptance", [1.0, 0.75])
def test_mtp_head_predicts_what_the_file_says(acceptance: float, synth_model) -> None:
    path = synth_model("predictable", acceptance=acceptance)
    info = read_synth_info(path)
    normal = [t for t in range(len(info.successor)) if t not in info.control_ids]
    tokens = list(np.random.default_rng(1).permutation(normal)[:256])
    trunk, head = _mtp_head_predictions(path, tokens)
    assert list(trunk) == list(info.successor[tokens])
    assert list(head) == list(info.head_successor[tokens])


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_half_precision_keeps_margins(dtype: str, synth_model) -> None:
    path = synth_model("predictable", acceptance=1.0, dtype=dtype)
    assert read_gguf(path).metadata["general.file_type"] == {"f16": 1, "bf16": 32}[dtype]
    info = read_synth_info(path)
    llm = _llama(path)
    prompt = llm.tokenize(b"The", add_bos=False)
    seq = [prompt[-1]] + [t for t, _ in zip(llm.generate(prompt, temp=0.0), range(8))]
    assert all(info.successor[a] == b for a, b in itertools.pairwise(seq))


# Tiny layers, large vocabulary: rounding the number of wrong tokens costs little.
_WIDE_VOCAB = SynthConfig(
    n_embd=64,
    n_head=2,
    n_head_kv=1,
    head_dim=16,
    n_expert=2,
    n_expert_used=1,
    n_ff_exp=64,
    n_ff_shexp=64,
    ssm_state=16,
    ssm_groups=1,
    ssm_v_heads=2,
    n_vocab=4096,
)


@pytest.mark.parametrize("target", [0.95, 0.75, 0.40])
def test_acceptance_calibration(target: float, tmp_path: Path) -> None:
    q = accuracy_for_acceptance(target, 3)
    assert acceptance_for_accuracy(q, 3) == pytest.approx(target, abs=1e-9)
    info = read_synth_info(write_model(tmp_path / "w.gguf", _WIDE_VOCAB, mode="predictable", acceptance=target))
    assert info.head_accuracy == pytest.approx(q, abs=0.001)
    assert info.expected_acceptance == pytest.approx(target, abs=0.01)
    assert info.n_draft == 3
    # Short generations stay close to the target because the wrong tokens are spread along the cycle.
    normal = [t for t in range(len(info.successor)) if t not in info.control_ids]
    rates = [a / d for d, a in (info.speculate(t, 128) for t in normal[::97])]
    assert np.mean(rates) == pytest.approx(target, abs=0.04)
    assert np.percentile(rates, 90) - np.percentile(rates, 10) < 0.15


def test_simulate_speculation_counts_rounds() -> None:
    f = np.array([1, 2, 3, 4, 5, 0])
    assert simulate_speculation(f, f, 0, 12, 3) == (9, 9)  # 3 rounds of 3 accepted + 1 own token
    g = f.copy()
    g[2] = 4  # the head is wrong after token 2
    # round 1 from 0: drafts 1,2,4 -> accepts 1,2, emits 3; round 2 from 3: drafts 4,5,0 -> all accepted, emits 1
    assert simulate_speculation(f, g, 0, 7, 3) == (6, 5)
    # the last round drafts at most (tokens left - 1): 5 tokens = 4 (3 drafts + bonus) + 1 plain step
    assert simulate_speculation(f, f, 0, 5, 3) == (3, 3)
    assert simulate_speculation(f, f, 0, 6, 3) == (4, 4)


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    digests = {
        hashlib.sha256(
            write_model(tmp_path / f"{i}.gguf", mode="predictable", acceptance=0.5, seed=7).read_bytes()
        ).hexdigest()
        for i in range(2)
    }
    assert len(digests) == 1


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="n_expert_used"):
        write_model(tmp_path / "x.gguf", SynthConfig(n_expert_used=16))
    with pytest.raises(InvalidRequestError, match="acceptance"):
        write_model(tmp_path / "x.gguf", mode="predictable", acceptance=1.5)
    with pytest.raises(InvalidRequestError, match="dtype"):
        write_model(tmp_path / "x.gguf", dtype="q4")  # type: ignore[arg-type]
    assert not (tmp_path / "x.gguf").exists()


def test_read_synth_info_refuses_other_files(tmp_path: Path) -> None:
    path = write_sparse(tmp_path / "s.gguf", model_metadata(PRESETS["tiny"]), [("a.weight", (256,), "F32")])
    with pytest.raises(InvalidGGUFError, match="synthetic"):
        read_synth_info(path)


# -------------------------------------------------------------------------------------------- sparse


def test_sparse_real_size_tensors_cost_no_disk(tmp_path: Path) -> None:
    tensors = [
        ("token_embd.weight", (2048, 248320), "Q4_K"),
        ("output.weight", (2048, 248320), "Q6_K"),
        ("blk.0.ffn_gate_exps.weight", (2048, 512, 256), "IQ2_XXS"),
        ("blk.0.ffn_down_exps.weight", (512, 2048, 256), "Q5_K"),
        ("blk.0.ffn_gate_inp.weight", (2048, 256), "F32"),
    ]
    path = write_sparse(tmp_path / "big.gguf", model_metadata(PRESETS["tiny"]), tensors)
    info = read_gguf(path)
    assert [(t.name, t.ne, t.type_name) for t in info.tensors] == tensors
    assert [t.n_bytes for t in info.tensors] == [tensor_nbytes(ne, ty) for _, ne, ty in tensors]
    assert tensor_nbytes((2048, 248320), "Q6_K") == 2048 * 248320 // 256 * 210
    assert info.file_size > 900 * 2**20
    assert path.stat().st_blocks * 512 < 2 * 2**20  # the data region is a hole
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    assert llm.detokenize(llm.tokenize(b"sparse but valid", add_bos=False)) == b"sparse but valid"


def test_tensor_nbytes_checks_blocks() -> None:
    with pytest.raises(InvalidRequestError, match="block size"):
        tensor_nbytes((100, 4), "Q4_K")
    with pytest.raises(InvalidRequestError, match="unknown ggml type"):
        tensor_nbytes((256,), "Q9_Z")


# ----------------------------------------------------------------------------------------------- CLI


def test_cli_reports_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "x.gguf"), "--mode", "predictable", "--acceptance", "2"]) == 2
    assert "acceptance" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_cli_writes_no_mtp_predictable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.gguf"
    assert (
        main([str(out), "--preset", "tiny", "--mode", "predictable", "--no-mtp", "--dtype", "f16", "--seed", "3"]) == 0
    )
    assert "wrote" in capsys.readouterr().out
    info = read_gguf(out)
    assert (info.nextn_layers, info.has_mtp_head, info.metadata["general.file_type"]) == (0, False, 1)
    assert read_synth_info(out).head_successor is None
    llm = _llama(out)
    assert llm.n_vocab() == replace(PRESETS["tiny"], mtp=False).n_vocab


def test_sparse_real_35b_layout(tmp_path: Path) -> None:
    config = REAL_CONFIGS["qwen35moe-35b-a3b"]
    path = write_sparse_model(tmp_path / "a3b.gguf", config, "Q4_K")
    _, n_tensors, _ = check_header(path)
    assert n_tensors == 753  # 733 trunk tensors + 20 in blk.40 (tensor-inventory.yaml)
    assert path.stat().st_size > 18 * 2**30 and path.stat().st_blocks * 512 < 32 * 2**20
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    assert llm.n_vocab() == 248320
    assert not list(tmp_path.glob("*.part"))


def test_sparse_rejects_duplicates_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="twice"):
        write_sparse(
            tmp_path / "d.gguf", model_metadata(PRESETS["tiny"]), [("a", (256,), "F32"), ("a", (256,), "F32")]
        )
    assert not list(tmp_path.iterdir())
