"""A simulated room for `speakerd run`: the speaker's sound returns to the microphone.

PulseAudio's module-loopback copies the `spk` sink's monitor into the `mic` sink with
a latency and a gain, so the daemon's microphone hears its own answer the way a room
returns it, on top of whatever a test plays into `mic` as the user's voice. Its
adaptive resampling is off (adjust_time=0): a room's delay stays put, while the
loopback would otherwise wander by milliseconds to hold its latency, which no
microphone and speaker on one Pi do. The delay changes when the room does
(Loopback.change).
"""

from __future__ import annotations

import base64
import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soxr

from .audio_devices import Pulse
from .realtime_server import RealtimeServer
from .speech import speak

ANSWER_TEXTS = [
    "The weather tomorrow will be sunny in the morning, with clouds coming in from the "
    "west after lunch and a high of twenty two degrees.",
    "Your pasta timer is set for eleven minutes. I will ring when it is done, so you can "
    "get on with the sauce in the meantime.",
    "Canberra is the capital of Australia, not Sydney, which is the largest city. It was "
    "chosen as a compromise between Sydney and Melbourne.",
    "Here is a short story. A cat who lived above a music shop learned to play the piano "
    "in the evenings, and the whole street came to listen.",
]
ANSWER_PEAK = 0.5


VOICES = ["en-us+f3", "en-gb+m3", "en-us+f5", "en-gb-x-rp+f2", "en-us+m1"]


def answer_pcm(i: int) -> tuple[bytes, float]:
    """The model's i-th spoken answer: 24 kHz s16le espeak-ng speech (6-10 s, in turn
    one of the texts, voices and speeds), and its level in dBFS over its voiced
    stretches."""
    x = speak(ANSWER_TEXTS[i % len(ANSWER_TEXTS)], voice=VOICES[i // 4 % len(VOICES)],
              speed=(150, 135, 165)[i // 20 % 3])
    x = soxr.resample(x, 16000, 24000).astype(np.float32)
    x = x / np.abs(x).max() * ANSWER_PEAK
    return (np.clip(np.rint(x * 32768), -32768, 32767).astype("<i2").tobytes(),
            voiced_dbfs(x))


def voiced_dbfs(x: np.ndarray, block: int = 2400) -> float:
    """Power of the blocks within 20 dB of the loudest block: speech, not its pauses."""
    blocks = [float(np.mean(np.square(x[i:i + block], dtype=np.float64)))
              for i in range(0, x.size - block + 1, block)]
    top = max(blocks)
    loud = [b for b in blocks if b > top / 100]
    return 10 * np.log10(np.mean(loud))


class Loopback:
    """module-loopback spk.monitor -> mic, `latency_ms` late, `gain_db` quieter."""

    def __init__(self, pulse: Pulse, *, latency_ms: int = 60, gain_db: float = -6.0) -> None:
        self.pulse = pulse
        self.latency_ms = latency_ms
        self.gain_db = gain_db
        self.module: str | None = None

    def _pactl(self, *args: str) -> str:
        return subprocess.run(["pactl", *args], env=self.pulse.env, check=True,
                              capture_output=True, text=True, timeout=20).stdout

    def load(self) -> None:
        self.module = self._pactl(
            "load-module", "module-loopback", "source=spk.monitor", "sink=mic",
            f"latency_msec={self.latency_ms}", "adjust_time=0", "source_dont_move=true",
            "sink_dont_move=true").strip()
        for line in self._pactl("list", "short", "sink-inputs").splitlines():
            fields = line.split("\t")
            if "module-loopback" in line:
                self._pactl("set-sink-input-volume", fields[0], f"{self.gain_db:.1f}dB")
                return
        raise RuntimeError("module-loopback made no sink input")

    def unload(self) -> None:
        if self.module is not None:
            self._pactl("unload-module", self.module)
            self.module = None

    def change(self, *, latency_ms: int | None = None, gain_db: float | None = None) -> None:
        """A different room: reload with a new delay or gain."""
        self.unload()
        if latency_ms is not None:
            self.latency_ms = latency_ms
        if gain_db is not None:
            self.gain_db = gain_db
        self.load()

    def __enter__(self) -> Loopback:
        self.load()
        return self

    def __exit__(self, *exc: object) -> None:
        self.unload()


def user_wav(path: Path, text: str, level_dbfs: float, lead_s: float = 0.0) -> tuple[Path, float]:
    """The user's sentence at `level_dbfs` (voiced power) as a 16 kHz wav, after
    `lead_s` of silence; -> (path, seconds from the file's start to the first voice)."""
    from .speech import silence, write_wav
    x = speak(text)
    x = x * 10 ** ((level_dbfs - voiced_dbfs(x, 1600)) / 20)
    x = np.concatenate([silence(lead_s), x.astype(np.float32), silence(0.5)])
    onset = int(np.argmax(np.abs(x) > 10 ** ((level_dbfs - 20) / 20))) / 16000
    return write_wav(path, x), onset


class Monitor:
    """parec on spk.monitor: the arrival time and level of every 10 ms the speaker played."""

    def __init__(self, pulse: Pulse) -> None:
        import threading
        import time
        self._time = time.monotonic
        self.blocks: list[tuple[float, float]] = []  # (arrival, rms of s16)
        self.proc = subprocess.Popen(
            ["parec", "-d", "spk.monitor", "--raw", "--format=s16le", "--rate=24000",
             "--channels=1", "--latency-msec=5"], env=pulse.env, stdout=subprocess.PIPE)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while block := self.proc.stdout.read(480):
            x = np.frombuffer(block, "<i2").astype(np.float64)
            self.blocks.append((self._time(), float(np.sqrt(np.mean(x ** 2)))))

    def loud_spans(self, quiet_s: float = 0.6, level: float = 300.0) -> list[tuple[float, float]]:
        """(start, end) of each stretch of sound with no quiet gap of `quiet_s` in it."""
        spans: list[list[float]] = []
        for at, rms in list(self.blocks):
            if rms < level:
                continue
            if spans and at - spans[-1][1] < quiet_s:
                spans[-1][1] = at
            else:
                spans.append([at, at])
        return [(a, b) for a, b in spans]

    def silent_by(self, flushed: float, level: float = 300.0, within: float = 0.5
                  ) -> float | None:
        """When the speaker fell silent for a flush around `flushed` (the truncate's
        arrival): just after the last loud 10 ms before `flushed + within`, which is
        sooner than any next answer could start."""
        loud = [at for at, rms in list(self.blocks) if rms >= level and at < flushed + within]
        return loud[-1] + 0.01 if loud else None

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)


@contextlib.contextmanager
def a_core_burning() -> Iterator[None]:
    """A second process spinning on one core while the rig runs, as CI runs beside
    other work."""
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        burner.kill()
        burner.wait()


def appended(server: RealtimeServer, start: float, end: float) -> np.ndarray:
    """What the daemon appended that reached the server between two times (24 kHz)."""
    parts = [np.frombuffer(base64.b64decode(r.event["audio"]), "<i2")
             for r in server.received if r.type == "input_audio_buffer.append"
             and start <= r.at <= end]
    return (np.concatenate(parts).astype(np.float64) / 32768 if parts
            else np.zeros(0))
