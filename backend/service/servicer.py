"""The gRPC `Backend` service (asyncio): converts LocalAI's messages at the edge, delegates to the scheduler.

Handlers never block the event loop: generation runs on the scheduler's thread and comes back through a queue,
model loading and freeing run on the llama thread, so Health/Status/GetMetrics answer at once however many
requests are generating or waiting. Requests are validated here, for LocalAI and `apexmtp run` alike; an error's
gRPC status code is its class's (`backend.core.errors.STATUSES`), and the trailing metadata names the class and
the PredictOptions field to blame. LoadModel alone reports failure in-band as `Result(success=False)`, which is
what LocalAI expects of it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import json
import logging
import os
import threading
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from ..core.errors import (
    ERROR_PARAM_KEY,
    ERROR_TYPE_KEY,
    ApexError,
    EngineClosedError,
    InvalidRequestError,
    ModelMismatchError,
    NoModelLoadedError,
    status_of,
)
from ..core.gguf_file import read_gguf
from ..core.parse import parse_bool
from ..engine.draft_model import DraftModel
from ..engine.generation import Chunk, GenerationRequest, Result
from ..engine.llama import Engine
from ..engine.llamalog import LIVE
from ..engine.sampling import SamplingParams, parse_logit_bias
from ..engine.scheduler import Scheduler, llama_thread
from ..engine.vision import Image, check_image
from ..proto import backend_pb2 as pb
from ..proto import backend_pb2_grpc as pb_grpc
from .chat import ChatTemplate, ToolPlan, message_dicts
from .grammars import trigger_patterns
from .options import LoadPlan, plan_load, resolve_model_path
from .tools import Parsed, ToolCallParser, merge_calls

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 512  # one default for Predict and PredictStream alike
IDENTITY_MISMATCH = "model identity mismatch"  # LocalAI's grpcerrors.ModelMismatchSentinel

def status_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code of an error: its class's in `backend.core.errors.STATUSES` (INTERNAL for a bug)."""
    return grpc.StatusCode[status_of(exc).grpc]


MAX_TOP_LOGPROBS = 20  # OpenAI's limit, and llama-server's n_probs cap


