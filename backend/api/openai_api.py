"""OpenAI's HTTP JSON <-> LocalAI's proto messages, as pure functions (no I/O): the translation `apexmtp run` does.

Requests become `PredictOptions` (chat messages for the backend to render with the GGUF's template, sampling with
the model config's defaults beneath the request's values); Replies become `chat.completion`/`text_completion`
objects and stream chunks carrying llama-server's `timings` (with `draft_n`, `draft_n_accepted`); errors, ours and
the backend's gRPC statuses, become an HTTP status and an OpenAI error body in one place (`http_error`, reading the
one table of `backend.core.errors`).

Requests are validated once, by the backend; this edge only translates shapes. It refuses what a PredictOptions
cannot carry (a number of the wrong type or outside int32, a `stop` that is not strings, an image URL it would have
to fetch, `max_tokens: 0`, which the wire reads as "unset") and the OpenAI rules the backend does not hold LocalAI
to (`n`, `echo`, `response_format` beside `grammar`, `top_logprobs` without `logprobs`, `tool_choice: required`
without tools, logit biases beyond +-100). Everything else the backend judges, naming the PredictOptions field to
blame; `body_params` turns that name back into the field the client sent. Finish reasons and logprobs come built
from the backend: the final Reply's `finish_reason` is used as it is, `Reply.logprobs` is reshaped only.
"""

from __future__ import annotations

import base64
import json
import math
import re
import struct
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from ..core import errors
from ..core.errors import BUG, ERROR_PARAM_KEY, ERROR_TYPE_KEY, GRPC_HTTP, ApexError, InvalidRequestError, status_of
from ..proto import backend_pb2 as pb
from ..service.grammars import response_format_grammar, schema_grammar

INT32_MAX = 2**31 - 1

# Request defaults below the model config's `parameters` and the request itself (llama-server's defaults).
DEFAULT_SAMPLING: dict[str, float] = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}
# OpenAI (and llama-server) body key -> (PredictOptions field, type).
SAMPLING_FIELDS: dict[str, tuple[str, type]] = {
    "temperature": ("Temperature", float),
    "top_p": ("TopP", float),
    "top_k": ("TopK", int),
    "min_p": ("MinP", float),
    "presence_penalty": ("PresencePenalty", float),
    "frequency_penalty": ("FrequencyPenalty", float),
    "repeat_penalty": ("Penalty", float),
    "repeat_last_n": ("Repeat", int),
}
# PredictOptions fields (and Metadata keys) the backend may blame -> the OpenAI body field a client sent them as;
# `body_params` adjusts it to one request's body.
BODY_PARAM: dict[str, str] = {"LogitBias": "logit_bias", "Grammar": "grammar", "Tokens": "max_tokens",
                              "TopLogprobs": "top_logprobs", "StopPrompts": "stop", "Messages": "messages",
                              "Tools": "tools", "ToolChoice": "tool_choice", "Images": "messages", "Prompt": "prompt",
                              "Embeddings": "input", "EmbeddingTokens": "input",
                              "Metadata.chat_template_kwargs": "chat_template_kwargs"}
MAX_LOGIT_BIAS = 100  # OpenAI's range, -100..100


# ------------------------------------------------------------------------------- the model being served


@dataclass(frozen=True)
class ServedModel:
    """What the HTTP layer knows about the loaded model: names, limits and request defaults."""

    name: str
    aliases: frozenset[str]  # other names a request may use for it (the REF, file name, "demo")
    context_size: int
    identity: str  # ModelOptions.Model, echoed as PredictOptions.ModelIdentity as LocalAI does
    embeddings: bool
    mtp: bool
    reranking: bool = False
    defaults: dict[str, Any] = field(default_factory=dict)  # the config's `parameters` (temperature, top_k...)
    media_marker: str = "<__media__>"  # where an image part goes in the text: llama.cpp mtmd's default marker

    def matches(self, name: str | None) -> bool:
        return not name or name == self.name or name in self.aliases


# ---------------------------------------------------------------------------- OpenAI JSON -> PredictOptions


def invalid(param: str | None, message: str) -> InvalidRequestError:
    """An InvalidRequestError (HTTP 400) that names the offending field, as OpenAI errors do."""
    return InvalidRequestError(message, param=param)


