"""Sample-format and rate conversion between ALSA devices and speakerd's 16/24 kHz mono s16."""

from __future__ import annotations

from dataclasses import dataclass

import alsaaudio
import numpy as np
import soxr

# ALSA formats speakerd reads and writes, with their numpy dtype and full scale.
FORMATS: dict[str, tuple[int, str, float]] = {
    "S16_LE": (alsaaudio.PCM_FORMAT_S16_LE, "<i2", 32768.0),
    "S32_LE": (alsaaudio.PCM_FORMAT_S32_LE, "<i4", 2147483648.0),
    "FLOAT_LE": (alsaaudio.PCM_FORMAT_FLOAT_LE, "<f4", 1.0),
}
ALSA_TO_NAME = {code: name for name, (code, _, _) in FORMATS.items()}


@dataclass(frozen=True, slots=True)
class DeviceFormat:
    """What the ALSA device was opened with."""

    rate: int
    channels: int
    format: str  # a key of FORMATS

    @property
    def frame_bytes(self) -> int:
        return self.channels * np.dtype(FORMATS[self.format][1]).itemsize


class Resampler:
    """A soxr stream resampler over float32 mono; keeps its state across chunks."""

    def __init__(self, in_rate: int, out_rate: int) -> None:
        self.in_rate = in_rate
        self.out_rate = out_rate
        self._stream = (soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32",
                                            quality="HQ")
                        if in_rate != out_rate else None)

    def __call__(self, samples: np.ndarray, last: bool = False) -> np.ndarray:
        if self._stream is None:
            return samples
        return self._stream.resample_chunk(samples, last=last)


def to_float(raw: bytes, fmt: DeviceFormat, channel: int = 0) -> np.ndarray:
    """Device bytes -> float32 mono in [-1, 1), taking one channel of several."""
    _, dtype, scale = FORMATS[fmt.format]
    data = np.frombuffer(raw, dtype=dtype)
    if fmt.channels > 1:
        data = data.reshape(-1, fmt.channels)[:, channel]
    if scale != 1.0:
        return data.astype(np.float32) / np.float32(scale)
    # A float device can hand over NaN or inf (a glitch, a driver bug); as audio they
    # are silence and full scale, and they must not reach the models or the socket.
    return np.nan_to_num(data.astype(np.float32), nan=0.0, posinf=1.0, neginf=-1.0)


def from_float(samples: np.ndarray, fmt: DeviceFormat) -> bytes:
    """float32 mono -> device bytes, duplicated to every channel, clipped to full scale."""
    _, dtype, scale = FORMATS[fmt.format]
    if scale == 1.0:
        out = np.clip(samples, -1.0, 1.0).astype(dtype)
    else:
        out = np.clip(np.rint(samples.astype(np.float64) * scale), -scale, scale - 1).astype(dtype)
    if fmt.channels > 1:
        out = np.repeat(out, fmt.channels)
    return out.tobytes()


def s16_to_float(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / np.float32(32768.0)


def float_to_s16(samples: np.ndarray) -> bytes:
    return np.clip(np.rint(samples * 32768.0), -32768, 32767).astype("<i2").tobytes()
