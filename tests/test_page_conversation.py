"""The page in a real headless Chromium: conversations, stop, errors, lost connections, reloads."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

import pytest
import tornado.httpserver
from tornado.httpclient import AsyncHTTPClient

from tornado_sse.demo import FakeUpstream, Script


from .browser import SOURCE, answered, ask, needs_chromium, open_page, until, wait_for
from .browser import page_settings, settings  # noqa: F401 (fixtures, by name)

pytestmark = [pytest.mark.gen_test(timeout=40), needs_chromium]


async def test_each_question_is_one_upstream_request_and_a_follow_up_sends_the_earlier_turns(
        base_url, request, fake: FakeUpstream):
    async with open_page(base_url, request) as (page, seen):
        fake.script = Script(deltas=["first answer"])
        await ask(page, "one")
        await answered(page)
        fake.script = Script(deltas=["second answer"])
        await ask(page, "two")
        await answered(page)
        assert await page.locator(".turn").count() == 2  # the whole conversation stays
        assert await page.locator(".turn .question").all_text_contents() == ["one", "two"]
        assert await page.evaluate(SOURCE) == "second answer"
        assert len(fake.requests) == 2
        messages = [(m["role"], m["content"]) for m in fake.requests[1]["messages"] if m["role"] != "system"]
        assert messages == [("user", "one"), ("assistant", "first answer"), ("user", "two")]
        first, second = seen.asks()
        assert "conversation" not in first and second["conversation"][0]


async def test_new_chat_forgets_the_conversation(base_url, request, fake: FakeUpstream):
    async with open_page(base_url, request) as (page, seen):
        fake.script = Script(deltas=["first answer"])
        await ask(page, "one")
        await answered(page)
        await page.click("#new-chat")
        assert await page.locator(".turn").count() == 0
        await ask(page, "two")
        await answered(page)
        assert [m["role"] for m in fake.requests[1]["messages"] if m["role"] != "system"] == ["user"]
        assert all("conversation" not in query for query in seen.asks())
        await page.reload()
        assert await page.locator(".turn .question").all_text_contents() == ["two"]


async def test_stop_aborts_the_generation_upstream_and_keeps_the_answer(base_url, request, fake: FakeUpstream):
    async with open_page(base_url, request) as (page, seen):
        fake.script = Script(tokens=500, token_delay=0.05)
        await ask(page, "q")
        await until(page, SOURCE)
        clicked = time.monotonic()
        await page.click("#stop")
        await wait_for(lambda: bool(fake.disconnects), 2)
        assert fake.disconnects[0].at - clicked < 0.5 and fake.completed == 0
        assert [r.method for r in seen.requests if urlsplit(r.url).path == "/stop"] == ["POST"]
        await answered(page)
        assert await page.text_content(".turn-note") == "Stopped."
        assert await page.get_attribute(".turn", "data-status") == "stopped"
        # The server ended the stream as stopped (finish, end frame), not as a reader that left.
        metrics = (await AsyncHTTPClient().fetch(base_url + "/metrics")).body.decode()
        assert 'tornado_sse_streams_finished_total{outcome="stopped"} 1.0' in metrics
        shown = await page.evaluate(SOURCE)
        assert shown.startswith("tok0 ")
        await asyncio.sleep(0.3)
        assert await page.evaluate(SOURCE) == shown  # nothing more arrives
        assert not await page.is_disabled("#ask") and not await page.is_visible("#stop")
        assert len(fake.requests) == 1


@pytest.mark.parametrize("script, words", [
    (Script(fail="status", status=401), "API key"),
    (Script(fail="status", status=429), "rate-limiting"),
    (Script(fail="status", status=503), "had a problem answering"),
    (Script(fail="hang"), "did not start answering"),
    (Script(deltas=["partial"], fail="truncate", fail_after=1), "broke off"),
], ids=["401", "429", "upstream-down", "timeout", "truncated"])
async def test_an_error_shows_its_message_and_is_asked_again_only_on_retry(
        base_url, request, fake: FakeUpstream, script: Script, words: str):
    async with open_page(base_url, request) as (page, _):
        fake.script = script
        await ask(page, "q")
        await page.wait_for_selector(".turn-error:not([hidden])", timeout=8000)
        assert words in (await page.text_content(".turn-error-text") or "")
        assert not await page.is_disabled("#ask")
        await asyncio.sleep(3.5)  # longer than an EventSource's reconnection delay
        assert len(fake.requests) == 1
        fake.script = Script(deltas=["fine now"])
        await page.click(".retry")
        # Poll the final text: right after the click the button may not be disabled yet, so
        # "Send is enabled" alone does not say the retried answer is in.
        await until(page, f"{SOURCE} === 'fine now'", timeout=10)
        await answered(page)
        assert await page.locator(".turn").count() == 1  # the failed turn was asked again in place
        assert len(fake.requests) == 2


async def test_a_lost_connection_keeps_the_text_and_says_it_was_cut_off(
        base_url, request, fake: FakeUpstream, http_server: tornado.httpserver.HTTPServer):
    async with open_page(base_url, request, allowed_errors="ERR_INCOMPLETE_CHUNKED_ENCODING") as (page, _):
        fake.script = Script(tokens=500, token_delay=0.05)
        await ask(page, "q")
        await until(page, f"{SOURCE}.length > 10")
        await http_server.close_all_connections()
        await answered(page)
        assert "cut off" in (await page.text_content(".turn-note") or "")
        assert (await page.evaluate(SOURCE)).startswith("tok0 tok1 ")
        await asyncio.sleep(3.5)
        assert len(fake.requests) == 1


@pytest.mark.parametrize("page_settings", [{"resume_grace": 10.0}], indirect=True)
async def test_a_lost_connection_resumes_the_same_answer_when_the_server_keeps_it(
        base_url, request, fake: FakeUpstream, http_server: tornado.httpserver.HTTPServer, page_settings):
    async with open_page(base_url, request, allowed_errors="ERR_INCOMPLETE_CHUNKED_ENCODING") as (page, seen):
        fake.script = Script(tokens=80, token_delay=0.03)
        await ask(page, "q")
        await until(page, f"{SOURCE}.length > 20")
        await http_server.close_all_connections()
        await answered(page, 15)
        assert await page.evaluate(SOURCE) == "".join(f"tok{i} " for i in range(80))
        assert await page.get_attribute(".turn", "data-status") == "done"
        assert len(fake.requests) == 1 and fake.completed == 1
        assert any("resume" in query for query in seen.asks())


async def test_a_reload_keeps_the_conversation_and_its_follow_ups(base_url, request, fake: FakeUpstream):
    async with open_page(base_url, request) as (page, seen):
        fake.script = Script(deltas=["- first answer"])
        await ask(page, "one")
        await answered(page)
        fake.script = Script(deltas=["second answer"])
        await ask(page, "two")
        await answered(page)
        # Each answer's timings render on the next frame after its end: wait for both to show.
        await until(page, "[...document.querySelectorAll('.metrics')].every(m => m.textContent)")
        metrics = await page.locator(".metrics").all_text_contents()
        assert len(metrics) == 2
        await page.reload()
        assert await page.locator(".turn .question").all_text_contents() == ["one", "two"]
        assert await page.text_content(".turn li") == "first answer"  # rendered again
        assert await page.locator(".metrics").all_text_contents() == metrics
        await asyncio.sleep(0.3)
        assert len(fake.requests) == 2  # nothing asked again
        fake.script = Script(deltas=["third answer"])
        await ask(page, "three")
        await answered(page)
        assert len([m for m in fake.requests[2]["messages"] if m["role"] != "system"]) == 5
        assert seen.asks()[2]["conversation"] == seen.asks()[1]["conversation"]


async def test_a_reload_mid_answer_shows_it_cut_off_and_never_asks_again(base_url, request, fake: FakeUpstream):
    async with open_page(base_url, request) as (page, _):
        fake.script = Script(tokens=500, token_delay=0.05)
        await ask(page, "q")
        shown = await until(page, f"{SOURCE}.length > 10 && {SOURCE}")
        await page.reload()
        assert "cut off" in (await page.text_content(".turn-note") or "")
        assert (await page.evaluate(SOURCE)).startswith(shown[:10])
        assert not await page.is_disabled("#ask")
        await asyncio.sleep(1)
        assert len(fake.requests) == 1


@pytest.mark.parametrize("page_settings", [{"resume_grace": 10.0}], indirect=True)
async def test_a_reload_mid_answer_resumes_the_same_answer(base_url, request, fake: FakeUpstream, page_settings):
    async with open_page(base_url, request) as (page, seen):
        fake.script = Script(tokens=80, token_delay=0.03)
        await ask(page, "q")
        await until(page, f"{SOURCE}.length > 20")
        await page.reload()
        await answered(page, 15)
        assert await page.evaluate(SOURCE) == "".join(f"tok{i} " for i in range(80))
        assert await page.get_attribute(".turn", "data-status") == "done"
        assert len(fake.requests) == 1 and fake.completed == 1
        assert any("resume" in query for query in seen.asks())


@pytest.mark.parametrize("page_settings", [{"resume_grace": 10.0}], indirect=True)
async def test_a_resume_the_server_answers_with_204_shows_the_answer_cut_off_at_once(
        base_url, request, fake: FakeUpstream, page_settings):
    async with open_page(base_url, request) as (page, seen):
        fake.script = Script(tokens=500, token_delay=0.05)
        await ask(page, "q")
        shown = await until(page, f"{SOURCE}.length > 10 && {SOURCE}")
        # As if the server had forgotten the answer: its id, written after the page saves.
        await page.evaluate("""() => addEventListener("pagehide", () => {
            const state = JSON.parse(sessionStorage.getItem("tornado-sse.chat.v1"));
            state.turns.at(-1).lastEventId = "gone00000000000000000000.5";
            sessionStorage.setItem("tornado-sse.chat.v1", JSON.stringify(state));
        })""")
        await page.reload()
        await page.wait_for_selector(".turn[data-status=lost]", state="attached", timeout=5000)
        assert "cut off" in (await page.text_content(".turn-note") or "")
        assert (await page.evaluate(SOURCE)).startswith(shown[:10])
        await asyncio.sleep(2.5)  # the page never asks again (it used to, every second)
        resumes = [query for query in seen.asks() if "resume" in query]
        assert [query["resume"] for query in resumes] == [["gone00000000000000000000.5"]]
        assert len(fake.requests) == 1


async def test_an_expired_conversation_starts_a_new_one_and_says_so(base_url, request, fake: FakeUpstream):
    async with open_page(base_url, request) as (page, _):
        fake.script = Script(deltas=["first answer"])
        await ask(page, "one")
        await answered(page)
        assert await page.is_hidden(".turn .restarted")
        # As if the server had forgotten it: a conversation id it never gave out, written after
        # the page saves its own state on the way out.
        await page.evaluate("""() => addEventListener("pagehide", () => {
            const state = JSON.parse(sessionStorage.getItem("tornado-sse.chat.v1"));
            state.conversation = "expired0000000000000000";
            sessionStorage.setItem("tornado-sse.chat.v1", JSON.stringify(state));
        })""")
        await page.reload()
        await ask(page, "two")
        await answered(page)
        assert await page.is_visible(".turn:last-child .restarted")
        assert [m["role"] for m in fake.requests[1]["messages"] if m["role"] != "system"] == ["user"]

