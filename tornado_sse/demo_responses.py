"""The fake upstream's `POST /v1/responses`: the Responses API's event stream, on the chat
handler's request recording, pacing, disconnects and failures (demo.py)."""

from __future__ import annotations

import json
import secrets
import time
from typing import TYPE_CHECKING, Any

from .demo import ChatCompletionsHandler, Script, demo_reply
from .demo_errors import is_reasoning_model

if TYPE_CHECKING:
    from .demo import FakeUpstream


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
