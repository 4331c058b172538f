"""Who may start a paid generation: the access token, sign-in sessions, failed attempts per
client, the per-browser owner cookie, the origin check, the per-client rate."""

from __future__ import annotations

import hmac
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable

import tornado.httputil

# A random session id, signed with a timestamp by Tornado's signed cookies (`--session-secret`),
# as Starlette's SessionMiddleware signs with itsdangerous' TimestampSigner: nothing in it comes
# from the access token, it expires after --session-max-age, and rotating the secret revokes all.
SESSION_COOKIE = "tornado_sse_session"
# A random id per browser: conversations and streams belong to the browser that started them.
OWNER_COOKIE = "tornado_sse_owner"
_OWNER = re.compile(r"[A-Za-z0-9_-]{22,64}")  # 128 bits or more, as token_urlsafe(16) makes
# Failed authentication, per client address: 10 at once, then one every 10 s. Enough for typing
# mistakes; a guesser gets ~8,600 tries a day instead of thousands a second, against a token of
# 2^128 (the start-up check), and the log shows the 429s.
AUTH_FAILURE_BURST = 10
AUTH_FAILURES_PER_MINUTE = 6.0


def secret_equals(given: str, secret: str) -> bool:
    return hmac.compare_digest(given.encode(), secret.encode())


def same_owner(stored: str, given: str) -> bool:
    """Whether `given` is the browser that started what `stored` owns (a stream, a conversation):
    compared in constant time, and an empty stored owner is nobody's, matched by nobody."""
    return bool(stored) and secret_equals(given, stored)


def bearer(request: tornado.httputil.HTTPServerRequest) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None without one."""
    auth = request.headers.get("Authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else None


def new_id() -> str:
    """A session or owner id: 128 random bits."""
    return secrets.token_urlsafe(16)


def valid_owner(value: str | None) -> bool:
    """An owner cookie we accept: ours, or one an API client made as randomly (22+ url-safe
    characters); anything else gets a fresh one."""
    return value is not None and _OWNER.fullmatch(value) is not None


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

    def wait(self, client: str) -> float:
        """The seconds until `client` may again, without counting anything (0: now)."""
        entry = self._buckets.get(client)
        if self._rate <= 0 or entry is None:
            return 0.0
        tokens = min(self._burst, entry[0] + (self._clock() - entry[1]) * self._rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self._rate

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


class Gate:
    """What access checks keep between requests (the Application owns one): failed attempts per
    client, and the sessions signed out before they expired."""

    def __init__(self, session_max_age: float, *, max_revoked: int = 100_000,
                 clock: Callable[[], float] = time.monotonic):
        self.failures = RateLimiter(AUTH_FAILURES_PER_MINUTE, AUTH_FAILURE_BURST, clock=clock)
        self._max_age = session_max_age
        self._max_revoked = max_revoked
        self._clock = clock
        self._revoked: OrderedDict[str, float] = OrderedDict()  # session id -> when revoked
        self.on_revoke: list[Callable[[str], None]] = []  # a shared store tells other instances

    def revoke(self, session: str, *, tell: bool = True) -> None:
        self._revoked[session] = self._clock()
        self._forget_old()
        for callback in self.on_revoke if tell else ():
            callback(session)

    def revoked(self, session: str) -> bool:
        self._forget_old()
        return session in self._revoked

    def _forget_old(self) -> None:
        # After the max age the cookie's own timestamp refuses it; past the bound, the oldest go.
        now = self._clock()
        while self._revoked and (len(self._revoked) > self._max_revoked
                                 or now - next(iter(self._revoked.values())) > self._max_age):
            self._revoked.popitem(last=False)
