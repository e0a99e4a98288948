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
    short burst). Nothing over the echo counts until the filter has learned the room:
    `ratio` below `adapted_db`, and the first answer it learned on (`arm_ms` of echo
    with the filter adapted) over: a fresh filter improves fast and unevenly, and the
    first answer after start waits rather than guesses.

    What a filter that has the room wrong leaves is echo, not a voice, and it is
    told apart by what explains it:
    - the volume changed: the filter's own prediction of the echo, scaled
      (`max_correlation`);
    - the echo moved by a fraction of a millisecond (a clock, a sound server, a
      loopback that slipped a few samples): the prediction's time derivative, which is
      orthogonal to the prediction itself and as loud as the echo (a shift of one
      16 kHz sample leaves -8 dB at 1 kHz, where the filter had left -40 dB). It is
      the prediction shifted by a little: what a fit of the residual on the
      prediction shifted by up to `SHIFTS` samples either way explains (`max_fit` of
      the residual's power, and too little left over it to be a voice; or `sure_fit`);
    - the echo slipped further (a gap the playback clock took for jitter, a sound
      server that started late): what it leaves is the echo and its own misplaced
      estimate, uncorrelated at that distance and as loud as the microphone, and where
      the echo falls quiet, louder: `ADDED_PIECES` pieces of the window where it left
      more than there was at the microphone, which a voice over a filter that has the
      echo never makes. (A reverberation it has wrong does the same: such pieces are
      never voiced themselves.)
    Once such a candidate is explained, the filter is known to leave more than it
    learned: `ratio` rises to what it left then and learns down again as the filter
    relearns, instead of the detector hearing the same misfit a frame later. And after
    every pause (a new answer, a moved echo) the filter needs `warm_up_ms` of echo
    beyond the detector's window before anything over the echo counts."""

    SUB = 160
    RESUME_DB = -20.0
    SHIFTS = 8
    # Pieces of a window where the filter left more than there was at the microphone
    # (by over 1 dB): a filter that has lost the echo adds its misplaced estimate to
    # it; over a filter that has the echo, a voice never does (none in any test voice).
    ADDED_PIECES = 2

    def __init__(self, *, margin_db: float = 13.0, adapted_db: float = -15.0,
                 min_voiced_ms: int = 100, min_span_ms: int = 150, window_ms: int = 300,
                 hangover_ms: int = 500, floor_dbfs: float = -55.0,
                 max_correlation: float = 0.2, max_fit: float = 0.5, sure_fit: float = 0.8,
                 warm_up_ms: int = 200, arm_ms: int = 1000,
                 passthrough: np.ndarray | None = None) -> None:
        self.margin = margin_db
        self.warm_up = warm_up_ms // 10
        # The filter's output is the microphone through `passthrough` minus its echo
        # estimate (speex: a DC notch): what it predicted is mic - left - that.
        self._passthrough = passthrough
        # (piece, what the filter left in dB of the microphone) over echo, recently
        self._ratios: collections.deque[tuple[int, float]] = collections.deque()
        self.onset_db = 0.0  # the median residual over the voiced pieces of the last one
        self.max_correlation = max_correlation
        self.max_fit = max_fit
        self.sure_fit = sure_fit
        # The voiced pieces over echo within the window, and what the filter left and
        # predicted over the window and a frame, for explaining them.
        self._recent: collections.deque[int] = collections.deque()
        self.correlation = 0.0  # of the last candidate, for tests and the journal
        self.fit = 0.0  # how much of the last candidate a slightly moved echo explains
        self.adapted = adapted_db
        self.min_voiced = min_voiced_ms // 10
        self.min_span = min_span_ms // 10
        self.window = max(window_ms // 10, self.min_span)
        self._history = np.zeros((2, (self.window + 10) * self.SUB), np.float32)
        self._history_end = 0  # the piece that ends the history
        self.hangover = hangover_ms // 10
        self.floor = floor_dbfs
        self.ratio = 0.0  # dB of residual over microphone, on echo alone
        self._arm = arm_ms // 10
        self._learned = 0  # pieces of echo with the filter adapted
        self._trusted = False  # an answer it learned on has ended
        self.explained = 0  # candidates taken for echo, in all
        self._raised_from: float | None = None  # the ratio before the last explained one
        # The closest echo alone came to a voice: the highest level above `ratio` that
        # `min_voiced` pieces of one window reached (a voice needs `margin`).
        self._excess: collections.deque[tuple[int, float]] = collections.deque()
        self.closest = -math.inf
        self._noise = floor_dbfs - 15
        self._voiced: collections.deque[int] = collections.deque()
        self._piece = 0
        self._quiet = self.hangover
        self.speaking = False

    @property
    def armed(self) -> bool:
        """Has the filter learned the room well enough for a voice over the echo?"""
        return self.ratio < self.adapted and self._trusted

    @property
    def relearning(self) -> bool:
        """Is the filter relearning after leaving more than it had learned?"""
        return self._raised_from is not None

    def resumed(self) -> None:
        """The speaker starts again after a pause: until its delay is measured again
        (to a fraction of a sample) the filter may leave more than it learned before
        (-18 dB against -41 dB, measured before the fraction was). Start from a
        cautious estimate and learn down again (over ~0.5 s)."""
        self.ratio = max(self.ratio, self.RESUME_DB)
        self._trusted = self._trusted or self._learned >= self._arm

    def reset(self) -> None:
        self._voiced.clear()
        self._recent.clear()
        self._ratios.clear()
        self._excess.clear()

    def _explained(self) -> bool:
        """Is what the filter left its own echo estimate, scaled or moved a little?"""
        voiced = set(self._voiced)
        self.onset_db = float(np.median([r for piece, r in self._ratios if piece in voiced]
                                        or [0.0]))
        self.correlation = self.fit = 0.0
        pieces = [p for p in self._recent if p in voiced]
        if not pieces:
            return False  # voiced where nothing played: nothing to explain it by
        length = self._history.shape[1]
        rows = np.concatenate([np.arange(start, start + self.SUB) for start in
                               (length - (self._history_end - p + 1) * self.SUB
                                for p in pieces)])
        left = self._history[0, rows].astype(np.float64)
        predicted = self._history[1].astype(np.float64)
        if self._passthrough is not None:
            # Without this, what the filter "predicted" holds the voice itself, and a
            # voice right after the answer is rebuilt from it exactly.
            mic_all = self._history[0] + self._history[1]
            predicted -= np.convolve(mic_all, self._passthrough)[:length]
        k = self.SHIFTS
        predicted = np.pad(predicted, k)
        shifted = np.stack([predicted[rows + k + d] for d in range(-k, k + 1)], axis=1)
        now = shifted[:, k]
        power = float(np.dot(left, left) * np.dot(now, now))
        self.correlation = abs(float(np.dot(left, now))) / math.sqrt(power) \
            if power > 0 else 0.0
        coef, *_ = np.linalg.lstsq(shifted, left, rcond=None)
        rest = left - shifted @ coef
        self.fit = 1.0 - float(np.dot(rest, rest)) / max(float(np.dot(left, left)), 1e-20)
        mic = (self._history[0] + self._history[1])[rows].astype(np.float64)
        still = sum(dbfs(rest[i:i + self.SUB]) - dbfs(mic[i:i + self.SUB])
                    > self.ratio + self.margin for i in range(0, rest.size, self.SUB))
        # A filter that has lost the echo (it slipped by more than SHIFTS: a gap the
        # playback clock took for jitter, a sound server that started late) leaves the
        # echo and its own misplaced estimate, uncorrelated at that distance and as loud
        # as the microphone; where the echo is quiet, louder than the microphone.
        added = sum(1 for piece, r in self._ratios
                    if piece > self._piece - self.window and r > 1.0)
        explained = (self.correlation > self.max_correlation or self.fit > self.sure_fit
                     or (self.fit > self.max_fit and still < self.min_voiced)
                     or added >= self.ADDED_PIECES)
        if explained:
            self.explained += 1
            if self.onset_db > self.ratio:
                if self._raised_from is None:
                    self._raised_from = self.ratio
                self.ratio = self.onset_db
        return explained

    def _keep(self, mic: np.ndarray, left: np.ndarray) -> None:
        n = mic.size
        self._history = np.concatenate(
            [self._history[:, n:], np.stack([left, mic - left])], axis=1)
        self._history_end = self._piece + n // self.SUB

    def take_closest(self) -> float:
        """The closest echo alone came to a voice since the last call (dB above what the
        filter leaves of echo alone; a voice needs `margin`); -inf if never armed."""
        closest, self.closest = self.closest, -math.inf
        return closest

    def _near_miss(self, excess: float) -> None:
        self._excess.append((self._piece, excess))
        while self._excess[0][0] <= self._piece - self.window:
            self._excess.popleft()
        if len(self._excess) >= self.min_voiced:
            level = sorted(e for _, e in self._excess)[-self.min_voiced]
            self.closest = max(self.closest, level)

    def update(self, mic: np.ndarray, left: np.ndarray, *, echo: bool,
               playing: bool = True) -> bool:
        """`mic` and what the filter `left` of it; `echo`: the speaker played within
        the last half second; `playing`: the speaker plays into this very frame
        (not only its tail), so what comes close to a voice is echo alone and counts
        towards `closest`. -> True on the frame where a voice is first heard."""
        onset = False
        self._keep(mic, left)
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
                armed = self.armed
                # A voice adds to the microphone: a piece louder after the filter than
                # before is the filter's own misfit.
                voice = voiced and self.ratio + self.margin < r < 1.0
                self._ratios.append((self._piece, r))
                while self._ratios[0][0] <= self._piece - 130:
                    self._ratios.popleft()
                if armed and playing:
                    self._near_miss(r - self.ratio if voiced and r < 1.0 else -math.inf)
                if voice and armed:
                    self._recent.append(self._piece)
                else:
                    voiced = False
                    self.ratio += 0.02 * (max(r, -60.0) - self.ratio)  # over ~0.5 s
                    if self.ratio < self.adapted:
                        self._learned += 1
                    if self._raised_from is not None and \
                            self.ratio < self._raised_from + self.margin / 2:
                        self._raised_from = None  # relearned
            while self._voiced and self._voiced[0] <= self._piece - self.window:
                self._voiced.popleft()
            while self._recent and self._recent[0] <= self._piece - self.window:
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
                              "leaves %.0f dB (%.0f dB on echo alone before), correlation "
                              "with its prediction %.2f, %.0f%% of it the echo moved a "
                              "little", self.onset_db, self._raised_from or self.ratio,
                              self.correlation, 100 * self.fit)
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

