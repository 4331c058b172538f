"""The page in a real headless Chromium, against the real server and the fake upstream."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from playwright.async_api import Page, async_playwright

from tornado_sse.demo import FakeUpstream, Script

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent / "artifacts"
pytestmark = [
    pytest.mark.gen_test(timeout=30),
    pytest.mark.skipif(not shutil.which(CHROMIUM) and not os.environ.get("CI"),
                       reason="Debian's chromium is not installed (.ci/run installs it)"),
]
# Without these, Chromium keeps dialing Google's hosts, which this offline machine refuses.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@asynccontextmanager
async def open_page(base_url: str, request: pytest.FixtureRequest) -> AsyncIterator[Page]:
    """A fresh Chromium on the page; a screenshot lands in tests/artifacts/ if the test fails."""
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = await browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        await page.goto(base_url + "/")
        try:
            yield page
            assert errors == [], errors
        except BaseException:
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
            raise
        finally:
            await browser.close()


async def ask(page: Page, question: str) -> None:
    await page.fill("#input", question)
    await page.press("#input", "Enter")


async def wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


EXPECTED = ["Line one\n", "\n", "- caf\u00e9 \u4f60\u597d \U0001f600\n", "  indented", " <b>not bold</b>", " end"]


async def test_an_answer_streams_in_and_ends_equal_to_the_upstreams_text(base_url: str, request: pytest.FixtureRequest, fake: FakeUpstream):
    async with open_page(base_url, request) as page:
        fake.script = Script(deltas=list(EXPECTED), token_delay=0.15)
        await ask(page, "Tell me something")
        assert await page.text_content("#question") == "Tell me something"
        assert await page.input_value("#input") == ""
        await page.wait_for_function("document.querySelector('#result').textContent.length > 0")
        partial = await page.text_content("#result")
        assert partial and partial != "".join(EXPECTED)  # visible before the upstream finished
        assert await page.is_disabled("#ask") and await page.is_visible("#stop")
        await page.wait_for_function("!document.querySelector('#ask').disabled")
        assert await page.text_content("#result") == "".join(EXPECTED)
        assert await page.inner_html("#result") == "".join(EXPECTED).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        assert not await page.is_visible("#stop") and not await page.is_visible("#error")
        await asyncio.sleep(0.3)
        assert len(fake.requests) == 1


async def test_model_output_that_looks_like_html_runs_nothing(base_url: str, request: pytest.FixtureRequest, fake: FakeUpstream):
    async with open_page(base_url, request) as page:
        dialogs: list[str] = []
        requests: list[str] = []
        page.on("dialog", lambda d: dialogs.append(d.message))
        page.on("request", lambda r: requests.append(r.url))
        evil = '<img src=x onerror=alert(1)><script>alert(2)</script>'
        fake.script = Script(deltas=[evil])
        await ask(page, "q")
        await page.wait_for_function("!document.querySelector('#ask').disabled")
        assert await page.text_content("#result") == evil
        await asyncio.sleep(0.2)
        assert dialogs == []
        assert [u for u in requests if u.endswith("/x") or not u.startswith(base_url)] == []


@pytest.mark.parametrize("script, words", [
    (Script(fail="status", status=401), "API key"),
    (Script(fail="status", status=429), "rate-limiting"),
    (Script(deltas=["partial"], fail="truncate", fail_after=1), "broke off"),
])
async def test_an_error_shows_a_readable_message_and_is_never_asked_again(base_url: str, request: pytest.FixtureRequest, fake: FakeUpstream, script: Script, words: str):
    async with open_page(base_url, request) as page:
        fake.script = script
        await ask(page, "q")
        await page.wait_for_selector("#error:not([hidden])")
        assert words in (await page.text_content("#error") or "")
        assert not await page.is_disabled("#ask")
        await asyncio.sleep(3.5)  # longer than an EventSource's reconnection delay
        assert len(fake.requests) == 1


async def test_stop_aborts_the_generation_upstream(base_url: str, request: pytest.FixtureRequest, fake: FakeUpstream):
    async with open_page(base_url, request) as page:
        fake.script = Script(tokens=500, token_delay=0.05)
        await ask(page, "q")
        await page.wait_for_function("document.querySelector('#result').textContent.length > 0")
        clicked = time.monotonic()
        await page.click("#stop")
        await wait_for(lambda: _true(bool(fake.disconnects)), 2)
        assert fake.disconnects[0].at - clicked < 0.5 and fake.completed == 0
        assert await page.text_content("#status") == "Stopped."
        shown = await page.text_content("#result")
        await asyncio.sleep(0.3)
        assert await page.text_content("#result") == shown  # nothing more arrives
        assert len(fake.requests) == 1


async def test_a_second_question_replaces_the_first_answer(base_url: str, request: pytest.FixtureRequest, fake: FakeUpstream):
    async with open_page(base_url, request) as page:
        fake.script = Script(deltas=["first answer"])
        await ask(page, "one")
        await page.wait_for_function("document.querySelector('#result').textContent === 'first answer'")
        fake.script = Script(deltas=["second answer"])
        await ask(page, "two")
        await page.wait_for_function("document.querySelector('#result').textContent === 'second answer'")
        assert await page.text_content("#question") == "two"
        assert [r["messages"][-1]["content"] for r in fake.requests] == ["one", "two"]


async def _true(value: bool) -> bool:
    return value
