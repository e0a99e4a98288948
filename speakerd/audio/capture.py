"""The microphone: an ALSA capture thread delivering 80 ms frames of 16 kHz mono s16 to the loop."""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable

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
from speakerd.threads import name_os_thread

log = logging.getLogger(__name__)

RATE = 16000
FRAME_MS = 80
FRAME_SAMPLES = RATE * FRAME_MS // 1000  # 1280, what openWakeWord consumes
FRAME_BYTES = FRAME_SAMPLES * 2
# Two frames per read: the microphone thread wakes 6 times a second, not 50, which
# was most of what idle listening cost besides the models (bench/wakeword.py). The
# price is up to 80 ms more before a wake word is seen.
PERIOD_MS = 160
# Preferred first; a device that refuses gets its own rate and format, converted here.
PREFERRED = DeviceFormat(RATE, 1, "S16_LE")


class Capture:
    """Reads `device` in its own thread and hands frames to the loop.

    Every 80 ms frame (1280 samples of 16 kHz s16le mono) goes to `in_thread(frame)`
    in the capture thread (the wake-word detector) and into a pre-roll ring of the
    last `preroll_seconds`. Whatever `in_thread` returns other than None is handed to
    `on_result` on the loop. Frames themselves reach `on_frame` on the loop only
    while streaming (`stream(True)`): an idle speaker then wakes the loop only when
    something was detected. If the loop falls behind, the oldest undelivered frames
    are dropped and counted. `on_status` gets DeviceLost / DeviceBack.

    While `clean` is set (a conversation is open, with echo cancellation or voice
    barge-in), each frame also goes through `clean(frame, end_time)` in the capture
    thread after the detector has seen it raw; what it returns, (audio, result),
    replaces the frame for `on_frame` (audio may hold several frames held back, or
    silence) and, its last 80 ms, for the pre-roll ring; a result other than None
    goes to `on_result` too. `end_time` is the monotonic time by which the
    frame's last sample had been captured.
    """

    def __init__(self, device: str, *, loop: asyncio.AbstractEventLoop,
                 on_frame: Callable[[bytes], None],
                 on_status: Callable[[object], None] = lambda e: None,
                 in_thread: Callable[[bytes], object | None] | None = None,
                 on_result: Callable[[object], None] = lambda r: None,
                 fmt: DeviceFormat = PREFERRED, channel: int = 0,
                 streaming: bool = False, preroll_seconds: float = 1.5,
                 max_pending_frames: int = 25, retry_first: float = 0.5,
                 retry_cap: float = 10.0) -> None:
        self.device = device
        self.want = fmt
        self.channel = channel
        self.got: DeviceFormat | None = None
        self._loop = loop
        self._on_frame = on_frame
        self._on_status = on_status
        self._in_thread = in_thread
        self._on_result = on_result
        self._pending: collections.deque[tuple[bytes | None, tuple[object, ...]]] = (
            collections.deque())
        self.clean: Callable[[bytes, float], tuple[bytes, object | None]] | None = None
        self._max_pending = max_pending_frames
        self._ring: collections.deque[tuple[int, bytes]] = collections.deque(
            maxlen=max(1, round(preroll_seconds * 1000 / FRAME_MS)))
        self._streaming = streaming
        self._lock = threading.Lock()
        self._scheduled = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pcm: alsaaudio.PCM | None = None
        self._retry = (retry_first, retry_cap)
        self._first = False  # start_opening(): the thread reports its first open
        self.frames = 0  # frames read, and the index of the next one
        self.dropped = 0
        self.overruns = 0
        self.reopens = 0

    def open(self) -> None:
        """Open the device now (at start-up): raises UnavailableError if it is not there."""
        try:
            self._pcm, self.got = negotiate(alsaaudio.PCM_CAPTURE, self.device, self.want,
                                            PERIOD_MS)
        except alsaaudio.ALSAAudioError as e:
            raise describe_missing(self.device, e, alsaaudio.PCM_CAPTURE) from None
        self._say_open()

    def _say_open(self) -> None:
        assert self.got
        log.info("microphone %s open at %d Hz, %d channel(s), %s", self.device,
                 self.got.rate, self.got.channels, self.got.format)

    def start(self, missing: bool = False) -> None:
        """Start the thread; `missing`: open() failed, so keep trying the device."""
        if self.got is None and not missing:
            self.open()
        self._thread = threading.Thread(target=self._run, name="capture", daemon=True)
        self._thread.start()

    def start_opening(self) -> None:
        """Start the thread, which opens the device itself: an open that takes long
        holds up only this thread. `on_status` then gets DeviceOpened, or DeviceLost
        (a one-line error naming the PCMs alsa-lib knows) and, once it opens,
        DeviceBack."""
        self._first = True
        self.start(missing=True)

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
            if self._thread.is_alive():
                log.warning("the microphone thread did not stop within 5 s (alsa-lib has "
                            "not returned from opening or reading %s); leaving it behind",
                            self.device)

    def stream(self, on: bool, after_frame: int = -1) -> list[bytes]:
        """Start or stop handing frames to on_frame; starting returns the pre-roll.

        The pre-roll is what the ring holds after frame index `after_frame` (the
        wake word's last frame, say): speech that began before streaming did.
        """
        with self._lock:
            self._streaming = on
            return [f for i, f in self._ring if i > after_frame] if on else []

    # --- the capture thread ------------------------------------------------------------

    def _run(self) -> None:
        name_os_thread()
        try:
            self._listen()
        except BaseException as e:
            # The speaker would look alive and never hear anything again: say so, loudly.
            log.critical("the microphone thread failed", exc_info=True)
            self._hand_status(ThreadFailed("capture", repr(e)))

    def _listen(self) -> None:
        pcm = self._pcm
        delay = self._retry[0]
        while not self._stop.is_set():
            if pcm is None:
                seen = self.got is not None
                first, self._first = self._first, False
                try:
                    pcm, self.got = negotiate(alsaaudio.PCM_CAPTURE, self.device, self.want,
                                              PERIOD_MS)
                except alsaaudio.ALSAAudioError as e:
                    if first:
                        self._hand_status(DeviceLost(self.device, str(describe_missing(
                            self.device, e, alsaaudio.PCM_CAPTURE))))
                    self._stop.wait(delay)
                    delay = min(delay * 2, self._retry[1])
                    continue
                delay = self._retry[0]
                if first:
                    self._say_open()
                    self._hand_status(DeviceOpened(self.device, self.got))
                else:
                    self.reopens += 1
                    log.info("microphone %s is %s: %d Hz, %d channel(s), %s", self.device,
                             "back" if seen else "there now", self.got.rate,
                             self.got.channels, self.got.format)
                    self._hand_status(DeviceBack(self.device))
            try:
                self._read_until_error(pcm)
            except alsaaudio.ALSAAudioError as e:
                log.error("microphone %s failed: %s; retrying every %.0f-%.0f s",
                          self.device, e, *self._retry)
                self._hand_status(DeviceLost(self.device, str(e)))
            finally:
                pcm.close()
                pcm = None

    def _read_until_error(self, pcm: alsaaudio.PCM) -> None:
        fmt = self.got
        assert fmt is not None
        # The usual case (plughw, PulseAudio, most USB mics) gives 16 kHz mono s16
        # already: cut frames from the bytes and convert nothing.
        direct = fmt == PREFERRED
        resampler = resample.Resampler(fmt.rate, RATE)
        raw_buf = bytearray()
        buf = np.zeros(0, dtype=np.float32)
        while not self._stop.is_set():
            length, raw = pcm.read()
            now = time.monotonic()
            if length < 0:  # -EPIPE: overrun; pyalsaaudio has re-prepared the stream
                self.overruns += 1
                log.warning("microphone %s overran (%d so far); audio was lost",
                            self.device, self.overruns)
                continue
            if not length:
                continue
            if direct:
                raw_buf += raw
                while len(raw_buf) >= FRAME_BYTES:
                    self._hand_frame(bytes(raw_buf[:FRAME_BYTES]),
                                     now - (len(raw_buf) - FRAME_BYTES) / 2 / RATE)
                    del raw_buf[:FRAME_BYTES]
                continue
            samples = resampler(resample.to_float(raw, fmt, self.channel))
            buf = np.concatenate((buf, samples))
            while buf.size >= FRAME_SAMPLES:
                self._hand_frame(resample.float_to_s16(buf[:FRAME_SAMPLES]),
                                 now - (buf.size - FRAME_SAMPLES) / RATE)
                buf = buf[FRAME_SAMPLES:]

    def _hand_frame(self, frame: bytes, end_time: float = 0.0) -> None:
        result = self._in_thread(frame) if self._in_thread else None
        results: tuple[object, ...] = () if result is None else (result,)
        clean = self.clean
        sent = frame
        if clean is not None:
            # What to stream for this frame: cleaned, silence, or (when a voice begins
            # over an answer) several frames held back until then.
            sent, heard = clean(frame, end_time)
            frame = sent[-FRAME_BYTES:] if len(sent) >= FRAME_BYTES else sent
            if heard is not None:
                results += (heard,)
        with self._lock:
            self._ring.append((self.frames, frame))
            self.frames += 1
            if not self._streaming and not results:
                return
            if len(self._pending) >= self._max_pending:
                self._pending.popleft()
                self.dropped += 1
            self._pending.append((sent if self._streaming else None, results))
            if self._scheduled:
                return
            self._scheduled = True
        self._loop.call_soon_threadsafe(self._deliver)

    def _hand_status(self, event: object) -> None:
        self._loop.call_soon_threadsafe(self._on_status, event)

    # --- on the loop --------------------------------------------------------------------

    def _deliver(self) -> None:
        with self._lock:
            items = list(self._pending)
            self._pending.clear()
            self._scheduled = False
        for frame, results in items:
            if frame is not None:
                self._on_frame(frame)
            for result in results:
                self._on_result(result)
