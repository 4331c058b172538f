"""`tornado-sse` / `python -m tornado_sse`: flags and environment -> Settings, logging, serve.

Every flag can also come from `TORNADO_SSE_<FLAG>` (`--max-streams` -> TORNADO_SSE_MAX_STREAMS),
so a systemd EnvironmentFile configures everything; a flag wins over the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import logging
import os
import signal
import ssl
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import tornado.netutil

from . import logs, process
from .app import make_app, make_server
from .backend import Backend, OpenAIBackend
from .demo import FakeUpstream, Script
from .responses import ResponsesBackend
from .settings import APIS, BACKENDS, LOG_LEVELS, REASONING_EFFORTS, Settings, SettingsError
from .registry import StreamRegistry
from .systemd import Notifier

log = logging.getLogger("tornado_sse")

ENV_PREFIX = "TORNADO_SSE_"
LISTEN_BACKLOG = 4096  # the kernel caps it at net.core.somaxconn
SHUTDOWN_GRACE = 5.0  # seconds for streams to write their last frames once the drain is over
FORCED_GRACE = 1.0  # the same after a second signal: enough for the frames, not for slow readers
# SIGHUP (a closed terminal, or `kill -HUP` out of habit) drains like SIGTERM: there is nothing to
# reload, and its default action would cut every stream without its end frame.
SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _bool(text: str) -> bool:
    if text.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if text.strip().lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(text)


def _origins(text: str) -> tuple[str, ...]:
    return tuple(o.strip() for o in text.split(",") if o.strip())


# flag, type, help: the one vocabulary of flags, Settings fields and TORNADO_SSE_* variables.
FLAGS: list[tuple[str, Callable[[str], Any], str]] = [
    ("--host", str, "address to listen on"),
    ("--port", int, "port to listen on (0: any free port)"),
    ("--backend", str, "auto: openai when OPENAI_API_KEY or OPENAI_BASE_URL is set, else demo; "
     "one of " + "|".join(BACKENDS)),
    ("--api", str, "chat: Chat Completions (every compatible server); responses: OpenAI's "
     "Responses API; one of " + "|".join(APIS)),
    ("--model", str, "model name sent to the upstream"),
    ("--temperature", float, "sampling temperature (none: the model's default; reasoning models "
     "accept no other)"),
    ("--max-tokens", int, "longest answer, in tokens (sent as max_completion_tokens to models "
     "that refuse max_tokens)"),
    ("--reasoning-effort", str, "how hard a reasoning model thinks, one of "
     + "|".join(REASONING_EFFORTS) + " (none: not sent)"),
    ("--system-prompt", str, "the operator's system message, sent first in every request"),
    ("--system-prompt-file", str, "a UTF-8 file holding the system message"),
    ("--max-question-chars", int, "longest question accepted (longer: 413)"),
    ("--connect-timeout", float, "seconds to connect to the upstream"),
    ("--first-token-timeout", float, "seconds to wait for the first token"),
    ("--idle-timeout", float, "longest silence between tokens, in seconds"),
    ("--max-retries", int, "retries of a failed upstream request, only before its answer starts"),
    ("--upstream-transport", str, "fast: a lean HTTP/1.1 keep-alive transport, or the SDK's aiohttp "
     "client where HTTP(S)_PROXY applies to the upstream; aiohttp: the SDK's aiohttp client always"),
    ("--keepalive", float, "seconds between ': ping' comments on a silent stream"),
    ("--send-timeout", float, "seconds a frame may wait for a slow reader before it is dropped"),
    ("--max-streams", int, "open streams at most; more get 503"),
    ("--rate-limit", float, "questions per minute per client address (0: no limit)"),
    ("--rate-burst", int, "questions a client may ask at once before the rate limit applies"),
    ("--trust-proxy-headers", _bool, "take the client address and scheme from X-Forwarded-For / "
     "X-Real-Ip / X-Forwarded-Proto (only behind a proxy you run)"),
    ("--header-timeout", float, "seconds a new connection has to send its whole first request head"),
    ("--keep-alive-timeout", float, "seconds a kept-alive connection may wait for its next request "
     "(the whole head)"),
    ("--max-connections-per-address", int, "open connections per client address, loopback spared "
     "(0: no cap; no cap with --trust-proxy-headers, where the proxy is the one address)"),
    ("--allowed-origins", _origins, "comma-separated origins, besides this server's own, whose "
     "pages may call /ask"),
    ("--access-token", str, "a secret /ask requires, of 128 bits or more (better: "
     "TORNADO_SSE_ACCESS_TOKEN)"),
    ("--session-secret", str, "signs the sign-in cookies; changing it signs everyone out (better: "
     "TORNADO_SSE_SESSION_SECRET; unset: random, so a restart signs everyone out)"),
    ("--session-max-age", float, "seconds a sign-in lasts"),
    ("--pad-frames", _bool, "pad every frame to hide each token's length from the network"),
    ("--certfile", str, "TLS certificate chain (PEM); with --keyfile, serve HTTPS"),
    ("--keyfile", str, "TLS private key (PEM)"),
    ("--drain-timeout", float, "on SIGTERM, seconds open streams may run before they are ended"),
    ("--resume-grace", float, "seconds a generation keeps running after its reader disconnects, "
     "for a Last-Event-ID resume (0: abort at once)"),
    ("--resume-buffer", int, "frames kept per stream for a resume"),
    ("--max-turns", int, "question/answer turns kept per conversation"),
    ("--max-conversation-chars", int, "characters kept per conversation"),
    ("--conversation-ttl", float, "seconds an idle conversation is kept"),
    ("--max-conversations", int, "conversations kept in memory (least recently used go first; "
     "with Redis, --conversation-ttl alone bounds them)"),
    ("--store", str, "memory: this process only; or redis://host:port/db (rediss:// for TLS, a "
     "password in the URL or TORNADO_SSE_STORE_PASSWORD): conversations, resume, Stop and the rate "
     "limit shared by every instance (needs --session-secret)"),
    ("--log-level", str, "one of " + "|".join(LOG_LEVELS)),
    ("--log-format", str, "text, or json: one JSON object per line (journald, log shippers)"),
    ("--log-content", _bool, "also log each question and answer (off: they are never logged)"),
    ("--public-metrics", _bool, "serve /metrics to every address, not just loopback"),
]


_ACCEPTS: dict[Callable[[str], Any], str] = {
    int: "a whole number", float: "a number", _bool: "true or false",
    _origins: "comma-separated origins"}


def parse_settings(argv: Sequence[str] | None, environ: Mapping[str, str]) -> Settings:
    defaults = Settings()
    p = argparse.ArgumentParser(
        prog="tornado-sse",
        description="Stream chat completions from OpenAI or any OpenAI-compatible server "
        "to the browser over Server-Sent Events.",
        epilog="Every flag can also be set as TORNADO_SSE_<FLAG> (e.g. TORNADO_SSE_MAX_STREAMS); "
        "flags win. Also read: OPENAI_API_KEY (the key), OPENAI_BASE_URL (another OpenAI-compatible "
        "server, e.g. http://127.0.0.1:11434/v1 for Ollama). With neither set, --backend auto uses "
        "the embedded demo backend.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    values: dict[str, Any] = {}
    for flag, kind, help in FLAGS:
        dest = flag[2:].replace("-", "_")
        env = ENV_PREFIX + dest.upper()
        default = getattr(defaults, dest)
        if env in environ:
            try:
                values[dest] = kind(environ[env])
            except ValueError:
                p.error(f"invalid {env}: {environ[env]!r} (accepted: {_ACCEPTS.get(kind, 'text')})")
        shown = "(hidden)" if dest in ("access_token", "session_secret") else ",".join(default) if isinstance(default, tuple) else default
        if kind is _bool:
            p.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{help} (default: {shown})")
        else:
            p.add_argument(flag, dest=dest, type=kind, default=None, metavar=dest.upper(),
                           help=f"{help} (default: {shown})")
    p.formatter_class = argparse.HelpFormatter  # the defaults are in the help texts already
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    try:
        return read_system_prompt(Settings(**{**values, **args}).with_environment(environ))
    except SettingsError as exc:
        p.error(str(exc))  # one clear line and exit 2, no traceback
        raise  # unreachable: p.error exits


def read_system_prompt(settings: Settings) -> Settings:
    """--system-prompt-file's text becomes the system prompt, read once at start-up."""
    if settings.system_prompt_file is None:
        return settings
    try:
        with open(settings.system_prompt_file, encoding="utf-8") as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise SettingsError(f"invalid --system-prompt-file: {settings.system_prompt_file!r} "
                            f"(accepted: a readable UTF-8 file; {reason})") from None
    if not text:
        raise SettingsError(f"invalid --system-prompt-file: {settings.system_prompt_file!r} "
                            "(accepted: a file with some text; it is empty)")
    return dataclasses.replace(settings, system_prompt=text, system_prompt_file=None)


