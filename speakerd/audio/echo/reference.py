"""The played audio, resampled to 16 kHz into a ring indexed by the time it is heard."""

from __future__ import annotations

import logging
import math
import threading

import numpy as np

from speakerd.audio import resample

log = logging.getLogger(__name__)

RATE = 16000
RING_SAMPLES = 1 << 16  # 4.1 s of reference: far more than any device buffer holds
# Jitter of the two clocks' readings (a late thread wakeup, a coarse avail()) is
# ignored up to this much; beyond it the stream is realigned to the clock. Past
# this, AEC3 re-finds the delay itself within a few frames.
PLAYBACK_SLACK_MS = 30
# Reference frames quieter than this played nothing worth measuring.
ACTIVE_DBFS = -50.0


def dbfs(x: np.ndarray) -> float:
    """Power of float samples in [-1, 1) in dB relative to full scale."""
    p = float(np.mean(np.square(x, dtype=np.float64))) if x.size else 0.0
    return 10 * math.log10(p) if p > 1e-20 else -200.0


def loudest_dbfs(x: np.ndarray, piece: int = 160) -> float:
    """The power of the loudest 10 ms in `x`."""
    n = x.size - x.size % piece
    if not n:
        return -200.0
    p = float(np.max(np.mean(np.square(x[:n].reshape(-1, piece), dtype=np.float64), axis=1)))
    return 10 * math.log10(p) if p > 1e-20 else -200.0


class Reference:
    """The ring of played audio at 16 kHz, indexed by the time it was heard.

    `played()` is called by the playback thread only, `take()` by the capture thread
    only; `clear()` by the playback thread on a flush, `ran_dry()` on an underrun. A
    lock guards the ring.
    """

    def __init__(self) -> None:
        self._ring = np.zeros(RING_SAMPLES, np.float32)
        # The absolute sample index each slot holds, -1 for none: a slot that was
        # never written for the index asked for reads as silence, never stale audio.
        self._stamp = np.full(RING_SAMPLES, -1, np.int64)
        self._lock = threading.Lock()
        self._resampler: resample.Resampler | None = None
        self._rate = 0
        self._next: int | None = None  # 16 kHz index where the next played sample goes
        self._next_time = 0.0  # the device clock's time for it
        self._run_start = 0  # where the current run of contiguous writes began
        self.realigned = 0
        self.runs = 0  # runs begun or moved: each one needs AEC3 to find the echo again

    def played(self, samples: np.ndarray, rate: int, heard_at: float,
               written_at: float | None = None) -> None:
        """`samples` (float mono at the device `rate`) went to ALSA in a write that
        began at `written_at`; the first is heard at monotonic time `heard_at` (the
        write's end plus the frames queued ahead of it / rate)."""
        written_at = heard_at if written_at is None else written_at
        if rate != self._rate or self._resampler is None:
            self._resampler = resample.Resampler(rate, RATE)
            self._rate = rate
            self._next = None
        jump = heard_at - self._next_time
        if self._next is not None and jump * 1000 > PLAYBACK_SLACK_MS \
                and written_at < self._next_time:
            # Heard later than the frame clock said, though the write began while
            # the run's audio was still queued: the device held back what it had
            # accepted (a sound server fills its buffer before it starts playing)
            # and the write waited for it. It ran late, not dry: the run's audio so
            # far moves to when it will be heard.
            self._shift(round(jump * RATE))
            self._next_time = heard_at
            self.realigned += 1
            self.runs += 1
            log.debug("echo reference moved %+.0f ms: the speaker started late", jump * 1000)
        elif self._next is None or abs(jump) * 1000 > PLAYBACK_SLACK_MS:
            # The device ran dry, was flushed, or this is the first write: its frame
            # clock starts again here. A fresh resampler has no tail of the old run.
            if self._next is not None:
                self.realigned += 1
                log.debug("echo reference realigned by %+.0f ms (the speaker ran dry, was "
                          "flushed, or its clock jumped; the write began %.0f ms after the "
                          "last audio was due)", jump * 1000,
                          (written_at - self._next_time) * 1000)
            self.runs += 1
            self._resampler = resample.Resampler(rate, RATE)
            self._next = self._run_start = round(heard_at * RATE)
            self._next_time = heard_at
        # Within the slack the frame clock is exact: place the samples right after
        # the previous ones, not where a jittery reading says.
        self._next_time += samples.size / rate
        out = self._resampler(samples.astype(np.float32, copy=False))
        if not out.size:
            return
        start = self._next
        assert start is not None
        self._next = start + out.size
        index = np.arange(start, start + out.size, dtype=np.int64)
        with self._lock:
            self._ring[index % RING_SAMPLES] = out
            self._stamp[index % RING_SAMPLES] = index

    def _shift(self, by: int) -> None:
        """Move the current run's samples `by` samples later."""
        assert self._next is not None
        old = np.arange(max(self._run_start, self._next - RING_SAMPLES // 2), self._next,
                        dtype=np.int64)
        with self._lock:
            slots = old % RING_SAMPLES
            keep = self._stamp[slots] == old
            values = self._ring[slots][keep]
            self._stamp[slots[keep]] = -1
            new = old[keep] + by
            self._ring[new % RING_SAMPLES] = values
            self._stamp[new % RING_SAMPLES] = new
        self._run_start += by
        self._next += by

    def clear(self) -> None:
        """Playback flushed: what was queued will never be heard."""
        with self._lock:
            self._stamp.fill(-1)
        self._next = None

    def ran_dry(self) -> None:
        """The device ran out of audio (an underrun): what it had was heard, and the next
        write starts a new run, placed by its own reading of the clock. A gap shorter
        than PLAYBACK_SLACK_MS would otherwise pass for jitter, and the reference run on
        as if the gap had not been: the echo up to 30 ms later than it says, the linear
        filter leaving all of it (a false barge-in under load, seen in CI)."""
        self._next = None

    def take(self, start: int, n: int) -> np.ndarray:
        """The reference for 16 kHz indexes [start, start + n); silence where none."""
        index = np.arange(start, start + n, dtype=np.int64)
        slots = index % RING_SAMPLES
        with self._lock:
            out = self._ring[slots]
            valid = self._stamp[slots] == index
        out[~valid] = 0.0
        return out

