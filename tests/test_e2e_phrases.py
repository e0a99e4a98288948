"""Fail fast, in words: real connection failures through `speakerd run` (see test_e2e.py),
timed from the wake word in the clip to the first sample of the spoken phrase at the
speaker sink's monitor, and the log line that names the cause."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
import wave
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import soxr

from speakerd.audio.cues import make_cues

from . import test_e2e
from .realtime_server import RealtimeServer, Reply
from .speech import RATE as MIC_RATE
from .speech import speak
from .test_e2e import KEY, Speaker, request, tone_blocks

prerequisites = test_e2e.prerequisites  # the fixture, for the tests of this module

SPK_RATE = 24000
# The wake cue marks when speakerd heard the wake word; this covers the detection
# itself (a frame or two of 80 ms after the word, more on these shared, busy cores) and
# PulseAudio's buffers. (paplay's start-up, up to a second here, is not speakerd's.)
TOLERANCE = 0.5
TEXTS = {  # config.PhrasesConfig's defaults, written out: a change there must show here
    "unreachable": "Sorry, I can't reach the internet right now.",
    "key_refused": "Sorry, the assistant service refused my key.",
    "quota": "Sorry, the assistant service is out of credit or too busy right now.",
    "failed": "Sorry, something went wrong with the assistant service.",
}


def espeak_pcm(text: str, tmp: Path) -> np.ndarray:
    """The phrase as espeak-ng says it, at the speaker's 24 kHz, float64 in s16 units."""
    path = tmp / "phrase.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(path), text], check=True,
                   capture_output=True)
    with wave.open(str(path)) as w:
        x = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768
        rate = w.getframerate()
    return soxr.resample(x, rate, SPK_RATE).astype(np.float64) * 32768


def find(recording: np.ndarray, template: np.ndarray) -> tuple[int, float]:
    """(offset, normalised correlation) of the best match of template in recording."""
    n = 1 << int(np.ceil(np.log2(recording.size + template.size)))
    corr = np.fft.irfft(np.fft.rfft(recording, n) * np.conj(np.fft.rfft(template, n)), n)
    corr = corr[:recording.size - template.size + 1]
    sums = np.concatenate(([0.0], np.cumsum(recording**2)))
    energy = sums[template.size:] - sums[:-template.size]  # of each window, in O(n)
    score = corr / np.sqrt(np.maximum(energy, 1e-9) * np.sum(template**2))
    at = int(np.argmax(score))
    return at, float(score[at])


