"""Software echo cancellation: what the speaker plays in, the microphone without it out.

The playback thread hands over exactly what it gives ALSA (after gain), stamped with
the time its first frame will be heard, read off the device's frame clock; it is
resampled to 16 kHz into a ring indexed by that time. The capture thread, for each
80 ms microphone frame, takes the reference that played over the same moment and
runs WebRTC's AEC3 (pywebrtc-audio) on the pair. Both ends are placed by the clock,
not by a queue's length, so a gap in playback (between answers, an underrun, a
flush) leaves zeros in the reference where nothing played and the pairing is right
again on the next frame. A microphone frame's time is an upper bound (its samples
can only be older than the read that returned them), so the reference paired with it
always leads the echo, which AEC3 needs; it tolerates a lead of a few hundred ms.

One canceller lives for the daemon's life, so it stays adapted to the room across
turns and conversations; it only runs while a conversation is open.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
from dataclasses import dataclass

import numpy as np

from speakerd.audio import resample

log = logging.getLogger(__name__)

RATE = 16000
FRAME_SAMPLES = 1280  # 80 ms, the capture frame
RING_SAMPLES = 1 << 16  # 4.1 s of reference: far more than any device buffer holds
# Extra lead on top of what the clocks give (soxr's filter delay is ~1 ms).
LEAD_MS = 10
# Jitter of the two clocks' readings (a late thread wakeup, a coarse avail()) is
# ignored up to this much; beyond it the stream is realigned to the clock. Past
# this, AEC3 re-finds the delay itself within a few frames.
PLAYBACK_SLACK_MS = 30
CAPTURE_SLACK_MS = 30
# A read returns its samples late by however long the thread, the driver or a sound
# server kept them (PulseAudio here: bursts up to 100 ms late, more under load). The
# microphone's frame clock is the lower envelope of the readings: it follows an
# earlier reading at once and rises by at most CAPTURE_DRIFT (a clock running slow
# by that much; USB sound cards are within 0.1 ms/s), so late bursts never move it.
CAPTURE_DRIFT = 0.0005  # seconds per second
# Every reading this much above the envelope for CAPTURE_STUCK_FRAMES: samples were
# lost (an overrun), and the envelope starts again from the readings.
CAPTURE_LOST_S = 0.15
CAPTURE_STUCK_FRAMES = 25  # 2 s
# A gap this long between frames: a new stream (a new conversation, an overrun).
CAPTURE_GAP_S = 0.5
# Reference frames quieter than this played nothing worth measuring.
ACTIVE_DBFS = -50.0
# A second of playback with this much echo removed: the canceller has converged.
ADAPTED_DB = 20.0
# After either stream was realigned (an answer starting after silence, an underrun,
# a flush), AEC3 takes a moment to find the echo again: frames while it does are not
# evidence of a voice. In the simulated room the start of an answer needed ~0.6 s.
SETTLE_FRAMES = 13  # 1 s


def dbfs(x: np.ndarray) -> float:
    """Power of float samples in [-1, 1) in dB relative to full scale."""
    p = float(np.mean(np.square(x, dtype=np.float64))) if x.size else 0.0
    return 10 * math.log10(p) if p > 1e-20 else -200.0


@dataclass(frozen=True, slots=True)
class EchoStats:
    """What the canceller did since the last take_stats()."""

    seconds: float  # of microphone audio while the speaker played
    mic_dbfs: float  # its power before cancellation
    out_dbfs: float  # and after
    realigned: int  # times either stream was moved back onto its clock

    @property
    def reduction_db(self) -> float:
        return self.mic_dbfs - self.out_dbfs


class Reference:
    """The ring of played audio at 16 kHz, indexed by the time it was heard.

    `played()` is called by the playback thread only, `take()` by the capture thread
    only; `clear()` by the playback thread on a flush. A lock guards the ring.
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

    def take(self, start: int, n: int) -> np.ndarray:
        """The reference for 16 kHz indexes [start, start + n); silence where none."""
        index = np.arange(start, start + n, dtype=np.int64)
        slots = index % RING_SAMPLES
        with self._lock:
            out = self._ring[slots]
            valid = self._stamp[slots] == index
        out[~valid] = 0.0
        return out


