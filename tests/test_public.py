"""Holding up in public: keep-alive, timeouts, retries, slow readers, limits, access, TLS, resume.
Each behaviour is proven by injecting its fault against the real server and the fake upstream."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from tornado_sse.demo import FakeUpstream, Script

from .conftest import OWNER, tuned, with_settings
from .sseclient import ask, open_raw, parse_events, read_until, serving

END = ("update", "<END_STREAMING_SSE>")
pytestmark = pytest.mark.gen_test(timeout=30)




async def wait_until(condition, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# -- keep-alive and timeouts ---------------------------------------------------------------------

@tuned(keepalive=0.2)
async def test_a_silent_stream_gets_ping_comments_and_the_text_is_unchanged(port, fake: FakeUpstream):
    fake.script = Script(deltas=["after", " silence"], first_token_delay=0.7)
    reader, writer = await open_raw(port, "/ask?question=q")
    body = await read_until(reader, b"<END_STREAMING_SSE>")
    writer.close()
    assert body.count(b": ping\n\n") >= 2
    assert body.index(b": ping") < body.index(b"data: after")
    events = parse_events(body.split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n"))
    assert "".join(d for e, d in events if e == "update" and d != END[1]).replace("\n", "").endswith("after silence")


@tuned(first_token_timeout=0.5)
async def test_the_first_token_timeout_names_itself_and_closes_the_upstream(base_url, fake):
    fake.script = Script(fail="hang")
    answer = await ask(base_url, "question=q")
    error = json.loads(answer.errors[0])
    assert error == {"code": "upstream_timeout", "message": "The model did not start answering within 0.5 seconds."}
    assert answer.events[-1] == END
    await wait_until(lambda: len(fake.disconnects) == 1)


@tuned(idle_timeout=0.4, first_token_timeout=5)
async def test_the_between_tokens_timeout_names_itself_and_closes_the_upstream(base_url, fake):
    fake.script = Script(deltas=["a", "b"], fail="stall", fail_after=1)
    started = time.monotonic()
    answer = await ask(base_url, "question=q")
    assert 0.35 < time.monotonic() - started < 2
    assert json.loads(answer.errors[0])["message"] == (
        "The model stopped writing for over 0.4 seconds in the middle of the answer.")
    assert answer.text == "a" and answer.events[-1] == END
    await wait_until(lambda: len(fake.disconnects) == 1)


@pytest.fixture
def unanswering_port() -> Iterator[int]:
    """A port whose listen backlog is full: a connect there hangs until it times out."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(8):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", listener.getsockname()[1]))
        except BlockingIOError:
            pass
        fillers.append(s)
    yield listener.getsockname()[1]
    for s in fillers:
        s.close()
    listener.close()


async def test_the_connect_timeout_names_itself(settings, unanswering_port, io_loop):
    slow = with_settings(settings, base_url=f"http://127.0.0.1:{unanswering_port}/v1", connect_timeout=0.3)
    async with serving(slow) as base_url:
        started = time.monotonic()
        answer = await ask(base_url, "question=q")
    assert time.monotonic() - started < 3
    assert json.loads(answer.errors[0]) == {
        "code": "upstream_timeout", "message": "Connecting to the model provider took too long."}


# -- retries: before the first token only --------------------------------------------------------

@tuned(max_retries=2)
async def test_a_failure_before_the_first_token_is_retried_honouring_retry_after(base_url, fake):
    fake.script = Script(deltas=["fine"], fail="status", status=503, retry_after="0.2", fail_times=1)
    started = time.monotonic()
    answer = await ask(base_url, "question=q")
    assert answer.text == "fine" and not answer.errors
    assert len(fake.requests) == 2 and time.monotonic() - started >= 0.2


@tuned(max_retries=2)
async def test_nothing_is_retried_after_the_first_token(base_url, fake):
    fake.script = Script(deltas=["a", "b"], fail="reset", fail_after=1)
    answer = await ask(base_url, "question=q")
    assert answer.text == "a" and json.loads(answer.errors[0])["code"] == "upstream_incomplete"
    assert len(fake.requests) == 1


