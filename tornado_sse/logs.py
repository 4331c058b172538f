"""Logging: text or JSON lines, the access log without query strings, one summary per stream.

The question sits in the query string, so no log line prints a URI; questions and answers are
logged only with --log-content.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

import tornado.web

from .streams import Stream

# What json.dumps(ensure_ascii=False) leaves raw but a terminal or log viewer acts on: DEL and the
# C1 controls (U+009B is a one-byte CSI), the line and paragraph separators (a line break to
# JavaScript and some viewers), and the bidi controls that reorder what a reader sees ("Trojan
# Source"). Written as \uXXXX, as the text format's repr() does; JSON decodes them unchanged.
_UNSAFE = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    return "\\u%04x" % ord(match.group())


access_log = logging.getLogger("tornado_sse.access")
stream_log = logging.getLogger("tornado_sse.stream")


class JSONFormatter(logging.Formatter):
    """One JSON object per line, for journald and log shippers; extra fields ride along."""

    _STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in self._STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _UNSAFE.sub(_escape, json.dumps(entry, ensure_ascii=False, default=str))


def configure(level: int, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # one INFO line per upstream request


def log_request(handler: tornado.web.RequestHandler) -> None:
    """The access log line: the path without its query string, which holds the question."""
    request = handler.request
    log_access(handler.get_status(), request.method or "", request.path, request.remote_ip,
               time.time() - request.request_time())


def log_access(status: int, method: str, path: str, client: str | None, started: float) -> None:
    """An access log line for a response that is complete; `started` is its request's time.time()."""
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    if not access_log.isEnabledFor(level):  # --log-level warning: no line, so nothing to build
        return
    duration = 1000.0 * (time.time() - started)
    # The path arrives as bytes read as Latin-1: a raw 0x9B is U+009B, a terminal's CSI.
    access_log.log(level, "%d %s %s %s %.1fms", status, method, _UNSAFE.sub(_escape, path), client,
                   duration, extra={"status": status, "method": method, "path": path,
                                    "client": client, "duration_ms": round(duration, 1)})


class StreamSummary:
    """The one line a stream leaves behind: id, outcome, tokens, time to first token, duration,
    and when the upstream said so, why it finished and the tokens it counted."""

    def __init__(self, log_content: bool):
        self.log_content = log_content

    def __call__(self, stream: Stream) -> None:
        if not stream_log.isEnabledFor(logging.INFO):
            return
        ttft = None if stream.first_token_at is None else round(1000 * (stream.first_token_at - stream.started_at))
        duration = round(1000 * (stream.finished_at - stream.started_at))
        # The stream's id resumes and stops it: the log shows a short hash (streams.log_id).
        fields: dict[str, object] = {"stream": stream.log_id, "outcome": stream.outcome,
                                     "tokens": len(stream.answer), "ttft_ms": ttft,
                                     "duration_ms": duration, "client": stream.client}
        ending = ""
        if stream.finish is not None and stream.outcome == "done":
            fields["finish_reason"] = stream.finish.reason
            ending = f" finish={stream.finish.reason}"
            if stream.finish.usage is not None:
                fields["input_tokens"], fields["output_tokens"] = stream.finish.usage
                ending += " input_tokens=%d output_tokens=%d" % stream.finish.usage
        if self.log_content:
            fields["question"] = stream.question
            fields["answer"] = "".join(stream.answer)
        stream_log.info("stream %s %s tokens=%d ttft=%s duration=%dms client=%s%s%s", stream.log_id,
                        stream.outcome, len(stream.answer), "-" if ttft is None else f"{ttft}ms",
                        duration, stream.client, ending,
                        f" question={stream.question!r} answer={''.join(stream.answer)!r}"
                        if self.log_content else "", extra=fields)
