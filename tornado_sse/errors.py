"""What can go wrong with a stream, and the one function that turns it into words for a person.

The tree of errors the backend raises itself (the SDK's and httpx's own errors pass through and
are described here too):

    UpstreamError
    ├── MalformedChunk      a chunk that is not the JSON we expect
    ├── ErrorInStream       the upstream sent an `error` object inside the stream
    ├── IncompleteStream    the stream ended without `data: [DONE]`
    └── UpstreamTimeout     no first token, or a silence between tokens, past its limit

`describe(exc)` is the only place that decides what the browser reads. The server log gets the
exception itself; the client gets a code and a sentence, never a traceback, a path or a key.
"""

from __future__ import annotations

import ast
import re
from typing import NamedTuple

import httpx2
import openai


class UpstreamError(Exception):
    """The upstream's answer broke the protocol; the message is the detail for the log."""


class MalformedChunk(UpstreamError):
    pass


class ErrorInStream(UpstreamError):
    pass


class IncompleteStream(UpstreamError):
    pass


class UpstreamTimeout(UpstreamError):
    def __init__(self, phase: str, seconds: float):
        super().__init__(f"no {phase} within {seconds:g} s")
        self.phase = phase  # "first token" or "next token"
        self.seconds = seconds


class Failure(NamedTuple):
    code: str
    message: str


_BY_STATUS = {
    400: Failure("upstream_bad_request", "The model provider rejected the request (400)."),
    401: Failure(
        "upstream_unauthorized",
        "The model provider rejected this server's API key (401). "
        "The server's operator needs to check OPENAI_API_KEY.",
    ),
    403: Failure(
        "upstream_forbidden",
        "The model provider refused access to this model or region (403).",
    ),
    404: Failure(
        "model_not_found",
        "The model provider does not know the configured model or endpoint (404). "
        "The server's operator needs to check --model and OPENAI_BASE_URL.",
    ),
    429: Failure(
        "upstream_rate_limited",
        "The model provider is rate-limiting this server (429). Please try again in a minute.",
    ),
}
_QUOTA = Failure(
    "upstream_quota_exceeded",
    "The API account behind this server is out of credits (429). The operator needs to top it up.",
)
_SERVER_ERROR = Failure(
    "upstream_unavailable", "The model provider had a problem answering. Please try again shortly."
)
_TIMEOUT = Failure("upstream_timeout", "The model provider took too long to answer.")
_UNREACHABLE = Failure(
    "upstream_unreachable", "This server could not reach the model provider. Please try again."
)
_INCOMPLETE = Failure(
    "upstream_incomplete",
    "The connection to the model provider broke off before the answer was complete.",
)
_INTERNAL = Failure("internal_error", "Something went wrong on this server. Please try again.")
_CONTENT_FILTER = Failure(
    "upstream_content_filter",
    "The model provider's content filter refused this question (400). Please rephrase it.",
)

PROVIDER_SAID_CHARS = 200
# API keys (OpenAI's `sk-...`, masked or not) and bearer tokens: what may hide in an exception's
# text in the server log.
_KEY_PATTERN = r"\bsk-[\w*.-]{3,}|\bBearer\s+\S+"
_KEYS = re.compile(_KEY_PATTERN)
# What must not reach a page even inside the provider's own words: those, organization ids, and
# long hex or base64 runs (other keys, signatures).
_SECRETS = re.compile(_KEY_PATTERN + r"|\borg-[A-Za-z0-9]{6,}|\b[0-9a-fA-F]{24,}\b|[A-Za-z0-9+/_-]{32,}={0,2}")
# The endpoint LiteLLM puts before its messages ("/chat/completions: ...").
_PATH_PREFIX = re.compile(r"^/[\w/.-]*:\s*")


