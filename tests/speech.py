"""Speech clips made with espeak-ng at test time, as 16 kHz mono float32."""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np
import soxr

RATE = 16000
_DIR = Path(tempfile.mkdtemp(prefix="speakerd-speech-"))


def have_espeak() -> bool:
    return shutil.which("espeak-ng") is not None


@functools.cache
def speak(text: str, voice: str = "en-us", speed: int = 160, pitch: int = 50) -> np.ndarray:
    """`text` as espeak-ng says it, resampled to 16 kHz, float32 in [-1, 1)."""
    path = _DIR / f"{abs(hash((text, voice, speed, pitch)))}.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w",
                    str(path), text], check=True, capture_output=True)
    with wave.open(str(path)) as w:
        rate = w.getframerate()
        x = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768
    return soxr.resample(x, rate, RATE).astype(np.float32)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(RATE * seconds), np.float32)


def to_pcm(x: np.ndarray) -> bytes:
    return np.clip(np.rint(x * 32768), -32768, 32767).astype("<i2").tobytes()


def frames(x: np.ndarray) -> list[bytes]:
    """80 ms frames of s16le, the last partial one dropped."""
    pcm = to_pcm(x)
    return [pcm[i:i + 2560] for i in range(0, len(pcm) - 2559, 2560)]


def write_wav(path: Path, x: np.ndarray, rate: int = RATE) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(to_pcm(x))
    return path