@contextlib.asynccontextmanager
async def _aborting(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """`async with _aborting(context):` around an RPC's work: whatever error it raises ends the RPC with that
    error's status (`_abort`); cancellation passes through."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - the RPC's last resort: every error becomes a status, a bug is logged
        await _abort(context, exc)


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    code = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("internal error", exc_info=exc)
    marker: tuple[tuple[str, str], ...] = ()
    if isinstance(exc, ApexError):
        marker = ((ERROR_TYPE_KEY, type(exc).__name__),)
        if getattr(exc, "param", None):
            marker += ((ERROR_PARAM_KEY, exc.param),)
    await context.abort(code, str(exc) or type(exc).__name__, trailing_metadata=marker)


@dataclass
class LoadedModel:
    """What LoadModel built: the scheduler (which owns the engine), the chat template and how it was loaded."""

    name: str
    scheduler: Scheduler
    template: ChatTemplate | None
    plan: LoadPlan

    @property
    def engine(self) -> Engine:
        return self.scheduler.engine


class BackendServicer(pb_grpc.BackendServicer):
    """LocalAI's model-runner protocol for one model at a time, served to many clients at once."""

    def __init__(self) -> None:
        self._model: LoadedModel | None = None
        self._load_lock = asyncio.Lock()
        self._jobs = None

    # -- lifecycle --------------------------------------------------------------------------------

    async def Health(self, request: pb.HealthMessage, context: grpc.aio.ServicerContext) -> pb.Reply:
        return pb.Reply(message=b"OK")

    async def LoadModel(self, request: pb.ModelOptions, context: grpc.aio.ServicerContext) -> pb.Result:
        async with self._load_lock:
            try:
                path = resolve_model_path(request.Model, request.ModelFile, request.ModelPath)
                info = read_gguf(path)  # validates the header before llama.cpp sees the file
                plan = plan_load(request, info, path)
                await self._free()
                loop = asyncio.get_running_loop()
                self._model = await loop.run_in_executor(llama_thread(), _build, request, plan, info)
                loop.run_in_executor(llama_thread(), self._model.scheduler.run)
            except ApexError as exc:
                log.warning("LoadModel failed: %s", exc)
                return pb.Result(success=False, message=str(exc))
            except Exception as exc:  # never let a load failure take the server down
                log.exception("LoadModel failed")
                return pb.Result(success=False, message=f"{type(exc).__name__}: {exc}")
            log.info("loaded %s (%s, %d slot(s) of %d tokens)", path, plan.mtp_reason, plan.engine.n_seq,
                     plan.engine.n_ctx)
            return pb.Result(success=True, message=f"Model loaded successfully ({plan.mtp_reason}; "
                                                   f"{plan.engine.n_seq} slot(s) of {plan.engine.n_ctx} tokens)")

    async def Free(self, request: pb.HealthMessage, context: grpc.aio.ServicerContext) -> pb.Result:
        async with self._load_lock:
            had = self._model is not None
            await self._free()
        return pb.Result(success=True, message="model freed" if had else "no model was loaded")

    async def _free(self) -> None:
        """Unload the model: its open requests end with UNAVAILABLE, then everything llama.cpp holds is freed."""
        model, self._model = self._model, None
        if model is not None:
            reason = EngineClosedError(f"model {model.name} was unloaded while this request was running")
            await asyncio.to_thread(model.scheduler.close, reason)

    async def close(self) -> None:
        async with self._load_lock:
            await self._free()

    def _loaded(self, request: Any = None) -> LoadedModel:
        model = self._model
        if model is None:
            raise NoModelLoadedError()
        identity = getattr(request, "ModelIdentity", "")
        if identity and model.plan.identity and identity != model.plan.identity:
            raise ModelMismatchError(f"{IDENTITY_MISMATCH}: loaded {model.plan.identity!r}, requested {identity!r}")
        return model

    # -- generation -------------------------------------------------------------------------------

    async def Predict(self, request: pb.PredictOptions, context: grpc.aio.ServicerContext) -> pb.Reply:
        async with _aborting(context):
            model = self._loaded(request)
            req, parser = await self._request(model, request)
            logprobs: list[dict] = []
            async for event in _events(model.scheduler, req):
                if isinstance(event, Result):
                    return _final_reply(event, logprobs, parser, with_text=True)
                logprobs += event.logprobs

    async def PredictStream(self, request: pb.PredictOptions,
                            context: grpc.aio.ServicerContext) -> AsyncIterator[pb.Reply]:
        async with _aborting(context):
            try:
                model = self._loaded(request)
                req, parser = await self._request(model, request)
                result = Result(n_prompt=req.n_prompt)
                async for event in _events(model.scheduler, req, progress=result):
                    if isinstance(event, Result):
                        yield _final_reply(event, [], parser, with_text=False)
                    else:
                        yield _chunk_reply(event, result, parser)
            except asyncio.CancelledError:
                log.info("client cancelled the stream")
                raise

    async def _request(self, model: LoadedModel,
                       r: pb.PredictOptions) -> tuple[GenerationRequest, ToolCallParser | None]:
        engine = model.engine
        tools = _tool_plan(model, r)
        text, thinking = self._prompt_text(model, r, tools)
        images: tuple = ()
        if r.Images:
            prompt, images = await _image_prompt(model, text, list(r.Images))
        else:
            prompt = _tokenize_prompt(model, text)
        if r.Grammar:  # the client's own grammar (lazy when the model was loaded with GrammarTriggers)
            grammar, triggers = r.Grammar, tuple(trigger_patterns(model.plan.grammar_triggers))
        else:
            grammar, triggers = tools.grammar(thinking=thinking)
        sampling = SamplingParams(
            temperature=r.Temperature, top_k=r.TopK, top_p=r.TopP, min_p=r.MinP,
            repeat_penalty=r.Penalty, repeat_last_n=r.Repeat,
            frequency_penalty=r.FrequencyPenalty, presence_penalty=r.PresencePenalty,
            seed=r.Seed if r.Seed > 0 else None,  # 0 is proto3's "unset"; negative means random
            grammar=grammar, grammar_triggers=triggers, logit_bias=parse_logit_bias(r.LogitBias, engine.n_vocab),
        )
        if r.Tokens < 0:
            raise InvalidRequestError(f"max tokens must not be negative (0: the default), got {r.Tokens}",
                                      param="Tokens")
        if not 0 <= r.TopLogprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError(f"top logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {r.TopLogprobs}",
                                      param="TopLogprobs")
        logprobs = r.TopLogprobs if r.Logprobs or r.TopLogprobs else None
        req = GenerationRequest(
            prompt=prompt, sampling=sampling, max_tokens=r.Tokens or DEFAULT_MAX_TOKENS,
            stop=tuple(s for s in r.StopPrompts if s), ignore_eos=r.IgnoreEOS,
            n_draft=r.NDraft if r.NDraft > 0 else None, logprobs=logprobs, thinking=thinking, images=images,
        )
        return req, tools.parser()

    def _prompt_text(self, model: LoadedModel, r: pb.PredictOptions, tools: ToolPlan) -> tuple[str, bool]:
        """The prompt text and whether it leaves the model inside a <think> block."""
        if r.Prompt:
            return r.Prompt, False
        if not r.UseTokenizerTemplate:
            raise InvalidRequestError("empty prompt: set Prompt, or Messages with UseTokenizerTemplate",
                                      param="Prompt")
        if model.template is None:
            raise InvalidRequestError("this model has no chat template (or use_jinja is off): send a Prompt")
        if not r.Messages:
            raise InvalidRequestError("no messages: send at least one (UseTokenizerTemplate is set)",
                                      param="Messages")
        kwargs = _template_kwargs(r.Metadata)
        if model.plan.reasoning >= 0:  # reasoning_budget: the default of requests that do not say
            kwargs.setdefault("enable_thinking", model.plan.reasoning > 0)
        messages = message_dicts(r.Messages)
        prefill = ""
        if model.plan.prefill_assistant and len(messages) > 1 and messages[-1]["role"] == "assistant" \
                and "tool_calls" not in messages[-1]:
            # llama-server's prefill: the reply continues the trailing assistant message instead of answering it
            prefill = messages.pop()["content"] or ""
        text = model.template.render(messages, tools=tools.tools, **kwargs) + prefill
        thinking = text.rstrip().endswith("<think>")
        return text, thinking

    # -- tokens, embeddings ------------------------------------------------------------------------

    async def TokenizeString(self, request: pb.PredictOptions,
                             context: grpc.aio.ServicerContext) -> pb.TokenizationResponse:
        async with _aborting(context):
            model = self._loaded(request)
            text, _ = (self._prompt_text(model, request, _tool_plan(model, request)) if request.UseTokenizerTemplate
                       else (request.Prompt, False))
            tokens = _tokenize_prompt(model, text) if text else []
            return pb.TokenizationResponse(length=len(tokens), tokens=tokens)

    async def Detokenize(self, request: pb.DetokenizeRequest,
                         context: grpc.aio.ServicerContext) -> pb.DetokenizeResponse:
        async with _aborting(context):
            engine = self._loaded().engine
            engine.check_tokens(request.tokens)
            return pb.DetokenizeResponse(content=engine.detokenize(request.tokens).decode("utf-8", "replace"))

    async def Embedding(self, request: pb.PredictOptions, context: grpc.aio.ServicerContext) -> pb.EmbeddingResult:
        async with _aborting(context):
            model = self._loaded(request)
            tokens = list(request.EmbeddingTokens) or model.engine.tokenize(request.Embeddings or request.Prompt)
            vec = await asyncio.wrap_future(model.scheduler.call(lambda engine: engine.embed(tokens)))
            return pb.EmbeddingResult(embeddings=vec, tokens=len(tokens), dim=len(vec), prompt_tokens=len(tokens),
                                      layout=pb.EMBEDDING_LAYOUT_FINAL)

    async def Rerank(self, request: pb.RerankRequest, context: grpc.aio.ServicerContext) -> pb.RerankResult:
        """Documents scored against the query by the model's classification head, best first (LocalAI's order),
        cut to `top_n` when set."""
        async with _aborting(context):
            model = self._loaded(request)
            if not request.query:
                raise InvalidRequestError("Rerank needs a query", param="query")
            if not request.documents:
                raise InvalidRequestError("Rerank needs at least one document", param="documents")
            docs = list(request.documents)
            scored = await asyncio.wrap_future(model.scheduler.call(lambda engine: engine.rerank(request.query, docs)))
            order = sorted(range(len(docs)), key=lambda i: -scored[i][0])
            if 0 < request.top_n < len(order):
                order = order[:request.top_n]
            tokens = sum(scored[i][1] for i in order)
            return pb.RerankResult(usage=pb.Usage(total_tokens=tokens, prompt_tokens=tokens),
                                   results=[pb.DocumentResult(index=i, text=docs[i], relevance_score=scored[i][0])
                                            for i in order])

    # -- introspection ----------------------------------------------------------------------------

    async def Status(self, request: pb.HealthMessage, context: grpc.aio.ServicerContext) -> pb.StatusResponse:
        model = self._model
        if model is None:
            return pb.StatusResponse(state=pb.StatusResponse.UNINITIALIZED,
                                     memory=pb.MemoryUsageData(total=_rss(), breakdown=_live()))
        busy = model.scheduler.busy_slots or model.scheduler.queue_depth
        state = pb.StatusResponse.BUSY if busy else pb.StatusResponse.READY
        return pb.StatusResponse(state=state, memory=pb.MemoryUsageData(total=_rss(), breakdown=memory_breakdown(model)))

    async def GetMetrics(self, request: pb.MetricsRequest, context: grpc.aio.ServicerContext) -> pb.MetricsResponse:
        model = self._model
        last = model.scheduler.metrics.last if model else None
        if last is None:
            return pb.MetricsResponse()
        s = last.stats
        return pb.MetricsResponse(
            tokens_per_second=last.tokens_per_second, tokens_generated=last.n_tokens,
            prompt_tokens_processed=last.n_prompt, draft_n=s.drafted, draft_n_accepted=s.accepted,
            draft_verify_steps=s.verify_steps, draft_acceptance_rate=s.acceptance_rate,
            draft_mean_accepted_length=s.mean_accepted_length,
        )

    async def ModelMetadata(self, request: pb.ModelOptions,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        model = self._model
        if model is None or model.template is None:
            return pb.ModelMetadataResponse()
        sample = [{"role": "user", "content": "Hello"}]
        try:
            rendered = model.template.render(sample, enable_thinking=True)
        except InvalidRequestError as exc:
            log.warning("chat template does not render a sample: %s", exc)
            rendered = ""
        projector = model.engine.projector
        return pb.ModelMetadataResponse(supports_thinking=model.template.supports_thinking, rendered_template=rendered,
                                        media_marker=projector.marker if projector is not None else "")

    # -- quantization (LocalAI's quantization UI drives the APEX quantizer) ----------------------------

    def _quant_jobs(self):
        if self._jobs is None:
            from quantizer.jobs import QuantizationJobs

            self._jobs = QuantizationJobs()
        return self._jobs

    async def StartQuantization(self, request: pb.QuantizationRequest,
                                context: grpc.aio.ServicerContext) -> pb.QuantizationJobResult:
        ok, message = await asyncio.to_thread(self._quant_jobs().start, request.model, request.quantization_type,
                                              request.output_dir, request.job_id, dict(request.extra_options))
        return pb.QuantizationJobResult(job_id=request.job_id, success=ok, message=message)

    async def QuantizationProgress(self, request: pb.QuantizationProgressRequest,
                                   context: grpc.aio.ServicerContext) -> AsyncIterator[pb.QuantizationProgressUpdate]:
        async with _aborting(context):
            updates = self._quant_jobs().progress(request.job_id)
            while (u := await asyncio.to_thread(next, updates, None)) is not None:
                yield pb.QuantizationProgressUpdate(
                    job_id=u.job_id, progress_percent=u.progress_percent, status=str(getattr(u.status, "value", u.status)),
                    message=u.message, output_file=u.output_file or "", extra_metrics=u.extra_metrics or {},
                )

    async def StopQuantization(self, request: pb.QuantizationStopRequest,
                               context: grpc.aio.ServicerContext) -> pb.Result:
        ok, message = await asyncio.to_thread(self._quant_jobs().stop, request.job_id)
        return pb.Result(success=ok, message=message)


# ------------------------------------------------------------------------------------------ helpers


def _build(request: pb.ModelOptions, plan: LoadPlan, info) -> LoadedModel:
    """Load the engine and its scheduler (on the llama thread)."""
    engine = Engine(plan.path, plan.engine)
    draft: Engine | None = None
    try:
        template = _template(engine, info) if plan.use_jinja else None
        if plan.draft_path is not None and plan.draft is not None:
            draft = Engine(plan.draft_path, plan.draft)
        scheduler = Scheduler(engine, plan.spec, name=request.Model or plan.path.name,
                              default_seed=request.Seed if request.Seed > 0 else None, cache=plan.cache,
                              draft_model=DraftModel(draft, engine) if draft is not None else None)
    except BaseException:
        engine.close()
        if draft is not None:
            draft.close()
        raise
    return LoadedModel(name=scheduler.name, scheduler=scheduler, template=template, plan=plan)


class _Mailbox:
    """Hands events from the scheduler's thread to one event loop, waking it once per batch: a step emits a chunk
    for every busy slot, and each `call_soon_threadsafe` is a write to the loop's self-pipe and a wake-up."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: collections.deque[tuple[Callable[[Any], None], Any]] = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def post(self, fn: Callable[[Any], None], arg: Any) -> None:
        with self._lock:
            self._items.append((fn, arg))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass

    def _deliver(self) -> None:
        with self._lock:
            items, self._items, self._scheduled = self._items, collections.deque(), False
        for fn, arg in items:
            fn(arg)


_MAILBOXES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = weakref.WeakKeyDictionary()


def _mailbox(loop: asyncio.AbstractEventLoop) -> _Mailbox:
    """The loop's one mailbox (made on the loop's thread, so no race creates two)."""
    box = _MAILBOXES.get(loop)
    if box is None:
        box = _MAILBOXES[loop] = _Mailbox(loop)
    return box


async def _events(scheduler: Scheduler, req: GenerationRequest,
                  progress: Result | None = None) -> AsyncIterator[Chunk | Result]:
    """Submit a request and yield its chunks, then its `Result`; raises the error that ended it. Leaving early
    (a cancelled RPC) cancels the request, which frees its slot at the next step."""
    mailbox = _mailbox(asyncio.get_running_loop())
    queue: asyncio.Queue = asyncio.Queue()

    def sink(event) -> None:  # called on the scheduler's thread
        mailbox.post(queue.put_nowait, event)

    ticket = scheduler.submit(req, sink)
    finished = False
    try:
        while True:
            event = await queue.get()
            if isinstance(event, BaseException):
                finished = True
                raise event
            if isinstance(event, Result):
                finished = True
                yield event
                return
            if progress is not None:  # what a stream chunk reports so far
                progress.n_tokens = ticket.result.n_tokens
                progress.stats = ticket.result.stats
            yield event
    finally:
        if not finished:
            scheduler.cancel(ticket)


def _template(engine: Engine, info) -> ChatTemplate | None:
    source = info.chat_template
    if not source:
        return None

    def tok_text(key: str) -> str:
        tid = info.metadata.get(key)
        return engine.piece(int(tid), special=True).decode("utf-8", "replace") if tid is not None and 0 <= int(tid) < engine.n_vocab else ""

    return ChatTemplate(source, bos_token=tok_text("tokenizer.ggml.bos_token_id"),
                        eos_token=tok_text("tokenizer.ggml.eos_token_id"))


_KWARGS = "Metadata.chat_template_kwargs"  # the param of its errors: a Metadata key, not a field


def _template_kwargs(metadata: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if metadata.get("chat_template_kwargs"):
        try:
            extra = json.loads(metadata["chat_template_kwargs"])
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"chat_template_kwargs is not valid JSON: {exc}", param=_KWARGS) from None
        if not isinstance(extra, dict):
            raise InvalidRequestError("chat_template_kwargs must be a JSON object", param=_KWARGS)
        kwargs.update(extra)
    if "enable_thinking" in metadata:
        kwargs["enable_thinking"] = _metadata_bool(metadata, "enable_thinking", default=False)
    if metadata.get("reasoning_effort"):
        kwargs["reasoning_effort"] = metadata["reasoning_effort"]
    return kwargs


def _add_special(model: LoadedModel, text: str) -> bool:
    """Whether tokenizing `text` should add BOS: a rendered template usually carries its own, and another would
    double it."""
    bos = model.template.bos_token if model.template else ""
    return not (bos and text.startswith(bos))


def _tokenize_prompt(model: LoadedModel, text: str) -> list[int]:
    return model.engine.tokenize(text, add_special=_add_special(model, text), parse_special=True)


def decode_images(images: list[str]) -> list[bytes]:
    """PredictOptions.Images (base64, optionally as data: URLs) -> checked image bytes."""
    out = []
    for i, item in enumerate(images):
        payload = item.split(",", 1)[1] if item.startswith("data:") and "," in item else item
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequestError(f"Images[{i}] is not valid base64", param="Images") from None
        check_image(data, f"Images[{i}]", param="Images")
        out.append(data)
    return out


async def _image_prompt(model: LoadedModel, text: str, images: list[str]) -> tuple[list[int], tuple[Image, ...]]:
    """The prompt with its images tokenized and encoded by the projector, on the llama thread (between steps)."""
    projector = model.engine.projector
    if projector is None:
        raise InvalidRequestError(f"this model has no vision projector (mmproj): {model.name} cannot take images; "
                                  "load it with MMProj (apexmtp run --mmproj FILE)", param="Images")
    limit = model.plan.image_limit
    if limit and len(images) > limit:
        raise InvalidRequestError(f"{len(images)} images in one request; this model takes at most {limit} "
                                  "(LimitImagePerPrompt)", param="Images")
    data = await asyncio.to_thread(decode_images, images)  # Pillow's check off the event loop and the llama thread
    add_special = _add_special(model, text)
    return await asyncio.wrap_future(model.scheduler.call(
        lambda engine: engine.projector.prompt(text, data, add_special=add_special)))


def _metadata_bool(metadata: Any, key: str, *, default: bool) -> bool:
    """A yes/no Metadata entry; `default` when it is missing or blank."""
    try:
        return parse_bool(metadata.get(key, ""), empty=default)
    except ValueError as exc:
        raise InvalidRequestError(f"Metadata {key}: {exc}", param=f"Metadata.{key}") from None


def _tool_plan(model: LoadedModel, r: pb.PredictOptions) -> ToolPlan:
    parallel = _metadata_bool(r.Metadata, "parallel_tool_calls", default=True)
    return ToolPlan.from_request(model.template, r.Tools, r.ToolChoice, parallel=parallel, user_grammar=r.Grammar)


def _call_deltas(calls: list) -> list[pb.ToolCallDelta]:
    return [pb.ToolCallDelta(index=c.index, id=c.id, name=c.name, arguments=c.arguments) for c in calls]


def logprobs_json(items: list[dict]) -> bytes:
    """Reply.logprobs as LocalAI reads it: OpenAI's chat `logprobs` object, `{"content": [...]}`, as JSON bytes
    (empty when there are none). The items are the engine's (`generation.make_logprobs`), in OpenAI's format."""
    return json.dumps({"content": items}).encode() if items else b""


def _chunk_reply(chunk: Chunk, result: Result, parser: ToolCallParser | None = None) -> pb.Reply:
    out = parser.feed(chunk.content) if parser is not None else Parsed(chunk.content)  # no markup in content
    return pb.Reply(
        message=out.content.encode(), tokens=result.n_tokens, prompt_tokens=result.n_prompt,
        chat_deltas=[pb.ChatDelta(content=out.content, reasoning_content=chunk.reasoning,
                                  tool_calls=_call_deltas(out.calls))],
        logprobs=logprobs_json(chunk.logprobs),
        **_draft_fields(result),
    )


def _draft_fields(result: Result) -> dict[str, int]:
    """A Reply's speculation counters: the totals, and the n-gram share where the model drafts by n-gram."""
    s = result.stats
    out = dict(draft_n=s.drafted, draft_n_accepted=s.accepted, draft_verify_steps=s.verify_steps)
    if "ngram" in s.by_origin:
        out["draft_ngram_n"], out["draft_ngram_n_accepted"] = s.by_origin["ngram"]
    return out


def _final_reply(result: Result, logprobs: list[dict], parser: ToolCallParser | None, *, with_text: bool) -> pb.Reply:
    """Predict's reply (`with_text`: the whole answer, each call whole) or a stream's last one (what the parser
    still held, and the totals)."""
    if parser is None:
        out = Parsed(result.content if with_text else "")
    elif with_text:
        out = parser.feed(result.content)
        out += parser.finish()
        out.calls = merge_calls(out.calls)
    else:
        out = parser.finish()
    finish = "tool_calls" if parser is not None and parser.n_calls and result.finish_reason != "length" else \
        result.finish_reason
    delta = pb.ChatDelta(content=out.content, reasoning_content=result.reasoning if with_text else "",
                         tool_calls=_call_deltas(out.calls))
    return pb.Reply(
        message=out.content.encode(), tokens=result.n_tokens, prompt_tokens=result.n_prompt,
        timing_prompt_processing=result.t_prompt_ms, timing_token_generation=result.t_gen_ms,
        logprobs=logprobs_json(logprobs),
        chat_deltas=[delta] if (with_text or out.content or out.calls) else [],
        **_draft_fields(result), finish_reason=finish,
        slot=result.slot, cached_prompt_tokens=result.n_cached,
    )


def memory_breakdown(model: LoadedModel) -> dict[str, int]:
    """Bytes per component as llama.cpp allocated them (the MTP parts named separately), and the slots."""
    engine = model.engine
    mem = dict(engine.memory)
    n_rs = engine.n_rs_seq
    rec = mem.pop("target_recurrent", 0)
    if rec:
        # llama.cpp allocates the recurrent state (1 + n_rs_seq) times: the extra copies are rollback snapshots (for
        # MTP or n-gram drafts; the key keeps its first name).
        mem["recurrent_state"] = rec // (1 + n_rs)
        if n_rs:
            mem["mtp_rollback_snapshots"] = rec - rec // (1 + n_rs)
    sched, m = model.scheduler, model.scheduler.metrics
    if sched.draft_model is not None:  # draft-simple: the draft model's own allocations, prefixed
        mem.update({f"draft_model_{k}": v for k, v in sched.draft_model.engine.memory.items()})
    mem.update(slots=engine.n_seq, slots_busy=sched.busy_slots, queue_depth=sched.queue_depth,
               slot_context=engine.n_ctx, requests_total=m.requests, prompt_tokens_total=m.prompt_tokens,
               generated_tokens_total=m.generated_tokens, drafted_total=m.drafted, accepted_total=m.accepted)
    mem.update(prompt_tokens_cached_total=m.cached_tokens, prompt_tokens_prefilled_total=m.prefilled_tokens,
               prompt_cache_misses_total=m.cache_misses,
               **{f"prompt_cache_hits_{source}_total": n for source, n in m.cache_hits.items()})
    # Bytes held for prompt reuse (read from this thread while the scheduler's may change them: a snapshot).
    mem["checkpoints"] = engine.checkpoint_bytes
    if sched.ram is not None:
        mem["prompt_cache_ram"] = sched.ram.nbytes
        mem["prompt_cache_ram_entries"] = len(sched.ram.entries)
    if sched.disk is not None:
        mem["prompt_cache_disk"] = sched.disk.nbytes
    if sched.ngram is not None and sched.ngram.table is not None:
        mem["ngram_table"] = sched.ngram.table.entries.nbytes
    mem.update(_live())
    if engine.workers is not None:
        mem.update(rpc_workers=len(engine.workers.guards), rpc_workers_lost=len(engine.workers.lost))
    last = sched.metrics.last
    if last is not None:
        mem["spec_drafted"] = last.stats.drafted
        mem["spec_accepted"] = last.stats.accepted
        mem["spec_verify_steps"] = last.stats.verify_steps
    return {k: int(v) for k, v in mem.items()}


def _live() -> dict[str, int]:
    """llama.cpp objects alive in the process (`live_model`, `live_context`, ...): a reload leaves none behind."""
    return {f"live_{kind}": n for kind, n in LIVE.items()}


def _rss() -> int:
    import psutil  # a dependency, imported on first use only

    try:
        return int(psutil.Process(os.getpid()).memory_info().rss)
    except psutil.Error:  # no /proc to read it from (a sandbox): unknown
        return 0