def make_backend(settings: Settings) -> Backend:
    """The OpenAI-compatible backend; in demo mode it talks to the embedded demo upstream."""
    kind: type[OpenAIBackend] = ResponsesBackend if settings.api == "responses" else OpenAIBackend
    if settings.resolved_backend == "openai":
        return kind(settings)
    _, port = FakeUpstream(Script(first_token_delay=0.3, token_delay=0.03)).listen("127.0.0.1", 0)
    # The demo upstream is in this process, on loopback: no proxy could reach it.
    demo = dataclasses.replace(settings, model="demo", api_key=None, proxies=())
    return kind(demo, name="demo", base_url=f"http://127.0.0.1:{port}/v1")


class StartupError(Exception):
    """Start-up cannot go on; the message is the one line the operator reads."""


async def serve(settings: Settings) -> bool:
    """Serve until a signal; True when the drain ran its course, False when a second signal cut it."""
    try:
        # Tornado's default backlog (128) drops connections when thousands open at once.
        sockets = tornado.netutil.bind_sockets(settings.port, settings.host, backlog=LISTEN_BACKLOG)
    except OSError as exc:
        raise StartupError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}") from None
    try:
        backend = make_backend(settings)
    except SettingsError as exc:
        raise StartupError(str(exc)) from None
    app = make_app(settings, backend)
    try:
        server = make_server(app, settings)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"cannot load --certfile/--keyfile: {exc}") from None
    registry: StreamRegistry = app.settings["registry"]
    await registry.store.start()  # an unreachable Redis is logged; the server starts all the same
    server.add_sockets(sockets)
    port = sockets[0].getsockname()[1]
    if backend.name == "demo":
        log.info("backend: demo (set OPENAI_API_KEY or OPENAI_BASE_URL to use a real model)")
    else:
        log.info("backend: openai, model %s at %s (%s API)", backend.model,
                 settings.base_url or "https://api.openai.com/v1", settings.api)
    if not _is_loopback(settings.host) and not settings.access_token:
        log.warning("listening on %s without --access-token: anyone who can reach this address "
                    "can spend the API key", settings.host)
    process.settle()  # before "listening": what the SDK imports lazily is in by then
    scheme = "https" if settings.tls else "http"
    log.info("tornado-sse listening on %s://%s:%d/", scheme, settings.host, port)

    shutdown = Shutdown()
    loop = asyncio.get_running_loop()
    for sig in SHUTDOWN_SIGNALS:
        loop.add_signal_handler(sig, shutdown.signal, sig)
    # READY only once SIGTERM drains: systemd may stop us the moment it reads it.
    notifier = Notifier.from_environ(os.environ)
    notifier.notify("READY=1", f"STATUS=listening on {scheme}://{settings.host}:{port}/")
    notifier.start_watchdog()
    await shutdown.requested.wait()

    forced = shutdown.forced
    log.info("draining: %d open streams get up to %gs to finish", registry.running, settings.drain_timeout)
    registry.draining = True
    notifier.notify("STOPPING=1", f"STATUS=draining {registry.running} open streams")
    server.stop()
    await _wait(lambda: registry.running == 0 or forced.is_set(), settings.drain_timeout)
    if registry.running:
        log.info("ending %d streams that are still open", registry.running)
        registry.shut_down_all()
        if forced.is_set():
            await _wait(lambda: registry.running == 0, FORCED_GRACE)
        else:
            await _wait(lambda: registry.running == 0 or forced.is_set(), SHUTDOWN_GRACE)
    await server.close_all_connections()
    await registry.store.close()  # after the last frames: they are written to Redis first
    await backend.close()
    notifier.stop_watchdog()
    return not forced.is_set()


class Shutdown:
    """SIGTERM, SIGINT or SIGHUP starts the drain; a second one ends the open streams now (each
    still gets its error and end frame) and the exit status is 1; a third exits on the spot."""

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self.forced = asyncio.Event()

    def signal(self, number: int) -> None:
        name = signal.Signals(number).name
        if not self.requested.is_set():
            log.info("%s: shutting down", name)
            self.requested.set()
        elif not self.forced.is_set():
            log.warning("%s during the drain: ending the open streams now", name)
            self.forced.set()
        else:
            log.warning("%s again: exiting at once", name)
            os._exit(1)


async def _wait(done: Callable[[], bool], timeout: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not done() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_settings(argv, os.environ)
    logs.configure(settings.log_level_number, settings.log_format)
    process.raise_open_files_limit()
    try:
        drained = asyncio.run(serve(settings))
    except StartupError as exc:
        log.error("%s", exc)
        sys.exit(1)
    if not drained:
        sys.exit(1)
