"""Who may start a paid generation: the access token, the origin check, the per-client rate."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Callable

import tornado.httputil

COOKIE = "tornado_sse_session"


def session_value(token: str) -> str:
    """What the sign-in cookie holds: derived from the token, so the token itself never sits in
    a browser's cookie jar, and changing the token signs everybody out."""
    return hmac.new(token.encode(), b"tornado-sse session", hashlib.sha256).hexdigest()


def secret_equals(given: str, secret: str) -> bool:
    return hmac.compare_digest(given.encode(), secret.encode())


def token_matches(request: tornado.httputil.HTTPServerRequest, token: str) -> bool:
    """A `Authorization: Bearer <token>` header or the sign-in cookie, compared in constant time."""
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return secret_equals(auth[7:].strip(), token)
    morsel = request.cookies.get(COOKIE)
    return morsel is not None and secret_equals(morsel.value, session_value(token))


def cross_site(request: tornado.httputil.HTTPServerRequest, allowed_origins: tuple[str, ...]) -> bool:
    """True for a request another site's page made (an EventSource, an <img>, a form).

    GET requests skip Tornado's XSRF check and CORS only hides the answer, not the spending, so
    /ask looks at what browsers say: `Origin`, and `Sec-Fetch-Site` for requests without it.
    Clients that send neither (curl, scripts) are not browsers acting for another site.
    """
    origin = request.headers.get("Origin")
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if origin == "null":  # a privacy-sensitive context (sandboxed frame, some form posts)
        return fetch_site != "same-origin"
    if origin is not None:
        own = f"{request.protocol}://{request.host}"
        return origin != own and origin not in allowed_origins
    return fetch_site in ("cross-site", "same-site")


class RateLimiter:
    """A token bucket per client: `per_minute` questions a minute on average, `burst` at once."""

    def __init__(self, per_minute: float, burst: int, *, max_clients: int = 100_000,
                 clock: Callable[[], float] = time.monotonic):
        self._rate = per_minute / 60.0
        self._burst = float(burst)
        self._max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, at)

    def take(self, client: str) -> float:
        """0 when `client` may ask now (and it is counted), else the seconds until it may."""
        if self._rate <= 0:
            return 0.0
        now = self._clock()
        tokens, at = self._buckets.pop(client, (self._burst, now))
        tokens = min(self._burst, tokens + (now - at) * self._rate)
        wait = 0.0 if tokens >= 1.0 else (1.0 - tokens) / self._rate
        self._buckets[client] = (tokens - 1.0 if wait == 0.0 else tokens, now)
        if len(self._buckets) > self._max_clients:
            self._buckets.popitem(last=False)  # the least recently seen client starts afresh
        return wait
