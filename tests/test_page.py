"""The page in a real headless Chromium, against the real server and the fake upstream.

The page runs under the server's strict Content-Security-Policy, which forbids eval, so the tests
poll with `page.evaluate` (not subject to the page's CSP) or CSS selectors, never
`page.wait_for_function` with a string (Playwright evaluates those with eval, inside the page).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import tornado.httpserver
from playwright.async_api import Page, Request, async_playwright

from tornado_sse.demo import FakeUpstream, Script
from tornado_sse.settings import Settings

from .conftest import with_settings

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent / "artifacts"
pytestmark = [
    pytest.mark.gen_test(timeout=40),
    pytest.mark.skipif(not shutil.which(CHROMIUM) and not os.environ.get("CI"),
                       reason="Debian's chromium is not installed (.ci/run installs it)"),
]
# Without these, Chromium keeps dialing Google's hosts, which this offline machine refuses.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
PHONE = {"width": 375, "height": 740}


@pytest.fixture
def page_settings(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Server settings for one test: `@pytest.mark.parametrize("page_settings", [{...}], indirect=True)`."""
    return getattr(request, "param", {})


@pytest.fixture
def settings(settings: Settings, page_settings: dict[str, Any]) -> Settings:
    return with_settings(settings, **page_settings)


class Browsing:
    """What one page did: every request it made, and every dialog it opened."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.dialogs: list[str] = []

    def asks(self) -> list[dict[str, list[str]]]:
        """The query of every /ask the page opened."""
        return [parse_qs(urlsplit(r.url).query) for r in self.requests if urlsplit(r.url).path == "/ask"]


@asynccontextmanager
async def open_page(base_url: str, request: pytest.FixtureRequest, *, path: str = "/",
                    allowed_errors: str | None = None, **context: Any) -> AsyncIterator[tuple[Page, Browsing]]:
    """A fresh Chromium on the page; a screenshot lands in tests/artifacts/ if the test fails.
    The page must log no console error (other than `allowed_errors`, a regex) and throw nothing."""
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = await (await browser.new_context(**context)).new_page()
        seen = Browsing()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.on("request", lambda r: seen.requests.append(r))
        page.on("dialog", lambda d: seen.dialogs.append(d.message))
        await page.goto(base_url + path)
        try:
            yield page, seen
            assert [e for e in errors if not (allowed_errors and re.search(allowed_errors, e))] == []
        except BaseException:
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
            raise
        finally:
            await browser.close()


async def ask(page: Page, question: str) -> None:
    await page.fill("#input", question)
    await page.press("#input", "Enter")


async def answered(page: Page, timeout: float = 10.0) -> None:
    """The answer is over (ended, failed or stopped): Send is enabled again."""
    await page.wait_for_selector("#ask:not([disabled])", state="attached", timeout=timeout * 1000)


async def until(page: Page, expression: str, timeout: float = 5.0) -> Any:
    """Poll a JavaScript expression until it is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = await page.evaluate(expression)
        if value:
            return value
        assert time.monotonic() < deadline, f"never true: {expression}"
        await asyncio.sleep(0.02)


async def wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


SOURCE = "document.querySelector('#result').dataset.source"  # the answer's text as received
EXPECTED = ["Line one\n", "\n", "- caf\u00e9 \u4f60\u597d \U0001f600\n", "  indented", " <b>not bold</b>", " end"]


async def test_an_answer_streams_in_and_ends_equal_to_the_upstreams_text(base_url, request, fake: FakeUpstream):
    async with open_page(base_url, request) as (page, _):
        fake.script = Script(deltas=list(EXPECTED), token_delay=0.15)
        await ask(page, "Tell me something")
        assert await page.text_content("#question") == "Tell me something"
        assert await page.input_value("#input") == ""
        partial = await until(page, SOURCE)
        assert partial != "".join(EXPECTED)  # visible before the upstream finished
        assert await page.is_disabled("#ask") and await page.is_visible("#stop")
        await answered(page)
        assert await page.evaluate(SOURCE) == "".join(EXPECTED)
        shown = await page.inner_text("#result")
        assert "Line one" in shown and "caf\u00e9 \u4f60\u597d \U0001f600" in shown and "<b>not bold</b>" in shown
        assert await page.locator("#result b").count() == 0  # the model's HTML is text
        assert not await page.is_visible("#stop") and not await page.is_visible(".turn-error")
        await asyncio.sleep(0.3)
        assert len(fake.requests) == 1


