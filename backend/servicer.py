"""The gRPC `Backend` service: converts LocalAI's messages at the edge, delegates to `generation.Model`.

Errors are mapped to gRPC status codes in exactly one place (`status_for`); LoadModel alone reports failure
in-band as `Result(success=False)`, which is what LocalAI expects of it.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from typing import Any, Iterator

import grpc

from proto import backend_pb2 as pb
from proto import backend_pb2_grpc as pb_grpc

from .chat import ChatTemplate, extract_tool_calls, message_dicts
from .engine import Engine
from .errors import (ApexError, InsufficientMemoryError, InvalidRequestError, ModelNotFoundError,
                     NoModelLoadedError)
from .generation import Chunk, GenerationRequest, Model, Result
from .gguf_file import read_gguf
from .options import plan_load, resolve_model_path
from .sampling import SamplingParams, parse_logit_bias

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 512  # one default for Predict and PredictStream alike
IDENTITY_MISMATCH = "model identity mismatch"  # LocalAI's grpcerrors.ModelMismatchSentinel


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The one mapping from our errors to gRPC status codes."""
    if isinstance(exc, NoModelLoadedError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, InsufficientMemoryError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, (InvalidRequestError, ValueError)):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, (ModelNotFoundError, FileNotFoundError, LookupError)):
        return grpc.StatusCode.NOT_FOUND
    return grpc.StatusCode.INTERNAL


def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    code = status_for(exc)
    if code == grpc.StatusCode.INTERNAL and not isinstance(exc, ApexError):
        log.exception("internal error")
    context.abort(code, str(exc))