def _number(body: dict[str, Any], key: str, kind: type) -> Any:
    """`body[key]` as a finite `kind`; integers must fit the int32 fields they travel in."""
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and isinstance(v, float)
                                                                    and not v.is_integer()):
        raise invalid(key, f"{key} must be {'an integer' if kind is int else 'a number'}, got {v!r}")
    if isinstance(v, float) and not math.isfinite(v):
        raise invalid(key, f"{key} must be a finite number, got {v!r}")
    if kind is int and not -INT32_MAX - 1 <= v <= INT32_MAX:
        raise invalid(key, f"{key} must be between {-INT32_MAX - 1} and {INT32_MAX}, got {v!r}")
    return kind(v)


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid("stop", "stop must be a string or an array of strings")
    return [s for s in stops if s]


def generation_fields(body: dict[str, Any], model: ServedModel) -> dict[str, Any]:
    """PredictOptions fields shared by chat and text completions: sampling, length, stop, seed."""
    given = {k: v for k, v in body.items() if v is not None}
    merged = {**DEFAULT_SAMPLING, **model.defaults, **given}
    fields: dict[str, Any] = {}
    for key, (name, kind) in SAMPLING_FIELDS.items():
        value = _number(merged, key, kind)
        if value is not None:
            fields[name] = value
    key = _tokens_key(given)
    max_tokens = _number({**model.defaults, **given}, key, int)
    if max_tokens == 0:  # 0 on the wire means "unset" (the backend's default): refused while it can be told apart
        raise invalid(key, f"{key} must be at least 1, got 0")
    # No limit means "until the context is full": the backend clamps to what the context has left. The backend
    # refuses a negative one.
    fields["Tokens"] = min(max_tokens or model.context_size, INT32_MAX)
    seed = _number(merged, "seed", int)
    if seed is not None and seed >= 0:
        # On the wire 0 means "unset" (random); a client asking for seed 0 wants it fixed, so send another constant.
        fields["Seed"] = seed or INT32_MAX
    if _number(given, "n", int) not in (None, 1):
        raise invalid("n", "only n=1 is supported")
    fields["StopPrompts"] = _stop(given.get("stop"))
    fields["IgnoreEOS"] = bool(given.get("ignore_eos", False))
    fields["Grammar"] = _grammar(given)
    fields["LogitBias"] = _logit_bias(given.get("logit_bias"))
    return fields


def _grammar(body: dict[str, Any]) -> str:
    """The request's GBNF: its own `grammar`, or one made from `response_format` / llama-server's `json_schema`."""
    grammar = body.get("grammar", "")
    if not isinstance(grammar, str):
        raise invalid("grammar", "grammar must be a GBNF string")
    made = response_format_grammar(body.get("response_format"))
    key = "response_format"
    if body.get("json_schema") is not None:
        if made:
            raise invalid("json_schema", "json_schema and a JSON response_format cannot be combined")
        try:
            made, key = schema_grammar(body["json_schema"]), "json_schema"
        except InvalidRequestError as exc:
            raise invalid("json_schema", str(exc)) from None
    if made and grammar:
        raise invalid(key, f"grammar and {key} cannot be combined: send one of them")
    return made or grammar


def _tokens_key(body: dict[str, Any]) -> str:
    """The body key a request gives its length limit under (OpenAI's newer name first)."""
    return "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"


def _logit_bias(bias: Any) -> str:
    """OpenAI `logit_bias` ({"token id": bias}) -> LocalAI's LogitBias JSON. OpenAI's range is held here: the backend
    takes llama-server's (any number, `false` bans), and checks the token ids against the vocabulary."""
    if bias is None:
        return ""
    if not isinstance(bias, dict):
        raise invalid("logit_bias", "logit_bias must be an object mapping token ids to biases")
    for key, value in bias.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) <= MAX_LOGIT_BIAS:
            raise invalid("logit_bias", f"logit_bias for token {key} must be a number from -{MAX_LOGIT_BIAS} to "
                                        f"{MAX_LOGIT_BIAS}, got {value!r}")
    return json.dumps(bias) if bias else ""


def _image_part(part: dict[str, Any], where: str, model: ServedModel) -> tuple[str, str]:
    """An `image_url` part -> (the media marker for the message text, the base64 image for PredictOptions.Images).

    Only data: URLs are taken; the server never fetches http(s) URLs on a client's behalf. The backend decodes and
    checks the image.
    """
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str) or not url:
        raise invalid(f"{where}.image_url", "image_url must be {\"url\": \"data:image/...;base64,...\"}")
    if url.startswith(("http://", "https://")):
        raise invalid(f"{where}.image_url", "image URLs are not fetched: send the image inline as a "
                                            "data:image/...;base64,... URL")
    head, sep, payload = url.partition(",")
    if not (url.startswith("data:") and sep and head.endswith(";base64")):
        raise invalid(f"{where}.image_url", "image_url must be a data:image/...;base64,... URL")
    return model.media_marker, payload