MARKDOWN = ["Some *emphasis* and `inline code`.\n\n", "- one\n", "- two\n\n",
            "```python\nprint('hi')\n```\n\n", "A [link](https://example.com/page)."]


async def test_markdown_renders_as_it_streams(base_url, request, fake: FakeUpstream):
    async with open_page(base_url, request) as (page, seen):
        fake.script = Script(deltas=list(MARKDOWN), token_delay=0.1)
        await ask(page, "q")
        await page.wait_for_selector("#result em")  # rendered while the answer still streams
        assert await page.is_visible("#stop")
        await answered(page)
        assert await page.text_content("#result em") == "emphasis"
        assert await page.text_content("#result p > code") == "inline code"
        assert await page.locator("#result li").all_text_contents() == ["one", "two"]
        assert await page.text_content("#result pre > code") == "print('hi')\n"
        assert await page.locator("#result .code-block .copy").count() == 1
        link = page.locator("#result a")
        assert await link.get_attribute("href") == "https://example.com/page"
        assert await link.get_attribute("target") == "_blank"
        assert await link.get_attribute("rel") == "noopener noreferrer nofollow"
        assert [r.url for r in seen.requests if not r.url.startswith(base_url)] == []


EVIL = ['<img src=x onerror=alert(1)>', '<script>alert(2)</script>\n\n',
        '![pic](http://127.0.0.1:9/x.png) [click](javascript:alert(3)) ',
        '<a href="javascript:alert(4)">a</a> <svg onload=alert(5)></svg> <style>*{color:red}</style>']


async def test_model_output_that_looks_like_html_runs_and_loads_nothing(base_url, request, fake: FakeUpstream):
    async with open_page(base_url, request) as (page, seen):
        fake.script = Script(deltas=list(EVIL))
        await ask(page, "q")
        await answered(page)
        assert await page.evaluate(SOURCE) == "".join(EVIL)
        assert "<img src=x onerror=alert(1)>" in await page.inner_text("#result")
        await page.click("#result a")  # only a harmless link is left to click
        await asyncio.sleep(0.3)
        assert seen.dialogs == []
        assert await page.locator("#result img, #result script, #result svg, #result style").count() == 0
        assert await page.locator("#result [onerror], #result [style], #result a[href^='javascript']").count() == 0
        assert [r.url for r in seen.requests if r.url.endswith("/x") or not r.url.startswith(base_url)] == []


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
        assert await page.text_content(".turn-note") == "Stopped."
        assert await page.get_attribute(".turn", "data-status") == "stopped"
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
        await answered(page)
        assert await page.evaluate(SOURCE) == "fine now"
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


async def test_the_page_is_served_under_a_strict_csp_and_logs_no_errors(base_url, request, fake: FakeUpstream):
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        response = await (await browser.new_page()).goto(base_url + "/")
        assert response is not None and response.headers.get("content-security-policy") == CSP
        html = await response.text()
        await browser.close()
    assert re.findall(r"<script(?![^>]*\bsrc=)", html) == [] and " style=" not in html
    async with open_page(base_url, request) as (page, _):  # it fails on any console error
        fake.script = Script(deltas=list(MARKDOWN))
        await ask(page, "q")
        await answered(page)
        assert await page.locator("#result li").count() == 2


async def test_enter_sends_and_shift_enter_adds_a_line(base_url, request, fake: FakeUpstream):
    async with open_page(base_url, request) as (page, _):
        fake.script = Script(deltas=["ok"])
        await page.click("#input")
        await page.keyboard.type("line one")
        await page.keyboard.press("Shift+Enter")
        await page.keyboard.type("line two")
        assert await page.input_value("#input") == "line one\nline two"
        await asyncio.sleep(0.2)
        assert fake.requests == []
        await page.keyboard.press("Enter")
        await answered(page)
        assert await page.inner_text("#question") == "line one\nline two"
        assert fake.requests[0]["messages"][-1]["content"] == "line one\nline two"


async def test_the_copy_buttons_copy_the_answer_and_the_code(base_url, request, fake: FakeUpstream):
    async with open_page(base_url, request, permissions=["clipboard-read", "clipboard-write"]) as (page, _):
        fake.script = Script(deltas=list(MARKDOWN))
        await ask(page, "q")
        await answered(page)
        await page.click(".copy-answer")
        assert await page.evaluate("navigator.clipboard.readText()") == "".join(MARKDOWN)
        assert await page.text_content(".copy-answer") == "Copied"
        await page.click(".code-block .copy")
        assert await page.evaluate("navigator.clipboard.readText()") == "print('hi')\n"


