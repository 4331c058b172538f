"""Helpers for the page tests: a fresh headless Chromium on the page, and ways to wait in it.

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
from playwright.async_api import Page, Request, async_playwright

from tornado_sse.settings import Settings

from .conftest import with_settings

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent / "artifacts"
# Without these, Chromium keeps dialing Google's hosts, which this offline machine refuses.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
PHONE = {"width": 375, "height": 740}
# Skipped on a developer machine without Debian's chromium; in CI (which installs it) never.
needs_chromium = pytest.mark.skipif(not shutil.which(CHROMIUM) and not os.environ.get("CI"),
                                    reason="Debian's chromium is not installed (.ci/run installs it)")


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
    """The answer is over (ended, failed or stopped): Send is enabled again, and the page has
    drawn the answer's last state. It draws on the next animation frame (app.js renderSoon), so
    a short answer can enable Send before its text is shown: a frame callback asked for now runs
    after the one the page asked for before."""
    await page.wait_for_selector("#ask:not([disabled])", state="attached", timeout=timeout * 1000)
    await page.evaluate("new Promise(resolve => requestAnimationFrame(() => resolve(null)))")


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