async def test_an_upstream_dying_midway_under_100_streams_ends_every_one(base_url, fake):
    fake.script = Script(tokens=30, token_delay=0.01, fail="reset", fail_after=10)
    answers = await asyncio.gather(*(ask(base_url, f"question=q{i}") for i in range(100)))
    for answer in answers:
        assert answer.events[-1] == END
        assert json.loads(answer.errors[0])["code"] == "upstream_incomplete"
        assert answer.text == "".join(f"tok{i} " for i in range(10))


# -- slow readers ----------------------------------------------------------------------------------

@tuned(send_timeout=0.5)
async def test_a_reader_that_never_reads_is_dropped_and_its_upstream_aborted(port, fake):
    fake.script = Script(deltas=["x" * 16384] * 8000)  # 128 MB if nothing held it back
    reader, writer = await open_raw(port, "/ask?question=q")
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await wait_until(lambda: len(fake.disconnects) == 1, timeout=10)
    # Backpressure held the upstream to what the kernel's socket buffers take (a few MB on
    # loopback), then the send timeout dropped the reader.
    assert fake.disconnects[0].chunks_written < 1500
    assert fake.completed == 0
    writer.close()


@tuned(send_timeout=10)
async def test_a_reader_that_falls_behind_holds_the_upstream_back_then_gets_every_frame(port, fake):
    # Far more than the socket buffers on both sides hold (a few MB each on loopback).
    fake.script = Script(deltas=["x" * 65536] * 1000)
    reader, writer = await open_raw(port, "/ask?question=q")
    body = bytearray(await reader.read(65536))
    await asyncio.sleep(0.5)  # not reading: the relay stops reading the upstream meanwhile
    assert fake.completed == 0 and not fake.disconnects
    while not body.endswith(b"<END_STREAMING_SSE>\n\n\r\n0\r\n\r\n"):
        chunk = await reader.read(1 << 20)  # caught up: the upstream must be read again
        assert chunk, "the connection closed before the end frame"
        body += chunk
    writer.close()
    assert body.count(b"x" * 65536) == 1000 and b"event: error" not in body
    assert fake.completed == 1 and not fake.disconnects


@tuned(idle_timeout=0.5, send_timeout=10)
async def test_time_spent_waiting_for_a_slow_reader_is_not_upstream_silence(port, fake):
    fake.script = Script(deltas=["x" * 65536] * 300)  # more than the socket buffers hold
    reader, writer = await open_raw(port, "/ask?question=q")
    body = bytearray(await reader.read(65536))
    await asyncio.sleep(1.5)  # three idle timeouts, while the upstream waits for us
    assert fake.completed == 0  # it did wait: backpressure held it
    while not body.endswith(b"<END_STREAMING_SSE>\n\n\r\n0\r\n\r\n"):
        chunk = await reader.read(1 << 20)
        assert chunk, "the connection closed before the end frame"
        body += chunk
    writer.close()
    assert b"event: error" not in body and body.count(b"x" * 65536) == 300


# -- limits ----------------------------------------------------------------------------------------

@tuned(max_streams=2)
async def test_above_max_streams_new_questions_get_503_and_slots_come_back(port, base_url, fake):
    fake.script = Script(tokens=1000, token_delay=0.05)
    held = [await open_raw(port, f"/ask?question=q{i}") for i in range(2)]
    for reader, _ in held:
        await read_until(reader, b"event: update")
    refused = await ask(base_url, "question=q")
    assert refused.status == 503 and refused.headers["Retry-After"] == "5"
    assert json.loads(refused.body)["error"]["code"] == "busy"
    for _, writer in held:
        writer.close()
    await wait_until(lambda: len(fake.disconnects) == 2)
    fake.script = Script(deltas=["ok"])
    assert (await ask(base_url, "question=q")).text == "ok"


