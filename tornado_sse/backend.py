"""Where answers come from: the Backend protocol, and the OpenAI-compatible backend.

A backend turns chat messages into deltas, handed to the stream as they arrive (`relay`), and
says how the answer ended. Cancelling the task that relays closes the upstream HTTP response at
once, so the upstream stops generating.

The `openai` SDK does what it is good at: configuration, auth, base URL, retries before the first
byte, and typed errors for non-2xx answers. The body is read raw and decoded here: the SDK's typed
chunk objects cost tens of microseconds each, more than everything else on the per-token path,
and the raw bytes also tell a finished stream (`data: [DONE]`) from a cut-off one.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple, Protocol

import httpx2
import jiter
import openai

from .connection import Exchange
from .direct import DirectPoster
from .errors import ErrorInStream, IncompleteStream, MalformedChunk
from .eventstream import EventStreamDecoder
from .settings import Settings
from .upstream import make_http_client
from .watchdog import Watchdog

log = logging.getLogger(__name__)

Message = dict[str, str]
# Parameters we send by default and adapt when a model refuses them by name: renamed (OpenAI's
# reasoning models: "Unsupported parameter: 'max_tokens' is not supported with this model. Use
# 'max_completion_tokens' instead.", code unsupported_parameter), or left out (Azure's older API
# versions: "Unrecognized request argument supplied: stream_options", param and code null).
RENAMED = {"max_tokens": "max_completion_tokens"}
ADAPTABLE = frozenset({"max_tokens", "stream_options"})
# How servers name a refused parameter in the message, when `param` is null.
_REFUSED = re.compile(r"(?:Unsupported parameter: |Unrecognized request argument supplied: |"
                      r"Unsupported value: )'?([A-Za-z_.]+)'?")
# The SDK's own header for "hand the response over unread", as with_streaming_response sends it.
STREAMED: openai.RequestOptions = {"headers": {"X-Stainless-Raw-Response": "stream"}}


class Delta(NamedTuple):
    event: str  # "update" for answer text, "reasoning" for a reasoning model's thinking
    text: str


class Usage(NamedTuple):
    input_tokens: int
    output_tokens: int


class Finish(NamedTuple):
    """How an answer ended, when it ended as its protocol says (what `relay` returns): why (the
    upstream's `finish_reason`: stop, length, content_filter, ...), and the tokens it counted."""
    reason: str
    usage: Usage | None = None


# Where a backend hands each delta (event, text) as it arrives. A future: the reader's socket is
# congested; the backend reads no more of the upstream until it is done (backpressure).
Deliver = Callable[[str, str], "asyncio.Future[None] | None"]


class Backend(Protocol):
    name: str
    model: str

    # Ask, deliver the answer's deltas, and say how it ended; the upstream response is closed
    # when this returns or raises (cancelled: at once, so the upstream stops generating).
    async def relay(self, messages: list[Message], deliver: Deliver) -> Finish: ...

    async def close(self) -> None: ...


class OpenAIBackend:
    """Chat Completions from OpenAI or any server that speaks its API (Ollama, vLLM, ...)."""

    def __init__(self, settings: Settings, *, name: str = "openai", base_url: str | None = None):
        self.name = name
        self.model = settings.model
        self._settings = settings
        # The parameters this backend's model (one per process: the settings are fixed) refused.
        self._adapted: tuple[str, ...] = ()
        # Reads have no httpx limit: the Watchdog bounds the first token and every silence after.
        timeout = httpx2.Timeout(None, connect=settings.connect_timeout, pool=settings.connect_timeout)
        http_client, fast = make_http_client(settings, timeout, base_url or settings.base_url)
        self._client = openai.AsyncOpenAI(
            # A local server (Ollama, llama.cpp) needs no key, but the SDK insists on one.
            api_key=settings.api_key or "no-key",
            base_url=base_url or settings.base_url,
            max_retries=settings.max_retries,
            timeout=timeout,
            http_client=http_client,
        )
        # On the lean transport, requests skip the SDK's per-request machinery (direct.py).
        self._direct = DirectPoster(self._client, fast, "/chat/completions") if fast else None

    async def relay(self, messages: list[Message], deliver: Deliver) -> Finish:
        s = self._settings
        async with Watchdog(s.first_token_timeout, s.idle_timeout) as watchdog:
            response = await self._post_adapting(messages)
            return await read_answer(response, ChatChunks(deliver, watchdog))

    def request_body(self, messages: list[Message]) -> dict[str, Any]:
        """The Chat Completions request, with what this model refused adapted (see `adapt`)."""
        s = self._settings
        body: dict[str, Any] = {"model": s.model, "messages": messages, "stream": True,
                                # OpenAI sends a usage chunk (`choices: []`) only when asked to.
                                "stream_options": {"include_usage": True},
                                "max_tokens": s.max_tokens}
        if s.temperature is not None:
            body["temperature"] = s.temperature
        if s.reasoning_effort is not None:
            body["reasoning_effort"] = s.reasoning_effort
        for param in self._adapted:
            value = body.pop(param, None)
            if param in RENAMED and value is not None:
                body[RENAMED[param]] = value
        return body

    async def _post_adapting(self, messages: list[Message]) -> Exchange | SDKAnswer:
        """POST the request; when the upstream refuses one of our own defaults by name, adapt
        that parameter and ask again: once per parameter, and before any token (none was sent)."""
        while True:
            body = self.request_body(messages)
            try:
                if self._direct is not None:
                    answer = await self._direct.post(body)
                    if answer is not None:
                        return answer
                # The SDK's generic `post` (its way to call any endpoint): the same auth, retries
                # and typed errors as `chat.completions.create`, without running the parameters
                # through their TypedDict transforms on every request, a fifth of a stream's
                # set-up CPU.
                return SDKAnswer(await self._client.post(
                    "/chat/completions", cast_to=httpx2.Response, body=body, options=STREAMED))
            except openai.BadRequestError as exc:
                param = refused_parameter(exc)
                # Once per parameter: adapted, it is no longer in the body.
                if param is None or param not in body or not self.adapt(param):
                    raise

    def adapt(self, param: str) -> bool:
        """Remember that this model refuses `param`, when it is one we send on our own: the token
        limit's old name, `stream_options` (usage is a nicety). An operator's explicit choice
        (`--temperature`, `--reasoning-effort`) is never dropped: its refusal is the error."""
        if param not in ADAPTABLE:
            return False
        if param in self._adapted:  # another stream, refused at the same time, adapted it first
            return True
        self._adapted += (param,)
        log.info("the upstream refuses %r for model %s: %s from now on", param, self.model,
                 f"sending {RENAMED[param]!r} instead" if param in RENAMED else "leaving it out")
        return True

    async def close(self) -> None:
        await self._client.close()


class SDKAnswer:
    """An httpx Response, read as an Exchange is (the aiohttp client, a redirect, Responses)."""

    __slots__ = ("_response", "_chunks")
    ended = False  # unknown: drain() waits a little for the body's end

    def __init__(self, response: httpx2.Response):
        self._response = response
        self._chunks = response.aiter_bytes()  # one iterator: httpx refuses a second

    def chunks(self) -> AsyncIterator[bytes]:
        return self._chunks

    async def aclose(self) -> None:
        await self._response.aclose()


class Decoder:
    """A streamed answer's body, piece by piece (`read_answer`): each delta to `deliver` as it is
    decoded, and how the answer ended. A subclass per API: ChatChunks, responses.ResponseEvents."""

    unfinished: str  # what a body that ends without its end event lacks, as the error says

    def __init__(self, deliver: Deliver, watchdog: Watchdog):
        self.deliver = deliver
        self.watchdog = watchdog
        self.events = EventStreamDecoder()
        self.finish: Finish | None = None  # set by the body's end event

    @property
    def satisfied(self) -> bool:
        return self.finish is not None

    def feed(self, piece: bytes) -> asyncio.Future[None] | None:
        """Deliver the deltas in `piece`; the last delivery's future if the browser is behind."""
        raise NotImplementedError

    def held(self, ready: asyncio.Future[None] | None) -> asyncio.Future[None] | None:
        """`ready`, the watchdog held for it: the upstream is not read until the browser catches
        up, and that wait is not the upstream's silence."""
        if ready is not None:
            self.watchdog.hold(ready)
        return ready


class ChatChunks(Decoder):
    """A Chat Completions body: `data: {chat.completion.chunk}` events, then `data: [DONE]`."""

    unfinished = "the upstream ended the stream without data: [DONE]"

    def __init__(self, deliver: Deliver, watchdog: Watchdog):
        super().__init__(deliver, watchdog)
        self.reason: str | None = None
        self.usage: Usage | None = None

    def feed(self, piece: bytes) -> asyncio.Future[None] | None:
        ready = None
        for data in self.events.feed(piece):
            if data == b"[DONE]":
                # A server that names no finish_reason ended normally all the same.
                self.finish = Finish(self.reason or "stop", self.usage)
                break
            content, reasoning, tail = parse_chat_chunk(data)
            if reasoning:
                self.watchdog.touch()
                ready = self.deliver("reasoning", reasoning) or ready
            if content:
                self.watchdog.touch()
                ready = self.deliver("update", content) or ready
            if tail is not None:  # the last chunks: finish_reason, then usage
                self.reason, self.usage = chunk_ending(tail, self.reason, self.usage)
        return self.held(ready)


async def read_answer(response: Exchange | SDKAnswer, decoder: Decoder) -> Finish:
    """An answer's body through `decoder`, then closed (early if need be: the upstream sees its
    connection closed at once). On our transport the body is pushed from the socket's callback:
    no future, task wake-up or loop turn per read (connection.py). Through httpx (the aiohttp client, a redirect, the Responses API) it is pulled."""
    try:
        if isinstance(response, Exchange):
            await response.pump(decoder)
        else:
            async for piece in response.chunks():
                ready = decoder.feed(piece)
                if ready is not None:
                    await ready
                if decoder.finish is not None:
                    break
        if decoder.finish is None:
            raise IncompleteStream(decoder.unfinished)
        if not response.ended:  # the body's end has not arrived yet: read on, a little
            await drain(response.chunks())
        return decoder.finish
    finally:
        await response.aclose()


def parse_chat_chunk(data: bytes) -> tuple[str | None, str | None, dict[str, Any] | None]:
    """A `chat.completion.chunk` -> (answer text, reasoning text, the chunk itself when it says
    how the stream ends: a `finish_reason` or `usage`), each of them None when absent.

    Chunks with no choices (Azure's prompt-filter results, the usage chunk), a null or missing
    `content` and finish chunks are normal and give no text.
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
        return None, None, chunk if chunk.get("usage") else None
    try:
        choice = choices[0]
        delta = choice.get("delta") or {}
        content = delta.get("content")
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        ending = choice.get("finish_reason") or chunk.get("usage")
    except (AttributeError, LookupError, TypeError):
        raise MalformedChunk(f"unexpected chunk shape: {data[:200]!r}") from None
    if not isinstance(content, (str, type(None))) or not isinstance(reasoning, (str, type(None))):
        raise MalformedChunk(f"delta text is not a string: {data[:200]!r}")
    return content, reasoning, chunk if ending else None


def chunk_ending(chunk: dict[str, Any], reason: str | None,
                 usage: Usage | None) -> tuple[str | None, Usage | None]:
    """The finish reason and usage so far, updated from a chunk that carries either. OpenAI
    sends `finish_reason` on the last choice chunk, then (asked with `stream_options`) a chunk
    with `choices: []` and `usage: {prompt_tokens, completion_tokens, ...}`; vLLM and others may
    put usage on the finish chunk itself."""
    choices = chunk.get("choices")
    if choices and isinstance(choices[0].get("finish_reason"), str):
        reason = choices[0]["finish_reason"]
    counted = chunk.get("usage")
    if isinstance(counted, dict):
        prompt, completion = counted.get("prompt_tokens"), counted.get("completion_tokens")
        if isinstance(prompt, int) and isinstance(completion, int):
            usage = Usage(prompt, completion)
    return reason, usage


def refused_parameter(exc: openai.APIStatusError) -> str | None:
    """The request parameter a 400 refuses by name: OpenAI's `param` (`max_tokens`), or the name
    in a message such as "Unrecognized request argument supplied: stream_options"."""
    if exc.param:
        return exc.param
    body = exc.body if isinstance(exc.body, dict) else {}
    message = body.get("message")
    found = _REFUSED.search(message) if isinstance(message, str) else None
    return found.group(1) if found else None


async def drain(chunks: AsyncIterator[bytes]) -> None:
    """Read what follows the end event (the end of the chunked body) so the connection can be
    reused; not when the body's end has arrived already (the usual case: no timer to arm)."""
    try:
        async with asyncio.timeout(0.1):
            async for _ in chunks:
                pass
    except (TimeoutError, httpx2.HTTPError):
        pass  # the response is closed either way; the answer is complete