def describe(exc: BaseException) -> Failure:
    """The error event's {code, message} for any exception that ended a stream."""
    if isinstance(exc, openai.APIStatusError):
        if exc.status_code == 429 and exc.code == "insufficient_quota":
            return _QUOTA
        if exc.status_code >= 500:
            return _SERVER_ERROR
        if exc.status_code == 400 and exc.code == "content_filter":  # Azure OpenAI's refusal
            return _CONTENT_FILTER
        ours = _BY_STATUS.get(
            exc.status_code,
            Failure("upstream_error", f"The model provider refused the request ({exc.status_code})."),
        )
        said = provider_said(exc.body)
        return ours._replace(message=f'{ours.message} The provider said: "{said}"') if said else ours
    if isinstance(exc, UpstreamTimeout):
        if exc.phase == "first token":
            return Failure("upstream_timeout", f"The model did not start answering within {exc.seconds:g} seconds.")
        return Failure("upstream_timeout",
                       f"The model stopped writing for over {exc.seconds:g} seconds in the middle of the answer.")
    if isinstance(exc, (openai.APITimeoutError, httpx2.TimeoutException, TimeoutError)):
        if _failed_to_connect(exc):
            return _UNREACHABLE
        if isinstance(exc, httpx2.ConnectTimeout) or isinstance(exc.__cause__, httpx2.ConnectTimeout):
            return Failure("upstream_timeout", "Connecting to the model provider took too long.")
        return _TIMEOUT
    if isinstance(exc, (openai.APIConnectionError, httpx2.ConnectError)):
        return _UNREACHABLE
    if isinstance(exc, (httpx2.TransportError, IncompleteStream)):
        return _INCOMPLETE
    if isinstance(exc, MalformedChunk):
        return Failure(
            "upstream_malformed", "The model provider sent a reply this server could not read."
        )
    if isinstance(exc, ErrorInStream):
        return Failure(
            "upstream_error", "The model provider reported an error while writing the answer."
        )
    return _INTERNAL


def without_keys(text: str) -> str:
    """`text` with anything that looks like an API key or a bearer token replaced, for the log:
    an upstream may echo the key it refused."""
    return _KEYS.sub("[redacted]", text)


def provider_said(body: object) -> str | None:
    """The upstream's own error message, for the operator reading the page: unwrapped (LiteLLM
    sends the repr of a dict, `{'error': '/chat/completions: Invalid model name ...'}`), without
    anything that looks secret, on one line, at most PROVIDER_SAID_CHARS long."""
    message = body.get("message") if isinstance(body, dict) else None
    if isinstance(message, str) and message.startswith("{"):
        try:
            inner = ast.literal_eval(message)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            inner = None
        if isinstance(inner, dict) and isinstance(inner.get("error"), str):
            message = inner["error"]
    elif isinstance(message, dict) and isinstance(message.get("error"), str):
        message = message["error"]  # LiteLLM before it became a string (BerriAI/litellm#8821)
    if not isinstance(message, str):
        return None
    message = _PATH_PREFIX.sub("", " ".join(message.split()))
    message = _SECRETS.sub("[redacted]", message).replace('"', "'")
    if len(message) > PROVIDER_SAID_CHARS:
        message = message[:PROVIDER_SAID_CHARS - 3].rstrip() + "..."
    return message or None


def _failed_to_connect(exc: BaseException) -> bool:
    """A "timeout" caused by a refused connection or a failed certificate check. The SDK's aiohttp
    client maps every aiohttp ClientConnectionError to httpx's ConnectTimeout (the first match in
    its AIOHTTP_EXC_MAP, openai/_vendor/httpx_aiohttp/transport.py); the cause tells the truth."""
    current: BaseException | None = exc
    for _ in range(16):  # a chain can loop back on itself
        if current is None:
            break
        if isinstance(current, OSError) and not isinstance(current, TimeoutError):
            return True
        current = _cause(current)
    return False


def _cause(exc: BaseException) -> BaseException | None:
    """What Python's traceback would print as the exception under `exc`."""
    return exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)


def cause_chain(exc: BaseException) -> str:
    """`Type: message` of `exc` and of each exception under it, for the log: the SDK says only
    "Connection error." and the cause tells a refused connection from a failed certificate check.
    A cause whose message its wrapper already quotes is named by its type alone."""
    parts: list[str] = []
    said = ""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current)
        parts.append(f"{type(current).__name__}: {text}" if text and text not in said else type(current).__name__)
        said = text
        current = _cause(current)
    return ", caused by ".join(parts)