@tuned(max_streams=1)
async def test_a_client_leaving_before_the_first_byte_releases_its_slot(port, base_url, fake, app):
    fake.script = Script(fail="hang")
    for _ in range(5):
        _, writer = await open_raw(port, "/ask?question=q")
        writer.close()
    registry = app.settings["registry"]
    await wait_until(lambda: registry.running == 0)
    fake.script = Script(deltas=["ok"])
    assert (await ask(base_url, "question=q")).text == "ok"


@tuned(rate_limit=60, rate_burst=2)
async def test_the_rate_limit_answers_429_with_retry_after(base_url, fake):
    fake.script = Script(deltas=["ok"])
    statuses = [(await ask(base_url, "question=q")).status for _ in range(2)]
    limited = await ask(base_url, "question=q")
    assert statuses == [200, 200] and limited.status == 429
    assert limited.headers["Retry-After"] == "1"
    assert "wait 1 s" in json.loads(limited.body)["error"]["message"]
    assert len(fake.requests) == 2


@pytest.mark.parametrize("settings, separate", [({"rate_limit": 60, "rate_burst": 1, "trust_proxy_headers": True}, True),
                                                ({"rate_limit": 60, "rate_burst": 1}, False)], indirect=["settings"])
async def test_client_addresses_come_from_proxy_headers_only_when_trusted(base_url, fake, http_client, separate):
    fake.script = Script(deltas=["ok"])
    codes = []
    for ip in ("203.0.113.1", "203.0.113.2"):
        response = await http_client.fetch(base_url + "/ask?question=q", headers={"X-Forwarded-For": ip}, raise_error=False)
        codes.append(response.code)
    assert codes == ([200, 200] if separate else [200, 429])


# -- access ----------------------------------------------------------------------------------------

TOKEN = "Lc3k9-TzqW0vXb7N_y2hRf8d"  # 24 url-safe characters: 157 bits by settings.entropy_bits


@tuned(access_token=TOKEN)
async def test_the_access_token_guards_ask_with_a_401(base_url, fake, http_client):
    fake.script = Script(deltas=["ok"])
    refused = await http_client.fetch(base_url + "/ask?question=q", raise_error=False)
    assert refused.code == 401 and refused.headers["WWW-Authenticate"].startswith("Bearer")
    assert json.loads(refused.body)["error"]["code"] == "unauthorized"
    wrong = await http_client.fetch(base_url + "/ask?question=q", raise_error=False,
                                    headers={"Authorization": f"Bearer {TOKEN[:-1]}X"})
    assert wrong.code == 401
    right = await http_client.fetch(base_url + "/ask?question=q", headers={"Authorization": f"Bearer {TOKEN}"})
    assert b"data: ok" in right.body
    assert len(fake.requests) == 1


@tuned(access_token=TOKEN)
async def test_signing_in_on_the_page_sets_a_safe_cookie_that_opens_ask(base_url, fake, http_client):
    fake.script = Script(deltas=["ok"])
    page = await http_client.fetch(base_url + "/")
    assert b'id="sign-in"' in page.body
    failed = await http_client.fetch(base_url + "/login", method="POST", body="token=nope",
                                     follow_redirects=False, raise_error=False)
    assert failed.code == 303 and failed.headers["Location"] == "/?sign_in=failed"
    assert "Set-Cookie" not in failed.headers
    signed = await http_client.fetch(base_url + "/login", method="POST", body=f"token={TOKEN}",
                                     follow_redirects=False, raise_error=False)
    assert signed.code == 303 and signed.headers["Location"] == "/"
    cookie = signed.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    answer = await http_client.fetch(base_url + "/ask?question=q", headers={"Cookie": cookie.split(";")[0]})
    assert b"data: ok" in answer.body
    page = await http_client.fetch(base_url + "/", headers={"Cookie": cookie.split(";")[0]})
    assert b'id="sign-in"' not in page.body


