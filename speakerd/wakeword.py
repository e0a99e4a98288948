"""Wake-word detection with openWakeWord models, run in the capture thread frame by frame."""

from __future__ import annotations

import functools
import logging
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from speakerd import log as logmod
from speakerd.audio.levels import Meter
from speakerd.config import BUILTIN_WAKE_WORDS, WakeWordConfig
from speakerd.errors import ConfigError
from speakerd.tflite import MODELS_DIR, Interpreter, ModelError

log = logging.getLogger(__name__)

# openWakeWord's streaming windows (pyopen_wakeword/openwakeword.py). Each stage there
# keeps a 10 s ring and reads its next window from the oldest sample not yet
# consumed; a FIFO of the unconsumed samples reads the same windows without
# shifting 10 s of floats on every chunk. The scores stay the package's.
RATE = 16000
CHUNK = 1280  # 80 ms
AUTOFILL = 8 * RATE  # the feature extractor starts as if 8 s of silence were new
MEL_SAMPLES = 1760
NUM_MELS = 32
EMB_WINDOW = 76
EMB_STEP = 8
EMB_FEATURES = 96


def _samples(frame: bytes) -> np.ndarray:
    """16 kHz s16le bytes -> the int16-valued floats the models take."""
    return np.frombuffer(frame, "<i2").astype(np.float32)


def model_path(name: str) -> Path:
    """A built-in model name or a .tflite path -> the file."""
    return MODELS_DIR / f"{name}.tflite" if name in BUILTIN_WAKE_WORDS else Path(name)


def model_id(name: str) -> str:
    return name if name in BUILTIN_WAKE_WORDS else Path(name).stem


@dataclass(frozen=True, slots=True)
class Detection:
    model: str
    score: float
    frame: int  # index of the 80 ms frame that crossed the threshold, from 0

    @property
    def seconds(self) -> float:
        """Audio time of the end of that frame since the detector started."""
        return (self.frame + 1) * CHUNK / RATE


class Features:
    """Audio -> openWakeWord embeddings (melspectrogram then embedding model)."""

    def __init__(self, *, threads: int = 1, xnnpack: bool = True) -> None:
        self.mel = Interpreter(MODELS_DIR / "melspectrogram.tflite",
                               input_shape=(1, MEL_SAMPLES), threads=threads, xnnpack=xnnpack)
        self.emb = Interpreter(MODELS_DIR / "embedding_model.tflite",
                               input_shape=(1, EMB_WINDOW, NUM_MELS, 1), threads=threads,
                               xnnpack=xnnpack)
        self.audio = np.zeros(AUTOFILL, np.float32)  # samples not yet consumed
        self.mels = np.zeros((0, NUM_MELS), np.float32)  # mel rows not yet consumed

    def process(self, chunk: np.ndarray) -> list[np.ndarray]:
        """One chunk of int16-valued float samples -> the embeddings (96 floats) it completes."""
        self.audio = np.concatenate((self.audio, chunk))
        out = []
        while self.audio.size >= MEL_SAMPLES:
            mels = self.mel.run(self.audio[:MEL_SAMPLES]) / 10 + 2
            self.audio = self.audio[CHUNK:]
            self.mels = np.concatenate((self.mels, mels.reshape(-1, NUM_MELS)))
            while self.mels.shape[0] >= EMB_WINDOW:
                out.append(self.emb.run(self.mels[:EMB_WINDOW]))
                self.mels = self.mels[EMB_STEP:]
        return out

    def restart(self) -> None:
        """Forget the audio, keeping the window alignment: what was buffered becomes silence."""
        self.audio = np.zeros_like(self.audio)
        self.mels = np.full_like(self.mels, self._silent_mel) if self.mels.size else self.mels

    @functools.cached_property
    def _silent_mel(self) -> float:
        # What the mel stage says for digital silence; mid-window zeros are harmless too,
        # since restart() is always followed by enough real audio to push them out.
        return float(self.mel.run(np.zeros(MEL_SAMPLES, np.float32)).flat[0]) / 10 + 2

    def close(self) -> None:
        self.mel.close()
        self.emb.close()


class Classifier:
    """Embeddings -> the probability of one wake word, per new embedding."""

    def __init__(self, name: str, path: Path, threshold: float, *, threads: int = 1,
                 xnnpack: bool = True) -> None:
        self.name = name
        self.threshold = threshold
        self.model = Interpreter(path, threads=threads, xnnpack=xnnpack)
        if len(self.model.input_shape) != 3 or self.model.input_shape[2] != EMB_FEATURES:
            self.model.close()
            raise ModelError(f"{path} is not an openWakeWord classifier (input "
                             f"{self.model.input_shape}, expected (1, N, {EMB_FEATURES}))")
        self.windows = self.model.input_shape[1]
        self.reset()

    def reset(self) -> None:
        self.pending = np.zeros((0, EMB_FEATURES), np.float32)  # not yet consumed

    def process(self, embedding: np.ndarray) -> list[float]:
        self.pending = np.concatenate((self.pending, embedding.reshape(1, EMB_FEATURES)))
        probs = []
        while self.pending.shape[0] >= self.windows:
            probs.append(float(self.model.run(self.pending[:self.windows])[0]))
            self.pending = self.pending[1:]
        return probs

    def close(self) -> None:
        self.model.close()


