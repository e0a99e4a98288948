"""Announcements: the house asks, and the speaker says a text in the assistant's voice.

Each announcement is a one-off realtime session of its own (its own socket, no
microphone, no tools), kept outside the conversation's state machine: the session
stays IDLE while one plays, and its audio goes through the same playback path as an
answer (gain, resampling, drain callback) under response ids `announce:N`, which the
daemon routes here rather than to the session.

The rules, as the README states them:
- one at a time, in the order asked, at most MAX_QUEUED waiting or playing;
- only while no conversation is open: one waits for the conversation to end, at
  most WAIT_SECONDS from the request, so it never talks over an answer nor into an
  open microphone (the model would take it for the user's next turn);
- mute does not stop it: mute stops listening, not speaking;
- the wake word or the talk button cuts a playing announcement off (as it cuts off
  an answer) and the conversation starts; one not yet heard waits for that
  conversation to end instead;
- every request is answered: after the drain, or with why it was not played.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from speakerd import log as logmod
from speakerd import session as s
from speakerd.realtime import client as clientmod
from speakerd.realtime import protocol

if TYPE_CHECKING:
    from speakerd.daemon import Daemon

log = logging.getLogger(__name__)

MAX_TEXT = 1000  # characters: over a minute of speech
MAX_QUEUED = 3  # announcements waiting or playing; one more is refused
WAIT_SECONDS = 60.0  # from the request: how long an open conversation is waited out
RESPONSE_TIMEOUT = 20.0  # silence from the service while the announcement is due
DRAIN_MARGIN = 2.0  # seconds on top of the audio queued before the drain is late
CONNECT_ATTEMPTS = 2  # the house is waiting for the reply: fail soon, it may retry
REPLY_TIMEOUT = 600.0  # how long `speakerd announce` waits for the daemon's reply
PREFIX = "announce:"  # playback response ids of announcements

INSTRUCTIONS = ("You read announcements aloud on a smart speaker. Say the text the user "
                "gives you exactly as written, word for word, in its own language, and "
                "nothing else: no greeting, no comment, no question.")


def prompt(text: str) -> str:
    return f"Read this announcement aloud, word for word, and say nothing else:\n\n{text}"


def error(code: str, message: str, **more: Any) -> dict[str, Any]:
    return {"ok": False, "code": code, "error": message, **more}


def check_text(value: object) -> tuple[str, dict[str, Any] | None]:
    """The text to say (whitespace collapsed), or the refusal to reply with."""
    if not isinstance(value, str) or not value.strip():
        return "", error("bad_argument", '"text" is the non-empty string to say, e.g. '
                         '{"request": "announce", "text": "The laundry is done."}')
    text = " ".join(value.split())
    if len(text) > MAX_TEXT:
        return "", error("bad_argument", f"text too long: {len(text)} characters, at most "
                         f"{MAX_TEXT}")
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


# What the speaking phase waits on, besides the realtime client's own events.
@dataclass(frozen=True, slots=True)
class _Drained:
    pass


@dataclass(frozen=True, slots=True)
class _Interrupted:
    why: str
    played_ms: int


class _Again(Exception):
    """Cut off before a sound was heard: wait for the conversation, then try again."""


class Announcer:
    """Queues and plays announcements on the daemon's loop.

    `await announce(text)` returns the control reply. The daemon calls
    `session_changed()` after every session input, `drained(rid)` for playback ids
    starting with PREFIX, and `interrupt(why)` before a wake word or talk press goes
    to the session; `speaking` is true from the first sound to the drain.
    """

    def __init__(self, daemon: Daemon, *,
                 spawn: Callable[[Coroutine[Any, Any, Any], str], asyncio.Task[Any]]) -> None:
        self.daemon = daemon
        self._spawn = spawn
        self._queue: collections.deque[_Job] = collections.deque()
        self._worker: asyncio.Task[Any] | None = None
        self._changed = asyncio.Event()  # the session took an input: maybe it is idle now
        self._numbers = itertools.count(1)
        self._events: asyncio.Queue[object] | None = None  # of the one being spoken
        self._rid: str | None = None
        self.speaking = False
        self.played = 0
        self.failed = 0

    # --- for the control socket and the daemon ----------------------------------------

    async def announce(self, value: object) -> dict[str, Any]:
        """Say `value`; returns after the drain, or with why it was not said."""
        text, refusal = check_text(value)
        if refusal:
            return refusal
        if len(self._queue) >= MAX_QUEUED:
            log.warning("refused an announcement: %d are queued already", len(self._queue))
            return error("queue_full", f"{len(self._queue)} announcements are queued "
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

    def session_changed(self) -> None:
        self._changed.set()

    def drained(self, rid: str) -> None:
        if rid == self._rid and self._events is not None:
            self._events.put_nowait(_Drained())

    def interrupt(self, why: str) -> None:
        """A conversation is about to start: silence the announcement at once (before
        the wake cue is queued behind it), and let it say why in its reply."""
        if self._events is None or self._rid is None:
            return
        playback = self.daemon.playback
        played = playback.played_ms(self._rid) if playback else 0
        if self.speaking and playback:
            playback.flush()
        self._events.put_nowait(_Interrupted(why, played))

    # --- the worker -------------------------------------------------------------------

    async def _work(self) -> None:
        """Plays the queue in order; every job gets a reply, however this task ends."""
        try:
            while self._queue:
                job = self._queue[0]
                reply: dict[str, Any] = error("failed", "speakerd is stopping")
                try:
                    if not job.reply.done():  # its requester may have gone
                        reply = await self._run(job)
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    # The supervisor of one announcement: the next ones still play.
                    log.exception("announcement %d failed", job.number)
                    reply = error("failed", f"announce failed: {type(e).__name__}: {e}")
                finally:
                    self._queue.popleft()
                    self._finish(job, reply)
        finally:
            while self._queue:  # cancelled (speakerd stopping): nobody waits in vain
                self._finish(self._queue.popleft(), error("failed", "speakerd is stopping"))

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
            refusal = await self._wait_for_idle(job)
            if refusal:
                return refusal
            try:
                return await self._speak(job)
            except _Again:
                continue

    async def _wait_for_idle(self, job: _Job) -> dict[str, Any] | None:
        # A wake word that interrupted us was queued for the session just before: let
        # the session take it (and leave IDLE) before looking.
        await self.daemon.settled()
        said = False
        while self.daemon.session.state is not s.State.IDLE:
            remaining = job.deadline - time.monotonic()
            if remaining <= 0:
                return error("in_conversation", f"a conversation was still going on "
                             f"{WAIT_SECONDS:.0f} s after the request; not played")
            if not said:
                log.info("announcement %d waits for the conversation to end (at most "
                         "%.0f s more)", job.number, remaining)
                said = True
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return None

    async def _speak(self, job: _Job) -> dict[str, Any]:
        d = self.daemon
        if d.api_key is None:
            return error("no_api_key", "no API key configured (realtime.api_key_file, the "
                         "systemd credential openai-key, or $OPENAI_API_KEY)")
        if "speaker" in d.missing or d.playback is None:
            return error("no_speaker", f"the speaker {d.config.audio.playback_device!r} "
                         "is missing; speakerd is waiting for it")
        c = d.config.realtime
        events: asyncio.Queue[object] = asyncio.Queue()
        client = clientmod.RealtimeClient(
            url=c.url, model=c.model, api_key=d.api_key, on_event=events.put_nowait,
            session_update=protocol.announce_session_update(
                model=c.model, voice=c.voice, instructions=INSTRUCTIONS),
            preroll_seconds=0, backoff=clientmod.Backoff(attempts=CONNECT_ATTEMPTS))
        self._events, self._rid = events, f"{PREFIX}{job.number}"
        self._spawn(client.run(), f"announcement {job.number}")
        started = time.monotonic()
        try:
            return await self._converse(job, client, events, self._rid, started)
        finally:
            client.close()
            self._events = self._rid = None
            if self.speaking:
                self.speaking = False
                d.announcing(False)

    async def _converse(self, job: _Job, client: clientmod.RealtimeClient,
                        events: asyncio.Queue[object], rid: str, started: float
                        ) -> dict[str, Any]:
        """From connect to drain: the reply, or _Again when cut off before a sound."""
        playback = self.daemon.playback
        assert playback
        response: str | None = None  # the service's id of our response
        audio_ms = 0.0
        drain_by: float | None = None  # set once the last audio is queued

        def heard(why: str) -> dict[str, Any]:
            if self.speaking:  # else a cue may be playing: leave it be
                playback.flush()
            return error("unavailable", why, played_ms=playback.played_ms(rid))

        while True:
            timeout = (drain_by - time.monotonic() if drain_by is not None
                       else RESPONSE_TIMEOUT)
            try:
                event = await asyncio.wait_for(events.get(), max(timeout, 0))
            except TimeoutError:
                if drain_by is not None:
                    log.warning("the speaker did not report the end of announcement %d "
                                "(%.0f ms of audio) in time; flushed it", job.number,
                                audio_ms)
                    playback.flush()
                    return error("failed", "the speaker did not report the end of the "
                                 "announcement in time", played_ms=playback.played_ms(rid))
                return heard(f"service unavailable: no answer for {RESPONSE_TIMEOUT:.0f} s")
            if isinstance(event, _Interrupted):
                if event.played_ms == 0:
                    log.info("announcement %d put back: %s starts a conversation first",
                             job.number, event.why)
                    raise _Again
                return error("interrupted", f"interrupted by the {event.why} after "
                             f"{event.played_ms} ms", played_ms=event.played_ms)
            if isinstance(event, _Drained):
                if "speaker" in self.daemon.missing:  # dropped unheard, yet drained
                    return error("no_speaker", "the speaker went missing while it played",
                                 played_ms=playback.played_ms(rid))
                return {"ok": True, "played_ms": playback.played_ms(rid),
                        "waited_ms": int((started - job.asked) * 1000)}
            if isinstance(event, clientmod.Ready):
                client.send(protocol.user_text(prompt(job.text)))
                client.send(protocol.response_create(output_modalities=["audio"]))
            elif isinstance(event, clientmod.Disconnected):
                if drain_by is not None:
                    continue  # closed after response.done: the audio plays on
                if not client.ready:
                    return error("unavailable", f"service unreachable: {event.reason}")
                return heard(f"service unavailable: connection lost ({event.reason})")
            elif isinstance(event, protocol.ServerError):
                return heard(f"service error: {event.message or event.code} "
                             f"({event.type}/{event.code or '-'})")
            elif isinstance(event, protocol.ResponseCreated):
                response = response or event.response_id
            elif isinstance(event, protocol.AudioDelta) and event.response_id == response:
                if not self.speaking:
                    self.speaking = True
                    self.daemon.announcing(True)
                audio_ms += len(event.pcm) / protocol.BYTES_PER_MS
                playback.enqueue(event.pcm, rid)
            elif isinstance(event, protocol.ResponseDone) and event.response_id == response:
                if event.status == "failed":
                    _, why = protocol.classify_error(event.error_type, event.error_code)
                    return heard(f"service error: the response failed: {why}")
                if audio_ms == 0:
                    return error("unavailable", f"service error: the response ({event.status}"
                                 ") held no audio")
                playback.finish(rid)
                client.close()  # all it had to say is here
                drain_by = time.monotonic() + audio_ms / 1000 + DRAIN_MARGIN


def _first_words(text: str, n: int = 6) -> str:
    words = text.split()
    return " ".join(words[:n]) + (" ..." if len(words) > n else "")
