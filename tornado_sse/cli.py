"""`tornado-sse` / `python -m tornado_sse`: flags and environment -> Settings, logging, serve."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence

import tornado.netutil

from .app import make_app, make_server
from .backend import Backend, OpenAIBackend
from .demo import FakeUpstream, Script
from .handlers import end_all_streams
from .settings import BACKENDS, LOG_LEVELS, Settings, SettingsError

log = logging.getLogger("tornado_sse")

SHUTDOWN_GRACE = 5.0  # seconds for streams to write their last frames on shutdown


def parse_settings(argv: Sequence[str] | None, environ: Mapping[str, str]) -> Settings:
    d = Settings()
    p = argparse.ArgumentParser(
        prog="tornado-sse",
        description="Stream chat completions from OpenAI or any OpenAI-compatible server "
        "to the browser over Server-Sent Events.",
        epilog="Environment: OPENAI_API_KEY (the key), OPENAI_BASE_URL (another OpenAI-compatible "
        "server, e.g. http://127.0.0.1:11434/v1 for Ollama). With neither set, --backend auto "
        "uses the embedded demo backend.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--host", default=d.host, help="address to listen on")
    p.add_argument("--port", type=int, default=d.port, help="port to listen on (0: any free port)")
    p.add_argument("--model", default=d.model, help="model name sent to the upstream")
    p.add_argument("--temperature", type=float, default=d.temperature, help="sampling temperature")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="longest answer, in tokens")
    p.add_argument("--backend", choices=BACKENDS, default=d.backend,
                   help="auto: openai when OPENAI_API_KEY or OPENAI_BASE_URL is set, else demo")
    p.add_argument("--max-question-chars", type=int, default=d.max_question_chars,
                   help="longest question accepted (longer: 413)")
    p.add_argument("--connect-timeout", type=float, default=d.connect_timeout,
                   help="seconds to connect to the upstream")
    p.add_argument("--read-timeout", type=float, default=d.read_timeout,
                   help="longest silence from the upstream, in seconds, before the stream fails")
    p.add_argument("--max-retries", type=int, default=d.max_retries,
                   help="retries of a failed upstream request, only before its answer starts")
    p.add_argument("--log-level", choices=LOG_LEVELS, default=d.log_level, help="log verbosity")
    args = vars(p.parse_args(argv))
    try:
        return Settings(**args).with_environment(environ)
    except SettingsError as exc:
        p.error(str(exc))  # one clear line and exit 2, no traceback
        raise  # unreachable: p.error exits


def make_backend(settings: Settings) -> Backend:
    """The OpenAI-compatible backend; in demo mode it talks to the embedded demo upstream."""
    if settings.resolved_backend == "openai":
        return OpenAIBackend(settings)
    _, port = FakeUpstream(Script(first_token_delay=0.3, token_delay=0.03)).listen("127.0.0.1", 0)
    demo = dataclasses.replace(settings, model="demo", api_key=None)
    return OpenAIBackend(demo, name="demo", base_url=f"http://127.0.0.1:{port}/v1")


class StartupError(Exception):
    """Start-up cannot go on; the message is the one line the operator reads."""


async def serve(settings: Settings) -> None:
    try:
        sockets = tornado.netutil.bind_sockets(settings.port, settings.host)
    except OSError as exc:
        raise StartupError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}") from None
    backend = make_backend(settings)
    app = make_app(settings, backend)
    server = make_server(app)
    server.add_sockets(sockets)
    port = sockets[0].getsockname()[1]
    if backend.name == "demo":
        log.info("backend: demo (set OPENAI_API_KEY or OPENAI_BASE_URL to use a real model)")
    else:
        log.info("backend: openai, model %s at %s", backend.model,
                 settings.base_url or "https://api.openai.com/v1")
    if not _is_loopback(settings.host):
        log.warning("listening on %s: anyone who can reach this address can spend the API key",
                    settings.host)
    log.info("tornado-sse listening on http://%s:%d/", settings.host, port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    streams = app.settings["streams"]
    log.info("shutting down: ending %d open streams", len(streams))
    server.stop()
    await end_all_streams(streams, timeout=SHUTDOWN_GRACE)
    await server.close_all_connections()
    await backend.close()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_settings(argv, os.environ)
    logging.basicConfig(level=settings.log_level_number, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # one INFO line per upstream request
    try:
        asyncio.run(serve(settings))
    except StartupError as exc:
        log.error("%s", exc)
        sys.exit(1)
