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
import functools
import logging
import math
import threading
from dataclasses import dataclass

import numpy as np

from speakerd.audio import resample, speex_echo

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
# The microphone's clock going earlier means the reference handed with each frame
# leads the echo by more than it must: harmless to AEC3 up to a few hundred ms, and
# every realignment costs it a moment of echo. So only past this much.
CAPTURE_LEAD_SLACK_MS = 150
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
# The echo's delay behind the reference, measured (GCC-PHAT) over the last half second
# of microphone against the reference up to half a second earlier, every other frame.
DELAY_WINDOW = 8000
DELAY_MAX = 8000
DELAY_EVERY = 2
DELAY_CONFIDENCE = 8.0  # the peak, in standard deviations of the rest: echo gives 15-30
DELAY_TOLERANCE = 48  # 3 ms: less moves nothing
# The speex filter is handed the reference shifted so the echo always sits this far
# into it, whatever the room's or the clocks' delay: a changed delay does not undo
# what the filter learned. Its tail covers that plus the room's reverberation.
SPEEX_LEAD = 160  # 10 ms
# Sub-sample delays: a new answer lands on the device a fraction of a 16 kHz sample
# differently (a 48 or 24 kHz device places it to its own sample), and a linear filter
# learned at one fraction removes ~8 dB less at another until it relearns, seconds
# later. The reference is shifted by the measured fraction too.
SINC_TAPS = 16
_FINE = np.linspace(-1.0, 1.0, 33)
_FINE_SINC = np.sinc(_FINE[:, None] - np.arange(-SINC_TAPS, SINC_TAPS + 1)[None, :])
SPEEX_TAIL = 3200  # 200 ms
# After the speex filter resumes it holds stale history for a tail's length; after a
# shift it re-learns the little that moved: no barge-in meanwhile.
RESUME_FRAMES = 4
SHIFT_FRAMES = 20


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