@pytest.mark.parametrize("headers, allowed", [
    ({"Origin": "https://evil.example"}, False),
    ({"Sec-Fetch-Site": "cross-site"}, False),
    ({"Sec-Fetch-Site": "same-site"}, False),
    ({"Origin": "null", "Sec-Fetch-Site": "cross-site"}, False),
    ({"Origin": "null"}, False),
    ({"Origin": "null", "Sec-Fetch-Site": "same-origin"}, True),
    ({"Origin": "https://friend.example"}, True),
    ({"Sec-Fetch-Site": "same-origin"}, True),
    ({"Sec-Fetch-Site": "none"}, True),
    ({}, True),
])
@tuned(allowed_origins=("https://friend.example",))
async def test_cross_site_pages_cannot_start_a_paid_generation(base_url, fake, http_client, headers, allowed):
    fake.script = Script(deltas=["ok"])
    response = await http_client.fetch(base_url + "/ask?question=q", headers=headers, raise_error=False)
    if allowed:
        assert response.code == 200 and len(fake.requests) == 1
    else:
        assert response.code == 403 and fake.requests == []
        assert json.loads(response.body)["error"]["code"] == "cross_site"


async def test_the_servers_own_origin_is_allowed(base_url, fake, http_client):
    fake.script = Script(deltas=["ok"])
    response = await http_client.fetch(base_url + "/ask?question=q", headers={"Origin": base_url})
    assert response.code == 200


async def test_every_response_has_the_security_headers(base_url, http_client):
    for path in ("/", "/healthz", "/ask", "/missing"):
        response = await http_client.fetch(base_url + path, raise_error=False)
        assert response.headers["X-Content-Type-Options"] == "nosniff", path
        assert response.headers["Referrer-Policy"] == "same-origin", path
        assert response.headers["X-Frame-Options"] == "DENY", path


async def test_draining_reports_503_on_healthz_and_refuses_new_questions(base_url, http_client, app, fake):
    app.settings["registry"].draining = True
    health = await http_client.fetch(base_url + "/healthz", raise_error=False)
    assert health.code == 503 and json.loads(health.body)["status"] == "draining"
    refused = await ask(base_url, "question=q")
    assert refused.status == 503 and json.loads(refused.body)["error"]["code"] == "shutting_down"
    assert fake.requests == []


# -- TLS -------------------------------------------------------------------------------------------

@pytest.fixture
def certificate(tmp_path) -> tuple[str, str]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return str(cert), str(key)


async def test_tls_in_the_server_itself(settings, certificate, fake, io_loop):
    secure = with_settings(settings, certfile=certificate[0], keyfile=certificate[1])
    fake.script = Script(deltas=["over", " tls"])
    async with serving(secure, scheme="https") as base_url:
        from tornado.httpclient import AsyncHTTPClient
        response = await AsyncHTTPClient().fetch(base_url + "/ask?question=q", validate_cert=False)
    assert parse_events(response.body)[1:3] == [("update", "over"), ("update", " tls")]
    assert response.headers["Strict-Transport-Security"].startswith("max-age=")


# -- resume ----------------------------------------------------------------------------------------

@tuned(resume_grace=3.0)
async def test_a_reconnect_with_last_event_id_resumes_without_a_second_upstream_request(port, fake, base_url):
    expected = "".join(f"tok{i} " for i in range(30))
    fake.script = Script(tokens=30, token_delay=0.02)
    reader, writer = await open_raw(port, "/ask?question=q", OWNER)
    first = await read_until(reader, b"event: update", 5)
    writer.close()
    events = _events_with_ids(first)
    last_id = [i for i, e, d in events if i][-1]
    seen = "".join(d for i, e, d in events if e == "update")
    await asyncio.sleep(0.2)  # the generation goes on meanwhile
    from tornado.httpclient import AsyncHTTPClient
    rest = await AsyncHTTPClient().fetch(base_url + "/ask?question=q", headers={"Last-Event-ID": last_id, **OWNER})
    rest_events = parse_events(rest.body)
    assert rest_events[-1] == END
    assert seen + "".join(d for e, d in rest_events[:-1] if e == "update") == expected
    assert len(fake.requests) == 1 and fake.disconnects == []