def _content(content: Any, index: int, model: ServedModel) -> tuple[str, list[str]]:
    """A message's content -> its text (image parts as the model's media marker) and its images, in order."""
    if content is None or isinstance(content, str):
        return content or "", []
    if isinstance(content, list):
        parts, images = [], []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif kind == "image_url":
                marker, image = _image_part(part, f"messages[{index}].content[{j}]", model)
                parts.append(marker)
                images.append(image)
            else:
                raise invalid(f"messages[{index}].content", "content parts must be text or image_url parts")
        return "".join(parts), images
    raise invalid(f"messages[{index}].content", "content must be a string or an array of content parts")


def _message(m: Any, index: int, model: ServedModel) -> tuple[pb.Message, list[str]]:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise invalid(f"messages[{index}]", "each message must be an object with a string role")
    calls = m.get("tool_calls")
    text, images = _content(m.get("content"), index, model)
    return pb.Message(
        role=m["role"], content=text, name=str(m.get("name") or ""),
        tool_call_id=str(m.get("tool_call_id") or ""), reasoning_content=str(m.get("reasoning_content") or ""),
        tool_calls=json.dumps(calls) if calls else "",
    ), images


def _chat_metadata(body: dict[str, Any]) -> dict[str, str]:
    """The chat-template switches LocalAI passes as Metadata (thinking on/off, reasoning effort, extra kwargs)."""
    meta: dict[str, str] = {}
    if body.get("chat_template_kwargs") is not None:
        meta["chat_template_kwargs"] = json.dumps(body["chat_template_kwargs"])
    if body.get("enable_thinking") is not None:
        meta["enable_thinking"] = "true" if body["enable_thinking"] else "false"
    if body.get("reasoning_effort"):
        meta["reasoning_effort"] = str(body["reasoning_effort"])
    if body.get("parallel_tool_calls") is not None:
        meta["parallel_tool_calls"] = "true" if body["parallel_tool_calls"] else "false"
    return meta


def chat_request(body: dict[str, Any], model: ServedModel) -> pb.PredictOptions:
    """`/v1/chat/completions` body -> PredictOptions (the backend renders the GGUF's chat template)."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise invalid("messages", "messages must be an array")
    top = _number(body, "top_logprobs", int)
    if top is not None and not body.get("logprobs"):
        raise invalid("top_logprobs", "top_logprobs needs logprobs: true")
    tools, choice = _tools(body)
    fields = generation_fields(body, model)
    converted = [_message(m, i, model) for i, m in enumerate(messages)]
    return pb.PredictOptions(
        Messages=[m for m, _ in converted], Images=[img for _, images in converted for img in images],
        UseTokenizerTemplate=True, Tools=tools, ToolChoice=choice,
        Logprobs=1 if body.get("logprobs") else 0, TopLogprobs=top or 0,
        Metadata=_chat_metadata(body), ModelIdentity=model.identity, **fields,
    )


def _tools(body: dict[str, Any]) -> tuple[str, str]:
    """`tools` and `tool_choice` JSON-encoded, as LocalAI sends them; the backend checks both (and hides the tools
    under tool_choice "none"). `tool_choice: required` without tools is refused here: a ToolChoice that comes
    without Tools has no effect in the backend, as LocalAI may send one."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if choice == "required" and not tools:
        raise invalid("tool_choice", "tool_choice required needs tools")
    return "" if tools is None else json.dumps(tools), "" if choice is None else json.dumps(choice)