@dataclass(frozen=True, slots=True)
class EchoStats:
    """What the canceller did since the last take_stats()."""

    seconds: float  # of microphone audio while the speaker played
    mic_dbfs: float  # its power before cancellation
    out_dbfs: float  # and after
    realigned: int  # times either stream was moved back onto its clock
    listening: float = 0.0  # fraction of the frames with echo where a voice could be heard
    linear_db: float = 0.0  # the echo speex's filter removes (what the detector hears)

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
        self.realigned = 0
        self.frames = 0
        # Voice over the echo: speex's linear filter on the reference shifted by the
        # measured delay, and a detector on what it leaves.
        self.delay = EchoDelay()
        self.talk = TalkOver()
        self.onset = False  # set by process(): a voice began over the echo in this frame
        self.echo_now = False  # and whether the speaker played within the last half second
        # The frame as best kept for a voice over the echo: speex's output (the voice
        # whole, a little echo left) when it ran, else AEC3's.
        self.voice = np.zeros(FRAME_SAMPLES, np.float32)
        self._speex: speex_echo.LinearEcho | None = None
        try:
            self._speex = speex_echo.LinearEcho(rate=RATE, tail=SPEEX_TAIL)
        except speex_echo.SpeexUnavailable as e:
            # AEC3's output is no substitute: its suppressor takes a voice over the
            # echo down with it and lets it through only in the answer's pauses.
            log.warning("voice barge-in is off: %s; the wake word and the talk button "
                        "still interrupt an answer (sudo apt install libspeexdsp1)", e)
        self._hold = 0  # frames before the detector may fire again
        self._moved = 0  # samples the microphone's clock moved the reference since
        self._echo_frames = 0  # frames with echo, since take_stats()
        self._armed_frames = 0  # of which the detector could hear a voice
        self._seen_runs = 0

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
        if self._cursor is None or want - self._cursor > CAPTURE_SLACK_MS * RATE / 1000 \
                or self._cursor - want > CAPTURE_LEAD_SLACK_MS * RATE / 1000:
            if self._cursor is not None:
                self.realigned += 1
                self._moved += want - self._cursor
                log.debug("microphone clock realigned by %+.0f ms",
                          (want - self._cursor) * 1000 / RATE)
            self._cursor = want
        ref = self.reference.take(self._cursor, n)
        self._cursor += n
        out = self._aec.process(mic, ref)
        self.frames += 1
        self.voice = out  # replaced by speex's output when it ran
        self.onset = self._talk_over(mic, out, self._cursor)
        if dbfs(ref) > ACTIVE_DBFS:
            mic_e = float(np.sum(np.square(mic, dtype=np.float64)))
            out_e = float(np.sum(np.square(out, dtype=np.float64)))
            with self._lock:
                self._mic_energy += mic_e
                self._out_energy += out_e
                self._active_samples += n
        return resample.float_to_s16(out), out

    def _talk_over(self, mic: np.ndarray, out: np.ndarray, cursor: int) -> bool:
        """Does a voice begin over the echo in this frame? `cursor`: the reference
        index just after the frame (before any measured shift)."""
        n = mic.size
        if self._speex is None:
            return False
        if self.reference.runs != self._seen_runs:
            # The speaker started, ran dry or was flushed: the delay is unconfirmed
            # until measured again.
            self._seen_runs = self.reference.runs
            self.delay.unconfirm()
            self.talk.resumed()
        if self._moved:
            # The microphone's clock was corrected: the same echo now pairs with a
            # reference that much later, exactly. Follow it at once, before speex
            # learns the wrong path; the next measures confirm.
            self.delay.moved(self._moved)
            self._moved = 0
            self._hold = max(self._hold, RESUME_FRAMES)
        if self.delay.feed(mic, self.reference, cursor):
            self._hold = max(self._hold, SHIFT_FRAMES)
        whole = math.floor(self.delay.offset)
        start = cursor - n - whole
        # Anything played from half a second before this frame's echo (the room's
        # reverberation) up to now, wherever the echo turns out to be; the frame's own
        # echo (speex's reference, with SINC_TAPS either side) is in it, at RATE // 2.
        head = RATE // 2
        recent = self.reference.take(start - head,
                                     max(cursor, start + n + SINC_TAPS) - start + head)
        echo_now = self.echo_now = loudest_dbfs(recent) > ACTIVE_DBFS
        self._echo_frames += echo_now
        if not self.delay.confirmed:
            # Speex would learn the wrong echo path: it stays as it was, and only a
            # microphone with no echo in it can be listened to.
            self._hold = max(self._hold, RESUME_FRAMES)
            if echo_now:
                self.talk.reset()
                return False
            return self.talk.update(mic, mic, echo=False)
        if not echo_now:
            # Nothing to cancel; and speex, fed silence as the reference and a voice
            # as the microphone, would drift from the room it learned.
            self._hold = max(self._hold, RESUME_FRAMES)
            return self.talk.update(mic, mic, echo=False)
        ref = fractional_delay(recent[head - SINC_TAPS:head + n + SINC_TAPS],
                               self.delay.offset - whole)
        linear = self.voice = self._speex.process(mic, ref)
        if self._hold:
            self._hold -= 1
            self.talk.reset()
            return False
        self._armed_frames += self.talk.ratio < self.talk.adapted
        onset = self.talk.update(mic, linear, echo=True)
        if onset:
            t = self.talk
            log.debug("a voice over the echo: the filter leaves %.0f dB of the microphone "
                      "(%.0f dB on echo alone), correlation with its prediction %.2f, echo "
                      "%.0f ms behind", t.onset_db, t.ratio, t.correlation,
                      self.delay.lag_ms or 0.0)
        return onset

    def take_stats(self) -> EchoStats | None:
        """The echo reduction since the last call; None if the speaker played nothing."""
        with self._lock:
            n, mic, out = self._active_samples, self._mic_energy, self._out_energy
            self._active_samples = 0
            self._mic_energy = self._out_energy = 0.0
        if not n:
            return None
        echo_frames, armed = self._echo_frames, self._armed_frames
        self._echo_frames = self._armed_frames = 0
        return EchoStats(n / RATE, 10 * math.log10(max(mic / n, 1e-20)),
                         10 * math.log10(max(out / n, 1e-20)),
                         self.realigned + self.reference.realigned,
                         armed / echo_frames if echo_frames else 0.0, -self.talk.ratio)


