"""Whole conversations through `speakerd run`: real mic and speaker (PulseAudio), real
wake-word models on espeak-ng speech, the fixture server as the model. Assertions
come from the server's record, the speaker's recording and the daemon's log."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from .conftest import ROOT, SPEAKERD, clean_env, need
from .realtime_server import Call, RealtimeServer, Reply
from .speech import have_espeak, silence, speak, write_wav

KEY = "sk-proj-E2EKEY0123456789abcdefghijkl"


class Speaker:
    """`speakerd run` against the fixture server and the PulseAudio devices."""

    def __init__(self, tmp_path: Path, pulse, server: RealtimeServer, extra: str = "") -> None:
        self.tmp = tmp_path
        self.pulse = pulse
        self.config = tmp_path / "speakerd.toml"
        self.config.write_text(
            '[audio]\ncapture_device = "mic"\nplayback_device = "spk"\nplayback_volume = 1.0\n'
            f'[realtime]\nurl = "{server.url}"\n' + extra)
        self.log_path = tmp_path / "speakerd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.speaker_start = 0

    async def start(self) -> None:
        self.speaker_start = len(self.pulse.speaker_bytes())
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen([*SPEAKERD, "run", "--config", str(self.config)],
                                         cwd=ROOT, stderr=log,
                                         env=clean_env(OPENAI_API_KEY=KEY))
        await self.wait_log("started: config")

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    async def wait_log(self, text: str, count: int = 1, timeout: float = 60) -> None:
        """Wait until `text` has appeared `count` times in the log (polled every 50 ms)."""
        deadline = time.monotonic() + timeout
        while self.log.count(text) < count:
            assert self.proc is not None and self.proc.poll() is None, self.log[-3000:]
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} x{count} not logged in {timeout}s:\n"
                                     + self.log[-3000:])
            await asyncio.sleep(0.05)

    def say(self, audio: np.ndarray, name: str) -> subprocess.Popen[bytes]:
        return self.pulse.play_into_mic(write_wav(self.tmp / f"{name}.wav", audio))

    def heard(self) -> np.ndarray:
        data = self.pulse.speaker_bytes()[self.speaker_start:]
        return np.frombuffer(data[:len(data) // 2 * 2], "<i2").astype(np.float64)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def transitions(self) -> list[str]:
        return [line.split(": ", 1)[1].split(":")[0] for line in self.log.splitlines()
                if "speakerd.session: " in line and " -> " in line]


def tone_blocks(x: np.ndarray, freq: float = 440.0, block: int = 2400) -> int:
    """How many 100 ms blocks are dominated by the fixture's reply tone."""
    n = 0
    for i in range(0, x.size - block, block):
        b = x[i:i + block]
        if np.sqrt(np.mean(b**2)) < 1000:
            continue
        spectrum = np.abs(np.fft.rfft(b))
        peak = np.argmax(spectrum) * 24000 / block
        n += abs(peak - freq) < 20
    return n


def request(text: str) -> np.ndarray:
    # People go on right after the wake word; a pause as long as the fixture VAD's
    # 500 ms silence window would commit the wake word's tail as a turn of its own.
    return np.concatenate([silence(0.5), speak("hey jarvis", "en-gb"), silence(0.3),
                           speak(text), silence(2.0)])


@pytest.fixture
def prerequisites(pulse):
    need(have_espeak(), "espeak-ng")
    return pulse


async def test_two_turns_the_second_without_a_wake_word(tmp_path, prerequisites):
    server = RealtimeServer(vad=True, replies=[Reply(audio_ms=1500), Reply(audio_ms=1000)])
    async with server:
        spk = Speaker(tmp_path, prerequisites, server,
                      "[conversation]\nfollow_up_seconds = 5\n[log]\nlevel = 'debug'\n")
        await spk.start()
        try:
            spk.say(request("what is the weather today"), "turn1")
            await spk.wait_log("audio_playing -> listening")
            spk.say(np.concatenate([speak("and tomorrow"), silence(2.0)]), "turn2")
            await spk.wait_log("audio_playing -> listening", count=2)
            await spk.wait_log("listening -> idle: conversation over: no follow-up")
        finally:
            assert spk.stop() == 0
    assert server.invalid == []
    assert len(server.handshakes) == 1  # one socket for both turns
    assert server.handshakes[0][1]["Authorization"] == f"Bearer {KEY}"
    assert len(server.of_type("session.update")) == 1
    turns = [e["type"] for e in server.sent].count("input_audio_buffer.committed")
    assert turns >= 2  # the fixture's energy VAD may split an utterance: a turn per commit
    assert [e["type"] for e in server.sent].count("response.done") == turns
    assert spk.transitions() == [
        "idle -> connecting", "connecting -> listening",
        *["listening -> thinking", "thinking -> responding", "responding -> audio_playing",
          "audio_playing -> listening"] * turns, "listening -> idle"]
    assert tone_blocks(spk.heard()) >= 22  # 1.5 s + 1 s of answers reached the speaker
    assert KEY not in spk.log  # not even at debug
    assert spk.log.count("after the end of speech") >= 2  # the per-turn trace
    # The models rested while the person spoke and ran again from thinking on.
    assert spk.log.count("wake word resumed after") == turns + 1  # + the follow-up window
    assert "turn: response " in spk.log


