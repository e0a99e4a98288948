"""The speaker: an ALSA playback thread with a per-response drain callback and barge-in flush."""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import alsaaudio
import numpy as np

from speakerd.audio import resample
from speakerd.audio.device import (
    DeviceBack,
    DeviceLost,
    DeviceOpened,
    ThreadFailed,
    describe_missing,
    negotiate,
)
from speakerd.audio.resample import DeviceFormat
from speakerd.errors import UnavailableError
from speakerd.threads import name_os_thread

log = logging.getLogger(__name__)

RATE = 24000  # what the realtime model sends
PREFERRED = DeviceFormat(RATE, 1, "S16_LE")
# 20 ms periods: a flush or a drain check is never more than one period late.
# Six of them (120 ms) ride out a busy moment on a Pi Zero without an underrun.
PERIOD_MS = 20
PERIODS = 6


class EchoSink(Protocol):
    def played(self, samples: np.ndarray, rate: int, heard_at: float,
               written_at: float) -> None: ...
    def flushed(self) -> None: ...
    def ran_dry(self) -> None: ...


@dataclass
class _Response:
    id: str
    resampler: resample.Resampler
    start: int | None = None  # device frame index of its first frame
    end: int = 0  # device frame index just after its last written frame
    finished: bool = False
    chunks: int = 0  # converted chunks not yet written


@dataclass
class _State:
    """Owned by the playback thread alone."""

    pcm: alsaaudio.PCM | None = None
    fmt: DeviceFormat | None = None
    buffer_frames: int = 0
    written: int = 0  # frames written since the device was opened
    pending: collections.deque[tuple[str, bytes]] = field(default_factory=collections.deque)
    responses: dict[str, _Response] = field(default_factory=dict)
    last_active: float = 0.0
    retry_at: float | None = None  # the device is missing: when to try it again
    retry_delay: float = 0.0