class EchoDelay:
    """How far the echo lags the reference handed out with each microphone frame,
    measured by GCC-PHAT (a cross-correlation that whitens both signals, so speech's
    own periodicity does not blur the peak). A voice over the echo does not move it:
    the voice is not in the reference. A new measure is believed when two in a row
    agree; the shift to apply is `offset` samples."""

    def __init__(self) -> None:
        self._mic = np.zeros(DELAY_WINDOW, np.float32)
        self._frames = 0
        self.offset = 0.0  # samples the reference is moved later for the speex filter
        # Unconfirmed: playback (re)started; the next measure near `offset` sets it.
        self.confirmed = False
        self._pending: float | None = None
        self.lag_ms: float | None = None  # the last measure, for the journal

    def unconfirm(self) -> None:
        """A new run of playback: its reference is placed by a fresh reading of the
        device's delay, a few ms off the last one's, and the filter needs it to the
        sample. The next measure sets the offset exactly."""
        self.confirmed = False
        self._pending = None

    def moved(self, by: int) -> None:
        """The reference handed with each frame moved `by` samples later."""
        self.offset = max(0.0, self.offset + by)
        self._pending = None
        self._mic[:] = 0.0  # its frames were measured against the old pairing

    def feed(self, mic: np.ndarray, reference: Reference, cursor: int) -> bool:
        """Keep the frame; measure every DELAY_EVERY frames. -> True if the offset
        moved."""
        self._mic = np.concatenate([self._mic[mic.size:], mic])
        self._frames += 1
        if self._frames % DELAY_EVERY:
            return False
        ref = reference.take(cursor - DELAY_WINDOW - DELAY_MAX, DELAY_WINDOW + DELAY_MAX)
        if dbfs(ref[DELAY_MAX:]) < ACTIVE_DBFS + 5 or dbfs(self._mic) < ACTIVE_DBFS:
            return False  # too little played, or heard, to measure
        lag, confidence = gcc_phat(self._mic, ref, DELAY_MAX)
        if confidence < DELAY_CONFIDENCE:
            return False
        self.lag_ms = lag * 1000 / RATE
        want = max(0.0, lag - SPEEX_LEAD)
        if abs(want - self.offset) <= DELAY_TOLERANCE:
            if not self.confirmed:
                # A new run, the same echo path placed a little differently: to the
                # sample, at once.
                self.offset = want
            self.confirmed, self._pending = True, None
            return False
        if self._pending is None or abs(self._pending - want) > DELAY_TOLERANCE:
            # The echo moved (the room, or a clock), or a voice over it blurred this
            # measure: believe it when the next one agrees. Meanwhile the filter and
            # the detector go on as they were: their own changes are announced
            # (moved(), unconfirm()), and a lone stray measure must not deafen the
            # detector just when someone talks over the answer.
            self._pending = want
            return False
        log.debug("echo delay now %.0f ms behind the reference (was %.0f ms)",
                  self.lag_ms, (self.offset + SPEEX_LEAD) * 1000 / RATE)
        self.offset, self._pending, self.confirmed = want, None, True
        return True


def gcc_phat(mic: np.ndarray, ref: np.ndarray, max_lag: int) -> tuple[float, float]:
    """The lag (samples, to a fraction of one) by which `mic` follows `ref`, both
    ending at the same moment (`ref` is `max_lag` longer), and its confidence: the
    peak in standard deviations of the correlation elsewhere."""
    size = 1 << int(np.ceil(np.log2(ref.size + mic.size)))
    cross = np.fft.rfft(mic, size) * np.conj(np.fft.rfft(ref, size))
    cross /= np.maximum(np.abs(cross), 1e-12)
    corr = np.fft.irfft(cross, size)
    lags = np.arange(-max_lag, 1)
    values = corr[lags % size]
    best = int(np.argmax(values))
    rest = np.concatenate([values[:max(0, best - 16)], values[best + 17:]])
    # Between the samples: the correlation is band-limited, so sinc interpolation of
    # the points around the peak is exact; a parabola alone is biased by up to 0.15
    # samples, differently for each fraction.
    k = SINC_TAPS
    around = corr[(lags[best] + np.arange(-k, k + 1)) % size]
    vals = _FINE_SINC @ around
    i = int(np.clip(np.argmax(vals), 1, vals.size - 2))
    y0, y1, y2 = vals[i - 1:i + 2]
    bend = y0 - 2 * y1 + y2
    step = _FINE[1] - _FINE[0]
    frac = _FINE[i] + (0.5 * (y0 - y2) / bend * step if bend < 0 else 0.0)
    return (float(lags[best] + max_lag + frac),
            float(values[best] / (np.std(rest) + 1e-12)))


def fractional_delay(x: np.ndarray, f: float) -> np.ndarray:
    """`x` delayed by `f` (0 <= f < 1) samples, windowed-sinc interpolated: SINC_TAPS
    samples of `x` on either side are used up (the result is 2 * SINC_TAPS shorter)."""
    if f == 0.0:
        return x[SINC_TAPS:x.size - SINC_TAPS]
    return np.convolve(x, _sinc_filter(f), "valid")


@functools.lru_cache(maxsize=4)
def _sinc_filter(f: float) -> np.ndarray:
    # The fraction changes only when the delay is measured anew: not rebuilt per frame.
    t = np.arange(-SINC_TAPS, SINC_TAPS + 1)
    return (np.sinc(t - f) * np.hanning(2 * SINC_TAPS + 3)[1:-1]).astype(np.float32)


