"""Kitchen timers: set, cancel and list them by voice; they ring through the speaker.

Timers live in memory and are lost on restart (the tool description says so). They
outlive the conversation that set them, ring with the timer cue when due (after the
current answer, since cues queue behind it), and stop on the talk button or wake word.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from speakerd.tools import Tool

log = logging.getLogger(__name__)


@dataclass
class Timer:
    id: int
    label: str
    seconds: float
    due: float  # on the scheduler's clock


class Timers:
    """The set of pending timers, on an injectable clock; no I/O, no loop."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.clock = clock
        self.on_change = on_change
        self.pending: dict[int, Timer] = {}
        self._ids = itertools.count(1)

    def add(self, seconds: float, label: str) -> Timer:
        t = Timer(next(self._ids), label, seconds, self.clock() + seconds)
        self.pending[t.id] = t
        log.info("timer %d '%s' set for %s", t.id, label, _span(seconds),
                 extra={"SPEAKERD_EVENT": "timer"})
        self.on_change()
        return t

    def cancel(self, label: str | None = None) -> list[Timer]:
        gone = [t for t in self.pending.values() if label in (None, "", t.label)]
        for t in gone:
            del self.pending[t.id]
            log.info("timer %d '%s' cancelled", t.id, t.label,
                     extra={"SPEAKERD_EVENT": "timer"})
        self.on_change()
        return gone

    def remaining(self) -> list[dict[str, Any]]:
        now = self.clock()
        return [{"label": t.label, "remaining": _span(max(0.0, t.due - now))}
                for t in sorted(self.pending.values(), key=lambda t: t.due)]

    def next_due(self) -> float | None:
        return min((t.due for t in self.pending.values()), default=None)

    def pop_due(self) -> list[Timer]:
        now = self.clock()
        due = [t for t in self.pending.values() if t.due <= now]
        for t in due:
            del self.pending[t.id]
        return due


class Ringer:
    """Rings due timers: the timer cue every `every` seconds, `times` at most, until
    stop() (talk button or wake word)."""

    def __init__(self, play: Callable[[], None], *, every: float = 4.0,
                 times: int = 8) -> None:
        self.play = play
        self.every = every
        self.times = times
        self._task: asyncio.Task[None] | None = None

    @property
    def ringing(self) -> bool:
        return self._task is not None and not self._task.done()

    def ring(self, timer: Timer) -> None:
        log.info("timer %d '%s' is due: ringing", timer.id, timer.label,
                 extra={"SPEAKERD_EVENT": "timer"})
        self.stop()
        self._task = asyncio.get_running_loop().create_task(self._ring())

    async def _ring(self) -> None:
        for n in range(self.times):
            if n:
                await asyncio.sleep(self.every)
            self.play()

    def stop(self) -> bool:
        if not self.ringing:
            return False
        assert self._task
        self._task.cancel()
        log.info("timer alarm stopped", extra={"SPEAKERD_EVENT": "timer"})
        return True


async def run(timers: Timers, ringer: Ringer, changed: asyncio.Event) -> None:
    """Wake when the next timer is due (or the set changes) and ring what is due."""
    while True:
        due = timers.next_due()
        wait = None if due is None else max(0.0, due - timers.clock())
        changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), wait)
        for t in timers.pop_due():
            ringer.ring(t)


def _span(seconds: float) -> str:
    seconds = round(seconds)
    m, s = divmod(seconds, 60)
    h, m = divmod(m, 60)
    parts = [f"{h} h" if h else "", f"{m} min" if m else "", f"{s} s" if s or not seconds
             else ""]
    return " ".join(p for p in parts if p)


def tools(timers: Timers) -> list[Tool]:
    async def set_timer(minutes: float = 0, seconds: float = 0, label: str = "timer"
                        ) -> dict[str, Any]:
        total = minutes * 60 + seconds
        if total <= 0:
            raise ValueError("the timer needs a duration above zero")
        t = timers.add(total, label)
        return {"set": t.label, "rings_in": _span(total)}

    async def cancel_timer(label: str = "") -> dict[str, Any]:
        gone = timers.cancel(label or None)
        return {"cancelled": [t.label for t in gone]}

    async def list_timers() -> dict[str, Any]:
        return {"timers": timers.remaining()}

    return [
        Tool("set_timer", "Set a kitchen timer that rings on the speaker. Timers are kept "
             "in memory: they are lost if the speaker restarts.",
             {"type": "object", "additionalProperties": False, "properties": {
                 "minutes": {"type": "number", "minimum": 0, "maximum": 1440},
                 "seconds": {"type": "number", "minimum": 0, "maximum": 86400},
                 "label": {"type": "string"}}}, set_timer),
        Tool("cancel_timer", "Cancel the timer with this label, or every timer when no "
             "label is given.",
             {"type": "object", "additionalProperties": False,
              "properties": {"label": {"type": "string"}}}, cancel_timer),
        Tool("list_timers", "The pending timers and how long each has left.",
             {"type": "object", "properties": {}, "additionalProperties": False},
             list_timers),
    ]