class EchoCanceller:
    """The microphone side: `process(frame, end_time)` in the capture thread.

    Carry on with the frame it returns (the wake-word detector, the socket). Stats
    for the journal: `take_stats()` from any thread.
    """

    def __init__(self, *, lead_ms: float = LEAD_MS, noise_suppression: bool = True) -> None:
        from pywebrtc_audio import AudioProcessor  # only when "software" is configured

        self.reference = Reference()
        self._aec = AudioProcessor(sample_rate=RATE, echo_cancellation=True,
                                   noise_suppression=noise_suppression)
        self._lead = lead_ms / 1000
        self._cursor: int | None = None  # 16 kHz index of the next frame's reference
        # The microphone's frame clock: frames since the stream began, and the
        # recent readings of the time its first sample was captured.
        self._mic_samples = 0
        self._start: float | None = None  # the envelope: when sample 0 was captured
        self._above = 0  # readings in a row far above it
        self._last_end = -math.inf
        self._lock = threading.Lock()
        self._mic_energy = 0.0
        self._out_energy = 0.0
        self._active_samples = 0
        self._block = [0.0, 0.0, 0]  # mic energy, out energy, samples: the adapted check
        self.adapted = False
        self.realigned = 0
        self.frames = 0
        self._seen_realigns = 0
        self._settling = 0  # frames left before the output is trusted again

    def played(self, samples: np.ndarray, rate: int, heard_at: float,
               written_at: float | None = None) -> None:
        """Playback thread: see Reference.played."""
        self.reference.played(samples, rate, heard_at, written_at)

    def flushed(self) -> None:
        """Playback thread: the device dropped what it held."""
        self.reference.clear()

    def process(self, frame: bytes, end_time: float) -> tuple[bytes, np.ndarray]:
        """One 80 ms s16le frame whose last sample was captured no later than
        `end_time` (monotonic) -> (the cleaned frame, as s16le and as float)."""
        mic = resample.s16_to_float(frame)
        n = mic.size
        if end_time - self._last_end > CAPTURE_GAP_S:
            self._mic_samples = 0
            self._start = None
        dt = max(0.0, end_time - self._last_end)
        self._last_end = end_time
        self._mic_samples += n
        # A reading is never earlier than the truth, only later.
        reading = end_time - self._mic_samples / RATE
        if self._start is None or reading < self._start:
            self._start, self._above = reading, 0
        else:
            self._start += min(reading - self._start, CAPTURE_DRIFT * dt)
            self._above = self._above + 1 if reading - self._start > CAPTURE_LOST_S else 0
            if self._above >= CAPTURE_STUCK_FRAMES:
                log.debug("microphone samples were lost: its clock starts again")
                self._start, self._above = reading, 0
        start = self._start
        want = round((start + self._mic_samples / RATE + self._lead) * RATE) - n
        if self._cursor is None or abs(self._cursor - want) > CAPTURE_SLACK_MS * RATE / 1000:
            if self._cursor is not None:
                self.realigned += 1
                log.debug("microphone clock realigned by %+.0f ms",
                          (want - self._cursor) * 1000 / RATE)
            self._cursor = want
        ref = self.reference.take(self._cursor, n)
        self._cursor += n
        realigns = self.realigned + self.reference.runs
        if realigns != self._seen_realigns:
            self._seen_realigns = realigns
            self._settling = SETTLE_FRAMES
        elif self._settling:
            self._settling -= 1
        out = self._aec.process(mic, ref)
        self.frames += 1
        if dbfs(ref) > ACTIVE_DBFS:
            mic_e = float(np.sum(np.square(mic, dtype=np.float64)))
            out_e = float(np.sum(np.square(out, dtype=np.float64)))
            with self._lock:
                self._mic_energy += mic_e
                self._out_energy += out_e
                self._active_samples += n
            if not self.adapted:
                self._check_adapted(mic_e, out_e, n)
        return resample.float_to_s16(out), out

    @property
    def trusted(self) -> bool:
        """Has it converged, and not been realigned within the last second?"""
        return self.adapted and not self._settling

    def _check_adapted(self, mic_e: float, out_e: float, n: int) -> None:
        """A fresh AEC3 lets echo through for its first second or so: until it has
        removed ADAPTED_DB over a second of playback, its output is no evidence of a
        voice. Once adapted it stays so: the instance lives as long as the daemon."""
        b = self._block
        b[0] += mic_e
        b[1] += out_e
        b[2] += n
        if b[2] >= RATE:
            if 10 * math.log10(max(b[0], 1e-20) / max(b[1], 1e-20)) >= ADAPTED_DB:
                self.adapted = True
                log.debug("echo canceller adapted after %d frames", self.frames)
            self._block = [0.0, 0.0, 0]

    def take_stats(self) -> EchoStats | None:
        """The echo reduction since the last call; None if the speaker played nothing."""
        with self._lock:
            n, mic, out = self._active_samples, self._mic_energy, self._out_energy
            self._active_samples = 0
            self._mic_energy = self._out_energy = 0.0
        if not n:
            return None
        return EchoStats(n / RATE, 10 * math.log10(max(mic / n, 1e-20)),
                         10 * math.log10(max(out / n, 1e-20)),
                         self.realigned + self.reference.realigned)