class TalkOver:
    """A voice over the echo, in what a linear echo filter leaves of the microphone.

    Where the speaker played, the filter leaves a residual some way below the
    microphone (`ratio`, learned on echo alone: -20 to -40 dB once adapted); a piece
    of 10 ms is voiced when it stands `margin_db` above that, and above the noise.
    Where nothing played, any sound is voiced. Speech is `min_voiced_ms` of voiced
    pieces within `window_ms`, spread over `min_span_ms` (a cough or a knock is one
    short burst). While the filter has not yet learned the room (`ratio` above
    `adapted_db`) nothing over the echo counts.

    A filter that has the room slightly wrong (the volume or the speaker moved) leaves
    more than `ratio` too, but what it leaves is its own prediction of the echo,
    scaled: a voice is not. So speech over the echo must also be uncorrelated with
    the echo the filter predicted (`max_correlation`). A filter that has the room
    wrong in its reverberation leaves a residual that is not its prediction, but where
    the echo falls quiet it leaves more than there was at the microphone, which a
    voice never does: such pieces are not voiced. And after every pause (a new
    answer, a moved echo) the filter needs `warm_up_ms` of echo beyond the detector's
    window before anything over the echo counts."""

    SUB = 160
    RESUME_DB = -20.0

    def __init__(self, *, margin_db: float = 13.0, adapted_db: float = -15.0,
                 min_voiced_ms: int = 100, min_span_ms: int = 150, window_ms: int = 300,
                 hangover_ms: int = 500, floor_dbfs: float = -55.0,
                 max_correlation: float = 0.2, warm_up_ms: int = 200) -> None:
        self.margin = margin_db
        self.warm_up = warm_up_ms // 10
        # (piece, what the filter left in dB of the microphone) over echo, recently
        self._ratios: collections.deque[tuple[int, float]] = collections.deque()
        self.onset_db = 0.0  # the median residual over the voiced pieces of the last one
        self.max_correlation = max_correlation
        # (piece, what the filter left, what it predicted) over the window
        self._recent: collections.deque[tuple[int, np.ndarray, np.ndarray]] = \
            collections.deque()
        self.correlation = 0.0  # of the last candidate, for tests and the journal
        self.adapted = adapted_db
        self.min_voiced = min_voiced_ms // 10
        self.min_span = min_span_ms // 10
        self.window = max(window_ms // 10, self.min_span)
        self.hangover = hangover_ms // 10
        self.floor = floor_dbfs
        self.ratio = 0.0  # dB of residual over microphone, on echo alone
        self._noise = floor_dbfs - 15
        self._voiced: collections.deque[int] = collections.deque()
        self._piece = 0
        self._quiet = self.hangover
        self.speaking = False

    def resumed(self) -> None:
        """The speaker starts again after a pause: until its delay is measured again
        (to a fraction of a sample) the filter may leave more than it learned before
        (-18 dB against -41 dB, measured before the fraction was). Start from a
        cautious estimate and learn down again (over ~0.5 s)."""
        self.ratio = max(self.ratio, self.RESUME_DB)

    def reset(self) -> None:
        self._voiced.clear()
        self._recent.clear()
        self._ratios.clear()

    def _explained(self) -> bool:
        """Is what the filter left its own echo estimate, scaled?"""
        voiced = set(self._voiced)
        self.onset_db = float(np.median([r for piece, r in self._ratios if piece in voiced]
                                        or [0.0]))
        self.correlation = 0.0
        pairs = [(x, y) for piece, x, y in self._recent if piece in voiced]
        if not pairs:
            return False  # voiced where nothing played: nothing to explain it by
        left = np.concatenate([x for x, _ in pairs]).astype(np.float64)
        predicted = np.concatenate([y for _, y in pairs]).astype(np.float64)
        power = float(np.dot(left, left) * np.dot(predicted, predicted))
        self.correlation = abs(float(np.dot(left, predicted))) / math.sqrt(power) \
            if power > 0 else 0.0
        return self.correlation > self.max_correlation

    def update(self, mic: np.ndarray, left: np.ndarray, *, echo: bool) -> bool:
        """`mic` and what the filter `left` of it; `echo`: the speaker played within
        the last half second. -> True on the frame where a voice is first heard."""
        onset = False
        for i in range(0, mic.size - self.SUB + 1, self.SUB):
            self._piece += 1
            m = dbfs(mic[i:i + self.SUB])
            x = dbfs(left[i:i + self.SUB])
            self._noise = x if x < self._noise else self._noise + 0.01
            voiced = x > max(self.floor, self._noise + 15)
            if echo and m <= self.floor - 5:
                voiced = False  # a voice would be at the microphone: it is near silent
            elif echo:
                r = x - m
                # A voice adds to the microphone: a piece louder after the filter than
                # before is the filter's own misfit.
                voice = voiced and self.ratio + self.margin < r < 1.0
                self._ratios.append((self._piece, r))
                while self._ratios[0][0] <= self._piece - 130:
                    self._ratios.popleft()
                if voice and self.ratio < self.adapted:
                    self._recent.append((self._piece, left[i:i + self.SUB],
                                         mic[i:i + self.SUB] - left[i:i + self.SUB]))
                else:
                    voiced = False
                    self.ratio += 0.02 * (max(r, -60.0) - self.ratio)  # over ~0.5 s
            while self._voiced and self._voiced[0] <= self._piece - self.window:
                self._voiced.popleft()
            while self._recent and self._recent[0][0] <= self._piece - self.window:
                self._recent.popleft()
            if not voiced:
                self._quiet += 1
                if self.speaking and self._quiet >= self.hangover:
                    self.speaking = False
                continue
            self._quiet = 0
            self._voiced.append(self._piece)
            if (not self.speaking and len(self._voiced) >= self.min_voiced
                    and self._piece - self._voiced[0] + 1 >= self.min_span):
                if echo and len(self._ratios) < self.window + self.warm_up:
                    continue  # the filter has not had enough echo yet: keep counting
                if echo and self._explained():
                    log.debug("a voice-like sound over the echo taken for echo: the filter "
                              "leaves %.0f dB (%.0f dB on echo alone), correlation with its "
                              "prediction %.2f", self.onset_db, self.ratio, self.correlation)
                    self._voiced.clear()
                    continue
                self.speaking = onset = True
        return onset


class VoiceActivity:
    """Is someone talking into a microphone with no echo in it (the device cancels
    it)? TalkOver's test for where nothing played: 10 ms pieces above a tracked noise
    floor, `min_voiced_ms` of them within `window_ms`, spread over `min_span_ms`."""

    def __init__(self, *, min_voiced_ms: int = 100, min_span_ms: int = 200,
                 window_ms: int = 500, hangover_ms: int = 500,
                 floor_dbfs: float = -55.0) -> None:
        self._talk = TalkOver(min_voiced_ms=min_voiced_ms, min_span_ms=min_span_ms,
                              window_ms=window_ms, hangover_ms=hangover_ms,
                              floor_dbfs=floor_dbfs)

    def update(self, samples: np.ndarray) -> bool:
        """-> True on the frame where a voice is first heard."""
        return self._talk.update(samples, samples, echo=False)


@dataclass(frozen=True, slots=True)
class VoiceOnset:
    """Someone began to talk over the cleaned microphone (handed to the loop)."""


class MicPath:
    """What the capture thread does to each frame while a conversation is open:
    cancel the echo (if a canceller is given), and with voice barge-in (a detector
    is given) listen for a voice over the answer. Called as Capture.clean:
    (frame, end_time) -> (what to stream, onset).

    While the answer plays the server gets silence: its own turn detection would take
    any echo left for the user's next turn and answer it (create_response is on). Only
    when the detector hears a voice does the stream open, with the last HELD_FRAMES
    frames first (kept as `voice`, the voice whole), so the words that barged in reach
    the server too.
    """

    HELD_FRAMES = 5  # 400 ms: the detector is sure of a voice 150-300 ms into it

    def __init__(self, canceller: EchoCanceller | None, vad: VoiceActivity | None) -> None:
        self.canceller = canceller
        self.vad = vad
        # Set from the loop while an answer plays with the mic open (voice barge-in).
        self.over_answer = False
        self._held: collections.deque[bytes] = collections.deque(maxlen=self.HELD_FRAMES)
        self._open = False  # a voice was heard over this answer: stream it

    def __call__(self, frame: bytes, end_time: float) -> tuple[bytes, VoiceOnset | None]:
        if self.canceller is not None:
            frame, _ = self.canceller.process(frame, end_time)
            voice = resample.float_to_s16(self.canceller.voice)
            onset = self.canceller.onset
        elif self.vad is not None:
            voice = frame
            onset = self.vad.update(resample.s16_to_float(frame))
        else:
            return frame, None
        if self.vad is None or not self.over_answer:
            self._held.clear()
            self._open = False
            return frame, None
        self._held.append(voice)
        if not (onset or self._open):
            return bytes(len(frame)), None
        self._open = True
        held = b"".join(self._held)
        self._held.clear()
        return held, VoiceOnset() if onset else None
