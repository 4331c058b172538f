"""Running it like a service: metrics, the per-stream log line, JSON logs, TORNADO_SSE_* config."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from tornado_sse.cli import parse_settings
from tornado_sse.demo import FakeUpstream, Script
from tornado_sse.server import is_loopback
from tornado_sse.streams import log_id

from .sseclient import ask
from .test_cli import CLEAN_ENV, fetch, running


def metric(text: str, name: str) -> float:
    """The value of one sample line, e.g. 'tornado_sse_streams_finished_total{outcome="done"}'."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.gen_test
async def test_metrics_count_streams_by_outcome_rejections_and_upstream_errors(base_url, fake: FakeUpstream, http_client):
    fake.script = Script(deltas=["a", "b", "c"])
    await ask(base_url, "question=q")
    fake.script = Script(fail="status", status=429)
    await ask(base_url, "question=q")
    await ask(base_url, "question=")  # rejected: missing_question
    text = (await http_client.fetch(base_url + "/metrics")).body.decode()
    assert metric(text, "tornado_sse_streams_started_total") == 2
    assert metric(text, 'tornado_sse_streams_finished_total{outcome="done"}') == 1
    assert metric(text, 'tornado_sse_streams_finished_total{outcome="upstream_rate_limited"}') == 1
    assert metric(text, 'tornado_sse_requests_rejected_total{code="missing_question"}') == 1
    assert metric(text, 'tornado_sse_upstream_errors_total{status="429"}') == 1
    assert metric(text, "tornado_sse_active_streams") == 0
    assert metric(text, "tornado_sse_stream_tokens_sum") == 3
    assert metric(text, "tornado_sse_time_to_first_token_seconds_count") == 1
    assert metric(text, "tornado_sse_stream_duration_seconds_count") == 2



PROXIED = [{"X-Forwarded-For": "127.0.0.1"}, {"X-Real-IP": "127.0.0.1"}, {"Forwarded": "for=127.0.0.1"},
           {"Via": "1.1 nginx"}]


@pytest.mark.parametrize("settings", [{"trust_proxy_headers": True}, {}], indirect=True)
@pytest.mark.parametrize("headers", PROXIED)
@pytest.mark.gen_test
async def test_metrics_through_a_proxy_on_this_machine_are_refused(base_url, http_client, headers):
    # nginx on the same host is a loopback peer for everyone it forwards: a request naming a proxy
    # hop came from elsewhere, whatever address the header claims.
    refused = await http_client.fetch(base_url + "/metrics", headers=headers, raise_error=False)
    assert refused.code == 403 and json.loads(refused.body)["error"]["code"] == "forbidden"
    direct = await http_client.fetch(base_url + "/metrics")
    assert direct.code == 200 and direct.headers["Content-Type"].startswith("text/plain")


@pytest.mark.parametrize("settings", [{"public_metrics": True}], indirect=True)
@pytest.mark.gen_test
async def test_public_metrics_are_served_through_a_proxy_too(base_url, http_client):
    response = await http_client.fetch(base_url + "/metrics", headers={"X-Forwarded-For": "203.0.113.9"})
    assert response.code == 200


@pytest.mark.parametrize("address, loopback", [("127.0.0.1", True), ("127.8.9.1", True), ("::1", True),
                                               ("10.0.0.1", False), ("203.0.113.9", False), ("", False)])
def test_only_loopback_peers_count_as_local(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


@pytest.mark.gen_test
async def test_one_summary_line_per_stream_and_no_question_or_answer(base_url, fake, caplog):
    caplog.set_level(logging.INFO)
    fake.script = Script(deltas=["secret ", "answer"])
    answer = await ask(base_url, "question=private%20matter")
    summaries = [r for r in caplog.records if r.name == "tornado_sse.stream"]
    assert len(summaries) == 1
    record = summaries[0]
    # The stream id resumes and stops the stream: the log carries a short hash of it, never the id.
    assert record.stream == log_id(str(answer.meta["stream"])) and record.outcome == "done"
    assert str(answer.meta["stream"]) not in caplog.text
    assert str(answer.meta["conversation"]) not in caplog.text
    assert record.tokens == 2 and record.ttft_ms is not None and record.client == "127.0.0.1"
    assert "private matter" not in caplog.text and "secret answer" not in caplog.text


def test_json_logs_and_log_content_when_asked() -> None:
    with running("--log-format", "json", "--log-content") as (proc, port, lines):
        fetch(port, "/ask?question=What%20now%3F")
        fetch(port, "/healthz")
        proc.terminate()
        proc.wait(10)
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert len(records) == len(lines), lines  # every line is JSON
    [summary] = [r for r in records if r["logger"] == "tornado_sse.stream"]
    assert summary["outcome"] == "done" and summary["question"] == "What now?"
    assert "demo backend" in summary["answer"]
    access = [r for r in records if r["logger"] == "tornado_sse.access"]
    assert {r["path"] for r in access} >= {"/ask", "/healthz"} and all("?" not in r["message"] for r in access)


def test_every_flag_can_come_from_the_environment_and_flags_win() -> None:
    env = {"TORNADO_SSE_PORT": "9999", "TORNADO_SSE_MAX_STREAMS": "7", "TORNADO_SSE_RESUME_GRACE": "2.5",
           "TORNADO_SSE_TRUST_PROXY_HEADERS": "true", "TORNADO_SSE_ALLOWED_ORIGINS": "https://a.example, https://b.example",
           "TORNADO_SSE_ACCESS_TOKEN": "from-the-environment-Xq7tK2"}
    settings = parse_settings([], env)
    assert (settings.port, settings.max_streams, settings.resume_grace) == (9999, 7, 2.5)
    assert settings.trust_proxy_headers is True
    assert settings.allowed_origins == ("https://a.example", "https://b.example")
    assert settings.access_token == "from-the-environment-Xq7tK2"
    assert parse_settings(["--port", "1234", "--no-trust-proxy-headers"], env).port == 1234
    assert parse_settings(["--no-trust-proxy-headers"], env).trust_proxy_headers is False


@pytest.mark.parametrize("name, value, words", [
    ("TORNADO_SSE_PORT", "eighty", "invalid TORNADO_SSE_PORT: 'eighty' (accepted: a whole number)"),
    ("TORNADO_SSE_TRUST_PROXY_HEADERS", "maybe", "invalid TORNADO_SSE_TRUST_PROXY_HEADERS: 'maybe' (accepted: true or false)"),
    ("TORNADO_SSE_BACKEND", "magic", "invalid --backend: 'magic' (accepted: one of auto|openai|demo)"),
    ("TORNADO_SSE_LOG_FORMAT", "xml", "invalid --log-format: 'xml' (accepted: text|json)"),
])
def test_an_invalid_environment_value_stops_with_one_clear_line(name: str, value: str, words: str) -> None:
    run = subprocess.run([sys.executable, "-m", "tornado_sse"], env={**CLEAN_ENV, name: value},
                         capture_output=True, text=True, timeout=20)
    assert run.returncode == 2 and words in run.stderr and "Traceback" not in run.stderr