class BackendServicer(pb_grpc.BackendServicer):
    """LocalAI's model-runner protocol for one model at a time."""

    def __init__(self) -> None:
        self._model: Model | None = None
        self._model_name = ""
        self._load_lock = threading.Lock()
        self._jobs = None

    # -- lifecycle --------------------------------------------------------------------------------

    def Health(self, request: pb.HealthMessage, context: grpc.ServicerContext) -> pb.Reply:
        return pb.Reply(message=b"OK")

    def LoadModel(self, request: pb.ModelOptions, context: grpc.ServicerContext) -> pb.Result:
        with self._load_lock:
            try:
                path = resolve_model_path(request.Model, request.ModelFile, request.ModelPath)
                info = read_gguf(path)  # validates the header before llama.cpp sees the file
                plan = plan_load(request, info, path)
                self._free()
                engine = Engine(path, plan.engine)
                template = _template(engine, info) if plan.use_jinja else None
                self._model = Model(engine, name=request.Model or path.name, spec=plan.spec, template=template,
                                    default_seed=request.Seed if request.Seed > 0 else None)
                self._model_name = request.Model
            except ApexError as exc:
                log.warning("LoadModel failed: %s", exc)
                return pb.Result(success=False, message=str(exc))
            except Exception as exc:  # never let a load failure take the server down
                log.exception("LoadModel failed")
                return pb.Result(success=False, message=f"{type(exc).__name__}: {exc}")
            log.info("loaded %s (%s)", path, plan.mtp_reason)
            return pb.Result(success=True, message=f"Model loaded successfully ({plan.mtp_reason})")

    def Free(self, request: pb.HealthMessage, context: grpc.ServicerContext) -> pb.Result:
        with self._load_lock:
            had = self._model is not None
            self._free()
        return pb.Result(success=True, message="model freed" if had else "no model was loaded")

    def _free(self) -> None:
        model, self._model = self._model, None
        if model is not None:
            with model.lock:  # wait for a running request to stop
                model.engine.close()

    def close(self) -> None:
        with self._load_lock:
            self._free()

    def _loaded(self, request: Any = None) -> Model:
        model = self._model
        if model is None:
            raise NoModelLoadedError()
        identity = getattr(request, "ModelIdentity", "")
        if identity and self._model_name and identity != self._model_name:
            raise LookupError(f"{IDENTITY_MISMATCH}: loaded {self._model_name!r}, requested {identity!r}")
        return model

    # -- generation -------------------------------------------------------------------------------

    def Predict(self, request: pb.PredictOptions, context: grpc.ServicerContext) -> pb.Reply:
        try:
            model = self._loaded(request)
            req, tools = self._request(model, request)
            result = Result()
            logprobs: list[dict] = []
            for chunk in model.stream(req, result):
                logprobs += chunk.logprobs
                if not context.is_active():
                    break
            return _final_reply(result, logprobs, tools, with_text=True)
        except Exception as exc:
            _abort(context, exc)

    def PredictStream(self, request: pb.PredictOptions, context: grpc.ServicerContext) -> Iterator[pb.Reply]:
        try:
            model = self._loaded(request)
            req, tools = self._request(model, request)
        except Exception as exc:
            _abort(context, exc)
        result = Result()
        cancel = threading.Event()
        # gRPC stops pulling a cancelled stream; the callback is what tells the producer to stop.
        context.add_callback(cancel.set)
        try:
            for chunk in pump(model.stream(req, result), cancel):
                if chunk.content or chunk.reasoning or chunk.logprobs:  # held-back text still has logprobs
                    yield _chunk_reply(chunk, result)
        except Exception as exc:
            _abort(context, exc)
        if cancel.is_set():
            log.info("client cancelled the stream after %d tokens", result.n_tokens)
            return
        yield _final_reply(result, [], tools, with_text=False)

    def _request(self, model: Model, r: pb.PredictOptions) -> tuple[GenerationRequest, bool]:
        engine = model.engine
        text, thinking = self._prompt_text(model, r)
        prompt = _tokenize_prompt(model, text)
        sampling = SamplingParams(
            temperature=r.Temperature, top_k=r.TopK, top_p=r.TopP, min_p=r.MinP,
            repeat_penalty=r.Penalty, repeat_last_n=r.Repeat,
            frequency_penalty=r.FrequencyPenalty, presence_penalty=r.PresencePenalty,
            seed=r.Seed if r.Seed > 0 else None,  # 0 is proto3's "unset"; negative means random
            grammar=r.Grammar, logit_bias=parse_logit_bias(r.LogitBias, engine.n_vocab),
        )
        if r.Tokens < 0:
            raise InvalidRequestError(f"Tokens (max tokens) must be >= 0, got {r.Tokens}")
        logprobs = None
        if r.Logprobs or r.TopLogprobs:
            logprobs = max(r.TopLogprobs, 0) if r.TopLogprobs else 0
            if logprobs > 20:
                raise InvalidRequestError(f"TopLogprobs must be at most 20, got {r.TopLogprobs}")
        req = GenerationRequest(
            prompt=prompt, sampling=sampling, max_tokens=r.Tokens or DEFAULT_MAX_TOKENS,
            stop=tuple(s for s in r.StopPrompts if s), ignore_eos=r.IgnoreEOS,
            n_draft=r.NDraft if r.NDraft > 0 else None, logprobs=logprobs, thinking=thinking,
        )
        return req, bool(r.Tools)

    def _prompt_text(self, model: Model, r: pb.PredictOptions) -> tuple[str, bool]:
        """The prompt text and whether it leaves the model inside a <think> block."""
        if r.Prompt:
            return r.Prompt, False
        if not r.UseTokenizerTemplate:
            raise InvalidRequestError("empty request: set Prompt, or Messages with UseTokenizerTemplate")
        if model.template is None:
            raise InvalidRequestError("this model has no chat template (or use_jinja is off): send a Prompt")
        if not r.Messages:
            raise InvalidRequestError("UseTokenizerTemplate is set but Messages is empty")
        kwargs = _template_kwargs(r.Metadata)
        tools = None
        if r.Tools:
            try:
                tools = json.loads(r.Tools)
            except json.JSONDecodeError as exc:
                raise InvalidRequestError(f"Tools is not valid JSON: {exc}") from None
        text = model.template.render(message_dicts(r.Messages), tools=tools, **kwargs)
        thinking = text.rstrip().endswith("<think>")
        return text, thinking

    # -- tokens, embeddings ------------------------------------------------------------------------

    def TokenizeString(self, request: pb.PredictOptions, context: grpc.ServicerContext) -> pb.TokenizationResponse:
        try:
            model = self._loaded(request)
            text, _ = self._prompt_text(model, request) if request.UseTokenizerTemplate else (request.Prompt, False)
            tokens = _tokenize_prompt(model, text) if text else []
            return pb.TokenizationResponse(length=len(tokens), tokens=tokens)
        except Exception as exc:
            _abort(context, exc)

    def Detokenize(self, request: pb.DetokenizeRequest, context: grpc.ServicerContext) -> pb.DetokenizeResponse:
        try:
            engine = self._loaded().engine
            engine.check_tokens(request.tokens)
            return pb.DetokenizeResponse(content=engine.detokenize(request.tokens).decode("utf-8", "replace"))
        except Exception as exc:
            _abort(context, exc)

    def Embedding(self, request: pb.PredictOptions, context: grpc.ServicerContext) -> pb.EmbeddingResult:
        try:
            model = self._loaded(request)
            engine = model.engine
            tokens = list(request.EmbeddingTokens) or engine.tokenize(request.Embeddings or request.Prompt)
            with model.lock:
                vec = engine.embed(tokens)
            return pb.EmbeddingResult(embeddings=vec, tokens=len(tokens), dim=len(vec), prompt_tokens=len(tokens),
                                      layout=pb.EMBEDDING_LAYOUT_FINAL)
        except Exception as exc:
            _abort(context, exc)

    # -- introspection ----------------------------------------------------------------------------

    def Status(self, request: pb.HealthMessage, context: grpc.ServicerContext) -> pb.StatusResponse:
        model = self._model
        if model is None:
            return pb.StatusResponse(state=pb.StatusResponse.UNINITIALIZED, memory=pb.MemoryUsageData(total=_rss()))
        state = pb.StatusResponse.BUSY if model.lock.locked() else pb.StatusResponse.READY
        breakdown = memory_breakdown(model)
        return pb.StatusResponse(state=state, memory=pb.MemoryUsageData(total=_rss(), breakdown=breakdown))

    def GetMetrics(self, request: pb.MetricsRequest, context: grpc.ServicerContext) -> pb.MetricsResponse:
        model = self._model
        last = model.last if model else None
        if last is None:
            return pb.MetricsResponse()
        s = last.stats
        return pb.MetricsResponse(
            tokens_per_second=last.tokens_per_second, tokens_generated=last.n_tokens,
            prompt_tokens_processed=last.n_prompt, draft_n=s.drafted, draft_n_accepted=s.accepted,
            draft_verify_steps=s.verify_steps, draft_acceptance_rate=s.acceptance_rate,
            draft_mean_accepted_length=s.mean_accepted_length,
        )

    def ModelMetadata(self, request: pb.ModelOptions, context: grpc.ServicerContext) -> pb.ModelMetadataResponse:
        model = self._model
        if model is None or model.template is None:
            return pb.ModelMetadataResponse()
        sample = [{"role": "user", "content": "Hello"}]
        try:
            rendered = model.template.render(sample, enable_thinking=True)
        except InvalidRequestError as exc:
            log.warning("chat template does not render a sample: %s", exc)
            rendered = ""
        return pb.ModelMetadataResponse(supports_thinking=model.template.supports_thinking, rendered_template=rendered)

    # -- quantization (LocalAI's quantization UI drives the APEX quantizer) ----------------------------

    def _quant_jobs(self):
        if self._jobs is None:
            from quantizer.jobs import QuantizationJobs

            self._jobs = QuantizationJobs()
        return self._jobs

    def StartQuantization(self, request: pb.QuantizationRequest, context: grpc.ServicerContext) -> pb.QuantizationJobResult:
        ok, message = self._quant_jobs().start(request.model, request.quantization_type, request.output_dir,
                                               request.job_id, dict(request.extra_options))
        return pb.QuantizationJobResult(job_id=request.job_id, success=ok, message=message)

    def QuantizationProgress(self, request: pb.QuantizationProgressRequest, context: grpc.ServicerContext):
        try:
            for u in self._quant_jobs().progress(request.job_id):
                if not context.is_active():
                    return
                yield pb.QuantizationProgressUpdate(
                    job_id=u.job_id, progress_percent=u.progress_percent, status=str(getattr(u.status, "value", u.status)),
                    message=u.message, output_file=u.output_file or "", extra_metrics=u.extra_metrics or {},
                )
        except Exception as exc:
            _abort(context, exc)

    def StopQuantization(self, request: pb.QuantizationStopRequest, context: grpc.ServicerContext) -> pb.Result:
        ok, message = self._quant_jobs().stop(request.job_id)
        return pb.Result(success=ok, message=message)