async def test_a_reload_keeps_the_conversation_and_its_follow_ups(base_url, request, fake: FakeUpstream):
    async with open_page(base_url, request) as (page, seen):
        fake.script = Script(deltas=["- first answer"])
        await ask(page, "one")
        await answered(page)
        fake.script = Script(deltas=["second answer"])
        await ask(page, "two")
        await answered(page)
        metrics = await page.locator(".metrics").all_text_contents()
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


async def test_a_phone_reads_it_without_scrolling_sideways(base_url, request, fake: FakeUpstream):
    async with open_page(base_url, request, viewport=PHONE, is_mobile=True) as (page, _):
        fake.script = Script(deltas=["A long word: " + "x" * 200 + "\n\n",
                                     "```\n" + "wide code line " * 30 + "\n```\n\n",
                                     "| a | b |\n|---|---|\n| " + "cell " * 40 + " | c |\n\n",
                                     "https://example.com/" + "path/" * 40])
        await ask(page, "q " * 200)
        await answered(page)
        assert await page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        assert await page.is_visible("#ask") and await page.is_visible("#new-chat")


async def test_each_answer_shows_its_first_token_time_and_speed(base_url, request, fake: FakeUpstream):
    async with open_page(base_url, request) as (page, _):
        fake.script = Script(tokens=20, first_token_delay=0.3, token_delay=0.05)
        await ask(page, "q")
        await answered(page)
        line = await page.text_content(".metrics") or ""
        match = re.fullmatch(r"first token (\d+) ms · ([\d.]+) tok/s", line)
        assert match, line
        assert 300 <= int(match[1]) < 3000
        assert 5 < float(match[2]) < 40  # 20 tokens, 50 ms apart


async def test_a_reasoning_models_thinking_is_folded_above_the_answer(base_url, request, fake: FakeUpstream):
    def chunk(delta: dict[str, str]) -> dict[str, Any]:
        return {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": "m",
                "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}

    async with open_page(base_url, request) as (page, _):
        fake.script = Script(deltas=[chunk({"reasoning_content": "Let me think."}), "The answer."])
        await ask(page, "q")
        await answered(page)
        assert await page.is_visible(".thinking summary") and not await page.is_visible(".thinking-text")
        await page.click(".thinking summary")
        assert await page.text_content(".thinking-text") == "Let me think."
        assert await page.evaluate(SOURCE) == "The answer."


async def test_the_view_follows_the_answer_unless_the_reader_scrolls_up(base_url, request, fake: FakeUpstream):
    at_bottom = ("document.documentElement.scrollHeight - (scrollY + innerHeight) < 60")
    async with open_page(base_url, request, viewport={"width": 800, "height": 400}) as (page, _):
        fake.script = Script(deltas=[f"Paragraph {i}.\n\n" for i in range(120)], token_delay=0.04)
        await ask(page, "q")
        await until(page, f"{SOURCE}.length > 400")
        assert await page.evaluate(at_bottom)
        await page.mouse.wheel(0, -2000)
        await until(page, "scrollY < 100")
        await asyncio.sleep(0.5)
        assert await page.evaluate("scrollY") < 100  # left where the reader put it
        assert await page.is_visible("#stop")
        await answered(page, 15)


@pytest.mark.parametrize("page_settings", [{"access_token": "open-sesame"}], indirect=True)
async def test_a_protected_server_shows_only_the_sign_in_form(base_url, request, fake: FakeUpstream, page_settings):
    async with open_page(base_url, request) as (page, _):
        assert await page.is_visible("#sign-in") and await page.locator("#form-question").count() == 0
        assert await page.get_attribute("#token", "autocomplete") == "current-password"
        await page.fill("#token", "wrong")
        await page.click("#sign-in button[type=submit]")
        await page.wait_for_selector("text=Wrong access token.")
        await page.fill("#token", "open-sesame")
        await page.click("#sign-in button[type=submit]")
        await page.wait_for_selector("#form-question")
        fake.script = Script(deltas=["hello"])
        await ask(page, "q")
        await answered(page)
        assert await page.evaluate(SOURCE) == "hello"
