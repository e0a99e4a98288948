"""Announcements on the daemon's loop: the queue, the wait for a conversation to end,
and one realtime connection per announcement driving its machine (machine.py)."""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from speakerd import log as logmod
from speakerd.announce import machine as m
from speakerd.errors import refusal
from speakerd.session import Settings

log = logging.getLogger(__name__)

MAX_TEXT = 1000  # characters: over a minute of speech
MAX_QUEUED = 3  # announcements waiting or playing; one more is refused
WAIT_SECONDS = 60.0  # from the request: how long an open conversation is waited out
REPLY_TIMEOUT = 600.0  # how long `speakerd announce` waits for the daemon's reply
PREFIX = "announce:"  # playback response ids of announcements


class Speaker(Protocol):
    """The playback path, as announcements use it (the answers' own)."""

    def enqueue(self, pcm: bytes, response_id: str) -> None: ...
    def finish(self, response_id: str) -> None: ...
    def flush(self) -> None: ...
    def played_ms(self, response_id: str) -> int: ...


class Connection(Protocol):
    def send(self, event: dict[str, Any]) -> None: ...
    def close(self) -> None: ...
    async def run(self) -> None: ...


class Stage(Protocol):
    """What announcements need of the daemon."""

    @property
    def settings(self) -> Settings: ...  # the conversation's timing
    @property
    def has_key(self) -> bool: ...
    @property
    def missing_speaker(self) -> str | None: ...  # the device's name while it is missing
    @property
    def speaker(self) -> Speaker: ...
    def connect(self, on_event: Callable[[object], None]) -> Connection: ...
    async def until_idle(self, timeout: float) -> bool: ...  # no conversation within it
    def speaking(self, on: bool) -> None: ...  # LEDs and status


def check_text(value: object) -> tuple[str, dict[str, Any] | None]:
    """The text to say (whitespace collapsed), or the refusal to reply with."""
    if not isinstance(value, str) or not value.strip():
        return "", refusal("bad_argument", '"text" is the non-empty string to say, e.g. '
                           '{"request": "announce", "text": "The laundry is done."}')
    text = " ".join(value.split())
    if len(text) > MAX_TEXT:
        return "", refusal("bad_argument", f"text too long: {len(text)} characters, at "
                           f"most {MAX_TEXT}")
    return text, None


@dataclass
class _Job:
    number: int
    text: str
    reply: asyncio.Future[dict[str, Any]]
    asked: float = field(default_factory=time.monotonic)

    @property
    def deadline(self) -> float:
        return self.asked + WAIT_SECONDS