class Playback:
    """Plays 24 kHz s16le mono answers on `device`.

    From the loop: `enqueue(pcm, response_id)` any number of times, then
    `finish(response_id)`; `on_drained(response_id)` is then called on the loop
    exactly once, after the response's last frame has left the device. `flush()`
    stops at once and discards everything queued; `on_flushed({response_id:
    played_ms})` reports what had actually been heard of each discarded response
    (those get no on_drained). The device stays open between responses and is
    released after `idle_close_seconds` of silence.

    A device that cannot be opened (at start-up: `start(missing=True)`, or when an
    answer finds it gone) is tried again with back-off from `retry_first` to
    `retry_cap` seconds; `on_status` gets DeviceLost when it goes and DeviceBack
    when it opens again. Answers meanwhile are dropped, and still drain.
    """

    def __init__(self, device: str, *, loop: asyncio.AbstractEventLoop,
                 on_drained: Callable[[str], None],
                 on_flushed: Callable[[dict[str, int]], None] = lambda played: None,
                 on_status: Callable[[object], None] = lambda event: None,
                 volume: float = 1.0, fmt: DeviceFormat = PREFERRED,
                 period_ms: int = PERIOD_MS, periods: int = PERIODS,
                 idle_close_seconds: float = 5.0, retry_first: float = 0.5,
                 retry_cap: float = 10.0) -> None:
        self.device = device
        self.want = fmt
        self.volume = volume
        self.period_ms = period_ms
        self.periods = periods
        self.idle_close_seconds = idle_close_seconds
        self._loop = loop
        self._on_drained = on_drained
        self._on_flushed = on_flushed
        self._on_status = on_status
        self._retry = (retry_first, retry_cap)
        self._commands: queue.Queue[tuple[int, str, str, bytes]] = queue.Queue()
        self._lock = threading.Lock()
        self._generation = 0  # bumped by flush(): commands from older generations are void
        self._played: dict[str, int] = {}
        self._thread: threading.Thread | None = None
        self.got: DeviceFormat | None = None
        # Echo cancellation's reference: told exactly what goes to ALSA, and when it
        # will be heard (audio/echo.py). Set from the loop; read once per write.
        self.echo: EchoSink | None = None
        self.frames_written = 0  # device frames, across opens; read it for stats only
        self.underruns = 0
        self.opens = 0
        self.errors = 0

    # --- the loop's side -----------------------------------------------------------

    def check(self) -> None:
        """Open and close the device once, at start-up: raises UnavailableError if absent."""
        try:
            pcm, self.got = negotiate(alsaaudio.PCM_PLAYBACK, self.device, self.want,
                                      self.period_ms)
        except alsaaudio.ALSAAudioError as e:
            raise describe_missing(self.device, e, alsaaudio.PCM_PLAYBACK) from None
        pcm.close()
        log.info("speaker %s accepts %d Hz, %d channel(s), %s", self.device, self.got.rate,
                 self.got.channels, self.got.format)

    def start(self, missing: bool = False) -> None:
        """Start the thread; `missing`: check() failed, so keep trying the device."""
        self._start(missing, first=False)

    def start_opening(self) -> None:
        """Start the thread, which runs check() itself: an open that takes long holds
        up only this thread. `on_status` then gets DeviceOpened, or DeviceLost (a
        one-line error naming the PCMs alsa-lib knows) and, once it opens, DeviceBack."""
        self._start(False, first=True)

    def _start(self, missing: bool, first: bool) -> None:
        self._thread = threading.Thread(target=self._run, args=(missing, first),
                                        name="playback", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._put("stop")
        if self._thread:
            self._thread.join(timeout=5)
            if self._thread.is_alive():
                log.warning("the speaker thread did not stop within 5 s (alsa-lib has not "
                            "returned from opening or writing %s); leaving it behind",
                            self.device)

    def enqueue(self, pcm: bytes, response_id: str) -> None:
        self._put("audio", response_id, pcm)

    def finish(self, response_id: str) -> None:
        """No more audio for this response: drain it, then call on_drained."""
        self._put("finish", response_id)

    def flush(self) -> None:
        with self._lock:
            self._generation += 1
        self._put("flush")

    def played_ms(self, response_id: str) -> int:
        with self._lock:
            return self._played.get(response_id, 0)

    def _put(self, kind: str, response_id: str = "", pcm: bytes = b"") -> None:
        with self._lock:
            generation = self._generation
        self._commands.put((generation, kind, response_id, pcm))

    # --- the playback thread --------------------------------------------------------

    def _run(self, missing: bool, first: bool) -> None:
        name_os_thread()
        try:
            self._play(missing, first)
        except BaseException as e:
            # Answers would queue up unheard and never drain: say so, loudly.
            log.critical("the speaker thread failed", exc_info=True)
            self._loop.call_soon_threadsafe(self._on_status, ThreadFailed("playback", repr(e)))

    def _play(self, missing: bool, first: bool) -> None:
        s = _State()
        if first:
            missing = not self._check_first()
        if missing:
            self._retry_later(s)
        seen_generation = 0
        while True:
            timeout = self._wait_time(s)
            try:
                # None blocks until a command comes: an idle, closed speaker costs nothing.
                generation, kind, rid, pcm = (self._commands.get_nowait() if timeout == 0
                                              else self._commands.get(timeout=timeout))
            except queue.Empty:
                kind = ""
            with self._lock:
                current = self._generation
            if current != seen_generation:
                seen_generation = current
                self._flush(s)
            if kind == "stop":
                self._close(s)
                return
            if kind and kind != "flush" and generation == current:
                self._command(s, kind, rid, pcm)
            if s.pending:
                self._write_one(s)
            self._check_drained(s)
            now = time.monotonic()
            if (s.pcm is not None and not s.pending and not s.responses
                    and now - s.last_active > self.idle_close_seconds):
                self._close(s)
                log.debug("speaker %s released after %.0f s of silence", self.device,
                          now - s.last_active)
            if s.retry_at is not None and now >= s.retry_at and s.pcm is None:
                self._probe(s)

    def _check_first(self) -> bool:
        """start_opening()'s check, in this thread; False if the device is missing."""
        try:
            self.check()
        except UnavailableError as e:
            self._loop.call_soon_threadsafe(self._on_status, DeviceLost(self.device, str(e)))
            return False
        assert self.got
        self._loop.call_soon_threadsafe(self._on_status, DeviceOpened(self.device, self.got))
        return True

    def _wait_time(self, s: _State) -> float | None:
        """How long to wait for a command: not at all while there is audio to write."""
        if s.pending:
            return 0
        if s.responses:  # waiting for play-out: look again after a period
            return self.period_ms / 1000
        if s.pcm is not None:
            return self.idle_close_seconds
        if s.retry_at is not None:
            return max(0.001, s.retry_at - time.monotonic())
        return None  # idle and closed: sleep until told

    def _command(self, s: _State, kind: str, rid: str, pcm: bytes) -> None:
        r = s.responses.get(rid)
        if r is None:
            r = s.responses[rid] = _Response(rid, resample.Resampler(RATE, self._rate(s)))
        if kind == "audio":
            samples = resample.s16_to_float(pcm)
            if self.volume != 1.0:
                samples = samples * np.float32(self.volume)
            self._convert(s, r, samples, last=False)
        elif kind == "finish":
            self._convert(s, r, np.zeros(0, np.float32), last=True)
            r.finished = True

    def _rate(self, s: _State) -> int:
        if s.fmt is None:
            self._open(s)
        return s.fmt.rate if s.fmt else RATE

    def _convert(self, s: _State, r: _Response, samples: np.ndarray, last: bool) -> None:
        if s.fmt is None:
            return  # no device: the audio is dropped, the drain check reports it
        out = r.resampler(samples, last=last)
        if out.size:
            s.pending.append((r.id, resample.from_float(out, s.fmt)))
            r.chunks += 1

    def _open(self, s: _State) -> None:
        try:
            s.pcm, s.fmt = negotiate(alsaaudio.PCM_PLAYBACK, self.device, self.want,
                                     self.period_ms)
        except alsaaudio.ALSAAudioError as e:
            self.errors += 1
            if s.retry_at is None:
                log.error("speaker %s cannot be opened: %s; this answer is not played, "
                          "and speakerd keeps trying the device", self.device, e)
                self._retry_later(s, str(e))
            return
        info = s.pcm.info()
        s.buffer_frames = int(info.get("buffer_size", s.fmt.rate * self.period_ms
                                       * self.periods // 1000))
        s.written = 0
        self.opens += 1
        self.got = s.fmt
        s.last_active = time.monotonic()
        if s.retry_at is not None:
            s.retry_at = None
            log.info("speaker %s is there now", self.device)
            self._loop.call_soon_threadsafe(self._on_status, DeviceBack(self.device))

    def _close(self, s: _State) -> None:
        if s.pcm is not None:
            s.pcm.close()
        s.pcm = None
        s.fmt = None

    def _write_one(self, s: _State) -> None:
        rid, data = s.pending[0]
        fmt = s.fmt
        if s.pcm is None or fmt is None:
            self._drop_pending(s)
            return
        period = fmt.rate * self.period_ms // 1000 * fmt.frame_bytes
        piece, rest = data[:period], data[period:]
        r = s.responses.get(rid)
        began = time.monotonic()
        try:
            n = s.pcm.write(piece)
        except alsaaudio.ALSAAudioError as e:
            self.errors += 1
            log.error("speaker %s failed: %s; dropping the queued audio and reopening on "
                      "the next answer", self.device, e)
            self._drop_pending(s)
            self._close(s)
            self._retry_later(s, str(e))
            return
        if n < 0:
            # -EPIPE: the device had run dry; pyalsaaudio re-prepares it and this piece
            # is written again next time round. Between answers that is the normal
            # idle state; in the middle of one (the server or this thread was slower
            # than playback) it was a gap the user heard.
            if r is not None and r.start is not None:
                self.underruns += 1
                log.warning("speaker %s underran in the middle of an answer (%d so far); "
                            "a gap was heard", self.device, self.underruns)
            echo = self.echo
            if echo is not None:
                # What follows starts a new run on the device, however short the gap:
                # its frame clock no longer continues the last write's.
                echo.ran_dry()
            return
        frames = n
        if r is not None:
            if r.start is None:
                r.start = s.written
            r.end = s.written + frames
        s.written += frames
        self.frames_written += frames
        s.last_active = time.monotonic()
        written_bytes = frames * fmt.frame_bytes
        echo = self.echo
        if echo is not None and frames > 0:
            # The device's frame clock: what is queued ahead of this piece plays
            # first (avail() read after the write, so the queue includes it).
            ahead = s.written - self._position(s) - frames
            echo.played(resample.to_float(piece[:written_bytes], fmt), fmt.rate,
                        s.last_active + max(0, ahead) / fmt.rate, began)
        if written_bytes >= len(piece) and not rest:
            s.pending.popleft()
            if r is not None:
                r.chunks -= 1
        else:
            s.pending[0] = (rid, data[written_bytes:])

    def _retry_later(self, s: _State, error: str = "") -> None:
        if s.retry_at is None:
            s.retry_delay = self._retry[0]
            if error:
                self._loop.call_soon_threadsafe(self._on_status,
                                                DeviceLost(self.device, error))
        s.retry_at = time.monotonic() + s.retry_delay

    def _probe(self, s: _State) -> None:
        """Is the missing device there now? Opens it and closes it again at once."""
        try:
            pcm, _ = negotiate(alsaaudio.PCM_PLAYBACK, self.device, self.want, self.period_ms)
        except alsaaudio.ALSAAudioError:
            s.retry_delay = min(s.retry_delay * 2, self._retry[1])
            s.retry_at = time.monotonic() + s.retry_delay
            return
        pcm.close()
        s.retry_at = None
        log.info("speaker %s is there now", self.device)
        self._loop.call_soon_threadsafe(self._on_status, DeviceBack(self.device))

    def _drop_pending(self, s: _State) -> None:
        """Forget unwritten audio; its responses then count as played out (and drain)."""
        s.pending.clear()
        for r in s.responses.values():
            r.chunks = 0
            r.end = min(r.end, s.written)

    def _position(self, s: _State) -> int:
        """Frames the device has played since it was opened."""
        if s.pcm is None:
            return s.written
        try:
            avail = s.pcm.avail()
        except alsaaudio.ALSAAudioError:
            return s.written
        if avail < 0:  # XRUN: everything written has been played
            return s.written
        return s.written - max(0, s.buffer_frames - avail)

    def _check_drained(self, s: _State) -> None:
        if not s.responses:
            return
        position = self._position(s)
        rate = s.fmt.rate if s.fmt else RATE
        with self._lock:
            for r in s.responses.values():
                if r.start is not None:
                    self._played[r.id] = max(0, min(position, r.end) - r.start) * 1000 // rate
        for rid, r in list(s.responses.items()):
            if r.finished and r.chunks <= 0 and (r.start is None or position >= r.end):
                del s.responses[rid]
                self._loop.call_soon_threadsafe(self._on_drained, rid)

    def _flush(self, s: _State) -> None:
        position = self._position(s)
        rate = s.fmt.rate if s.fmt else RATE
        played = {rid: (max(0, min(position, r.end) - r.start) * 1000 // rate
                        if r.start is not None else 0)
                  for rid, r in s.responses.items()}
        if s.pcm is not None:
            try:
                s.pcm.drop()  # discard what the device holds; the next write re-prepares
            except alsaaudio.ALSAAudioError as e:
                log.warning("speaker %s: drop failed: %s", self.device, e)
            s.written = 0
        s.pending.clear()
        s.responses.clear()
        echo = self.echo
        if echo is not None:
            echo.flushed()
        with self._lock:
            self._played.update(played)
        self._loop.call_soon_threadsafe(self._on_flushed, played)
