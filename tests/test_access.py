"""Who may spend and whose answer is whose: failed tokens throttled everywhere, the token's
strength at start-up, random expiring sessions, conversations and streams bound to the browser
that started them, and Stop that ends its stream."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import subprocess
import sys
import time

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPResponse

from tornado_sse.conversations import CUT_OFF_NOTE
from tornado_sse.demo import FakeUpstream, Script
from tornado_sse.settings import Settings, SettingsError

from .conftest import OWNER, tuned, with_settings
from .sseclient import ask, open_raw, parse_events, read_until, serving
from .test_cli import CLEAN_ENV

END = ("update", "<END_STREAMING_SSE>")
TOKEN = "Lc3k9-TzqW0vXb7N_y2hRf8d"  # 24 url-safe characters: 157 bits by settings.entropy_bits
SECRET = "k2J9-wq8ZrT0bN5yXc_Lf3Pv7Hs4Md6G"
STRANGER = {"Cookie": "tornado_sse_owner=someone-else-0123456789abcdef"}
pytestmark = pytest.mark.gen_test(timeout=30)




async def fetch(url: str, method: str = "GET", headers: dict[str, str] | None = None,
                body: str | None = None) -> HTTPResponse:
    return await AsyncHTTPClient().fetch(url, method=method, headers=headers, body=body,
                                         raise_error=False, follow_redirects=False)


async def sign_in(base_url: str) -> str:
    """Sign in on the form; the session cookie as a Cookie header value."""
    signed = await fetch(base_url + "/login", "POST", body=f"token={TOKEN}")
    assert signed.code == 303 and signed.headers["Location"] == "/"
    [cookie] = [c for c in signed.headers.get_list("Set-Cookie") if c.startswith("tornado_sse_session=")]
    return cookie.split(";")[0]


# -- failed tokens ---------------------------------------------------------------------------------

@tuned(access_token=TOKEN)
async def test_wrong_tokens_on_ask_stop_and_login_share_one_bucket_then_even_the_right_token_waits(base_url, fake):
    fake.script = Script(deltas=["ok"])
    session = await sign_in(base_url)  # a success costs nothing
    wrong = {"Authorization": "Bearer " + TOKEN[:-1] + "X"}
    codes = [(await fetch(base_url + "/ask?question=q", headers=wrong)).code for _ in range(4)]
    codes += [(await fetch(base_url + "/stop?stream=x", "POST", wrong, "")).code for _ in range(3)]
    codes += [(await fetch(base_url + "/login", "POST", body="token=nope")).code for _ in range(3)]
    assert codes == [401] * 7 + [303] * 3
    for method, path, body in (("GET", "/ask?question=q", None), ("POST", "/stop?stream=x", "")):
        locked = await fetch(base_url + path, method, {"Authorization": f"Bearer {TOKEN}"}, body)
        assert locked.code == 429 and 1 <= int(locked.headers["Retry-After"]) <= 10, path
        error = json.loads(locked.body)["error"]
        assert error["code"] == "too_many_failures" and "wait" in error["message"]
        assert TOKEN not in locked.body.decode()
    assert (await fetch(base_url + "/login", "POST", body=f"token={TOKEN}")).code == 429
    assert fake.requests == []
    # A browser signed in before keeps working: its signed session says nothing about the token.
    assert (await fetch(base_url + "/ask?question=q", headers={"Cookie": session})).code == 200


@tuned(access_token=TOKEN, trust_proxy_headers=True)
async def test_a_guessers_lockout_is_its_own_address_only(base_url, fake):
    fake.script = Script(deltas=["ok"])
    guesser = {"Authorization": "Bearer wrong", "X-Real-Ip": "203.0.113.66"}
    codes = [(await fetch(base_url + "/ask?question=q", headers=guesser)).code for _ in range(12)]
    assert codes == [401] * 10 + [429] * 2
    other = {"Authorization": f"Bearer {TOKEN}", "X-Real-Ip": "203.0.113.7"}
    assert (await fetch(base_url + "/ask?question=q", headers=other)).code == 200


# -- the token's strength --------------------------------------------------------------------------

@pytest.mark.parametrize("token", ["let-me-in-please", "open-sesame", "a" * 27, "0123456789" * 3])
def test_a_guessable_access_token_is_refused_with_a_way_to_make_one(token: str, io_loop) -> None:
    with pytest.raises(SettingsError) as refused:
        Settings(access_token=token)
    assert "128 bits" in str(refused.value) and "secrets.token_urlsafe(32)" in str(refused.value)
    assert token not in str(refused.value)


def test_a_guessable_session_secret_is_refused_too(io_loop) -> None:
    with pytest.raises(SettingsError, match="invalid --session-secret: '\\(hidden\\)'"):
        Settings(session_secret="hunter2hunter2")
    assert Settings(session_secret=SECRET).session_secret == SECRET and SECRET not in repr(Settings(session_secret=SECRET))


def test_the_cli_refuses_a_weak_token_from_the_environment_at_start_up(io_loop) -> None:
    run = subprocess.run([sys.executable, "-m", "tornado_sse"], capture_output=True, text=True, timeout=20,
                         env={**CLEAN_ENV, "TORNADO_SSE_ACCESS_TOKEN": "correct-horse"})
    assert run.returncode == 2 and "invalid --access-token" in run.stderr
    assert "secrets.token_urlsafe(32)" in run.stderr and "correct-horse" not in run.stderr


# -- sessions --------------------------------------------------------------------------------------

@tuned(access_token=TOKEN)
async def test_each_sign_in_gets_its_own_random_session_unrelated_to_the_token(base_url, fake):
    fake.script = Script(deltas=["ok"])
    one, two = await sign_in(base_url), await sign_in(base_url)
    assert one != two and TOKEN not in one
    for cookie in (one, two):
        assert (await fetch(base_url + "/ask?question=q", headers={"Cookie": cookie})).code == 200
    # The cookie the token alone used to make (HMAC of a constant) opens nothing.
    derived = hmac.new(TOKEN.encode(), b"tornado-sse session", hashlib.sha256).hexdigest()
    forged = await fetch(base_url + "/ask?question=q", headers={"Cookie": f"tornado_sse_session={derived}"})
    assert forged.code == 401


@tuned(access_token=TOKEN, session_max_age=2.0)
async def test_a_session_expires_after_its_max_age(base_url, fake):
    fake.script = Script(deltas=["ok"])
    cookie = await sign_in(base_url)
    assert (await fetch(base_url + "/ask?question=q", headers={"Cookie": cookie})).code == 200
    await asyncio.sleep(3.2)  # the signed timestamp has whole seconds
    assert (await fetch(base_url + "/ask?question=q", headers={"Cookie": cookie})).code == 401


@tuned(access_token=TOKEN, session_secret=SECRET)
async def test_rotating_the_session_secret_signs_everyone_out_without_changing_the_token(base_url, settings, fake):
    fake.script = Script(deltas=["ok"])
    cookie = await sign_in(base_url)
    async with serving(settings) as restarted:  # the same secret: sign-ins survive a restart
        assert (await fetch(restarted + "/ask?question=q", headers={"Cookie": cookie})).code == 200
    async with serving(with_settings(settings, session_secret=SECRET[::-1])) as rotated:
        assert (await fetch(rotated + "/ask?question=q", headers={"Cookie": cookie})).code == 401
        assert (await fetch(rotated + "/ask?question=q", headers={"Authorization": f"Bearer {TOKEN}"})).code == 200


@tuned(access_token=TOKEN)
async def test_signing_out_ends_the_session_even_for_a_copy_of_its_cookie(base_url, fake):
    fake.script = Script(deltas=["ok"])
    cookie = await sign_in(base_url)
    out = await fetch(base_url + "/logout", "POST", {"Cookie": cookie}, "")
    assert out.code == 303 and out.headers["Location"] == "/"
    cleared = " ".join(out.headers.get_list("Set-Cookie"))
    assert "tornado_sse_session=;" in cleared or 'tornado_sse_session="";' in cleared
    assert (await fetch(base_url + "/ask?question=q", headers={"Cookie": cookie})).code == 401
    page = await fetch(base_url + "/", headers={"Cookie": cookie})
    assert b'id="sign-in"' in page.body


# -- conversations and streams belong to the browser that started them ------------------------------

async def test_the_owner_cookie_is_minted_by_ask_http_only_and_same_site(base_url, fake):
    fake.script = Script(deltas=["ok"])
    page = await fetch(base_url + "/")
    assert "tornado_sse_owner" not in " ".join(page.headers.get_list("Set-Cookie"))
    answer = await fetch(base_url + "/ask?question=q")
    [cookie] = [c for c in answer.headers.get_list("Set-Cookie") if c.startswith("tornado_sse_owner=")]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    again = await fetch(base_url + "/ask?question=q", headers={"Cookie": cookie.split(";")[0]})
    assert "tornado_sse_owner" not in " ".join(again.headers.get_list("Set-Cookie"))


async def test_someone_elses_conversation_id_starts_a_new_conversation_and_leaks_nothing(base_url, fake: FakeUpstream):
    fake.script = Script(deltas=["The launch code is 1234."])
    mine = await ask(base_url, "question=Remember%201234", headers=OWNER)
    conversation = mine.meta["conversation"]
    fake.script = Script(deltas=["ok"])
    for stranger in (STRANGER, None):  # another browser, or a client with no cookie
        theirs = await ask(base_url, f"question=What%20was%20the%20code%3F&conversation={conversation}",
                           headers=stranger)
        assert theirs.meta["restarted"] is True and theirs.meta["conversation"] != conversation
        assert fake.requests[-1]["messages"] == [{"role": "user", "content": "What was the code?"}]
    again = await ask(base_url, f"question=And%20now%3F&conversation={conversation}", headers=OWNER)
    assert again.meta == {**again.meta, "conversation": conversation, "restarted": False}
    assert [m["content"] for m in fake.requests[-1]["messages"]] == [
        "Remember 1234", "The launch code is 1234.", "And now?"]  # nothing of the strangers'


@tuned(resume_grace=3.0)
async def test_someone_elses_last_event_id_neither_replays_the_answer_nor_cuts_its_reader_off(port, base_url, fake):
    fake.script = Script(tokens=20, token_delay=0.03)
    reader, writer = await open_raw(port, "/ask?question=q", OWNER)
    first = await read_until(reader, b"event: update", 2)
    stream_id = json.loads(parse_events(first.split(b"\r\n\r\n", 1)[1].split(b"\r\n", 1)[1])[0][1])["stream"]
    for stranger in (STRANGER, {}):
        # As for an id that never existed: 204, the SSE spec's "stop reconnecting", and nothing else.
        taken = await fetch(base_url + "/ask", headers={"Last-Event-ID": f"{stream_id}.0", **stranger})
        assert taken.code == 204 and taken.body == b""
        resumed = await fetch(base_url + f"/ask?resume={stream_id}.0", headers=stranger)
        assert resumed.code == 204 and resumed.body == b""
    rest = await asyncio.wait_for(read_until(reader, b"<END_STREAMING_SSE>"), 10)
    writer.close()
    assert b"tok19" in first + rest and fake.disconnects == [] and fake.completed == 1


async def test_a_stranger_cannot_stop_someone_elses_answer(port, base_url, fake):
    fake.script = Script(tokens=20, token_delay=0.03)
    reader, writer = await open_raw(port, "/ask?question=q", OWNER)
    first = await read_until(reader, b"event: update")
    stream_id = json.loads(parse_events(first.split(b"\r\n\r\n", 1)[1].split(b"\r\n", 1)[1])[0][1])["stream"]
    for stranger in (STRANGER, {}):
        refused = await fetch(base_url + f"/stop?stream={stream_id}", "POST", stranger, "")
        assert refused.code == 404 and json.loads(refused.body)["error"]["code"] == "unknown_stream"
    rest = await asyncio.wait_for(read_until(reader, b"<END_STREAMING_SSE>"), 10)
    writer.close()
    assert b"tok19" in first + rest and b"\"reason\": \"stop\"" in rest and b"stopped" not in rest
    assert fake.disconnects == [] and fake.completed == 1


# -- Stop ends the stream --------------------------------------------------------------------------

async def test_stop_ends_the_readers_stream_with_finish_stopped_and_the_end_frame(port, base_url, fake):
    fake.script = Script(tokens=1000, token_delay=0.02)
    reader, writer = await open_raw(port, "/ask?question=q1", OWNER)
    first = await read_until(reader, b"event: update")
    meta = json.loads(parse_events(first.split(b"\r\n\r\n", 1)[1].split(b"\r\n", 1)[1])[0][1])
    stopped = await fetch(base_url + f"/stop?stream={meta['stream']}", "POST", OWNER, "")
    assert stopped.code == 204
    started = time.monotonic()
    raw = first + await asyncio.wait_for(read_until(reader, b"\r\n0\r\n\r\n"), 5)  # the response ends
    writer.close()
    assert time.monotonic() - started < 2 and b": ping" not in raw
    # Chunk-size lines end up in front of a frame: its tail is what the reader parses.
    frames = [f for f in raw.replace(b"\r\n", b"\n").split(b"\n\n") if b"event: " in f]
    assert frames[-2].endswith(b'\nevent: finish\ndata: {"reason": "stopped"}')
    assert frames[-1].endswith(b"\nevent: update\ndata: <END_STREAMING_SSE>")
    assert parse_events(b"\n\n".join(frames[-2:]) + b"\n\n") == [("finish", '{"reason": "stopped"}'), END]
    # The turn is kept, marked cut off, as with a lost connection.
    fake.script = Script(deltas=["ok"])
    await ask(base_url, f"question=q2&conversation={meta['conversation']}", headers=OWNER)
    assert fake.requests[-1]["messages"][1]["content"].endswith(CUT_OFF_NOTE)
