"""Every setting of the server in one frozen object, with its default and its validation."""

from __future__ import annotations

import dataclasses
import logging
import math
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

BackendName = Literal["auto", "openai", "demo"]
BACKENDS: tuple[BackendName, ...] = ("auto", "openai", "demo")
ApiName = Literal["chat", "responses"]
APIS: tuple[ApiName, ...] = ("chat", "responses")
LOG_LEVELS = ("debug", "info", "warning", "error")
REASONING_EFFORTS = ("minimal", "low", "medium", "high")
MIN_SECRET_BITS = 128
MAKE_A_SECRET = 'python3 -c "import secrets; print(secrets.token_urlsafe(32))"'


class SettingsError(ValueError):
    """A setting has a value we cannot use; the message names the setting and what it accepts."""


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8888
    model: str = "gpt-4o-mini"
    # None: not sent, the model's own default (OpenAI's reasoning models accept no other).
    temperature: float | None = None
    max_tokens: int = 1024  # sent as max_tokens, or max_completion_tokens to a model that asks
    reasoning_effort: str | None = None  # None: not sent
    system_prompt: str | None = None  # the operator's system message, first in every request
    system_prompt_file: str | None = None  # read into system_prompt by the CLI
    backend: BackendName = "auto"
    api: ApiName = "chat"
    max_question_chars: int = 4000
    log_level: str = "info"
    log_format: str = "text"
    log_content: bool = False
    public_metrics: bool = False
    # The upstream
    connect_timeout: float = 10.0
    first_token_timeout: float = 180.0
    idle_timeout: float = 60.0
    max_retries: int = 2
    upstream_transport: Literal["fast", "aiohttp"] = "fast"
    # The browser side
    keepalive: float = 15.0
    send_timeout: float = 30.0
    max_streams: int = 5000
    rate_limit: float = 20.0  # questions per minute per client; 0: no limit
    rate_burst: int = 10
    trust_proxy_headers: bool = False
    header_timeout: float = 20.0  # a new connection's first request head, complete
    keep_alive_timeout: float = 75.0  # a kept-alive connection's next request head, complete
    max_connections_per_address: int = 64  # 0: no cap; off with trust_proxy_headers
    allowed_origins: tuple[str, ...] = ()
    access_token: str | None = field(default=None, repr=False)
    session_secret: str | None = field(default=None, repr=False)  # None: random per process
    session_max_age: float = 7 * 24 * 3600.0  # seconds a sign-in lasts
    pad_frames: bool = True
    certfile: str | None = None
    keyfile: str | None = None
    drain_timeout: float = 10.0
    resume_grace: float = 0.0
    resume_buffer: int = 4096  # frames kept per stream for a resume
    # Conversations
    max_turns: int = 20
    max_conversation_chars: int = 24000
    conversation_ttl: float = 3600.0
    max_conversations: int = 10000
    # memory: this process only; redis://host:port/db (rediss:// for TLS): shared by every
    # instance. The URL may carry a password: no repr.
    store: str = field(default="memory", repr=False)
    store_password: str | None = field(default=None, repr=False)  # TORNADO_SSE_STORE_PASSWORD
    # From the environment, the variables the openai SDK itself reads. The key never reaches a
    # repr, a log line or a response.
    api_key: str | None = field(default=None, repr=False)
    base_url: str | None = None
    # What every Python HTTP client reads: the proxies (urllib's keys: "http", "https", "all",
    # "no"; a proxy URL may carry a password, hence no repr) and the CAs the upstream is checked
    # against.
    proxies: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    ssl_cert_file: str | None = None
    ssl_cert_dir: str | None = None

    def __post_init__(self) -> None:
        _check(self.backend in BACKENDS, "backend", self.backend, "one of " + "|".join(BACKENDS))
        _check(self.api in APIS, "api", self.api, "one of " + "|".join(APIS))
        _check(0 <= self.port <= 65535, "port", self.port, "0 to 65535")
        _check(self.temperature is None or 0.0 <= self.temperature <= 2.0, "temperature",
               self.temperature, "0 to 2")
        _check(self.reasoning_effort is None or self.reasoning_effort in REASONING_EFFORTS,
               "reasoning_effort", self.reasoning_effort, "|".join(REASONING_EFFORTS))
        _check(self.system_prompt is None or self.system_prompt_file is None, "system_prompt_file",
               self.system_prompt_file, "--system-prompt or --system-prompt-file, not both")
        _check(self.max_tokens >= 1, "max_tokens", self.max_tokens, "a whole number >= 1")
        _check(self.max_question_chars >= 1, "max_question_chars", self.max_question_chars, ">= 1")
        _check(self.log_level in LOG_LEVELS, "log_level", self.log_level, "|".join(LOG_LEVELS))
        _check(self.log_format in ("text", "json"), "log_format", self.log_format, "text|json")
        _check(self.connect_timeout > 0, "connect_timeout", self.connect_timeout, "seconds > 0")
        _check(self.first_token_timeout > 0, "first_token_timeout", self.first_token_timeout, "seconds > 0")
        _check(self.idle_timeout > 0, "idle_timeout", self.idle_timeout, "seconds > 0")
        _check(self.max_retries >= 0, "max_retries", self.max_retries, "a whole number >= 0")
        _check(bool(self.model.strip()), "model", self.model, "a model name")
        _check(self.upstream_transport in ("fast", "aiohttp"), "upstream_transport",
               self.upstream_transport, "fast|aiohttp")
        _check(self.keepalive > 0, "keepalive", self.keepalive, "seconds > 0")
        _check(self.send_timeout > 0, "send_timeout", self.send_timeout, "seconds > 0")
        _check(self.max_streams >= 1, "max_streams", self.max_streams, "a whole number >= 1")
        _check(self.rate_limit >= 0, "rate_limit", self.rate_limit, "questions per minute >= 0")
        _check(self.rate_burst >= 1, "rate_burst", self.rate_burst, "a whole number >= 1")
        _check(self.header_timeout > 0, "header_timeout", self.header_timeout, "seconds > 0")
        _check(self.keep_alive_timeout > 0, "keep_alive_timeout", self.keep_alive_timeout, "seconds > 0")
        _check(self.max_connections_per_address >= 0, "max_connections_per_address",
               self.max_connections_per_address, "a whole number >= 0 (0: no cap)")
        _check(self.drain_timeout >= 0, "drain_timeout", self.drain_timeout, "seconds >= 0")
        _check(self.resume_grace >= 0, "resume_grace", self.resume_grace, "seconds >= 0")
        _check(self.resume_buffer >= 1, "resume_buffer", self.resume_buffer, "frames >= 1")
        _check(self.max_turns >= 1, "max_turns", self.max_turns, "a whole number >= 1")
        _check(self.max_conversation_chars >= 1, "max_conversation_chars",
               self.max_conversation_chars, "a whole number >= 1")
        _check(self.conversation_ttl > 0, "conversation_ttl", self.conversation_ttl, "seconds > 0")
        _check(self.max_conversations >= 1, "max_conversations", self.max_conversations, ">= 1")
        _check((self.certfile is None) == (self.keyfile is None), "certfile", self.certfile,
               "--certfile and --keyfile together")
        for origin in self.allowed_origins:
            _check("://" in origin and not origin.endswith("/"), "allowed_origins", origin,
                   "origins like https://example.com, without a path")
        for name in ("access_token", "session_secret"):
            secret = getattr(self, name)
            _check(secret is None or entropy_bits(secret) >= MIN_SECRET_BITS, name, "(hidden)",
                   f"a random secret of at least {MIN_SECRET_BITS} bits, such as 22 random letters "
                   f"and digits; make one with: {MAKE_A_SECRET}")
        _check(self.session_max_age > 0, "session_max_age", self.session_max_age, "seconds > 0")
        _check(self.store == "memory" or self.store.startswith(("redis://", "rediss://")), "store",
               "(hidden)" if "@" in self.store else self.store,
               "memory, or a Redis URL such as redis://127.0.0.1:6379/0 (rediss:// for TLS)")
        _check(self.store == "memory" or self.session_secret is not None, "session_secret", None,
               "a secret shared by every instance when --store is Redis: each one must verify the "
               f"others' sign-in cookies; make one with: {MAKE_A_SECRET}")

    @property
    def resolved_backend(self) -> Literal["openai", "demo"]:
        """`auto` means: a real upstream when one is configured (a key or a base URL), else the demo."""
        if self.backend == "auto":
            return "openai" if (self.api_key or self.base_url) else "demo"
        return self.backend

    @property
    def log_level_number(self) -> int:
        return int(getattr(logging, self.log_level.upper()))

    @property
    def tls(self) -> bool:
        return self.certfile is not None

    def with_environment(self, environ: Mapping[str, str]) -> Settings:
        """The openai SDK's own variables, OPENAI_API_KEY and OPENAI_BASE_URL; the access token,
        which is better kept out of the process list than given as a flag; and what every Python
        HTTP client reads: the *_proxy variables, SSL_CERT_FILE and SSL_CERT_DIR."""
        return dataclasses.replace(
            self,
            api_key=environ.get("OPENAI_API_KEY") or None,
            base_url=environ.get("OPENAI_BASE_URL") or None,
            access_token=self.access_token or environ.get("TORNADO_SSE_ACCESS_TOKEN") or None,
            proxies=tuple(sorted(proxies_from(environ).items())),
            ssl_cert_file=environ.get("SSL_CERT_FILE") or None,
            ssl_cert_dir=environ.get("SSL_CERT_DIR") or None,
            store_password=environ.get("TORNADO_SSE_STORE_PASSWORD") or None,
        )


