"""An OpenAI-compatible streaming upstream: the demo backend, the tests' fake and the benchmarks'.

It speaks the exact Chat Completions wire format (a role chunk, content chunks, a finish chunk,
the usage chunk when asked for, `data: [DONE]`), so the demo runs the same `openai` SDK path as
production, and it is as strict as OpenAI about reasoning models' parameters (`refusal`);
`POST /v1/responses` speaks the Responses API's event stream the same way (demo_responses.py). A `Script` says what to send and how to
fail; the upstream records every request and every client that went away.

    python -m tornado_sse.demo --port 9000 --tokens 200 --token-delay 0.02
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import re
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import tornado.httpserver
import tornado.netutil
import tornado.web
from tornado.iostream import StreamClosedError

from .demo_errors import ErrorStyle, error_body, refusal

FailureKind = Literal["status", "hang", "malformed", "error_event", "truncate", "reset", "stall"]
FAILURES: tuple[str, ...] = FailureKind.__args__  # type: ignore[attr-defined]


@dataclass
class Script:
    """What the upstream answers. A delta is answer text (str), a whole chunk object (dict), or
    raw bytes written to the wire as they are."""

    deltas: list[str | dict[str, Any] | bytes] | None = None  # None: the demo reply
    tokens: int | None = None  # instead of deltas: this many generated tokens
    stamp: bool = False  # generated tokens carry their send time (time.monotonic_ns())
    first_token_delay: float = 0.0
    token_delay: float = 0.0
    fail: FailureKind | None = None
    fail_after: int = 0  # deltas sent before the failure
    status: int = 500  # for fail="status"
    error_code: str | None = None  # for fail="status", e.g. "insufficient_quota"
    retry_after: str | None = None  # for fail="status": a Retry-After header
    fail_times: int | None = None  # fail only the first N requests (None: every one)
    # for fail="error_event" on /v1/responses: the event that reports it
    stream_error: Literal["error", "response.failed"] = "error"
    # for fail="status": whose error body. litellm: LiteLLM's 400 for an unknown model;
    # azure_content_filter: Azure OpenAI's 400 when its content filter refuses the question.
    error_style: ErrorStyle = "openai"
    error_message: str | None = None  # for fail="status": the error body's message
    finish_reason: str = "stop"  # of the last chunk
    # Parameters refused as an older server refuses them (Azure's older API versions):
    # "Unrecognized request argument supplied: <name>", param and code null.
    refuse: tuple[str, ...] = ()
    # /v1/responses, a reasoning model asked for `reasoning.summary`: the summary's deltas
    summary: list[str] = field(default_factory=lambda: ["Reading the question. ", "Answering it."])


@dataclass
class Disconnect:
    at: float  # time.monotonic() when the client's close was seen
    chunks_written: int  # data chunks written before that


@dataclass
class FakeUpstream:
    script: Script = field(default_factory=Script)
    requests: list[dict[str, Any]] = field(default_factory=list)
    disconnects: list[Disconnect] = field(default_factory=list)
    completed: int = 0

    def make_app(self) -> tornado.web.Application:
        from .demo_responses import ResponsesHandler  # it builds on ChatCompletionsHandler, below

        return tornado.web.Application(
            [(r"/v1/chat/completions", ChatCompletionsHandler, {"fake": self}),
             (r"/v1/responses", ResponsesHandler, {"fake": self})],
            log_function=lambda handler: None,  # the server in front logs its own requests
        )

    def listen(self, host: str = "127.0.0.1", port: int = 0) -> tuple[tornado.httpserver.HTTPServer, int]:
        """Start serving on the running IOLoop; returns the server and its port."""
        [sock] = tornado.netutil.bind_sockets(port, host, family=socket.AF_INET)
        server = tornado.httpserver.HTTPServer(self.make_app())
        server.add_sockets([sock])
        return server, sock.getsockname()[1]


# How a model's tokenizer cuts text: a word carries the space before it (" world"), and a run of
# newlines is a token of its own. Pages that append `event.data` to `innerText` (the tutorial's)
# depend on it: a trailing space at the end of what is shown collapses, a leading one does not.
_TOKEN = re.compile(r"\n+| *[^ \n]+| +")


def demo_reply(question: str) -> list[str]:
    """A markdown-ish reply, split the way a model streams it: " word", "\n\n"."""
    quoted = question if len(question) <= 80 else question[:77] + "..."
    text = (
        f"You asked: **{quoted}**\n\n"
        "This is the **tornado-sse demo backend**, not a real model. It streams this reply token "
        "by token over the same OpenAI-compatible wire format a real model uses, so you can see "
        "the page, the stream and the Stop button work.\n\n"
        "To connect a real model:\n\n"
        "- OpenAI: set `OPENAI_API_KEY` and restart the server.\n"
        "- Ollama, vLLM, llama.cpp or LM Studio: set `OPENAI_BASE_URL` "
        "(for example `http://127.0.0.1:11434/v1`) and choose `--model`.\n\n"
        "Then ask again, and the answer will come from the model."
    )
    return _TOKEN.findall(text)


_ID = "chatcmpl-tornado-sse-demo"


def _chunk(model: str, delta: dict[str, Any], finish_reason: str | None = None,
           usage: bool = False) -> bytes:
    obj: dict[str, Any] = {
        "id": _ID,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if usage:  # asked for usage, every chunk has the field, null until the last (OpenAI's docs)
        obj["usage"] = None
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _usage_chunk(model: str, prompt_tokens: int, completion_tokens: int) -> bytes:
    """OpenAI's last chunk with `stream_options: {"include_usage": true}`: no choices, the usage."""
    obj = {"id": _ID, "object": "chat.completion.chunk", "created": int(time.time()),
           "model": model, "choices": [],
           "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                     "total_tokens": prompt_tokens + completion_tokens,
                     "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                     "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                                   "accepted_prediction_tokens": 0,
                                                   "rejected_prediction_tokens": 0}}}
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