def completion_request(body: dict[str, Any], model: ServedModel) -> pb.PredictOptions:
    """`/v1/completions` body -> PredictOptions (the prompt goes to the model verbatim)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise invalid("prompt", "prompt must be a string (or an array holding one)")
    if body.get("echo") or body.get("suffix"):
        raise invalid("echo" if body.get("echo") else "suffix", "echo and suffix are not supported")
    top = _number(body, "logprobs", int)  # the number of top tokens; 0 still asks for the chosen ones'
    return pb.PredictOptions(Prompt=prompt, Logprobs=1 if top is not None else 0, TopLogprobs=top or 0,
                             ModelIdentity=model.identity, **generation_fields(body, model))


# ---------------------------------------------------------------------------- Reply -> OpenAI JSON


def timings(reply: pb.Reply) -> dict[str, float | int]:
    """llama-server's `timings` object from a final Reply.

    The backend's generation time runs from the first token to the last, so the rate counts the n-1 tokens after
    the first one (the first token's cost is in `prompt_ms`, as in llama-server). `prompt_n` counts the prompt
    tokens decoded, `cache_n` those reused (a slot, a checkpoint or the prompt cache), as llama-server counts them.
    """
    pn, gn = reply.prompt_tokens - reply.cached_prompt_tokens, reply.tokens
    pms, gms = reply.timing_prompt_processing, reply.timing_token_generation
    steps = max(gn - 1, 0)
    return {
        "id_slot": reply.slot, "cache_n": reply.cached_prompt_tokens, "prompt_n": pn, "prompt_ms": pms,
        "prompt_per_token_ms": pms / pn if pn else 0.0, "prompt_per_second": 1000.0 * pn / pms if pms > 0 else 0.0,
        "predicted_n": gn, "predicted_ms": gms,
        "predicted_per_token_ms": gms / steps if steps else 0.0,
        "predicted_per_second": 1000.0 * steps / gms if gms > 0 else 0.0,
        "draft_n": reply.draft_n, "draft_n_accepted": reply.draft_n_accepted,
        **({"draft_ngram_n": reply.draft_ngram_n, "draft_ngram_n_accepted": reply.draft_ngram_n_accepted}
           if reply.HasField("draft_ngram_n") else {}),
    }


def usage(reply: pb.Reply) -> dict[str, Any]:
    """OpenAI's usage object; `prompt_tokens_details.cached_tokens` is what the prompt reused instead of prefilling."""
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.tokens,
            "total_tokens": reply.prompt_tokens + reply.tokens,
            "prompt_tokens_details": {"cached_tokens": reply.cached_prompt_tokens}}


def _tool_calls(delta: pb.ChatDelta | None) -> list[dict[str, Any]]:
    if delta is None:
        return []
    return [{"index": tc.index, "id": tc.id, "type": "function",
             "function": {"name": tc.name, "arguments": tc.arguments}} for tc in delta.tool_calls]


def chat_logprobs(raw: bytes) -> dict[str, Any]:
    """Reply.logprobs, the backend's chat `logprobs` object as JSON (`{"content": [...]}`), as that object."""
    return json.loads(raw) if raw else {"content": []}


def legacy_logprobs(items: list[dict[str, Any]], offset: int = 0) -> dict[str, Any]:
    """Chat-format logprob items -> the `/v1/completions` shape (tokens, token_logprobs, top_logprobs, offsets)."""
    offsets, pos = [], offset
    for item in items:
        offsets.append(pos)
        pos += len(item["token"])
    return {
        "tokens": [i["token"] for i in items], "token_logprobs": [i["logprob"] for i in items],
        "top_logprobs": [{t["token"]: t["logprob"] for t in i.get("top_logprobs", [])} for i in items],
        "text_offset": offsets,
    }


@dataclass
class Job:
    """One completion in flight: its kind, the proto request and the envelope of every response object."""

    kind: str  # "chat" or "text"
    request: pb.PredictOptions
    model: ServedModel
    params: Mapping[str, str] = field(default_factory=lambda: BODY_PARAM)  # `body_params` of the request's body
    stream: bool = False
    include_usage: bool = False
    id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        self.id = self.id or f"{'chatcmpl' if self.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = self.created or int(time.time())

    def envelope(self, chunk: bool = False) -> dict[str, Any]:
        obj = ("chat.completion.chunk" if chunk else "chat.completion") if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model.name}

    def logprobs(self, reply: pb.Reply, offset: int = 0) -> dict[str, Any] | None:
        """The choice's `logprobs`: the backend's object for chat, reshaped for text completions; None unasked."""
        if not self.request.Logprobs:
            return None
        chat = chat_logprobs(reply.logprobs)
        return chat if self.kind == "chat" else legacy_logprobs(chat["content"], offset)


def body_params(kind: str, body: dict[str, Any]) -> dict[str, str]:
    """BODY_PARAM for one request: its length limit under the key the body used, and a text completion's number
    of top logprobs under `logprobs`."""
    return {**BODY_PARAM, "Tokens": _tokens_key(body), **({"TopLogprobs": "logprobs"} if kind == "text" else {})}


