"""`apexmtp chat [REF]`: an interactive terminal chat over the OpenAI-compatible API of `apexmtp run`.

Without `--url` it starts the same server in-process (backend subprocess included) on a free loopback port, so
what the chat shows is what any OpenAI client would get. Answers stream as they are generated; after each one a
line gives the tokens, the decode speed and, when MTP speculation ran, how many drafted tokens were accepted.
Ctrl-C while an answer streams stops that answer (the server cancels the generation); Ctrl-C or Ctrl-D at the
prompt leaves.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import signal
import sys
from collections.abc import Generator
from typing import Any, TextIO
from urllib.parse import urlsplit

from ..core import constants
from ..core.cli_errors import cli_error
from ..core.errors import ApexError

HELP = "commands: /reset (forget the conversation), /exit (leave), /help"
DIM, RESET = "\033[2m", "\033[0m"


def stats_line(timings: dict[str, Any]) -> str:
    """`[42 tokens, 95.3 tok/s | prompt 12 tokens, 410 tok/s | MTP 30/36 drafts accepted (83%)]`."""
    parts = [f"{timings.get('predicted_n', 0)} tokens, {timings.get('predicted_per_second', 0.0):.1f} tok/s",
             f"prompt {timings.get('prompt_n', 0)} tokens, {timings.get('prompt_per_second', 0.0):.0f} tok/s"]
    drafted, accepted = timings.get("draft_n", 0), timings.get("draft_n_accepted", 0)
    if drafted:
        parts.append(f"MTP {accepted}/{drafted} drafts accepted ({accepted / drafted:.0%})")
    else:
        parts.append("MTP: no drafts")
    return "[" + " | ".join(parts) + "]"


def _connection(base: str) -> http.client.HTTPConnection:
    u = urlsplit(base)
    if u.scheme not in ("http", "") or not u.hostname:
        raise ApexError(f"--url must look like http://HOST:PORT, got {base!r}")
    return http.client.HTTPConnection(u.hostname, u.port or 80, timeout=3600)


def _error_message(status: int, raw: bytes) -> str:
    try:
        return f"HTTP {status}: {json.loads(raw)['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}: {raw[:200].decode('utf-8', 'replace')}"


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def get_json(base: str, path: str, key: str = "") -> dict[str, Any]:
    """GET `path` on the server (with API key `key`, if any); raises ApexError with the server's message on an
    error status."""
    conn = _connection(base)
    try:
        conn.request("GET", path, headers=_auth(key))
        resp = conn.getresponse()
        raw = resp.read()
        if resp.status != 200:
            raise ApexError(_error_message(resp.status, raw))
        return json.loads(raw)
    except OSError as exc:
        raise ApexError(f"cannot reach {base}: {exc}") from None
    finally:
        conn.close()


def stream_chat(base: str, body: dict[str, Any], key: str = "") -> Generator[dict[str, Any], None, None]:
    """POST a streaming chat completion and yield its chunks. Closing the generator closes the connection,
    which is how the server learns to cancel the generation."""
    conn = _connection(base)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body),
                     {"Content-Type": "application/json", **_auth(key)})
        resp = conn.getresponse()
        if resp.status != 200:
            raise ApexError(_error_message(resp.status, resp.read()))
        for raw in resp:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise ApexError(chunk["error"].get("message", "the server reported an error"))
            yield chunk
    except OSError as exc:
        raise ApexError(f"connection to {base} failed: {exc}") from None
    finally:
        conn.close()


class ChatSession:
    """The conversation so far and one streamed turn at a time."""

    def __init__(self, base: str, model: str, out: TextIO, *, system: str | None = None,
                 sampling: dict[str, Any] | None = None, key: str = "") -> None:
        self.base, self.model, self.out, self.key = base, model, out, key
        self.system = system
        self.sampling = sampling or {}
        self.color = out.isatty()
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def turn(self, text: str) -> dict[str, Any] | None:
        """Send `text`, print the answer as it streams, then the stats line. Returns the final timings."""
        self.messages.append({"role": "user", "content": text})
        body = {"model": self.model, "messages": self.messages, "stream": True, **self.sampling}
        answer: list[str] = []
        timings = None
        chunks = stream_chat(self.base, body, self.key)
        try:
            for chunk in chunks:
                timings = chunk.get("timings") or timings
                for choice in chunk.get("choices", []):
                    self._show(choice.get("delta") or {}, answer)
        except KeyboardInterrupt:
            chunks.close()
            self.out.write("\n[stopped]")
        self.messages.append({"role": "assistant", "content": "".join(answer)})
        self.out.write("\n" + (stats_line(timings) if timings else "") + "\n")
        self.out.flush()
        return timings

    def _show(self, delta: dict[str, Any], answer: list[str]) -> None:
        if delta.get("reasoning_content"):
            text = delta["reasoning_content"]
            self.out.write(f"{DIM}{text}{RESET}" if self.color else text)
        if delta.get("content"):
            answer.append(delta["content"])
            self.out.write(delta["content"])
        self.out.flush()

    def run(self, inp: TextIO) -> int:
        """Read prompts from `inp` until EOF, Ctrl-C or /exit."""
        interactive = inp.isatty()
        self.out.write(f"chatting with {self.model} at {self.base} ({HELP})\n")
        while True:
            try:
                if interactive:
                    line = input("> ")
                else:
                    line = inp.readline()
                    if not line:
                        return 0
            except (EOFError, KeyboardInterrupt):
                self.out.write("\n")
                return 0
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                return 0
            if text == "/reset":
                self.reset()
                self.out.write("conversation cleared\n")
                continue
            if text == "/help":
                self.out.write(HELP + "\n")
                continue
            try:
                self.turn(text)
            except ApexError as exc:
                self.messages.pop()  # the turn did not happen
                self.out.write(f"error: {exc}\n")


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt()


def main(argv: list[str]) -> int:
    """`apexmtp chat [REF] [--url http://127.0.0.1:8080] [--system TEXT] [--temperature T] [--max-tokens N]`"""
    from .models import RunOptions
    from .server import add_run_arguments, backend_options, serve

    parser = argparse.ArgumentParser(prog="apexmtp chat", description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    parser.add_argument("--url", help="attach to a running `apexmtp run` (e.g. http://127.0.0.1:8080) "
                        "instead of starting one")
    parser.add_argument("--api-key", default=constants.API_KEY.split(",")[0].strip(),
                        help="API key of the server at --url (default: the first of APEXMTP_API_KEY)")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--temperature", type=float, help="sampling temperature (0 = greedy)")
    parser.add_argument("--max-tokens", type=int, help="longest answer in tokens")
    args = parser.parse_args(argv)
    sampling = {k: v for k, v in (("temperature", args.temperature), ("max_tokens", args.max_tokens)) if v is not None}
    signal.signal(signal.SIGTERM, _raise_interrupt)
    server = None
    try:
        key = ""
        if args.url:
            base, key = args.url.rstrip("/").removesuffix("/v1"), args.api_key
        else:
            logging.getLogger().setLevel(logging.WARNING)  # the chat owns the terminal: no request log
            print(f"loading {args.ref or 'demo'} ...", file=sys.stderr, flush=True)
            server = serve(RunOptions(ref=args.ref, port=0, tier=args.tier, context=args.context,
                                      models_dir=args.models_dir, threads=args.threads, embeddings=args.embeddings,
                                      no_mtp=args.no_mtp, parallel=args.parallel, prefer=args.prefer,
                                      echo_backend=False, rpc=args.rpc, mmproj=args.mmproj,
                                      backend_options=backend_options(args)))
            base = server.url
        model = get_json(base, "/v1/models", key)["data"][0]["id"]
        return ChatSession(base, model, sys.stdout, system=args.system, sampling=sampling, key=key).run(sys.stdin)
    except KeyboardInterrupt:
        return 0
    except (ApexError, OSError) as exc:
        return cli_error(parser.prog, exc)
    finally:
        if server is not None:
            server.close()
