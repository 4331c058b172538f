"""Process-wide tuning at start-up: the open-files limit, lazy imports done early, the GC.

Thousands of streams in one process (issue 12) need descriptors, must not meet an import at the
limit, and should not have the collector walk long-lived objects again and again.
"""

from __future__ import annotations

import gc
import importlib
import logging
import resource

log = logging.getLogger("tornado_sse")

# What the SDK imports on first use, found by running with `python -X importtime` (the Responses
# API's resources and stream helpers; anyio's streams on its retry sleep). Imported at start-up:
# at the open-files limit an import fails with "too many open files", and the stream with it.
PRELOAD = ("openai.resources.responses", "openai.resources.responses.input_items",
           "openai.resources.responses.input_tokens", "openai.pagination", "openai._websocket_connection",
           "openai._event_handler", "openai._send_queue", "openai.lib._response_resources",
           "openai.lib.streaming.responses", "anyio.abc",
           "anyio.streams.memory", "anyio.streams.stapled", "anyio.streams.tls", "anyio.to_thread",
           "anyio._backends._asyncio")
# After gc.freeze(), a young collection every 50,000 allocations instead of 700: a stream's
# objects are mostly gone by then instead of being promoted, and the older generations, walked
# again each time a stream's objects reach them, are collected less often. Measured (bench/,
# 2,000 streams opened at once, two runs each): 1.8 s of server CPU with (700, 10, 10), 1.45 s.
GC_THRESHOLDS = (50_000, 20, 20)


def raise_open_files_limit() -> None:
    """The soft RLIMIT_NOFILE up to the hard one: each stream holds two descriptors (the reader's
    socket and the upstream's), and the usual soft limit (1,024) would stop at ~500 streams.
    The systemd units set the hard limit (LimitNOFILE=)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft >= hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open-files limit from %d to %d: %s", soft, hard, exc)
        return
    log.info("open-files limit raised from %d to %d (the hard limit)", soft, hard)


def settle() -> None:
    """Once start-up is done: import what the SDK imports lazily, then keep everything built so
    far (modules, the app, the SDK's models; it lives as long as the process) out of every later
    collection, which would otherwise walk it again and again."""
    for module in PRELOAD:
        importlib.import_module(module)
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
