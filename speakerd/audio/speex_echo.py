"""speexdsp's echo canceller, through ctypes: a linear adaptive filter and nothing more.

speakerd sends the server AEC3's output (echo.py), which is clean but, while the
answer plays, holds back everything it cannot tell from echo: a person talking over
the answer comes through only in the answer's pauses, a second or more late. Speex's
filter (MDF) only subtracts the echo it predicts from the reference, so a voice over
the echo is left whole beside a residual; the barge-in detector listens to that.

libspeexdsp1 is in Debian and Raspberry Pi OS (PulseAudio and alsa-plugins use it);
install.sh installs it. Nothing on PyPI wraps its echo canceller for current Pythons.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import numpy as np

_SET_SAMPLING_RATE = 24  # SPEEX_ECHO_SET_SAMPLING_RATE in speex_echo.h


class SpeexUnavailable(RuntimeError):
    """libspeexdsp is not installed."""


@functools.cache
def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("speexdsp") or "libspeexdsp.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError as e:
        raise SpeexUnavailable(f"libspeexdsp is not installed ({e}); "
                               "apt install libspeexdsp1") from e
    lib.speex_echo_state_init.restype = ctypes.c_void_p
    lib.speex_echo_state_init.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.speex_echo_cancellation.restype = None
    lib.speex_echo_cancellation.argtypes = [ctypes.c_void_p] * 4
    lib.speex_echo_ctl.restype = ctypes.c_int
    lib.speex_echo_ctl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    lib.speex_echo_state_destroy.restype = None
    lib.speex_echo_state_destroy.argtypes = [ctypes.c_void_p]
    return lib


def available() -> bool:
    try:
        _lib()
    except SpeexUnavailable:
        return False
    return True


class LinearEcho:
    """`process(mic, ref)` -> mic minus the echo the filter predicts from ref (float32
    mono, same length, a multiple of `block` samples). The filter spans `tail`
    samples: the reference must lead the echo by less than that. One thread only."""

    def __init__(self, *, rate: int = 16000, block: int = 160, tail: int = 3200) -> None:
        self.block = block
        self._rate = rate
        self._tail = tail
        self._lib = _lib()
        self._state = self._lib.speex_echo_state_init(block, tail)
        if not self._state:
            raise SpeexUnavailable("speex_echo_state_init failed")
        r = ctypes.c_int(rate)
        self._lib.speex_echo_ctl(self._state, _SET_SAMPLING_RATE, ctypes.byref(r))

    def process(self, mic: np.ndarray, ref: np.ndarray) -> np.ndarray:
        if mic.size != ref.size or mic.size % self.block:
            raise ValueError(f"{mic.size} and {ref.size} samples: need equal multiples "
                             f"of {self.block}")
        near = _s16(mic)
        far = _s16(ref)
        out = np.empty_like(near)
        step = self.block * 2  # bytes
        base = (near.ctypes.data, far.ctypes.data, out.ctypes.data)
        for i in range(0, near.size * 2, step):
            self._lib.speex_echo_cancellation(self._state, base[0] + i, base[1] + i,
                                              base[2] + i)
        return out.astype(np.float32) / 32768

    def passthrough(self, length: int = 512) -> np.ndarray:
        """What the filter hands through untouched besides removing echo: speex takes a
        DC notch of the microphone before it subtracts its estimate, so `mic - output`
        is its estimate plus this filter of the microphone (a leaky integral of it, from
        which two taps rebuild the microphone exactly). The impulse response, measured
        on a fresh filter with nothing played."""
        return _passthrough(self._rate, self.block, self._tail, length)

    def close(self) -> None:
        if self._state:
            self._lib.speex_echo_state_destroy(self._state)
            self._state = None

    def __del__(self) -> None:
        self.close()


def _s16(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.clip(np.rint(x * 32768), -32768, 32767).astype(np.int16))


@functools.cache
def _passthrough(rate: int, block: int, tail: int, length: int) -> np.ndarray:
    n = -(-length // block) * block
    impulse = np.zeros(n, np.float32)
    impulse[0] = 0.5
    probe = LinearEcho(rate=rate, block=block, tail=tail)
    try:
        out = probe.process(impulse, np.zeros(n, np.float32))
    finally:
        probe.close()
    return ((impulse - out) * 2)[:length].astype(np.float64)
