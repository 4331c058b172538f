"""The page says in words why an answer ended when the model did not end it by itself: the length
limit or a content filter (the `finish` event), in a real headless Chromium."""

from __future__ import annotations


import pytest

from tornado_sse.demo import FakeUpstream, Script

from .browser import SOURCE, answered, ask, needs_chromium, open_page
from .browser import page_settings, settings  # noqa: F401 (fixtures, by name)

pytestmark = [pytest.mark.gen_test(timeout=60), needs_chromium]


async def test_an_answer_cut_at_the_limit_or_by_a_filter_says_so_and_a_whole_one_says_nothing(
        base_url, request, fake: FakeUpstream):
    async with open_page(base_url, request) as (page, _):
        for reason, words in [("length", "reached the length limit"),
                              ("content_filter", "content filter stopped this answer"),
                              ("stop", None)]:
            fake.script = Script(deltas=["Partial ", reason], finish_reason=reason)
            await ask(page, f"Question ending in {reason}")
            await answered(page, timeout=20)
            turn = page.locator(".turn").last
            assert await page.evaluate(SOURCE) == "Partial " + reason
            note = turn.locator(".turn-note")
            if words is None:
                assert await note.text_content() == "" and not await note.is_visible()
            else:
                assert words in (await note.text_content() or "") and await note.is_visible()
            assert not await turn.locator(".turn-error").is_visible()
            assert await turn.get_attribute("data-status") == "done"