@contextmanager
def port(listen: bool) -> Iterator[socket.socket]:
    """A socket on a loopback port where nothing listens (refused), or where the kernel
    accepts TCP connections that nobody ever answers (listen=True)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        if listen:
            s.listen()
        yield s


async def heard_phrase(pulse, start: int, phrase: np.ndarray
                       ) -> tuple[np.ndarray, int, float]:
    """Wait until `phrase` has reached the speaker after sample `start`: (what the
    speaker played since, where the phrase begins in it, its correlation with phrase)."""
    template = phrase[:SPK_RATE // 2]
    deadline = time.monotonic() + 30
    while True:  # until the whole phrase has reached the monitor
        x = np.frombuffer(pulse.speaker_bytes()[start * 2:], "<i2").astype(np.float64)
        if x.size > template.size:
            at, score = find(x, template)
            if score > 0.9 and x.size >= at + phrase.size:
                break
        assert time.monotonic() < deadline, "the phrase never reached the speaker"
        await asyncio.sleep(0.2)
    heard = x[at:at + phrase.size]
    whole = float(np.dot(heard, phrase) / np.sqrt(np.dot(heard, heard) * np.dot(phrase, phrase)))
    return x, at, whole


async def told(spk: Speaker, pulse, tmp: Path, situation: str
               ) -> tuple[float, float, float]:
    """Say the request; (seconds from the wake cue, which speakerd plays the moment it
    hears the wake word, to the first sample of the phrase, both at the speaker sink's
    monitor; the same from the end of the wake word in the clip, which includes paplay's
    start-up; the phrase's correlation with espeak-ng's rendering)."""
    phrase = espeak_pcm(TEXTS[situation], tmp)
    wake = speak("hey jarvis", "en-gb")
    voiced = np.flatnonzero(np.abs(wake) > 0.01)  # espeak-ng pads its clips with silence
    wake_end = 0.5 + (voiced[-1] + 1) / MIC_RATE  # see request()
    start = len(pulse.speaker_bytes()) // 2
    spk.say(request("what time is it"), "ask")
    await spk.wait_log(f"saying the {situation} phrase (espeak-ng", timeout=30)
    x, at, whole = await heard_phrase(pulse, start, phrase)
    cue, score = find(x[:at], np.frombuffer(make_cues()["wake"], "<i2").astype(np.float64))
    assert score > 0.9, ("no wake cue before the phrase", score)
    return (at - cue) / SPK_RATE, at / SPK_RATE - wake_end, whole


CASES = [
    # (id, url maker, situation, bound in s, what the log says)
    ("dns-invalid", lambda srv, p: "wss://realtime.speakerd.invalid/v1/realtime",
     "unreachable", 3.0, "cannot reach realtime.speakerd.invalid: name resolution failed"),
    ("refused", lambda srv, p: f"ws://127.0.0.1:{p}/v1/realtime", "unreachable", 3.0,
     "cannot reach 127.0.0.1: connection refused"),
    ("http-401", lambda srv, p: srv.url, "key_refused", 3.0,
     "the API key was refused (HTTP 401)"),
    ("http-429", lambda srv, p: srv.url, "quota", 3.0,
     "out of quota or rate-limited (HTTP 429)"),
    ("unknown-model-404", lambda srv, p: srv.url, "failed", 3.0,
     "not found (HTTP 404): check realtime.url and realtime.model"),
    ("no-handshake", lambda srv, p: f"ws://127.0.0.1:{p}/v1/realtime", "unreachable", 8.0,
     "the realtime service did not answer within 8 s"),
]
STATUS = {"http-401": 401, "http-429": 429, "unknown-model-404": 404}


@pytest.mark.parametrize(("case", "url", "situation", "bound", "cause"), CASES,
                         ids=[c[0] for c in CASES])
async def test_a_failed_connection_is_told_in_words_within_its_bound(
        tmp_path, prerequisites, case, url, situation, bound, cause) -> None:
    pulse = prerequisites
    server = RealtimeServer(reject_status=STATUS.get(case))
    with port(listen=case == "no-handshake") as sock:
        async with server:
            spk = Speaker(tmp_path, pulse, server, "[cues]\nend = false\n")
            spk.config.write_text(spk.config.read_text().replace(
                server.url, url(server, sock.getsockname()[1])))
            await spk.start()
            try:
                await spk.wait_log("status phrases ready")
                seconds, from_clip, match = await told(spk, pulse, tmp_path, situation)
                await spk.wait_log("error -> idle: error shown")
                if case == "refused":  # the service comes back: the background retry says so
                    sock.listen()
                    await spk.wait_log("the realtime service at 127.0.0.1 answers again",
                                       timeout=30)
            finally:
                assert spk.stop() == 0
    print(f"\n{case}: the {situation} phrase began {seconds:.2f} s after the wake cue, "
          f"{from_clip:.2f} s after the end of the wake word in the clip (bound {bound:g} s); "
          f"correlation with espeak-ng's rendering {match:.4f}")
    log = spk.log
    assert seconds <= bound + TOLERANCE, (seconds, log[-3000:])
    if bound > 3:  # a slow network is given its time before the person is told
        assert seconds >= bound - TOLERANCE, seconds
    assert match > 0.99  # the phrase itself was played, whole, not the earcon
    assert cause in log, log[-3000:]
    assert "connecting -> error: " in log
    assert len(server.handshakes) <= 1  # no retries in front of the person
    assert KEY not in log
    if case == "no-handshake":  # what was said while it waited went nowhere
        assert "of what was said after the wake word: the session never came up" in log


async def test_a_service_gone_mid_answer_says_so_after_what_came(tmp_path, prerequisites):
    pulse = prerequisites
    phrase = espeak_pcm(TEXTS["failed"], tmp_path)
    server = RealtimeServer(vad=True, replies=[Reply(audio_ms=4000, drop_after_ms=1000)])
    async with server:
        spk = Speaker(tmp_path, pulse, server)
        await spk.start()
        try:
            await spk.wait_log("status phrases ready")
            start = len(pulse.speaker_bytes()) // 2
            spk.say(request("what is the weather today"), "ask")
            await spk.wait_log("saying the failed phrase (espeak-ng", timeout=60)
            x, at, match = await heard_phrase(pulse, start, phrase)
        finally:
            assert spk.stop() == 0
    log = spk.log
    assert log.index("audio_playing -> idle: conversation over: connection lost") \
        < log.index("saying the failed phrase")
    assert match > 0.99
    assert tone_blocks(x[:at]) >= 9  # the second of answer that came was played first