async def test_two_parallel_tool_calls_then_one_response_create(tmp_path, prerequisites):
    server = RealtimeServer(vad=True, replies=[
        Reply(audio_ms=600, function_calls=[Call("get_time", "{}", "call_time"),
                                            Call("get_volume", "{}", "call_volume")]),
        Reply(audio_ms=1200, transcript="It is noon and the volume is 100%.")])
    async with server:
        spk = Speaker(tmp_path, prerequisites, server,
                      "[conversation]\nfollow_up_seconds = 2\n")
        await spk.start()
        try:
            spk.say(request("what time is it"), "ask")
            await spk.wait_log("listening -> idle", timeout=90)
        finally:
            assert spk.stop() == 0
    assert server.invalid == []
    types = server.types()
    outputs = server.of_type("conversation.item.create")
    assert sorted(o.event["item"]["call_id"] for o in outputs) == ["call_time",
                                                                    "call_volume"]
    by_call = {o.event["item"]["call_id"]: o.event["item"]["output"] for o in outputs}
    assert '"time"' in by_call["call_time"] and '"percent"' in by_call["call_volume"]
    creates = server.of_type("response.create")
    assert len(creates) == 1
    last_output = max(i for i, t in enumerate(types) if t == "conversation.item.create")
    assert types.index("response.create") > last_output
    assert "conversation_already_has_active_response" not in server.errors_sent
    assert [e["type"] for e in server.sent].count("response.done") >= 2
    assert tone_blocks(spk.heard()) >= 16  # the answer after the tools was heard too


async def test_a_45_second_answer_plays_completely(tmp_path, prerequisites):
    server = RealtimeServer(vad=True, replies=[Reply(audio_ms=45000, chunk_ms=200)])
    async with server:
        spk = Speaker(tmp_path, prerequisites, server,
                      "[conversation]\nfollow_up_seconds = 3\n[cues]\nwake = false\nend = false\n")
        await spk.start()
        try:
            spk.say(request("tell me a long story"), "story")
            await spk.wait_log("responding -> audio_playing", timeout=60)
            started = time.monotonic()
            await spk.wait_log("audio_playing -> listening", timeout=90)
            played = time.monotonic() - started
            await spk.wait_log("listening -> idle")
        finally:
            assert spk.stop() == 0
    assert played > 40  # the turn stayed open for the whole answer
    blocks = tone_blocks(spk.heard())
    # All of it, to within a couple of periods (and any silence an underrun put in).
    assert 447 <= blocks <= 452, blocks
    assert "did not report the end" not in spk.log


async def test_end_during_playback_happens_only_after_the_drain(tmp_path, prerequisites):
    server = RealtimeServer(vad=True, replies=[
        Reply(audio_ms=3000, function_calls=[Call("end_conversation", "{}", "call_end")]),
        Reply(audio_ms=700)])
    async with server:
        spk = Speaker(tmp_path, prerequisites, server, "[cues]\nwake = false\nend = false\n")
        await spk.start()
        try:
            spk.say(request("thanks, goodbye"), "bye")
            await spk.wait_log("conversation will end after the answer has played "
                               "(end_conversation tool)", timeout=60)
            await spk.wait_log("-> idle: conversation over: end_conversation tool")
        finally:
            assert spk.stop() == 0
    log = spk.log
    assert log.index("will end after the answer") < log.index("-> idle")
    assert spk.transitions()[-2:] == ["responding -> audio_playing", "audio_playing -> idle"]
    assert tone_blocks(spk.heard()) >= 36  # all 3 s and the goodbye's 0.7 s were heard
    assert len(server.of_type("response.create")) == 1


async def test_sigterm_mid_answer_lets_it_finish_then_exits_0(tmp_path, prerequisites):
    server = RealtimeServer(vad=True, replies=[Reply(audio_ms=2500)])
    async with server:
        spk = Speaker(tmp_path, prerequisites, server, "[cues]\nwake = false\nend = false\n")
        await spk.start()
        spk.say(request("what is the weather today"), "ask")
        await spk.wait_log("responding -> audio_playing")
        assert spk.proc is not None
        spk.proc.send_signal(signal.SIGTERM)
        assert spk.proc.wait(20) == 0
    log = spk.log
    assert log.index("stopping on SIGTERM") < log.index("audio_playing -> idle")
    assert "did not finish within" not in log
    assert tone_blocks(spk.heard()) >= 23  # the whole 2.5 s answer was heard