_CLASSES = (string.ascii_lowercase, string.ascii_uppercase, string.digits)


def entropy_bits(secret: str) -> float:
    """An upper bound on a secret's entropy, as guessers count: its length times log2 of the
    alphabet of the character classes it uses (26 lower, 26 upper, 10 digits, 33 for anything
    else). A word or a repeated pattern has far less; a random string from a generator has this."""
    alphabet = sum(len(chars) for chars in _CLASSES if any(c in chars for c in secret))
    if any(not any(c in chars for chars in _CLASSES) for c in secret):
        alphabet += 33  # ASCII punctuation and space; other characters count no more
    return len(secret) * math.log2(alphabet) if alphabet > 1 else 0.0


def proxies_from(environ: Mapping[str, str]) -> dict[str, str]:
    """`urllib.request.getproxies_environment()` on a given environment: every `<scheme>_proxy`
    variable in either case, the lowercase one winning; HTTP_PROXY ignored in a CGI request
    (REQUEST_METHOD set: it could come from a client's `Proxy:` header, CVE-2016-1000110)."""
    proxies = {name[:-6].lower(): value for name, value in environ.items()
               if value and name[-6:].lower() == "_proxy"}
    if "REQUEST_METHOD" in environ:
        proxies.pop("http", None)
    for name, value in environ.items():
        if name[-6:] == "_proxy":
            if value:
                proxies[name[:-6].lower()] = value
            else:
                proxies.pop(name[:-6].lower(), None)
    return proxies


def _check(ok: bool, name: str, value: object, accepted: str) -> None:
    if not ok:
        flag = "--" + name.replace("_", "-")
        raise SettingsError(f"invalid {flag}: {value!r} (accepted: {accepted})")