class Detector:
    """Frames in, detections out; several models share one feature extractor.

    Build it, `warm_up()` before reporting ready, then call `process(frame)` for
    every 80 ms frame from one thread. `reset()` may be called from any thread: the
    model state is cleared before the next frame (the features are kept, so there
    is no 8 s warm-up again).

    `enabled` (False while muted) and `needed` (False while the conversation would
    ignore a wake word: connecting, the user speaking) may be set from any thread.
    While either is False no model runs at all (unless someone asked for levels,
    which include the scores): on a Pi Zero or under emulation the
    models take most of a core, and the capture thread must keep up with the
    person's speech. The last frames are kept, so when the detector is wanted again
    it rebuilds its windows from recent audio only (never from audio before the
    pause, which could hold the wake word that started the conversation) and scores
    from then on as if it had never stopped.
    """

    def __init__(self, models: Sequence[tuple[str, Path, float]], *,
                 refractory_seconds: float = 2.0, trigger_level: int = 1,
                 threads: int = 1, xnnpack: bool = True) -> None:
        self.features = Features(threads=threads, xnnpack=xnnpack)
        self.classifiers = [Classifier(name, path, threshold, threads=threads,
                                       xnnpack=xnnpack) for name, path, threshold in models]
        self.refractory_frames = round(refractory_seconds * RATE / CHUNK)
        self.trigger_level = trigger_level
        self.frame = -1
        self._last_detection = -(10**9)
        self._above = dict.fromkeys((c.name for c in self.classifiers), 0)
        self._reset = threading.Event()
        self.enabled = True
        self.needed = True
        # Frames to refill every window: the embedding's mel window (76 rows, 8 per
        # frame), the longest classifier's embeddings, and the audio overlap.
        refill = -(-EMB_WINDOW // (CHUNK // 160)) + max(
            (c.windows for c in self.classifiers), default=1) + 2
        self._skipped: deque[bytes] = deque(maxlen=refill)
        self._gap = 0  # frames skipped since the models last ran
        self.scores: dict[str, float] = {}  # each model's latest score
        # A levels.Meter while someone asks for levels (check, the control socket),
        # fed from process(); whoever attached it takes it off again.
        self.meter: Meter | None = None

    @classmethod
    def from_config(cls, config: WakeWordConfig, path: str = "<config>",
                    **kw: object) -> Detector:
        """Load the configured models; a file TFLite cannot use is a ConfigError."""
        specs = [(model_id(m), model_path(m),
                  config.model_thresholds.get(model_id(m), config.threshold))
                 for m in config.models]
        try:
            return cls(specs, refractory_seconds=config.refractory_seconds,
                       trigger_level=config.trigger_level, **kw)  # type: ignore[arg-type]
        except ModelError as e:
            raise ConfigError(path, "wake_word.models", f"{e} (built-in models: "
                              + ", ".join(BUILTIN_WAKE_WORDS) + ")") from None

    def warm_up(self) -> None:
        """Run the feature extractor's 8 s autofill now, not on the first live frame."""
        self.features.process(np.zeros(CHUNK, np.float32))
        for c in self.classifiers:
            c.reset()
        self.frame = -1

    def reset(self) -> None:
        self._reset.set()

    def process(self, frame: bytes) -> Detection | None:
        """One 80 ms frame of 16 kHz s16le mono -> a detection or None."""
        self.frame += 1
        if not (self.enabled and self.needed) and self.meter is None:
            self._skipped.append(frame)
            self._gap += 1
            return None
        if self._gap:
            self._catch_up()
        if self._reset.is_set():
            self._reset.clear()
            for c in self.classifiers:
                c.reset()
            self._above = dict.fromkeys(self._above, 0)
        meter = self.meter
        samples = _samples(frame)
        scores: dict[str, list[float]] = {}
        best: Detection | None = None
        for c, p in self._scores(samples):
            if meter is not None:
                scores.setdefault(c.name, []).append(p)
            hit = self._judge(c, p)
            if hit and (best is None or hit.score > best.score):
                best = hit
        if meter is not None:
            meter.add(samples, scores)  # a meter that is done ignores it
        if best is None or not self.enabled:
            return None
        self._last_detection = self.frame
        for c in self.classifiers:
            c.reset()  # the wake word's own tail must not trigger again
        log.info("wake word %s heard (score %.3f) at %.2f s", best.model, best.score,
                 best.seconds, extra=logmod.fields(event="wake"))
        return best

    def _scores(self, samples: np.ndarray) -> list[tuple[Classifier, float]]:
        out = [(c, p) for emb in self.features.process(samples)
               for c in self.classifiers for p in c.process(emb)]
        for c, p in out:
            self.scores[c.name] = p
        return out

    def _catch_up(self) -> None:
        """Refill the windows from the frames kept while the models were not run."""
        if self._gap > len(self._skipped):
            # What is buffered is from before the pause: it may hold the wake word
            # that started this conversation. (A shorter pause is all kept: the frames
            # below continue the windows exactly.)
            self.features.restart()
            for c in self.classifiers:
                c.reset()
        self._above = dict.fromkeys(self._above, 0)
        self._reset.clear()
        log.debug("wake word resumed after %.1f s; refilling from the last %.1f s",
                  self._gap * CHUNK / RATE, len(self._skipped) * CHUNK / RATE)
        for f in self._skipped:
            self._scores(_samples(f))  # what was said while not listening is not judged
        self._skipped.clear()
        self._gap = 0

    def _judge(self, c: Classifier, p: float) -> Detection | None:
        if p < c.threshold:
            if p >= c.threshold / 2:
                log.debug("near miss: %s scored %.3f (threshold %.2f) at frame %d",
                          c.name, p, c.threshold, self.frame)
            self._above[c.name] = 0
            return None
        self._above[c.name] += 1
        if self._above[c.name] < self.trigger_level:
            return None
        if self.frame - self._last_detection < self.refractory_frames:
            return None
        return Detection(c.name, p, self.frame)

    def close(self) -> None:
        self.features.close()
        for c in self.classifiers:
            c.close()
