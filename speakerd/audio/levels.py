"""Microphone and wake-word figures over a few seconds, gathered in the capture thread.

`speakerd check` and the control socket's `levels` request both ask for them: a
`Meter` is handed to the wake-word detector, which feeds it every 80 ms frame it
already holds as numpy samples, with the scores it has just computed. Nothing is
measured while no meter is attached, so idle listening costs what it did.
"""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

FRAME_SECONDS = 0.08
FULL_SCALE = 32768.0
FLOOR_DBFS = -120.0  # what digital silence reports (log of zero has no number)
MIN_SECONDS = 0.5
MAX_SECONDS = 30.0  # a levels request holds its client this long at most


def s16_dbfs(x: float) -> float:
    """An amplitude in s16 units -> dB relative to full scale, floored at FLOOR_DBFS."""
    return round(max(FLOOR_DBFS, 20 * math.log10(x / FULL_SCALE)) if x > 0 else FLOOR_DBFS,
                 1)


@dataclass
class _Model:
    name: str
    threshold: float
    trigger_level: int
    best: float = 0.0
    best_frame: int = -1
    # The highest threshold that `trigger_level` scores in a row would still have
    # crossed: the best over runs of that length of the run's lowest score.
    highest: float = 0.0
    recent: collections.deque[float] = field(default_factory=collections.deque)

    def add(self, score: float, frame: int) -> None:
        if score > self.best:
            self.best, self.best_frame = score, frame
        self.recent.append(score)
        if len(self.recent) > self.trigger_level:
            self.recent.popleft()
        if len(self.recent) == self.trigger_level:
            self.highest = max(self.highest, min(self.recent))

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "threshold": self.threshold,
                "best": round(self.best, 3),
                "at_seconds": (round((self.best_frame + 1) * FRAME_SECONDS, 2)
                               if self.best_frame >= 0 else None),
                "highest_threshold": round(self.highest, 3),
                "would_trigger": self.highest >= self.threshold}


class Meter:
    """Collects `seconds` of frames, then calls `on_done(report)` once, in the feeding
    thread (hand it to the loop with call_soon_threadsafe). `add()` is called by one
    thread only; `done` tells that thread to let go of the meter."""

    def __init__(self, seconds: float, models: Sequence[tuple[str, float]],
                 trigger_level: int, on_done: Callable[[dict[str, Any]], None]) -> None:
        self.seconds = seconds
        self.want = max(1, math.ceil(seconds / FRAME_SECONDS - 1e-9))
        self.models = {name: _Model(name, threshold, trigger_level)
                       for name, threshold in models}
        self.trigger_level = trigger_level
        self._on_done = on_done
        self.frames = 0
        self._squares = 0.0
        self._sum = 0.0
        self._peak = 0.0
        self._clipped = 0
        self._samples = 0
        self.done = False

    def add(self, samples: np.ndarray, scores: dict[str, list[float]]) -> None:
        """One frame of int16-valued float samples and each model's scores for it."""
        if self.done:
            return
        self._squares += float(np.dot(samples, samples))
        self._sum += float(samples.sum())
        self._peak = max(self._peak, float(np.abs(samples).max(initial=0.0)))
        # s16 has no value past these: a sample sitting on either is a clipped one.
        self._clipped += int(np.count_nonzero((samples >= 32767) | (samples <= -32768)))
        self._samples += samples.size
        for name, values in scores.items():
            model = self.models.get(name)
            for score in values if model else ():
                model.add(score, self.frames)  # type: ignore[union-attr]
        self.frames += 1
        if self.frames >= self.want:
            self.done = True
            self._on_done(self.report())

    def report(self) -> dict[str, Any]:
        n = max(1, self._samples)
        return {
            "seconds": round(self.frames * FRAME_SECONDS, 2),
            "rms_dbfs": s16_dbfs(math.sqrt(self._squares / n)),
            "peak_dbfs": s16_dbfs(self._peak),
            "clipped": self._clipped,
            "samples": self._samples,
            "dc_offset": round(self._sum / n / FULL_SCALE, 5),  # fraction of full scale
            "wake_word": {"trigger_level": self.trigger_level,
                          "models": [m.as_dict() for m in self.models.values()]},
        }


class _Classifier(Protocol):
    name: str
    threshold: float


class Metered(Protocol):
    """The wake-word detector, as a meter rides on it."""

    classifiers: Sequence[_Classifier]
    trigger_level: int
    meter: Meter | None


async def measure(detector: Metered, seconds: float, timeout: float,
                  start: Callable[[], None] | None = None) -> dict[str, Any]:
    """`seconds` of what the detector hears, once its capture thread has fed them to a
    Meter (call `start` to set that thread going); TimeoutError after `timeout`."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[dict[str, Any]] = loop.create_future()

    def finished(report: dict[str, Any]) -> None:  # in the capture thread
        loop.call_soon_threadsafe(lambda: done.done() or done.set_result(report))
    meter = Meter(seconds, [(c.name, c.threshold) for c in detector.classifiers],
                  detector.trigger_level, finished)
    detector.meter = meter
    try:
        if start is not None:
            start()
        return await asyncio.wait_for(done, timeout)
    finally:
        if detector.meter is meter:
            detector.meter = None
