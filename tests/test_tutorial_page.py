"""The Laravel tutorial's own page, unchanged, against this server in a real headless Chromium.

The README promises that page works against us. Its script appends each `update` to `innerText`
and closes the EventSource at the end frame; nothing else. Served from the server's own origin
(Playwright answers that one URL with the file), so its `/ask` goes to the real server.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.async_api import Route, async_playwright

from tornado_sse.demo import FakeUpstream, Script, demo_reply

from .browser import CHROMIUM, FLAGS, needs_chromium, until

pytestmark = [pytest.mark.gen_test(timeout=40), needs_chromium]

TUTORIAL_PAGE = (Path(__file__).parent / "pages" / "tutorial.html").read_text()
KEEP_EVENT_SOURCES = """{
  const Native = window.EventSource;
  window.__sources = [];
  window.EventSource = function (url, init) {
    const source = new Native(url, init);
    window.__sources.push(source);
    return source;
  };
  window.EventSource.prototype = Native.prototype;
}"""


async def tutorial_answer(base_url: str, question: str) -> tuple[str, int]:
    """Ask on the tutorial's page; the text it shows once the end frame closed its EventSource,
    and how many /ask requests it made."""
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = await browser.new_page()
            asks: list[str] = []
            page.on("request", lambda r: asks.append(r.url) if "/ask?" in r.url else None)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))

            async def serve_tutorial(route: Route) -> None:
                await route.fulfill(status=200, content_type="text/html", body=TUTORIAL_PAGE)

            await page.route(base_url + "/tutorial.html", serve_tutorial)
            # The page's own script is unchanged; this only keeps its EventSources within reach.
            await page.add_init_script(KEEP_EVENT_SOURCES)
            await page.goto(base_url + "/tutorial.html")
            await page.fill("input[name=input]", question)
            await page.click("button[type=submit]")
            # CLOSED (2) comes only from the page's close() at the end frame: a stream the server
            # merely ends leaves it CONNECTING (0), and it reconnects after 3 s and asks again.
            await until(page, "window.__sources.length === 1 && window.__sources[0].readyState === 2",
                        timeout=15)
            assert errors == []
            return await page.inner_text("#result"), len(asks)
        finally:
            await browser.close()


async def test_the_tutorials_page_shows_the_demo_answer_with_its_spaces(base_url, fake: FakeUpstream):
    # The demo backend's own reply, as the fake upstream streams it by default.
    text = "".join(demo_reply("What is SSE?"))
    shown, asks = await tutorial_answer(base_url, "What is SSE?")
    assert shown.startswith("You asked: **What is SSE?**\n\nThis is the **tornado-sse demo backend**")
    assert shown.split() == text.split()  # every word, none run together
    assert asks == 1


async def test_the_tutorials_page_keeps_newlines_and_stops_at_the_end_frame(base_url, fake: FakeUpstream):
    fake.script = Script(deltas=["Two", " lines:\n", "- one\n", "- two", " <END_STREAMING_SSE>"])
    shown, asks = await tutorial_answer(base_url, "q")
    assert shown == "Two lines:\n- one\n- two <END_STREAMING_SSE>"
    assert asks == 1
