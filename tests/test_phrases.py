"""Status phrases: which words, rendered by the real espeak-ng, and what stands in."""

from __future__ import annotations

import io
import logging
import wave

import numpy as np

from speakerd import phrases
from speakerd.config import PhrasesConfig
from speakerd.realtime import protocol as p

from .conftest import need
from .speech import have_espeak


def test_every_situation_has_words_by_default_and_empty_ones_are_left_out():
    assert set(phrases.texts(PhrasesConfig())) == set(p.SITUATIONS)
    assert set(phrases.texts(PhrasesConfig(quota="", muted="  "))) == \
        set(p.SITUATIONS) - {p.QUOTA, p.MUTED}
    assert phrases.texts(PhrasesConfig(enabled=False)) == {}


def test_a_22050_hz_wav_becomes_24_khz_s16():
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(22050)
        w.writeframes(b"\x00\x10" * 22050)
    pcm = phrases.wav_to_pcm(buf.getvalue())
    assert abs(len(pcm) // 2 - 24000) <= 2
    x = np.frombuffer(pcm, "<i2")
    assert abs(int(np.median(x)) - 0x1000) <= 2


async def test_espeak_ng_renders_each_phrase_once_into_memory(caplog):
    need(have_espeak(), "espeak-ng")
    store = phrases.Phrases(PhrasesConfig(failed=""))
    with caplog.at_level(logging.INFO, logger="speakerd.phrases"):
        await store.render()
    assert set(store.espeak) == set(p.SITUATIONS) - {p.FAILED}
    pcm, voice = store.pcm(p.UNREACHABLE)
    assert voice == "espeak-ng"
    seconds = len(pcm) / p.BYTES_PER_MS / 1000
    assert 1.0 < seconds < 6.0, seconds  # a sentence, not a click, not silence padding
    assert np.abs(np.frombuffer(pcm, "<i2")).max() > 3000  # audible
    assert store.pcm(p.FAILED) is None  # configured to say nothing: the earcon stands in
    assert "status phrases ready (espeak-ng voice en-us)" in caplog.text


async def test_a_voice_espeak_ng_does_not_know_is_logged_and_left_to_the_earcon(caplog):
    need(have_espeak(), "espeak-ng")
    store = phrases.Phrases(PhrasesConfig(espeak_voice="xx-nonexistent"))
    await store.render()
    assert store.pcm(p.UNREACHABLE) is None
    assert "espeak-ng could not say the unreachable phrase (phrases.unreachable, voice " \
        "'xx-nonexistent')" in caplog.text


async def test_without_espeak_ng_the_earcon_stands_in(monkeypatch, caplog):
    monkeypatch.setenv("PATH", "/nonexistent")
    store = phrases.Phrases(PhrasesConfig())
    await store.render()
    assert store.pcm(p.UNREACHABLE) is None
    assert "espeak-ng is not installed" in caplog.text

