"""How far the echo lags the reference: GCC-PHAT to a fraction of a sample."""

from __future__ import annotations

import functools
import logging

import numpy as np

from speakerd.audio.echo.reference import ACTIVE_DBFS, RATE, Reference, dbfs

log = logging.getLogger(__name__)

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
        sample. The next measure sets the offset exactly, and only this run's echo may
        make it: after an underrun the window still holds the last run's, and a measure
        of that confirmed the old placement while the filter met the new one."""
        self.confirmed = False
        self._pending = None
        self._mic[:] = 0.0

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

