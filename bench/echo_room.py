"""Echo cancellation and voice barge-in through `speakerd run` in a simulated room.

The speaker's sound returns to the microphone through a PulseAudio loopback (60 ms
late, 6 dB down; tests/room.py), the model's answers are espeak-ng speech, and the
fixture server records every byte of audio the daemon appends. A few trials here;
bench/echo.py runs the 20-trial figures.

Not in the test suite: voice barge-in is opt-in because it does not yet meet its
goals, and these checks fail about one run in three (a false barge-in, 26.7 dB on
an answer). Run them with

    PYTHONPATH=. .venv/bin/pytest -p tests.conftest bench/echo_room.py -s
"""

from __future__ import annotations

import base64
import random
import subprocess
import time

import numpy as np
import pytest

from speakerd.audio.echo import dbfs
from tests.conftest import need
from tests.realtime_server import RealtimeServer, Reply
from tests.room import Loopback, Monitor, answer_pcm, user_wav
from tests.speech import have_espeak, silence, speak
from tests.test_e2e import Speaker, request

VOICE = ("[conversation]\nbarge_in = 'voice'\nfollow_up_seconds = 6\n"
         "[log]\nlevel = 'debug'\n")


def voice_speaker(tmp_path, pulse, server: RealtimeServer) -> Speaker:
    spk = Speaker(tmp_path, pulse, server, VOICE)
    spk.config.write_text(spk.config.read_text().replace(
        "[audio]\n", "[audio]\necho_cancellation = 'software'\n", 1))
    return spk
FOLLOW_UPS = ["and what about the weekend", "tell me more about that",
              "and after that"]


@pytest.fixture
def room(pulse):
    need(have_espeak(), "espeak-ng")
    with Loopback(pulse, latency_ms=60, gain_db=-6.0) as loop:
        yield loop


def appended(server: RealtimeServer, start: float, end: float) -> np.ndarray:
    """What the daemon appended that reached the server between two times (24 kHz)."""
    parts = [np.frombuffer(base64.b64decode(r.event["audio"]), "<i2")
             for r in server.received if r.type == "input_audio_buffer.append"
             and start <= r.at <= end]
    return (np.concatenate(parts).astype(np.float64) / 32768 if parts
            else np.zeros(0))


def pcm_dbfs(pcm: bytes) -> float:
    return dbfs(np.frombuffer(pcm, "<i2").astype(np.float64) / 32768)


def reductions(server: RealtimeServer, monitor: Monitor, answers: list[bytes],
               gain_db: float) -> list[float]:
    """Per answer heard: the echo a mic without cancellation would have sent (the
    answer's power through the loopback's gain) over what reached the server."""
    spans = [s for s in monitor.loud_spans() if s[1] - s[0] > 3.0]
    out = []
    for (a, b), pcm in zip(spans, answers, strict=False):
        # Appends arrive a frame or two after capture: skip the edges.
        got = appended(server, a + 0.4, b - 0.2)
        out.append(pcm_dbfs(pcm) + gain_db - dbfs(got))
    return out


async def test_echo_alone_never_barges_in_and_is_removed(tmp_path, room):
    answers = [answer_pcm(i)[0] for i in range(3)]
    server = RealtimeServer(vad=True, replies=[Reply(pcm=a, speed=20) for a in answers])
    monitor = Monitor(room.pulse)
    async with server:
        spk = voice_speaker(tmp_path, room.pulse, server)
        await spk.start()
        try:
            spk.say(request("what is the weather tomorrow"), "turn0")
            for n, text in enumerate(FOLLOW_UPS[:len(answers) - 1], start=1):
                await spk.wait_log("audio_playing -> listening", count=n, timeout=90)
                spk.say(np.concatenate([speak(text), silence(1.5)]), f"turn{n}")
            await spk.wait_log("audio_playing -> listening", count=len(answers), timeout=90)
        finally:
            assert spk.stop() == 0
            monitor.stop()
    assert server.invalid == []
    figures = reductions(server, monitor, answers, room.gain_db)
    daemon = [line.split("over answer ")[1] for line in spk.log.splitlines()
              if "echo cancellation over answer" in line]
    print("echo reduction on what reached the server, per answer (dB):",
          ", ".join(f"{f:.1f}" for f in figures))
    print("the daemon's own figures:", *daemon, sep="\n  ")
    assert "barge-in by voice" not in spk.log
    assert "cut off after" not in spk.log
    assert len(figures) == len(answers)
    assert min(figures[1:]) >= 30
    assert len(daemon) == len(answers)


async def test_talking_over_the_answer_barges_in(tmp_path, room):
    answers = [answer_pcm(i) for i in range(2)]
    server = RealtimeServer(vad=True, replies=[Reply(pcm=a, speed=20) for a, _ in answers])
    rng = random.Random(17)
    async with server:
        spk = voice_speaker(tmp_path, room.pulse, server)
        await spk.start()
        try:
            spk.say(request("what is the weather tomorrow"), "turn0")
            await spk.wait_log("audio_playing -> listening", timeout=90)  # adapted now
            spk.say(np.concatenate([speak(FOLLOW_UPS[0]), silence(1.5)]), "turn1")
            await spk.wait_log("thinking -> responding", count=2, timeout=60)
            await spk.wait_log("responding -> audio_playing", count=2, timeout=60)
            # The user, 12 dB below the echo, at a random point of the answer.
            echo_level = answers[1][1] + room.gain_db
            wav, onset = user_wav(tmp_path / "over.wav", "no, I meant the weather on Saturday",
                                  echo_level - 12, lead_s=rng.uniform(1.0, 3.0))
            started = time.monotonic()
            player = subprocess.Popen(["paplay", "-d", "mic", str(wav)], env=room.pulse.env)
            await spk.wait_log("barge-in by voice", timeout=30)
            player.wait(30)
            await spk.wait_log("cut off after", timeout=10)
        finally:
            assert spk.stop() == 0
    assert server.invalid == []
    spoke = started + onset
    truncates = server.of_type("conversation.item.truncate")
    assert len(truncates) == 1
    cut = truncates[0].at
    assert cut > spoke  # no barge-in before the user spoke
    print(f"user's speech began {onset:.2f} s into the file; truncate {(cut - spoke) * 1000:.0f}"
          f" ms after it")
    # Cut off, not played out (24 kHz s16: 48 bytes a millisecond). How much of it
    # was heard is checked against the speaker's recording by the wake-word barge-in
    # tests: voice barge-in flushes the same way. Timing it here from the sink's
    # monitor is not reliable: AEC3 lets the user through in bursts, so the cut comes
    # 0.3-5 s after the speech began (bench/echo.py prints the distribution).
    heard_ms = truncates[0].event["audio_end_ms"]
    assert 0 < heard_ms < len(answers[1][0]) / 48 - 500, heard_ms
    assert len(server.of_type("response.cancel")) <= 1
    assert spk.log.count("barge-in by voice") == 1