class VoiceActivity:
    """Is someone talking in the cleaned microphone signal? An energy detector on 10 ms
    pieces with a tracked noise floor, not AEC3's own speech probability: that is
    computed before the echo is removed and says "speech" on the speaker's own voice.

    While the speaker plays, AEC3 lets the user through in bursts (its suppressor
    holds back whatever it cannot tell from echo), so speech is `min_voiced_ms` of
    voiced pieces within `window_ms`, spread over at least `min_span_ms`: a cough or
    a knock is one short burst and is not a barge-in. `update(frame)` -> True on the
    frame where speech is first recognised; the next onset needs `hangover_ms` of
    quiet first.
    """

    SUB = 160  # 10 ms decisions

    def __init__(self, *, min_voiced_ms: int = 100, min_span_ms: int = 200,
                 window_ms: int = 500, hangover_ms: int = 500, floor_dbfs: float = -55.0,
                 above_noise_db: float = 15.0) -> None:
        self.min_voiced = min_voiced_ms // 10
        self.min_span = min_span_ms // 10
        self.window = max(window_ms // 10, self.min_span)
        self.hangover = hangover_ms // 10
        self.floor_dbfs = floor_dbfs
        self.above_noise = above_noise_db
        self._noise = floor_dbfs - above_noise_db  # the room's noise, as cleaned
        self._voiced: collections.deque[int] = collections.deque()  # piece numbers
        self._piece = 0
        self._quiet = self.hangover
        self.speaking = False

    def update(self, samples: np.ndarray) -> bool:
        onset = False
        for i in range(0, samples.size - self.SUB + 1, self.SUB):
            self._piece += 1
            level = dbfs(samples[i:i + self.SUB])
            # The floor follows quiet at once and rises slowly (1 dB/s): speech
            # cannot raise it much in the time it takes to be recognised.
            self._noise = level if level < self._noise else self._noise + 0.01
            voiced = level > max(self.floor_dbfs, self._noise + self.above_noise)
            while self._voiced and self._voiced[0] <= self._piece - self.window:
                self._voiced.popleft()
            if not voiced:
                self._quiet += 1
                if self.speaking and self._quiet >= self.hangover:
                    self.speaking = False
                continue
            self._quiet = 0
            self._voiced.append(self._piece)
            if (not self.speaking and len(self._voiced) >= self.min_voiced
                    and self._piece - self._voiced[0] + 1 >= self.min_span):
                self.speaking = True
                onset = True
        return onset


@dataclass(frozen=True, slots=True)
class VoiceOnset:
    """Someone began to talk over the cleaned microphone (handed to the loop)."""


class MicPath:
    """What the capture thread does to each frame while a conversation is open:
    cancel the echo (if a canceller is given), then listen for a voice (if a
    detector is given). Called as Capture.clean: (frame, end_time) -> (frame, onset).
    """

    def __init__(self, canceller: EchoCanceller | None, vad: VoiceActivity | None) -> None:
        self.canceller = canceller
        self.vad = vad
        # Set from the loop while an answer plays with the mic open (voice barge-in).
        self.over_answer = False

    def __call__(self, frame: bytes, end_time: float) -> tuple[bytes, VoiceOnset | None]:
        if self.canceller is None:
            if self.vad is None:
                return frame, None
            samples = resample.s16_to_float(frame)
        else:
            frame, samples = self.canceller.process(frame, end_time)
            if self.over_answer and not self.canceller.trusted:
                # A fresh canceller lets the answer through for its first second or
                # so, a realigned one for a moment: the server's own VAD would take
                # that for the user's next turn, and the detector for a barge-in.
                frame = bytes(len(frame))
                samples = np.zeros_like(samples)
        if self.vad is None or not self.vad.update(samples):
            return frame, None
        return frame, VoiceOnset()
