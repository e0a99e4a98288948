"""A voice over the echo, in what a linear echo filter leaves of the microphone."""

from __future__ import annotations

import collections
import logging
import math

import numpy as np

from speakerd.audio.echo.reference import dbfs

log = logging.getLogger(__name__)


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

