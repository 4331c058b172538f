"""An OpenAI-compatible streaming upstream: the demo backend, the tests' fake and the benchmarks'.

It speaks the exact Chat Completions wire format (a role chunk, content chunks, a finish chunk,
the usage chunk when asked for, `data: [DONE]`), so the demo runs the same `openai` SDK path as
production, and it is as strict as OpenAI about reasoning models' parameters (`refusal`); `POST /v1/responses`
speaks the Responses API's event stream the same way. A `Script` says what to send and how to
fail; the upstream records every request and every client that went away.

    python -m tornado_sse.demo --port 9000 --tokens 200 --token-delay 0.02
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import re
import secrets
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import tornado.httpserver
import tornado.netutil
import tornado.web
from tornado.iostream import StreamClosedError

from .demo_errors import ErrorStyle, error_body, is_reasoning_model, refusal

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


class ResponsesHandler(ChatCompletionsHandler):
    """`POST /v1/responses` with `stream: true`, in the Responses API's wire format.

    Request recording, disconnects, status failures and hangs are the chat handler's; the body is
    a Responses event stream, each event an `event: <type>` line and its JSON data: created,
    in_progress, the message item and its content part added, one `response.output_text.delta`
    per delta, the text, part and item done, and `response.completed` with the whole response
    and its usage. A dict delta is a whole event object (its `sequence_number` filled in).
    """

    api = "responses"

    def initialize(self, fake: FakeUpstream) -> None:
        super().initialize(fake)
        self.sequence = 0

    async def send_event(self, kind: str, **fields: Any) -> None:
        await self.send_object({"type": kind, "sequence_number": self.sequence, **fields})

    async def send_object(self, event: dict[str, Any]) -> None:
        """One event: `event: <its type>` (when it has one) and its JSON data, numbered."""
        event.setdefault("sequence_number", self.sequence)
        self.sequence = event["sequence_number"] + 1
        data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
        kind = event.get("type")
        await self.send((f"event: {kind}\n" if isinstance(kind, str) else "").encode()
                        + f"data: {data}\n\n".encode())

    def deltas(self, script: Script, body: dict[str, Any]) -> list[str | dict[str, Any] | bytes]:
        if script.tokens is None and script.deltas is None:
            return list(demo_reply(_last_text(body.get("input"))))
        return super().deltas(script, body)

    async def stream(self, script: Script, model: str, deltas: list[str | dict[str, Any] | bytes]) -> None:
        body = json.loads(self.request.body)
        response = _response_object(model, body)
        await self.send_event("response.created", response=response)
        await self.send_event("response.in_progress", response=response)
        output: list[dict[str, Any]] = []
        reasoning = body.get("reasoning")
        if is_reasoning_model(model) and isinstance(reasoning, dict) and reasoning.get("summary"):
            output.append(await self.stream_summary(script))
        index = len(output)
        item_id = "msg_" + secrets.token_hex(24)
        item: dict[str, Any] = {"id": item_id, "type": "message", "status": "in_progress",
                                "content": [], "role": "assistant"}
        await self.send_event("response.output_item.added", output_index=index, item=item)
        at = {"item_id": item_id, "output_index": index, "content_index": 0}
        part: dict[str, Any] = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
        await self.send_event("response.content_part.added", **at, part=part)
        text: list[str] = []
        async for delta in self.paced(script, deltas):
            if isinstance(delta, bytes):
                await self.send(delta)
            elif isinstance(delta, dict):
                await self.send_object(dict(delta))
            else:
                text.append(delta)
                await self.send_event("response.output_text.delta", **at, delta=delta, logprobs=[])
        if self.gone.is_set():
            return
        if script.fail is not None:
            await self.fail_responses_midway(script, response)
            return
        part = {**part, "text": "".join(text)}
        await self.send_event("response.output_text.done", **at, text=part["text"], logprobs=[])
        await self.send_event("response.content_part.done", **at, part=part)
        item = {**item, "status": "completed", "content": [part]}
        await self.send_event("response.output_item.done", output_index=index, item=item)
        input_tokens = len(_last_text(body.get("input")).split())
        usage = {"input_tokens": input_tokens,
                 "input_tokens_details": {"cache_write_tokens": 0, "cached_tokens": 0},
                 "output_tokens": len(text), "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": input_tokens + len(text)}
        await self.send_event("response.completed", response={
            **response, "status": "completed", "completed_at": int(time.time()), "output": [*output, item],
            "usage": usage})
        self.fake.completed += 1

    async def stream_summary(self, script: Script) -> dict[str, Any]:
        """A reasoning item with one summary part, streamed as OpenAI streams it before the
        answer (response.reasoning_summary_*); returns the finished item."""
        item_id = "rs_" + secrets.token_hex(24)
        item: dict[str, Any] = {"id": item_id, "type": "reasoning", "summary": []}
        await self.send_event("response.output_item.added", output_index=0, item=item)
        at = {"item_id": item_id, "output_index": 0, "summary_index": 0}
        await self.send_event("response.reasoning_summary_part.added", **at,
                              part={"type": "summary_text", "text": ""})
        for delta in script.summary:
            await self.send_event("response.reasoning_summary_text.delta", **at, delta=delta)
        text = "".join(script.summary)
        await self.send_event("response.reasoning_summary_text.done", **at, text=text)
        part = {"type": "summary_text", "text": text}
        await self.send_event("response.reasoning_summary_part.done", **at, part=part)
        item = {**item, "summary": [part]}
        await self.send_event("response.output_item.done", output_index=0, item=item)
        return item

    async def fail_responses_midway(self, script: Script, response: dict[str, Any]) -> None:
        message = "The server had an error while processing your request. Sorry about that!"
        if script.fail == "malformed":
            await self.send(b'event: response.output_text.delta\n'
                            b'data: {"type":"response.output_text.delta","delta": \n\n')
        elif script.fail == "error_event" and script.stream_error == "error":
            await self.send_event("error", code="server_error", message=message, param=None)
        elif script.fail == "error_event":
            await self.send_event("response.failed", response={
                **response, "status": "failed", "error": {"code": "server_error", "message": message}})
        else:
            await self.fail_midway(script)  # reset, stall, hang; "truncate" ends without completed


def _response_object(model: str, body: dict[str, Any]) -> dict[str, Any]:
    """The `response` of response.created, in progress and without output yet."""
    return {
        "id": "resp_" + secrets.token_hex(24), "object": "response", "created_at": int(time.time()),
        "status": "in_progress", "background": False, "error": None, "incomplete_details": None,
        "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
        "max_tool_calls": None, "model": model, "output": [], "parallel_tool_calls": True,
        "previous_response_id": None, "prompt_cache_key": None,
        "reasoning": {"effort": None, "summary": None, **(body.get("reasoning") or {})},
        "safety_identifier": None,
        "service_tier": "default", "store": True, "temperature": body.get("temperature", 1.0),
        "text": {"format": {"type": "text"}, "verbosity": "medium"}, "tool_choice": "auto",
        "tools": [], "top_logprobs": 0, "top_p": body.get("top_p", 1.0), "truncation": "disabled",
        "usage": None, "user": None, "metadata": {},
    }


def _last_text(input: object) -> str:
    """The last message's text of a Responses `input`: a string, or a list of messages."""
    if isinstance(input, str):
        return input
    if isinstance(input, list) and input and isinstance(input[-1], dict):
        content = input[-1].get("content", "")
        if isinstance(content, list):  # content parts: [{"type": "input_text", "text": ...}]
            return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        return str(content)
    return ""


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
