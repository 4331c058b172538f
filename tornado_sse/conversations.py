"""Conversations kept in memory, so follow-up questions carry their context. Every bound is a
setting: turns and characters per conversation (oldest turns dropped first), idle lifetime, and a
total count with least-recently-used eviction."""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from .guard import same_owner

Message = dict[str, str]
CUT_OFF_NOTE = "\n\n[This answer was cut off.]"


@dataclass
class Turn:
    question: str
    answer: str
    cut_off: bool = False


@dataclass
class Conversation:
    id: str
    owner: str = ""  # the browser that started it (BaseHandler.owner): to others it is unknown
    turns: list[Turn] = field(default_factory=list)
    used: float = 0.0
    system: str | None = None  # the operator's system prompt when it started; never trimmed

    def messages(self, question: str) -> list[Message]:
        """The system prompt, the turns so far, then the new question, as Chat Completions
        messages."""
        messages: list[Message] = [{"role": "system", "content": self.system}] if self.system else []
        for turn in self.turns:
            messages.append({"role": "user", "content": turn.question})
            answer = turn.answer + CUT_OFF_NOTE if turn.cut_off else turn.answer
            messages.append({"role": "assistant", "content": answer})
        messages.append({"role": "user", "content": question})
        return messages


class ConversationStore:
    def __init__(self, *, max_turns: int, max_chars: int, ttl: float, max_conversations: int,
                 system_prompt: str | None = None, clock: Callable[[], float] = time.monotonic):
        self._system_prompt = system_prompt
        self._max_turns = max_turns
        self._max_chars = max_chars
        self._ttl = ttl
        self._max = max_conversations
        self._clock = clock
        self._items: OrderedDict[str, Conversation] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def open(self, id: str | None, owner: str) -> tuple[Conversation, bool]:
        """The conversation `id` if `owner` started it, or a new one of `owner`'s; the flag says a
        given id was unknown, expired or someone else's (which must look the same: an id alone
        must not let a stranger read the turns back through the model, nor add to them)."""
        now = self._clock()
        self._expire(now)
        conversation = self._items.get(id) if id else None
        if conversation is not None and not same_owner(conversation.owner, owner):
            conversation = None
        if conversation is None:
            conversation = Conversation(secrets.token_urlsafe(16), owner, system=self._system_prompt)
            self._items[conversation.id] = conversation
            while len(self._items) > self._max:
                self._items.popitem(last=False)
        self._items.move_to_end(conversation.id)
        conversation.used = now
        return conversation, bool(id) and conversation.id != id

    def record(self, conversation: Conversation, turn: Turn) -> None:
        """Add a finished (or cut-off) turn, then drop the oldest turns past the bounds. The turn
        itself is kept within the characters bound too: an answer past it is cut (and marked so),
        since an upstream may stream far more than anyone asked for, and it is all resent."""
        add_turn(conversation, turn, self._max_turns, self._max_chars)
        conversation.used = self._clock()
        if conversation.id in self._items:
            self._items.move_to_end(conversation.id)

    def _expire(self, now: float) -> None:
        while self._items:
            oldest = next(iter(self._items.values()))
            if now - oldest.used < self._ttl:
                break
            del self._items[oldest.id]


def add_turn(conversation: Conversation, turn: Turn, max_turns: int, max_chars: int) -> None:
    """Append `turn`, cut to `max_chars`, then drop the oldest turns past the bounds: the same
    rule wherever the conversation is kept (this process, or Redis: redis_store.py)."""
    room = max(max_chars - len(turn.question), 0)
    if len(turn.answer) > room:
        turn = Turn(turn.question, turn.answer[:room], cut_off=True)
    turns = conversation.turns
    turns.append(turn)
    while len(turns) > max_turns or (
        len(turns) > 1 and sum(len(t.question) + len(t.answer) for t in turns) > max_chars
    ):
        del turns[0]
