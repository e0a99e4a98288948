"""Short earcons (wake, end, error, timer), synthesised once at start-up as 24 kHz s16 mono."""

from __future__ import annotations

import numpy as np

from speakerd.audio.resample import float_to_s16

RATE = 24000


def _tone(freq: float, ms: int, level: float = 0.3) -> np.ndarray:
    n = RATE * ms // 1000
    t = np.arange(n, dtype=np.float32) / RATE
    # 5 ms raised-cosine edges: a bare sine edge clicks on every speaker.
    fade = min(n // 2, RATE * 5 // 1000)
    env = np.ones(n, dtype=np.float32)
    ramp = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, fade, dtype=np.float32))
    env[:fade], env[n - fade:] = ramp, ramp[::-1]
    return (level * env * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _gap(ms: int) -> np.ndarray:
    return np.zeros(RATE * ms // 1000, dtype=np.float32)


def _join(*parts: np.ndarray) -> bytes:
    return float_to_s16(np.concatenate(parts))


def make_cues() -> dict[str, bytes]:
    """name -> PCM. Rising for "I'm listening", falling for "done", low for trouble."""
    return {
        "wake": _join(_tone(660, 70), _gap(20), _tone(880, 90)),
        "end": _join(_tone(880, 70), _gap(20), _tone(587, 110)),
        "error": _join(_tone(220, 160, 0.35), _gap(60), _tone(196, 220, 0.35)),
        "timer": _join(*[p for _ in range(3) for p in (_tone(988, 120), _gap(120))]),
        "check": _join(_tone(523, 400)),  # speakerd check's speaker test
    }
