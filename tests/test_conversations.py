"""Follow-up questions keep their context: the store's bounds, and conversations over HTTP."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from tornado_sse.conversations import CUT_OFF_NOTE, ConversationStore, Turn
from tornado_sse.demo import FakeUpstream, Script

from .conftest import OWNER, with_settings
from .sseclient import ask, open_raw, read_until, serving


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


BROWSER = "browser-0123456789abcdef01"  # an owner id, as BaseHandler.owner gives them


def store(clock: Clock | None = None, **bounds: int) -> ConversationStore:
    limits: dict[str, Any] = {"max_turns": 3, "max_chars": 1000, "ttl": 60, "max_conversations": 3, **bounds}
    return ConversationStore(**limits, clock=clock or Clock())


def test_a_new_conversation_gets_an_unguessable_id_and_an_unknown_one_restarts() -> None:
    s = store()
    first, restarted = s.open(None, BROWSER)
    assert not restarted and len(first.id) >= 21
    again, restarted = s.open(first.id, BROWSER)
    assert again is first and not restarted
    other, restarted = s.open("made-up", BROWSER)
    assert other is not first and restarted and other.id != "made-up"


def test_an_id_opens_its_conversation_only_for_the_browser_that_started_it() -> None:
    s = store()
    mine, _ = s.open(None, BROWSER)
    assert s.open(mine.id, BROWSER) == (mine, False)
    assert s.open(mine.id, "someone-else-0123456789a")[1] is True
    assert s.open(mine.id, BROWSER[:-1])[1] is True
    nobodys, _ = s.open(None, "")  # an empty owner is nobody's: not even "" gets it back
    assert s.open(nobodys.id, "")[1] is True


def test_messages_carry_the_turns_then_the_question_and_mark_cut_off_answers() -> None:
    s = store()
    c, _ = s.open(None, BROWSER)
    s.record(c, Turn("q1", "a1"))
    s.record(c, Turn("q2", "half an ans", cut_off=True))
    assert c.messages("q3") == [
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "half an ans" + CUT_OFF_NOTE},
        {"role": "user", "content": "q3"}]


def test_the_oldest_turns_go_first_past_the_turn_and_character_bounds() -> None:
    s = store(max_turns=2, max_chars=30)
    c, _ = s.open(None, BROWSER)
    for i in range(3):
        s.record(c, Turn(f"q{i}", f"a{i}"))
    assert [t.question for t in c.turns] == ["q1", "q2"]
    s.record(c, Turn("long" * 5, "x" * 9))  # 29 characters: alone it fits, with q2 it does not
    assert [t.question for t in c.turns] == ["long" * 5]


def test_idle_conversations_expire_and_the_least_recently_used_are_evicted() -> None:
    clock = Clock()
    s = store(clock)
    a, _ = s.open(None, BROWSER)
    clock.now += 30
    b, _ = s.open(None, BROWSER)
    clock.now += 31  # a is idle for 61 s, b for 31 s
    assert s.open(a.id, BROWSER)[1] is True and s.open(b.id, BROWSER) == (b, False)
    c, _ = s.open(None, BROWSER)
    d, _ = s.open(None, BROWSER)
    s.open(b.id, BROWSER)  # b is used again: the least recently used is now the one from open(a.id)
    e, _ = s.open(None, BROWSER)
    assert len(s) == 3 and s.open(b.id, BROWSER)[0] is b and s.open(d.id, BROWSER)[0] is d


pytestmark_http = pytest.mark.gen_test


@pytestmark_http
async def test_a_follow_up_sends_the_earlier_turns_to_the_model(base_url, fake: FakeUpstream):
    fake.script = Script(deltas=["Paris", " is the capital."])
    first = await ask(base_url, "question=Capital%20of%20France%3F", headers=OWNER)
    conversation = first.meta["conversation"]
    fake.script = Script(deltas=["About 2 million."])
    second = await ask(base_url, f"question=Its%20population%3F&conversation={conversation}", headers=OWNER)
    assert second.meta["conversation"] == conversation and second.meta["restarted"] is False
    assert fake.requests[1]["messages"] == [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris is the capital."},
        {"role": "user", "content": "Its population?"}]


@pytestmark_http
async def test_an_unknown_conversation_starts_a_new_one_and_says_so(base_url, fake):
    fake.script = Script(deltas=["ok"])
    answer = await ask(base_url, "question=q&conversation=expired-or-made-up")
    assert answer.meta["restarted"] is True and answer.meta["conversation"] != "expired-or-made-up"
    assert fake.requests[0]["messages"] == [{"role": "user", "content": "q"}]


@pytestmark_http
async def test_each_question_without_a_conversation_starts_afresh(base_url, fake):
    fake.script = Script(deltas=["ok"])
    one = await ask(base_url, "question=a")
    two = await ask(base_url, "question=b")
    assert one.meta["conversation"] != two.meta["conversation"]
    assert one.meta["stream"] != two.meta["stream"]
    assert fake.requests[1]["messages"] == [{"role": "user", "content": "b"}]


@pytestmark_http
async def test_an_aborted_answer_is_kept_as_far_as_it_got_and_marked_cut_off(port, base_url, fake):
    fake.script = Script(deltas=["first part", " never sent"], token_delay=5)
    reader, writer = await open_raw(port, "/ask?question=q1", OWNER)
    raw = await read_until(reader, b"data: first part")
    conversation = json.loads(raw.split(b"event: meta\ndata: ", 1)[1].split(b"\n", 1)[0])["conversation"]
    writer.close()
    await asyncio.sleep(0.1)
    fake.script = Script(deltas=["ok"])
    await ask(base_url, f"question=q2&conversation={conversation}", headers=OWNER)
    assert fake.requests[1]["messages"][1] == {"role": "assistant", "content": "first part" + CUT_OFF_NOTE}


@pytestmark_http
async def test_a_failed_answer_before_any_text_is_not_kept(base_url, fake):
    fake.script = Script(fail="status", status=500)
    first = await ask(base_url, "question=q1", headers=OWNER)
    fake.script = Script(deltas=["ok"])
    await ask(base_url, f"question=q2&conversation={first.meta['conversation']}", headers=OWNER)
    assert fake.requests[1]["messages"] == [{"role": "user", "content": "q2"}]


@pytestmark_http
async def test_an_answer_longer_than_the_character_bound_is_kept_cut_and_marked(settings, fake):
    fake.script = Script(deltas=["0123456789"] * 20)  # 200 characters
    async with serving(with_settings(settings, max_conversation_chars=50)) as base_url:
        first = await ask(base_url, "question=q1", headers=OWNER)
        assert len(first.text) == 200  # the reader gets all of it; the conversation keeps 50
        fake.script = Script(deltas=["ok"])
        await ask(base_url, f"question=q2&conversation={first.meta['conversation']}", headers=OWNER)
    assert fake.requests[1]["messages"][:2] == [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": ("0123456789" * 5)[:48] + CUT_OFF_NOTE}]


def test_the_newest_turn_alone_is_cut_to_the_character_bound() -> None:
    s = store(max_chars=30)
    c, _ = s.open(None, BROWSER)
    s.record(c, Turn("question", "x" * 100))
    assert c.turns == [Turn("question", "x" * 22, cut_off=True)]