@tuned(resume_grace=0.6)
async def test_a_reader_taken_over_leaves_no_grace_behind_for_the_one_that_took_over(port, fake):
    fake.script = Script(tokens=200, token_delay=0.02)
    first, first_writer = await open_raw(port, "/ask?question=q", OWNER)
    last_id = [i for i, e, d in _events_with_ids(await read_until(first, b"event: update", 2)) if i][-1]
    second, second_writer = await open_raw(port, "/ask", {"Last-Event-ID": last_id, **OWNER})
    await read_until(second, b"event: update", 2)  # took over: the first is dropped
    await asyncio.sleep(0.3)
    second_writer.close()  # leaves: the grace (0.6 s) starts now, not when the first was dropped
    await asyncio.sleep(0.45)
    assert fake.disconnects == [], "aborted by the dropped reader's grace"
    await wait_until(lambda: len(fake.disconnects) == 1, timeout=2)
    first_writer.close()


@tuned(resume_grace=3.0)
async def test_resume_by_query_parameter_after_the_answer_finished(port, fake, base_url):
    fake.script = Script(deltas=["one ", "two ", "three"], token_delay=0.05)
    reader, writer = await open_raw(port, "/ask?question=q", OWNER)
    first = await read_until(reader, b"data: one")
    writer.close()
    last_id = [i for i, e, d in _events_with_ids(first) if i][-1]
    await wait_until(lambda: fake.completed == 1)
    rest = await ask(base_url, "resume=" + last_id, headers=OWNER)
    assert rest.text == "two three" and rest.events[-1] == END


@tuned(resume_grace=3.0)
async def test_an_answer_written_to_the_end_is_still_kept_for_a_reader_that_missed_its_tail(base_url, fake):
    # Written to the socket is not read: a connection that drops just after the end frame went
    # out loses what was in flight, and the reader comes back with an earlier id.
    fake.script = Script(deltas=["one ", "two ", "three"])
    whole = await ask(base_url, "question=q", headers=OWNER)
    assert whole.text == "one two three"
    rest = await ask(base_url, f"resume={whole.meta['stream']}.2", headers=OWNER)  # after "one "
    assert rest.text == "two three" and rest.events[-1] == END
    assert len(fake.requests) == 1


@tuned(resume_grace=3.0)
async def test_stop_aborts_at_once_even_with_a_resume_grace(port, fake, base_url, http_client):
    fake.script = Script(tokens=1000, token_delay=0.02)
    reader, writer = await open_raw(port, "/ask?question=q", OWNER)
    first = await read_until(reader, b"event: update")
    stream_id = json.loads(parse_events(first.split(b"\r\n\r\n", 1)[1].split(b"\r\n", 1)[1])[0][1])["stream"]
    stopped = await http_client.fetch(base_url + f"/stop?stream={stream_id}", method="POST", body=b"",
                                      headers=OWNER)
    assert stopped.code == 204
    await wait_until(lambda: len(fake.disconnects) == 1, timeout=1)
    writer.close()
    again = await http_client.fetch(base_url + "/stop?stream=" + stream_id, method="POST", body=b"",
                                    raise_error=False, headers=OWNER)
    assert again.code == 404


def _events_with_ids(raw: bytes) -> list[tuple[str, str, str]]:
    """(id, event, data) of complete frames in a raw chunked HTTP response read so far."""
    body = raw.split(b"\r\n\r\n", 1)[1]
    frames = []
    for block in body.decode().split("\n\n")[:-1]:
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":"))
        if "event" in fields:
            frames.append((fields.get("id", ""), fields["event"], fields.get("data", "")))
    return frames