def completion_response(job: Job, reply: pb.Reply) -> dict[str, Any]:
    """A non-streamed `chat.completion` or `text_completion` from Predict's Reply."""
    delta = reply.chat_deltas[0] if reply.chat_deltas else None
    text = delta.content if delta else reply.message.decode("utf-8", "replace")
    calls = _tool_calls(delta)
    if job.kind == "chat":
        message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
        if delta and delta.reasoning_content:
            message["reasoning_content"] = delta.reasoning_content
        if calls:
            message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
        choice: dict[str, Any] = {"index": 0, "message": message}
    else:
        choice = {"index": 0, "text": text}
    choice.update(logprobs=job.logprobs(reply), finish_reason=reply.finish_reason)
    return {**job.envelope(), "choices": [choice], "usage": usage(reply), "timings": timings(reply)}


class StreamFormatter:
    """Turns the Replies of one PredictStream into OpenAI stream chunks (`chat.completion.chunk` / text).

    Tool calls arrive as the backend parses them: the first delta of a call carries index, id, type and name, later
    ones only `function.arguments` fragments; the last chunk carries the final Reply's finish_reason ("tool_calls"
    when any came).
    """

    def __init__(self, job: Job) -> None:
        self.job = job
        self.offset = 0  # text offset for legacy logprobs
        self.calls: set[int] = set()  # indexes of the tool calls announced so far

    def _chunk(self, payload: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
        key = "delta" if self.job.kind == "chat" else "text"
        return {**self.job.envelope(chunk=True),
                "choices": [{"index": 0, key: payload, "logprobs": logprobs, "finish_reason": finish}]}

    def opening(self) -> list[dict[str, Any]]:
        return [self._chunk({"role": "assistant", "content": ""})] if self.job.kind == "chat" else []

    def _tool_deltas(self, delta: pb.ChatDelta | None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for tc in delta.tool_calls if delta is not None else []:
            if out and out[-1]["index"] == tc.index:  # several pieces of one call in one Reply: one delta
                out[-1]["function"]["arguments"] += tc.arguments
            elif tc.index not in self.calls:
                self.calls.add(tc.index)
                out.append({"index": tc.index, "id": tc.id, "type": "function",
                            "function": {"name": tc.name, "arguments": tc.arguments}})
            else:
                out.append({"index": tc.index, "function": {"arguments": tc.arguments}})
        return out

    def delta(self, reply: pb.Reply) -> dict[str, Any] | None:
        d = reply.chat_deltas[0] if reply.chat_deltas else None
        content = d.content if d else reply.message.decode("utf-8", "replace")
        reasoning = d.reasoning_content if d else ""
        calls = self._tool_deltas(d) if self.job.kind == "chat" else []
        if not content and not reasoning and not calls:
            return None
        logprobs = self.job.logprobs(reply, self.offset)
        if self.job.kind == "text":
            self.offset += len(content)
            return self._chunk(content, logprobs=logprobs)  # type: ignore[arg-type]
        payload: dict[str, Any] = {"content": content} if content else {}
        if reasoning:
            payload["reasoning_content"] = reasoning
        if calls:
            payload["tool_calls"] = calls
        return self._chunk(payload, logprobs=logprobs)

    def closing(self, final: pb.Reply) -> list[dict[str, Any]]:
        """What the final Reply still carries, the chunk with finish_reason + usage + timings, and the usage-only
        chunk if asked."""
        rest = self.delta(final)
        out = [rest] if rest is not None else []
        last = self._chunk({} if self.job.kind == "chat" else "", finish=final.finish_reason)
        out.append({**last, "usage": usage(final), "timings": timings(final)})
        if self.job.include_usage:
            out.append({**self.job.envelope(chunk=True), "choices": [], "usage": usage(final),
                        "timings": timings(final)})
        return out


def embeddings_request(body: dict[str, Any], model: ServedModel) -> list[pb.PredictOptions]:
    """One Embedding call per input (a string, an array of strings, or token arrays)."""
    inputs = body.get("input")
    if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and all(isinstance(t, int) for t in inputs)):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs:
        raise invalid("input", "input must be a non-empty string or array")
    if body.get("encoding_format", "float") not in ("float", "base64"):
        raise invalid("encoding_format", "encoding_format must be 'float' or 'base64'")
    out = []
    for i, item in enumerate(inputs):
        if isinstance(item, str) and item:
            out.append(pb.PredictOptions(Embeddings=item, ModelIdentity=model.identity))
        elif isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            out.append(pb.PredictOptions(EmbeddingTokens=item, ModelIdentity=model.identity))
        else:
            raise invalid(f"input[{i}]", "each input must be a non-empty string or array of token ids")
    return out


def embeddings_response(results: list[pb.EmbeddingResult], model: ServedModel, encoding: str) -> dict[str, Any]:
    def vector(r: pb.EmbeddingResult) -> Any:
        if encoding == "base64":  # little-endian float32, what the openai client decodes by default
            return base64.b64encode(struct.pack(f"<{len(r.embeddings)}f", *r.embeddings)).decode()
        return list(r.embeddings)

    n = sum(r.prompt_tokens or r.tokens for r in results)
    return {"object": "list", "model": model.name, "usage": {"prompt_tokens": n, "total_tokens": n},
            "data": [{"object": "embedding", "index": i, "embedding": vector(r)} for i, r in enumerate(results)]}


def rerank_request(body: dict[str, Any]) -> pb.RerankRequest:
    """LocalAI's /v1/rerank body (Jina's shape: `query`, `documents` as strings or `{"text": ...}`, `top_n`)."""
    query, docs, top_n = body.get("query"), body.get("documents"), body.get("top_n", 0)
    if not isinstance(query, str) or not query:
        raise invalid("query", "query must be a non-empty string")
    if not isinstance(docs, list) or not docs:
        raise invalid("documents", "documents must be a non-empty array")
    texts = []
    for i, doc in enumerate(docs):
        text = doc.get("text") if isinstance(doc, dict) else doc
        if not isinstance(text, str):
            raise invalid(f"documents[{i}]", "each document must be a string or an object with a string `text`")
        texts.append(text)
    if top_n is None:
        top_n = 0
    if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 0:
        raise invalid("top_n", "top_n must be a non-negative integer")
    return pb.RerankRequest(query=query, documents=texts, top_n=top_n)


def rerank_response(result: pb.RerankResult, model: ServedModel) -> dict[str, Any]:
    """The backend's ranking as LocalAI answers /v1/rerank: best first, each with its index and text."""
    return {"model": model.name, "object": "list",
            "usage": {"total_tokens": result.usage.total_tokens, "prompt_tokens": result.usage.prompt_tokens},
            "results": [{"index": r.index, "relevance_score": r.relevance_score, "document": {"text": r.text}}
                        for r in result.results]}


def _backend_error(exc: grpc.RpcError) -> tuple[str, str]:
    """The error class and the request field the backend named in its trailing metadata, or ("", "")."""
    # An RpcError raised without a call behind it (a cancellation, a test double) may have no metadata at all.
    trailing = getattr(exc, "trailing_metadata", None)
    meta = dict((trailing() if callable(trailing) else None) or ())
    return meta.get(ERROR_TYPE_KEY, ""), meta.get(ERROR_PARAM_KEY, "")


_FIELD_HEAD = re.compile(r"[A-Za-z]+")


def body_param(field: str, params: Mapping[str, str] = BODY_PARAM) -> str:
    """The body field for a PredictOptions field the backend blamed: `Tools[1].function.parameters` ->
    `tools[1].function.parameters`; a field without a body counterpart as it is."""
    if field in params:
        return params[field]
    head = _FIELD_HEAD.match(field)
    if head is None or head.group() not in params:
        return field
    return params[head.group()] + field[head.end():]


def is_bug(exc: BaseException) -> bool:
    """True for an exception that is neither ours nor the backend's status: a bug, logged with its traceback."""
    return not isinstance(exc, (ApexError, grpc.RpcError))


def http_error(exc: BaseException, params: Mapping[str, str] = BODY_PARAM) -> tuple[int, dict[str, Any]]:
    """The HTTP status and OpenAI error body of an error: ours by its class (`backend.core.errors.STATUSES`), the
    backend's gRPC errors by the class their trailing metadata names, by their code when they name none.
    `params` (`body_params`) names the body field of the PredictOptions field the backend blamed."""
    param = getattr(exc, "param", None)
    if isinstance(exc, grpc.RpcError):
        name, blamed = _backend_error(exc)
        cls = getattr(errors, name, None) if name else None
        if isinstance(cls, type) and issubclass(cls, ApexError):
            status = status_of(cls)
        else:
            status = GRPC_HTTP.get(exc.code().name, BUG)
        message = exc.details() or str(exc.code())
        param = body_param(blamed, params) if blamed else None
    elif isinstance(exc, ApexError):
        status, message = status_of(exc), str(exc)
    else:
        status = BUG
        message = f"internal error ({type(exc).__name__}: {exc}); see the server log"
    return status.http, error_body(message, status.kind, status.code, param)


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
