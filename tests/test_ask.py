"""/ask through the real server on a real port, against the fake upstream on its own port."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from urllib.parse import quote

import pytest
from tornado.httpclient import AsyncHTTPClient

from tornado_sse.demo import FakeUpstream, Script
from tornado_sse.settings import Settings

from .conftest import API_KEY, with_settings
from .sseclient import Answer, ask, open_raw, parse_events, read_until, serving

END = ("update", "<END_STREAMING_SSE>")
pytestmark = pytest.mark.gen_test


async def test_a_stream_has_the_sse_headers_and_one_frame_per_delta(base_url, fake: FakeUpstream):
    fake.script = Script(deltas=["Hello", ", ", "world"])
    answer = await ask(base_url, "question=hi")
    assert answer.status == 200
    assert answer.headers["Content-Type"] == "text/event-stream"
    assert answer.headers["Cache-Control"] == "no-cache"
    assert answer.headers["X-Accel-Buffering"] == "no"
    meta = answer.meta
    s = meta["stream"]
    assert answer.body == (
        f"id: {s}.1\nevent: meta\ndata: " + json.dumps(meta) + "\n\n"
        f"id: {s}.2\nevent: update\ndata: Hello\n\n"
        f"id: {s}.3\nevent: update\ndata: , \n\n"
        f"id: {s}.4\nevent: update\ndata: world\n\n"
        f'id: {s}.5\nevent: finish\ndata: {{"reason": "stop", "usage": {{"input_tokens": 1, "output_tokens": 3}}}}\n\n'
        f"id: {s}.6\nevent: update\ndata: <END_STREAMING_SSE>\n\n"
    ).encode()
    assert meta["restarted"] is False and len(str(meta["conversation"])) >= 20


async def test_the_upstream_gets_the_question_model_and_sampling_settings(base_url, fake, settings: Settings):
    fake.script = Script(deltas=["ok"])
    await ask(base_url, "question=What%20is%20SSE%3F")
    [request] = fake.requests
    assert request["messages"] == [{"role": "user", "content": "What is SSE?"}]
    assert request["model"] == settings.model
    assert "temperature" not in request  # not set: the model's own default
    assert request["max_tokens"] == settings.max_tokens
    assert request["stream"] is True and request["stream_options"] == {"include_usage": True}


TRICKY = ["a\nb", "\n\n", "x\n", "line one\nline two\n\n- item\n", "data: x", ":x", "event: y",
          "id: 3\nretry: 1", " spaced ", "h\u00e9 \u4f60\u597d \U0001f600 \u2028 \x85", "<b>&amp;</b>"]


async def test_tricky_deltas_reach_the_client_unchanged(base_url, fake):
    fake.script = Script(deltas=list(TRICKY))
    answer = await ask(base_url, "question=q")
    assert [data for event, data in answer.after_meta] == [
        *TRICKY, json.dumps({"reason": "stop", "usage": {"input_tokens": 1, "output_tokens": len(TRICKY)}}),
        "<END_STREAMING_SSE>"]
    assert answer.text == "".join(TRICKY)


async def test_unicode_passes_byte_exact(base_url, fake):
    fake.script = Script(deltas=["\u00e9\u00e8", "\U0001f680", "\u4e2d\u6587"])
    answer = await ask(base_url, "question=q")
    assert "event: update\ndata: \u00e9\u00e8\n\n".encode() in answer.body
    assert "event: update\ndata: \U0001f680\n\n".encode() in answer.body
    assert answer.text == "\u00e9\u00e8\U0001f680\u4e2d\u6587"


async def test_crlf_in_a_delta_arrives_as_a_line_break(base_url, fake):
    fake.script = Script(deltas=["a\r\nb", "\r\n"])
    answer = await ask(base_url, "question=q")
    assert answer.text == "a\nb\n"


async def test_the_model_writing_the_end_marker_does_not_end_the_stream(base_url, fake):
    fake.script = Script(deltas=["before ", "<END_STREAMING_SSE>", " after"])
    answer = await ask(base_url, "question=q")
    assert answer.text == "before <END_STREAMING_SSE> after"
    assert answer.events[-1] == END


async def test_chunk_shapes_of_real_servers_do_not_break_the_stream(base_url, fake):
    fake.script = Script(deltas=[
        {"choices": [], "prompt_filter_results": [{"prompt_index": 0}]},  # Azure
        {"choices": [{"index": 0, "delta": {"content": None}}]},
        {"choices": [{"index": 0, "delta": {}}]},
        {"choices": [{"index": 0, "delta": {"reasoning_content": "thinking..."}}]},  # vLLM, DeepSeek
        {"choices": [{"index": 0, "delta": {"content": "Answer"}}]},
        {"choices": [{"index": 0, "delta": {"content": ""}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]},
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}},
    ])
    answer = await ask(base_url, "question=q")
    assert answer.after_meta[:2] == [("reasoning", "thinking..."), ("update", "Answer")]
    assert answer.after_meta[2][0] == "finish" and answer.events[-1] == END
    assert b"None" not in answer.body and b"null" not in answer.body


FAILURES = [
    (Script(fail="status", status=401), "upstream_unauthorized", "API key"),
    (Script(fail="status", status=403), "upstream_forbidden", "refused access"),
    (Script(fail="status", status=404), "model_not_found", "--model"),
    (Script(fail="status", status=429), "upstream_rate_limited", "try again"),
    (Script(fail="status", status=429, error_code="insufficient_quota"), "upstream_quota_exceeded", "credits"),
    (Script(fail="status", status=500), "upstream_unavailable", "try again"),
    (Script(fail="status", status=503), "upstream_unavailable", "try again"),
    (Script(fail="status", status=400), "upstream_bad_request", "rejected"),
    (Script(fail="hang"), "upstream_timeout", "did not start answering within 2 seconds"),
    (Script(deltas=["a", "b"], fail="malformed", fail_after=1), "upstream_malformed", "could not read"),
    (Script(deltas=["a", "b"], fail="error_event", fail_after=1), "upstream_error", "reported an error"),
    (Script(deltas=["a", "b"], fail="truncate", fail_after=1), "upstream_incomplete", "broke off"),
    (Script(deltas=["a", "b"], fail="reset", fail_after=1), "upstream_incomplete", "broke off"),
    (Script(deltas=["a", "b"], fail="stall", fail_after=1), "upstream_timeout", "stopped writing for over 2 seconds"),
]


@pytest.mark.parametrize("script, code, words", FAILURES, ids=[f"{s.fail}-{s.status}-{c}" for s, c, _ in FAILURES])
async def test_every_failure_ends_with_an_error_event_and_the_end_frame(base_url, fake, script, code, words, caplog):
    fake.script = script
    assert_failed_cleanly(await ask(base_url, "question=q"), script, code, words, caplog.text)


def assert_failed_cleanly(answer: Answer, script: Script, code: str, words: str, log: str) -> None:
    """An error event with `code` and a message holding `words`, then the end frame; the text
    before the failure kept; no traceback, path or key anywhere."""
    assert answer.status == 200
    assert answer.events[-1] == END
    assert answer.events[-2][0] == "error" and answer.finish is None  # a failure sends no finish
    error = json.loads(answer.events[-2][1])
    assert error["code"] == code
    assert words in error["message"]
    assert "Traceback" not in answer.body.decode() and "/" not in error["message"].replace("--", "")
    assert answer.text == ("a" if script.fail_after == 1 else "")
    assert API_KEY not in answer.body.decode() and API_KEY not in log


async def test_an_unreachable_upstream_is_an_error_event(settings):
    # Nothing listens on a port we bind, learn and close again.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    async with serving(with_settings(settings, base_url=f"http://127.0.0.1:{dead_port}/v1")) as base_url:
        answer = await ask(base_url, "question=q")
    assert answer.events[-1] == END
    assert json.loads(answer.errors[0])["code"] == "upstream_unreachable"


async def test_the_api_key_reaches_the_upstream_but_no_response_or_log(base_url, fake, caplog, http_client):
    caplog.set_level(logging.DEBUG)
    fake.script = Script(deltas=["x"])
    answer = await ask(base_url, "question=secret%20question%20text")
    assert answer.text == "x"
    for path in ("/", "/healthz", "/nope"):
        page = await http_client.fetch(base_url + path, raise_error=False)
        assert API_KEY.encode() not in page.body
    assert API_KEY not in caplog.text
    assert "secret question text" not in caplog.text and "secret%20question" not in caplog.text


BAD_INPUT = [
    ("", 400, "missing_question"),
    ("question=", 400, "missing_question"),
    ("question=%20%20%0A", 400, "missing_question"),
    ("other=1", 400, "missing_question"),
    ("question=%FF%FE", 400, "invalid_encoding"),
    ("question=%C3%28", 400, "invalid_encoding"),
    ("question=a%00b", 400, "invalid_characters"),
    ("question=" + "x" * 4001, 413, "question_too_long"),
    ("question=" + "%C3%A9" * 4001, 413, "question_too_long"),
]


@pytest.mark.parametrize("query, status, code", BAD_INPUT, ids=[f"{c}-{len(q)}" for q, _, c in BAD_INPUT])
async def test_bad_input_gets_a_clear_4xx_and_no_stream(base_url, fake, query, status, code):
    answer = await ask(base_url, query)
    assert answer.status == status
    assert answer.headers["Content-Type"].startswith("application/json")
    error = json.loads(answer.body)["error"]
    assert error["code"] == code and len(error["message"]) > 10
    assert fake.requests == []


async def test_a_question_at_the_limit_is_accepted(base_url, fake):
    fake.script = Script(deltas=["ok"])
    answer = await ask(base_url, "question=" + "\u00e9" * 4000)
    assert answer.status == 200 and answer.text == "ok"


@pytest.mark.parametrize("size", [100_000, 1_000_000])
async def test_a_huge_url_gets_a_clean_431_not_a_dropped_connection(base_url, fake, port, size):
    reader, writer = await open_raw(port, "/ask?question=" + "x" * size)
    response = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, body = response.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 431 ") and b"application/json" in head
    error = json.loads(body)["error"]
    assert error["code"] == "request_too_large" and "shorter question" in error["message"]
    assert fake.requests == []


async def test_the_longest_question_of_4_byte_characters_is_accepted(base_url, fake):
    # The request head that needs the most bytes: 4,000 characters, each 4 UTF-8 bytes, each
    # byte percent-encoded (%F0%9F%98%80), with the headers and cookies of a real browser.
    fake.script = Script(deltas=["ok"])
    response = await AsyncHTTPClient().fetch(
        base_url + "/ask?question=" + quote("\U0001F600" * 4000) + "&conversation=" + "c" * 22,
        headers={"Cookie": "x=" + "y" * 4000, "User-Agent": "z" * 400}, raise_error=False)
    assert response.code == 200 and parse_events(response.body)[1] == ("update", "ok")
    assert fake.requests[0]["messages"][-1]["content"] == "\U0001F600" * 4000


async def test_html_in_the_question_passes_through_safely(base_url, fake):
    fake.script = Script(deltas=["fine"])
    answer = await ask(base_url, "question=%3Cscript%3Ealert(1)%3C%2Fscript%3E")
    assert answer.status == 200 and answer.text == "fine"
    assert fake.requests[0]["messages"][0]["content"] == "<script>alert(1)</script>"


async def test_the_server_stays_healthy_after_bad_input_and_failures(base_url, fake, http_client):
    for query, _, _ in BAD_INPUT:
        await ask(base_url, query)
    fake.script = Script(deltas=["a"], fail="reset", fail_after=0)
    await ask(base_url, "question=q")
    fake.script = Script(deltas=["still", " fine"])
    assert (await ask(base_url, "question=q")).text == "still fine"
    health = await http_client.fetch(base_url + "/healthz")
    assert json.loads(health.body) == {"status": "ok", "backend": "openai", "model": "test-model"}


async def test_unknown_paths_and_methods_get_clean_404_and_405(base_url, http_client):
    missing = await http_client.fetch(base_url + "/nothing-here", raise_error=False)
    assert missing.code == 404 and json.loads(missing.body)["error"]["code"] == "not_found"
    post = await http_client.fetch(base_url + "/ask?question=q", method="POST", body=b"", raise_error=False)
    assert post.code == 405 and json.loads(post.body)["error"]["code"] == "method_not_allowed"


async def seconds_until_the_upstream_sees_the_close(writer: asyncio.StreamWriter, fake: FakeUpstream) -> float:
    """Hang up like a browser that went away; how long until the fake upstream saw its client go."""
    closed_at = time.monotonic()
    writer.close()
    while not fake.disconnects and time.monotonic() - closed_at < 2:
        await asyncio.sleep(0.002)
    assert fake.disconnects, "the upstream never saw the close"
    return fake.disconnects[0].at - closed_at


async def test_closing_the_browser_aborts_the_upstream_at_once(port, fake):
    fake.script = Script(tokens=1000, token_delay=0.01)
    reader, writer = await open_raw(port, "/ask?question=q")
    await read_until(reader, b"event: update", 5)
    assert await seconds_until_the_upstream_sees_the_close(writer, fake) < 0.1
    [gone] = fake.disconnects
    written = gone.chunks_written
    await asyncio.sleep(0.1)
    assert fake.disconnects[0].chunks_written == written and fake.completed == 0


async def test_the_abort_reaches_a_silent_upstream_too(port, fake):
    # The upstream is between tokens for 10 s: nothing to read, and still the close goes through.
    fake.script = Script(deltas=["first", "second"], token_delay=10)
    reader, writer = await open_raw(port, "/ask?question=q")
    await read_until(reader, b"data: first")
    assert await seconds_until_the_upstream_sees_the_close(writer, fake) < 0.1


async def test_the_abort_reaches_an_upstream_that_has_not_answered_yet(port, fake):
    fake.script = Script(fail="hang")
    reader, writer = await open_raw(port, "/ask?question=q")
    await read_until(reader, b"\r\n\r\n")  # our headers are out; the upstream is still silent
    await asyncio.sleep(0.05)
    assert await seconds_until_the_upstream_sees_the_close(writer, fake) < 0.1


async def test_fifty_concurrent_streams_are_all_correct(base_url, fake):
    fake.script = Script(tokens=40, token_delay=0.005)
    answers = await asyncio.gather(*(ask(base_url, f"question=q{i}") for i in range(50)))
    expected = "".join(f"tok{i} " for i in range(40))
    assert [a.text for a in answers] == [expected] * 50
    assert all(a.events[-1] == END and not a.errors for a in answers)
    assert len(fake.requests) == 50 and fake.completed == 50


async def test_every_token_is_flushed_as_it_arrives(port, fake):
    fake.script = Script(deltas=["one", "two"], token_delay=1.0)
    reader, writer = await open_raw(port, "/ask?question=q")
    started = time.monotonic()
    body = await read_until(reader, b"data: one")
    writer.close()
    assert time.monotonic() - started < 0.5 and b"data: two" not in body


async def test_healthz_and_the_page(base_url, http_client):
    health = await http_client.fetch(base_url + "/healthz")
    assert json.loads(health.body) == {"status": "ok", "backend": "openai", "model": "test-model"}
    page = await http_client.fetch(base_url + "/")
    html = page.body.decode()
    assert page.headers["Content-Security-Policy"].startswith("default-src 'none'; script-src 'self'")
    for needle in ('id="form-question"', 'id="stop"', "/static/app.js"):
        assert needle in html
    assert "Demo mode" not in html and "<script>" not in html  # no inline script
    script = await http_client.fetch(base_url + "/static/app.js")
    assert script.code == 200 and script.headers["Content-Type"].startswith(("application/javascript", "text/javascript"))