# ------------------------------------------------------------------------------------------ helpers


_DONE = object()


def pump(chunks: Iterator[Chunk], cancel: threading.Event) -> Iterator[Chunk]:
    """Run `chunks` on its own thread and hand them over through a queue.

    The generator holds the model lock while it runs; driving it from a thread that checks `cancel` after every
    chunk means a client that goes away (and a gRPC stream nobody pulls any more) frees the model at once.
    """
    q: queue.SimpleQueue = queue.SimpleQueue()

    def produce() -> None:
        try:
            for chunk in chunks:
                if cancel.is_set():
                    break
                q.put(chunk)
        except BaseException as exc:  # re-raised on the consumer side
            q.put(exc)
        finally:
            chunks.close()
            q.put(_DONE)

    threading.Thread(target=produce, name="generate", daemon=True).start()
    finished = False
    try:
        while True:
            item = q.get()
            if item is _DONE:
                finished = True
                return
            if isinstance(item, BaseException):
                finished = True
                raise item
            yield item
    finally:
        if not finished:  # the consumer stopped early: stop the producer too
            cancel.set()


def _template(engine: Engine, info) -> ChatTemplate | None:
    source = info.chat_template
    if not source:
        return None

    def tok_text(key: str) -> str:
        tid = info.metadata.get(key)
        return engine.piece(int(tid), special=True).decode("utf-8", "replace") if tid is not None and 0 <= int(tid) < engine.n_vocab else ""

    return ChatTemplate(source, bos_token=tok_text("tokenizer.ggml.bos_token_id"),
                        eos_token=tok_text("tokenizer.ggml.eos_token_id"))