class ChatCompletionsHandler(tornado.web.RequestHandler):
    api: Literal["chat", "responses"] = "chat"

    def initialize(self, fake: FakeUpstream) -> None:
        self.fake = fake
        self.chunks_written = 0
        self.gone = asyncio.Event()

    def on_connection_close(self) -> None:
        self.fake.disconnects.append(Disconnect(time.monotonic(), self.chunks_written))
        self.gone.set()

    async def send(self, data: bytes) -> None:
        self.write(data)
        await self.flush()
        self.chunks_written += 1

    async def post(self) -> None:
        try:
            body = json.loads(self.request.body)
        except ValueError:
            raise tornado.web.HTTPError(400) from None
        self.fake.requests.append(body)
        script = self.fake.script
        if script.fail_times is not None and len(self.fake.requests) > script.fail_times:
            script = dataclasses.replace(script, fail=None)
        model = str(body.get("model", "demo"))
        refused = refusal(model, body, script.refuse, self.api)
        if refused is not None:
            self.set_status(400)
            self.finish(refused)
            return
        if script.fail == "status":
            await self.fail_with_status(script)
            return
        if script.fail == "hang" and script.fail_after == 0:
            await self.gone.wait()
            return
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        try:
            await self.stream(script, model, self.deltas(script, body))
        except StreamClosedError:
            pass

    def deltas(self, script: Script, body: dict[str, Any]) -> list[str | dict[str, Any] | bytes]:
        if script.tokens is not None:
            return [f"tok{i} " for i in range(script.tokens)]
        if script.deltas is not None:
            return script.deltas
        messages = body.get("messages") or [{}]
        return list(demo_reply(str(messages[-1].get("content", ""))))

    async def paced(self, script: Script,
                    deltas: list[str | dict[str, Any] | bytes]) -> AsyncIterator[str | dict[str, Any] | bytes]:
        """The deltas at the script's pace, up to its failure point (or the client's leaving).
        Generated text is stamped with its send time when the script says so."""
        if script.first_token_delay:
            await asyncio.sleep(script.first_token_delay)
        for i, delta in enumerate(deltas):
            if script.fail is not None and i == script.fail_after:
                return
            if i and script.token_delay:
                await asyncio.sleep(script.token_delay)
            if self.gone.is_set():
                return
            yield f"{time.monotonic_ns()} " if script.stamp and isinstance(delta, str) else delta

    async def stream(self, script: Script, model: str, deltas: list[str | dict[str, Any] | bytes]) -> None:
        body = json.loads(self.request.body)
        options = body.get("stream_options")
        usage = isinstance(options, dict) and options.get("include_usage") is True
        await self.send(_chunk(model, {"role": "assistant", "content": ""}, usage=usage))
        sent = 0
        async for delta in self.paced(script, deltas):
            if isinstance(delta, bytes):
                await self.send(delta)
            elif isinstance(delta, dict):
                await self.send(b"data: " + json.dumps(delta).encode() + b"\n\n")
            else:
                sent += 1
                await self.send(_chunk(model, {"content": delta}, usage=usage))
        if self.gone.is_set():
            return
        if script.fail is not None:
            await self.fail_midway(script)
            return
        await self.send(_chunk(model, {}, finish_reason=script.finish_reason, usage=usage))
        if usage:
            prompt = sum(len(str(m.get("content", "")).split()) for m in body.get("messages") or [])
            await self.send(_usage_chunk(model, prompt, sent))
        await self.send(b"data: [DONE]\n\n")
        self.fake.completed += 1

    async def fail_midway(self, script: Script) -> None:
        if script.fail == "malformed":
            await self.send(b'data: {"id": "chatcmpl-x", "choices": [{"delta": {"content": \n\n')
        elif script.fail == "error_event":
            error = {"error": {"message": "The server had an error while processing your request.",
                               "type": "server_error", "code": None}}
            await self.send(b"data: " + json.dumps(error).encode() + b"\n\n")
        elif script.fail == "reset":
            self.request.connection.stream.close()  # type: ignore[union-attr]
            return
        elif script.fail in ("stall", "hang"):
            await self.gone.wait()
        # "truncate", and after the others: end the body cleanly, without [DONE]

    async def fail_with_status(self, script: Script) -> None:
        self.set_status(script.status)
        self.set_header("Content-Type", "application/json")
        if script.retry_after is not None:
            self.set_header("Retry-After", script.retry_after)
        self.finish(error_body(script.error_style, script.status, script.error_code,
                               script.error_message, str(json.loads(self.request.body).get("model"))))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tornado_sse.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--tokens", type=int, default=None, help="tokens per answer (default: the demo reply)")
    parser.add_argument("--stamp", action="store_true", help="tokens carry their send time in ns")
    parser.add_argument("--first-token-delay", type=float, default=0.3, help="seconds (default 0.3)")
    parser.add_argument("--token-delay", type=float, default=0.03, help="seconds between tokens (default 0.03)")
    parser.add_argument("--fail", choices=FAILURES, default=None, help="fail every answer this way")
    parser.add_argument("--fail-after", type=int, default=0, help="tokens sent before failing")
    parser.add_argument("--status", type=int, default=500, help="HTTP status for --fail status")
    args = parser.parse_args(argv)
    script = Script(tokens=args.tokens, stamp=args.stamp, first_token_delay=args.first_token_delay,
                    token_delay=args.token_delay, fail=args.fail, fail_after=args.fail_after,
                    status=args.status)

    async def serve() -> None:
        _, port = FakeUpstream(script).listen(args.host, args.port)
        print(f"fake OpenAI-compatible upstream on http://{args.host}:{port}/v1", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
