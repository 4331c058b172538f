"""The Responses API backend: `responses.create(stream=True)` into the same deltas as Chat Completions.

The client, its timeouts, retries and typed errors for non-2xx answers are OpenAIBackend's; only
the request and the body differ. The body is read raw, as the chat backend reads it (the SDK's
typed events cost more than the rest of the per-token path). Every event carries its `type` in
its JSON data, so the `event:` lines are not needed:

    response.output_text.delta                answer text      -> Delta("update", ...)
    response.reasoning_summary_text.delta     reasoning        -> Delta("reasoning", ...)
    response.reasoning_text.delta             reasoning        -> Delta("reasoning", ...)
    response.completed                        Finish("stop", usage) (there is no `data: [DONE]`)
    response.incomplete, max_output_tokens    Finish("length"): the answer is as long as --max-tokens
                                              allows, as a chat stream with finish_reason "length"
    response.incomplete, content_filter       Finish("content_filter"), as chat's finish_reason
    response.incomplete, any other reason     ErrorInStream
    response.failed, error                    ErrorInStream
    a body that ends before the end           IncompleteStream
    anything else (created, in_progress,      ignored
      output_item.added, output_text.done, refusal deltas, tool events, ...)
"""

from __future__ import annotations

import asyncio
from typing import Any

import jiter

from .backend import (Decoder, Deliver, Delta, Finish, Message, OpenAIBackend, SDKAnswer, Usage,
                      read_answer)
from .errors import ErrorInStream, IncompleteStream, MalformedChunk
from .watchdog import Watchdog

# The text events, by their `type`, and the Delta event each becomes.
_TEXT_EVENTS = {
    "response.output_text.delta": "update",
    "response.reasoning_summary_text.delta": "reasoning",
    "response.reasoning_text.delta": "reasoning",
}
_FAILED = ("response.failed", "error")
# response.incomplete's reasons that end an answer as chat's finish_reason would
_INCOMPLETE_FINISH = {"max_output_tokens": "length", "content_filter": "content_filter"}


class ResponsesBackend(OpenAIBackend):
    """OpenAI's Responses API, or a server that speaks it; the same client as OpenAIBackend."""

    async def relay(self, messages: list[Message], deliver: Deliver) -> Finish:
        s = self._settings
        extra: dict[str, Any] = {}
        if s.temperature is not None:
            extra["temperature"] = s.temperature
        if s.reasoning_effort is not None:
            # The summary is what OpenAI streams of a reasoning model's thinking, as
            # response.reasoning_summary_text.delta events; "auto": the most detailed it has.
            extra["reasoning"] = {"effort": s.reasoning_effort, "summary": "auto"}
        async with (
            Watchdog(s.first_token_timeout, s.idle_timeout) as watchdog,
            self._client.responses.with_streaming_response.create(
                model=s.model,
                input=messages,  # type: ignore[arg-type]
                max_output_tokens=s.max_tokens,
                stream=True,
                **extra,
            ) as response,
        ):
            return await read_answer(SDKAnswer(response.http_response), ResponseEvents(deliver, watchdog))


class ResponseEvents(Decoder):
    """A Responses body: typed events, the last one `response.completed` (no `data: [DONE]`)."""

    unfinished = "the upstream ended the stream without response.completed"

    def feed(self, piece: bytes) -> asyncio.Future[None] | None:
        ready = None
        for data in self.events.feed(piece):
            delta = parse_response_event(data)
            if isinstance(delta, Finish):
                self.finish = delta
                break
            if delta is not None:
                self.watchdog.touch()
                ready = self.deliver(*delta) or ready
        return self.held(ready)


def parse_response_event(data: bytes) -> Delta | Finish | None:
    """One Responses stream event -> a Delta with text, a Finish at the end, or None (ignored).

    Raises ErrorInStream for a failure the upstream reports, MalformedChunk for data that is not
    a Responses event, and IncompleteStream for a `data: [DONE]` before `response.completed`
    (some compatible servers end that way; the answer may be cut short).
    """
    try:
        event = jiter.from_json(data)  # as parse_chat_chunk: the SDK's parser, faster than json
    except ValueError as exc:
        if data == b"[DONE]":
            raise IncompleteStream("data: [DONE] before response.completed") from None
        raise MalformedChunk(f"event is not JSON ({exc}): {data[:200]!r}") from None
    if not isinstance(event, dict):
        raise MalformedChunk(f"event is not a JSON object: {data[:200]!r}")
    kind = event.get("type")
    name = _TEXT_EVENTS.get(kind) if isinstance(kind, str) else None
    if name is not None:
        text = event.get("delta")
        if not isinstance(text, str):
            raise MalformedChunk(f"delta text is not a string: {data[:200]!r}")
        return Delta(name, text) if text else None
    if kind == "response.completed":
        return Finish("stop", _usage(event.get("response")))
    # A top-level `error` object: some servers send their errors that way, and so does the SDK's
    # own check, which raises on it.
    if kind in _FAILED or event.get("error"):
        raise ErrorInStream(f"{kind or 'error'} in the stream: {data[:500]!r}")
    if kind == "response.incomplete":
        response = event.get("response")
        details = response.get("incomplete_details") if isinstance(response, dict) else None
        reason = details.get("reason") if isinstance(details, dict) else None
        if reason in _INCOMPLETE_FINISH:
            return Finish(_INCOMPLETE_FINISH[reason], _usage(response))
        raise ErrorInStream(f"response.incomplete ({reason}): {data[:500]!r}")
    if not isinstance(kind, str):
        raise MalformedChunk(f"event has no type: {data[:200]!r}")
    return None


def _usage(response: object) -> Usage | None:
    """The `usage` of a finished response: {input_tokens, output_tokens, ...}, when it has one."""
    usage = response.get("usage") if isinstance(response, dict) else None
    if not isinstance(usage, dict):
        return None
    input_tokens, output_tokens = usage.get("input_tokens"), usage.get("output_tokens")
    if isinstance(input_tokens, int) and isinstance(output_tokens, int):
        return Usage(input_tokens, output_tokens)
    return None
