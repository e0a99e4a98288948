"""Echo cancellation and voice barge-in through `speakerd run` in a simulated room.

The speaker's sound returns to the microphone through a PulseAudio loopback (60 ms
late, 6 dB down; tests/room.py), the model's answers are espeak-ng speech, and the
fixture server records every byte of audio the daemon appends. 20 echo-only answers
and one talk-over here; bench/echo.py runs 200 and 20 of them for the figures.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import time

import numpy as np
import pytest

from bench.echo import echo_only, print_echo_only
from speakerd.audio import speex_echo

from .conftest import need
from .realtime_server import RealtimeServer, Reply
from .room import (
    Loopback,
    a_core_burning,
    answer_pcm,
    appended,
    user_wav,
    voiced_dbfs,
)
from .speech import have_espeak, silence, speak
from .test_e2e import Speaker, request

VOICE = ("[conversation]\nbarge_in = 'voice'\nfollow_up_seconds = 6\n"
         "[log]\nlevel = 'debug'\n")
FOLLOW_UPS = ["and what about the weekend", "tell me more about that"]


def voice_speaker(tmp_path, pulse, server: RealtimeServer) -> Speaker:
    spk = Speaker(tmp_path, pulse, server, VOICE)
    spk.config.write_text(spk.config.read_text().replace(
        "[audio]\n", "[audio]\necho_cancellation = 'software'\n", 1))
    return spk


@pytest.fixture
def room(pulse):
    need(have_espeak(), "espeak-ng")
    need(speex_echo.available(), "libspeexdsp1")
    with Loopback(pulse, latency_ms=60, gain_db=-6.0) as loop:
        yield loop


async def test_echo_alone_never_barges_in_nor_reaches_the_server(tmp_path, room):
    # bench/echo.py's conditions, 20 answers instead of 200: the machine loaded, two
    # starts (each one's first answer), underruns, the room's delay changing.
    began = time.monotonic()
    with a_core_burning():
        got = await echo_only(room.pulse, room, tmp_path, 20, per_start=10)
    print_echo_only(got, time.monotonic() - began)
    assert got.invalid == []
    assert got.answers == 20 and got.starts == 2
    assert got.false == 0
    assert got.cut_off == 0
    # The server never answered its own echo: it heard silence while answers played.
    assert got.answered_over == 0
    assert len(got.silent) == 20 and all(got.silent)
    assert len(got.echo_lines) == 20


async def test_talking_over_the_answer_barges_in_and_the_words_reach_the_server(tmp_path,
                                                                                room):
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
            await spk.wait_log("responding -> audio_playing", count=2, timeout=60)
            # The user, 12 dB below the echo, at a random point of the answer.
            echo_level = answers[1][1] + room.gain_db
            user_level = echo_level - 12
            wav, onset = user_wav(tmp_path / "over.wav", "no, I meant the weather on Saturday",
                                  user_level, lead_s=rng.uniform(1.0, 3.0))
            started = time.monotonic()
            player = subprocess.Popen(["paplay", "-d", "mic", str(wav)], env=room.pulse.env)
            await spk.wait_log("barge-in by voice", timeout=30)
            # Off the loop: the fixture server stamps events as it reads them.
            await asyncio.to_thread(player.wait, 30)
            await spk.wait_log("cut off after", timeout=10)
        finally:
            assert spk.stop() == 0
    assert server.invalid == []
    spoke = started + onset
    truncates = server.of_type("conversation.item.truncate")
    assert len(truncates) == 1
    cut = truncates[0].at
    assert cut > spoke  # no barge-in before the user spoke
    print(f"user's speech began {onset:.2f} s into the file; truncate "
          f"{(cut - spoke) * 1000:.0f} ms after it")
    heard_ms = truncates[0].event["audio_end_ms"]
    assert 0 < heard_ms < len(answers[1][0]) / 48 - 500, heard_ms  # cut off, not played out
    assert len(server.of_type("response.cancel")) <= 1
    assert spk.log.count("barge-in by voice") == 1
    # The words that barged in reached the server: the stream, silent over the answer,
    # opened with the frames held back from before the detector was sure.
    words = voiced_dbfs(appended(server, cut - 0.5, cut + 1.5), block=2400)
    print(f"the server got speech at {words:.1f} dBFS around the barge-in; the user spoke "
          f"at {user_level:.1f} dBFS")
    assert words > user_level - 15  # AEC3 takes a few dB off a voice in the echo's tail