def _template_kwargs(metadata: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if metadata.get("chat_template_kwargs"):
        try:
            extra = json.loads(metadata["chat_template_kwargs"])
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"Metadata chat_template_kwargs is not valid JSON: {exc}") from None
        if not isinstance(extra, dict):
            raise InvalidRequestError("Metadata chat_template_kwargs must be a JSON object")
        kwargs.update(extra)
    if "enable_thinking" in metadata:
        kwargs["enable_thinking"] = metadata["enable_thinking"].strip().lower() in ("1", "true", "yes", "on")
    if metadata.get("reasoning_effort"):
        kwargs["reasoning_effort"] = metadata["reasoning_effort"]
    return kwargs


def _tokenize_prompt(model: Model, text: str) -> list[int]:
    bos = model.template.bos_token if model.template else ""
    # A rendered template usually carries its own BOS; adding another would double it.
    add_special = not (bos and text.startswith(bos))
    return model.engine.tokenize(text, add_special=add_special, parse_special=True)


def _chunk_reply(chunk: Chunk, result: Result) -> pb.Reply:
    return pb.Reply(
        message=chunk.content.encode(), tokens=result.n_tokens, prompt_tokens=result.n_prompt,
        chat_deltas=[pb.ChatDelta(content=chunk.content, reasoning_content=chunk.reasoning)],
        logprobs=json.dumps({"content": chunk.logprobs}).encode() if chunk.logprobs else b"",
        draft_n=result.stats.drafted, draft_n_accepted=result.stats.accepted,
        draft_verify_steps=result.stats.verify_steps,
    )


def _final_reply(result: Result, logprobs: list[dict], tools: bool, *, with_text: bool) -> pb.Reply:
    content, calls = extract_tool_calls(result.content) if tools else (result.content, [])
    delta = pb.ChatDelta(
        content=content if with_text else "", reasoning_content=result.reasoning if with_text else "",
        tool_calls=[pb.ToolCallDelta(index=i, id=f"call_{i}", name=c["name"], arguments=c["arguments"])
                    for i, c in enumerate(calls)],
    )
    return pb.Reply(
        message=content.encode() if with_text else b"", tokens=result.n_tokens, prompt_tokens=result.n_prompt,
        timing_prompt_processing=result.t_prompt_ms, timing_token_generation=result.t_gen_ms,
        logprobs=json.dumps({"content": logprobs}).encode() if logprobs else b"",
        chat_deltas=[delta] if (with_text or calls) else [],
        draft_n=result.stats.drafted, draft_n_accepted=result.stats.accepted,
        draft_verify_steps=result.stats.verify_steps, finish_reason=result.finish_reason,
    )


def memory_breakdown(model: Model) -> dict[str, int]:
    """Bytes per component as llama.cpp allocated them, plus the MTP parts named separately."""
    mem = dict(model.engine.memory)
    n_rs = model.engine.config.n_draft_max if model.engine.mtp_enabled else 0
    rec = mem.pop("target_recurrent", 0)
    if rec:
        # llama.cpp allocates the recurrent state (1 + n_rs_seq) times: the extra copies are rollback snapshots.
        mem["recurrent_state"] = rec // (1 + n_rs)
        if n_rs:
            mem["mtp_rollback_snapshots"] = rec - rec // (1 + n_rs)
    last = model.last
    if last is not None:
        mem["spec_drafted"] = last.stats.drafted
        mem["spec_accepted"] = last.stats.accepted
        mem["spec_verify_steps"] = last.stats.verify_steps
    return {k: int(v) for k, v in mem.items()}


def _rss() -> int:
    try:
        import psutil

        return int(psutil.Process(os.getpid()).memory_info().rss)
    except Exception:
        return 0