class Announcer:
    """Queues and plays announcements on `stage`.

    `await announce(text)` returns the control reply. The daemon calls `drained(rid)`
    for playback ids starting with PREFIX and `interrupt(why)` before a wake word or
    talk press goes to the session; `speaking` is true from the first sound to the end.
    """

    def __init__(self, stage: Stage, *,
                 spawn: Callable[[Coroutine[Any, Any, Any], str], asyncio.Task[Any]]) -> None:
        self.stage = stage
        self._spawn = spawn
        self._queue: collections.deque[_Job] = collections.deque()
        self._worker: asyncio.Task[Any] | None = None
        self._numbers = itertools.count(1)
        self._inputs: asyncio.Queue[object] | None = None  # of the one being spoken
        self._rid: str | None = None
        self.speaking = False
        self.played = 0
        self.failed = 0

    async def announce(self, value: object) -> dict[str, Any]:
        """Say `value`; returns after the drain, or with why it was not said."""
        text, refused = check_text(value)
        if refused:
            return refused
        if len(self._queue) >= MAX_QUEUED:
            log.warning("refused an announcement: %d are queued already", len(self._queue))
            return refusal("queue_full", f"{len(self._queue)} announcements are queued "
                           f"already (at most {MAX_QUEUED}); try again later")
        job = _Job(next(self._numbers), text, asyncio.get_running_loop().create_future())
        log.debug('announcement %d asked: %d characters, "%s"', job.number, len(text),
                  _first_words(text))
        self._queue.append(job)
        if self._worker is None or self._worker.done():
            self._worker = self._spawn(self._work(), "announcer")
        return await job.reply

    def status(self) -> dict[str, Any]:
        return {"played": self.played, "failed": self.failed, "queued": len(self._queue),
                "speaking": self.speaking}

    def drained(self, rid: str) -> None:
        if rid == self._rid and self._inputs is not None:
            self._inputs.put_nowait(m.Drained(self.stage.missing_speaker is not None))

    def interrupt(self, why: str) -> None:
        """A conversation is about to start: silence the announcement at once (before
        the wake cue is queued behind it), and let it say why in its reply."""
        if self._inputs is None or self._rid is None:
            return
        speaker = self.stage.speaker
        played = speaker.played_ms(self._rid)
        if self.speaking:
            speaker.flush()
        self._inputs.put_nowait(m.Interrupted(why, played))

    # --- the worker -------------------------------------------------------------------

    async def _work(self) -> None:
        """Plays the queue in order; every job gets a reply, however this task ends."""
        try:
            while self._queue:
                job = self._queue[0]
                reply: dict[str, Any] = refusal("failed", "speakerd is stopping")
                try:
                    if not job.reply.done():  # its requester may have gone
                        reply = await self._run(job)
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    # The supervisor of one announcement: the next ones still play.
                    log.exception("announcement %d failed", job.number)
                    reply = refusal("failed", f"announce failed: {type(e).__name__}: {e}")
                finally:
                    self._queue.popleft()
                    self._finish(job, reply)
        finally:
            while self._queue:  # cancelled (speakerd stopping): nobody waits in vain
                self._finish(self._queue.popleft(), refusal("failed", "speakerd is stopping"))

    def _finish(self, job: _Job, reply: dict[str, Any]) -> None:
        if reply["ok"]:
            self.played += 1
            log.info("announcement %d played: %d characters, %d ms of speech, after "
                     "waiting %d ms", job.number, len(job.text), reply["played_ms"],
                     reply["waited_ms"], extra=logmod.fields(event="announce"))
        else:
            self.failed += 1
            log.warning("announcement %d not played: %s", job.number, reply["error"],
                        extra=logmod.fields(event="announce"))
        if not job.reply.done():
            job.reply.set_result(reply)

    async def _run(self, job: _Job) -> dict[str, Any]:
        while True:
            remaining = job.deadline - time.monotonic()
            if not await self._until_idle(job, remaining):
                return refusal("in_conversation", f"a conversation was still going on "
                               f"{WAIT_SECONDS:.0f} s after the request; not played")
            reply = await self._speak(job)
            if reply is not None:
                return reply

    async def _until_idle(self, job: _Job, remaining: float) -> bool:
        if await self.stage.until_idle(0):
            return True
        log.info("announcement %d waits for the conversation to end (at most %.0f s "
                 "more)", job.number, max(remaining, 0))
        return await self.stage.until_idle(max(remaining, 0))

    async def _speak(self, job: _Job) -> dict[str, Any] | None:
        """Connect, say it and wait for the drain: the reply, or None to wait again."""
        stage = self.stage
        if not stage.has_key:
            return refusal("no_api_key", "no API key configured (realtime.api_key_file, "
                           "the systemd credential openai-key, or $OPENAI_API_KEY)")
        if stage.missing_speaker is not None:
            return refusal("no_speaker", f"the speaker {stage.missing_speaker!r} is "
                           "missing; speakerd is waiting for it")
        inputs: asyncio.Queue[object] = asyncio.Queue()
        connection = stage.connect(inputs.put_nowait)
        self._inputs, self._rid = inputs, f"{PREFIX}{job.number}"
        self._spawn(connection.run(), f"announcement {job.number}")
        started = time.monotonic()
        try:
            reply = await self._converse(m.Announcement(job.number, job.text, stage.settings),
                                         connection, inputs, self._rid)
        finally:
            connection.close()
            self._inputs = self._rid = None
            if self.speaking:
                self.speaking = False
                stage.speaking(False)
        if reply is not None and reply["ok"]:
            reply["waited_ms"] = int((started - job.asked) * 1000)
        return reply

    async def _converse(self, machine: m.Announcement, connection: Connection,
                        inputs: asyncio.Queue[object], rid: str) -> dict[str, Any] | None:
        """Carry out what the machine says until it replies (None: put back)."""
        speaker = self.stage.speaker
        wait = machine.settings.response_timeout
        deadline: float | None = None  # once the machine asked for a fixed wait
        while True:
            timeout = wait if deadline is None else deadline - time.monotonic()
            try:
                event = await asyncio.wait_for(inputs.get(), max(timeout, 0))
            except TimeoutError:
                event = m.TimedOut()
            for action in machine.handle(event):
                if isinstance(action, m.Send):
                    connection.send(action.event)
                elif isinstance(action, m.Enqueue):
                    speaker.enqueue(action.pcm, rid)
                elif isinstance(action, m.Speaking):
                    self.speaking = True
                    self.stage.speaking(True)
                elif isinstance(action, m.Finish):
                    speaker.finish(rid)
                elif isinstance(action, m.Flush):
                    speaker.flush()
                elif isinstance(action, m.Close):
                    connection.close()
                elif isinstance(action, m.Wait):
                    deadline = time.monotonic() + action.seconds
                elif isinstance(action, m.Again):
                    return None
                elif isinstance(action, m.Reply):
                    reply = dict(action.reply)
                    if action.played:
                        reply["played_ms"] = speaker.played_ms(rid)
                    return reply


def _first_words(text: str, n: int = 6) -> str:
    words = text.split()
    return " ".join(words[:n]) + (" ..." if len(words) > n else "")
