"""Spoken status phrases: the words for what went wrong, as 24 kHz s16 mono PCM.

The voice, best first: the assistant's own (a model-voice recording kept in the
state directory, see speakerd/phrase_cache.py, recorded by asking the model to say
each phrase once, out of band, right after a conversation's session is up), else
espeak-ng rendered once at start-up into memory, else nothing (the caller plays the
error earcon).
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import shutil
import wave
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import soxr

from speakerd.audio.resample import float_to_s16
from speakerd.config import PhrasesConfig
from speakerd.phrase_cache import PhraseCache
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


def _words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


@dataclass
class _Recording:
    situation: str
    text: str
    pcm: bytearray = field(default_factory=bytearray)
    transcript: str = ""


class Phrases:
    """The phrases to say. `await render()` once at start-up; then `pcm(situation)`.

    With a `cache` (the state directory), the assistant's own `voice` is preferred:
    `load_cached()` at start-up; `ask()` when a conversation's session is up gives the
    out-of-band response.create for one phrase not yet recorded (each phrase and voice
    is asked for at most once per run), and `take(event)` claims that response's
    events, which are not the conversation's, and stores the recording when it is done.
    """

    def __init__(self, config: PhrasesConfig, cache: PhraseCache | None = None,
                 voice: str = "") -> None:
        self.config = config
        self.texts = texts(config)
        self.cache = cache
        self.voice = voice
        self.espeak: dict[str, bytes] = {}  # situation -> PCM, for the current texts
        self.model_voice: dict[str, bytes] = {}  # situation -> PCM in the assistant's voice
        self._asked: set[tuple[str, str]] = set()  # (voice, text) asked for in this run
        self._recordings: dict[str, _Recording] = {}  # response id -> what is coming

    # --- the assistant's voice ------------------------------------------------------

    def load_cached(self) -> None:
        """Read the recordings of the current phrases in the current voice, if any."""
        if self.cache is None:
            return
        for situation, text in self.texts.items():
            pcm = self.cache.load(self.voice, text)
            if pcm is not None:
                self.model_voice[situation] = pcm
        if self.model_voice:
            log.info("status phrases in the assistant's voice (%s): %s", self.voice,
                     ", ".join(self.model_voice))

    def ask(self) -> dict[str, Any] | None:
        """The response.create that records one missing phrase, or None: nothing to ask."""
        if self.cache is None:
            return None
        for situation, text in self.texts.items():
            if situation in self.model_voice or (self.voice, text) in self._asked:
                continue
            self._asked.add((self.voice, text))
            log.info("asking the model to say the %s phrase in voice %s, to keep it",
                     situation, self.voice)
            return protocol.phrase_response(text, self.voice, situation)
        return None

    def take(self, event: object) -> bool:
        """True when `event` belongs to a phrase recording (the caller then drops it)."""
        if isinstance(event, protocol.ResponseCreated) and event.phrase:
            text = self.texts.get(event.phrase)
            if text is not None:
                self._recordings[event.response_id] = _Recording(event.phrase, text)
            return True
        rec = self._recordings.get(getattr(event, "response_id", None) or "")
        if rec is None:
            return False
        if isinstance(event, protocol.AudioDelta):
            rec.pcm += event.pcm
        elif isinstance(event, protocol.TranscriptDone):
            rec.transcript = event.transcript
        elif isinstance(event, protocol.ResponseDone):
            del self._recordings[event.response_id]
            self._keep(rec, event.status)
        return True

    def forget_recordings(self) -> None:
        """The socket is gone: recordings under way will not finish."""
        self._recordings.clear()

    def _keep(self, rec: _Recording, status: str) -> None:
        if status != "completed" or not rec.pcm:
            log.warning("the model's recording of the %s phrase ended %s with %d ms of "
                        "audio; not kept", rec.situation, status,
                        len(rec.pcm) // protocol.BYTES_PER_MS)
            return
        if _words(rec.transcript) != _words(rec.text):
            log.warning("the model did not say the %s phrase verbatim (it said %r); not "
                        "kept", rec.situation, rec.transcript)
            return
        pcm = bytes(rec.pcm)
        self.model_voice[rec.situation] = pcm
        assert self.cache is not None
        try:
            path = self.cache.store(self.voice, rec.text, pcm)
        except OSError as e:
            log.warning("could not keep the %s phrase in %s: %s; it is used until "
                        "speakerd stops", rec.situation, self.cache.directory, e)
            return
        log.info("recorded the %s phrase in the assistant's voice (%s, %.1f s) in %s",
                 rec.situation, self.voice, len(pcm) / protocol.BYTES_PER_MS / 1000, path)

    # --- espeak-ng ----------------------------------------------------------------------

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
