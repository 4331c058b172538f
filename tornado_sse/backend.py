"""Where answers come from: the Backend protocol, and the OpenAI-compatible backend.

A backend turns chat messages into an async iterator of deltas. Closing the iterator (`aclose()`,
or cancelling the task that iterates it) closes the upstream HTTP response at once, so the
upstream stops generating.

The `openai` SDK does what it is good at: configuration, auth, base URL, retries before the first
byte, and typed errors for non-2xx answers. The body is read raw and decoded here: the SDK's typed
chunk objects cost tens of microseconds each, more than everything else on the per-token path,
and the raw bytes also tell a finished stream (`data: [DONE]`) from a cut-off one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import NamedTuple, Protocol

import httpx2
import jiter
import openai

from .errors import ErrorInStream, IncompleteStream, MalformedChunk
from .eventstream import EventStreamDecoder
from .settings import Settings
from .upstream import make_http_client
from .watchdog import Watchdog

Message = dict[str, str]
# The SDK's own header for "hand the response over unread", as with_streaming_response sends it.
STREAMED: openai.RequestOptions = {"headers": {"X-Stainless-Raw-Response": "stream"}}


class Delta(NamedTuple):
    event: str  # "update" for answer text, "reasoning" for a reasoning model's thinking
    text: str


class Backend(Protocol):
    name: str
    model: str

    def stream(self, messages: list[Message]) -> AsyncGenerator[Delta, None]: ...

    async def close(self) -> None: ...


class OpenAIBackend:
    """Chat Completions from OpenAI or any server that speaks its API (Ollama, vLLM, ...)."""

    def __init__(self, settings: Settings, *, name: str = "openai", base_url: str | None = None):
        self.name = name
        self.model = settings.model
        self._settings = settings
        # Reads have no httpx limit: the Watchdog bounds the first token and every silence after.
        timeout = httpx2.Timeout(None, connect=settings.connect_timeout, pool=settings.connect_timeout)
        self._client = openai.AsyncOpenAI(
            # A local server (Ollama, llama.cpp) needs no key, but the SDK insists on one.
            api_key=settings.api_key or "no-key",
            base_url=base_url or settings.base_url,
            max_retries=settings.max_retries,
            timeout=timeout,
            http_client=make_http_client(settings, timeout, base_url or settings.base_url),
        )

    async def stream(self, messages: list[Message]) -> AsyncGenerator[Delta, None]:
        s = self._settings
        body = {"model": s.model, "messages": messages, "temperature": s.temperature,
                "max_tokens": s.max_tokens, "stream": True}
        async with Watchdog(s.first_token_timeout, s.idle_timeout) as watchdog:
            # The SDK's generic `post` (its way to call any endpoint): the same auth, retries and
            # typed errors as `chat.completions.create`, without running the parameters through
            # their TypedDict transforms on every request, a fifth of a stream's set-up CPU.
            response = await self._client.post(
                "/chat/completions", cast_to=httpx2.Response, body=body, options=STREAMED)
            try:
                chunks = response.aiter_bytes()
                events = EventStreamDecoder()
                async for chunk in chunks:
                    for data in events.feed(chunk):
                        if data == b"[DONE]":
                            await drain(chunks)
                            return
                        content, reasoning = parse_chat_chunk(data)
                        if reasoning:
                            watchdog.touch()
                            yield Delta("reasoning", reasoning)
                        if content:
                            watchdog.touch()
                            yield Delta("update", content)
                raise IncompleteStream("the upstream ended the stream without data: [DONE]")
            finally:
                await response.aclose()  # early: the upstream sees its connection closed at once

    async def close(self) -> None:
        await self._client.close()


def parse_chat_chunk(data: bytes) -> tuple[str | None, str | None]:
    """A `chat.completion.chunk` -> (answer text, reasoning text), either of them None.

    Chunks with no choices (Azure's prompt-filter results, the usage chunk), a null or missing
    `content` and finish chunks are normal and give (None, None).
    """
    try:
        chunk = jiter.from_json(data)  # the openai SDK's own JSON parser, 3x json.loads here
    except ValueError as exc:
        raise MalformedChunk(f"chunk is not JSON ({exc}): {data[:200]!r}") from None
    if not isinstance(chunk, dict):
        raise MalformedChunk(f"chunk is not a JSON object: {data[:200]!r}")
    if chunk.get("error"):
        raise ErrorInStream(f"error object in the stream: {data[:500]!r}")
    choices = chunk.get("choices")
    if not choices:
        return None, None
    try:
        delta = choices[0].get("delta") or {}
        content = delta.get("content")
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
    except (AttributeError, LookupError, TypeError):
        raise MalformedChunk(f"unexpected chunk shape: {data[:200]!r}") from None
    if not isinstance(content, (str, type(None))) or not isinstance(reasoning, (str, type(None))):
        raise MalformedChunk(f"delta text is not a string: {data[:200]!r}")
    return content, reasoning


async def drain(chunks: AsyncIterator[bytes]) -> None:
    """Read what follows [DONE] (the end of the chunked body) so the connection can be reused."""
    try:
        async with asyncio.timeout(0.1):
            async for _ in chunks:
                pass
    except (TimeoutError, httpx2.HTTPError):
        pass  # the response is closed either way; the answer is complete
