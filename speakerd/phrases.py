"""Spoken status phrases: the words for what went wrong, as 24 kHz s16 mono PCM.

The voice, best first: the assistant's own (a model-voice recording kept in the
state directory, see speakerd/phrase_cache.py), else espeak-ng rendered once at
start-up into memory, else nothing (the caller plays the error earcon).
"""

from __future__ import annotations

import asyncio
import io
import logging
import shutil
import wave

import numpy as np
import soxr

from speakerd.audio.resample import float_to_s16
from speakerd.config import PhrasesConfig
from speakerd.realtime import protocol

log = logging.getLogger(__name__)

RATE = protocol.SAMPLE_RATE
ESPEAK = "espeak-ng"


def texts(config: PhrasesConfig) -> dict[str, str]:
    """situation -> the words to say; situations configured to "" are left out."""
    if not config.enabled:
        return {}
    return {s: getattr(config, s) for s in protocol.SITUATIONS if getattr(config, s).strip()}


def wav_to_pcm(data: bytes) -> bytes:
    """A mono s16 WAV at any rate (espeak-ng's is 22050 Hz) -> 24 kHz s16 mono."""
    with wave.open(io.BytesIO(data)) as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise ValueError(f"expected mono 16-bit audio, got {w.getnchannels()} channel(s) "
                             f"of {w.getsampwidth() * 8} bits")
        rate = w.getframerate()
        x = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768
    if rate != RATE:
        x = soxr.resample(x, rate, RATE).astype(np.float32)
    return float_to_s16(x)


async def espeak(text: str, voice: str, timeout: float = 20.0) -> bytes:
    """`text` said by espeak-ng, as 24 kHz s16 mono. Raises OSError/ValueError on failure."""
    proc = await asyncio.create_subprocess_exec(
        ESPEAK, "-v", voice, "--stdout", "--", text, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    if proc.returncode != 0:
        why = err.decode(errors="replace").strip().splitlines()
        raise ValueError(f"exit status {proc.returncode}: {why[-1] if why else 'no message'}")
    try:
        return wav_to_pcm(out)
    except (wave.Error, EOFError) as e:
        raise ValueError(f"not a WAV file: {e}") from None


class Phrases:
    """The phrases to say. `await render()` once at start-up; then `pcm(situation)`."""

    def __init__(self, config: PhrasesConfig) -> None:
        self.config = config
        self.texts = texts(config)
        self.espeak: dict[str, bytes] = {}  # situation -> PCM, for the current texts
        self.model_voice: dict[str, bytes] = {}  # situation -> PCM in the assistant's voice

    async def render(self) -> None:
        """Render every phrase with espeak-ng into memory; a failure is logged, not raised."""
        if not self.texts:
            return
        if shutil.which(ESPEAK) is None:
            log.warning("espeak-ng is not installed: status phrases fall back to the error "
                        "earcon until the assistant's voice has said them once "
                        "(sudo apt install espeak-ng)")
            return
        for situation, text in self.texts.items():
            try:
                self.espeak[situation] = await espeak(text, self.config.espeak_voice)
            except (OSError, ValueError, TimeoutError) as e:
                log.warning("espeak-ng could not say the %s phrase (phrases.%s, voice %r): "
                            "%s; the error earcon stands in for it", situation, situation,
                            self.config.espeak_voice, e)
        if self.espeak:
            log.info("status phrases ready (espeak-ng voice %s): %s",
                     self.config.espeak_voice, ", ".join(self.espeak))

    def pcm(self, situation: str) -> tuple[bytes, str] | None:
        """(PCM, which voice) for `situation`, or None: nothing to say it with."""
        if situation not in self.texts:
            return None
        if situation in self.model_voice:
            return self.model_voice[situation], "model voice"
        if situation in self.espeak:
            return self.espeak[situation], "espeak-ng"
        return None
