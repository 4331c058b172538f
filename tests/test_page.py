"""The page in a real headless Chromium: streaming, rendering, safety, input, layout, sign-in."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
from playwright.async_api import async_playwright

from tornado_sse.demo import FakeUpstream, Script


from .browser import CHROMIUM, CSP, FLAGS, PHONE, SOURCE, answered, ask, needs_chromium, open_page, until
from .browser import page_settings, settings  # noqa: F401 (fixtures, by name)

pytestmark = [pytest.mark.gen_test(timeout=40), needs_chromium]

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


@pytest.mark.parametrize("page_settings", [{"access_token": "open-sesame-4Hq9Zt-Wk2pLx7"}], indirect=True)
async def test_a_protected_server_shows_only_the_sign_in_form(base_url, request, fake: FakeUpstream, page_settings):
    async with open_page(base_url, request) as (page, _):
        assert await page.is_visible("#sign-in") and await page.locator("#form-question").count() == 0
        assert await page.get_attribute("#token", "autocomplete") == "current-password"
        await page.fill("#token", "wrong")
        await page.click("#sign-in button[type=submit]")
        await page.wait_for_selector("text=Wrong access token.")
        await page.fill("#token", "open-sesame-4Hq9Zt-Wk2pLx7")
        await page.click("#sign-in button[type=submit]")
        await page.wait_for_selector("#form-question")
        fake.script = Script(deltas=["hello"])
        await ask(page, "q")
        await answered(page)
        assert await page.evaluate(SOURCE) == "hello"
        await page.click("#sign-out button")  # the session ends here, not just in this tab
        await page.wait_for_selector("#sign-in")
