"""Transcripts in the journal: `speakerd run` next to a private journald (as in
test_log.py), a whole conversation spoken into the PulseAudio mic (as in test_e2e.py),
the fixture server transcribing; what reached the journal is read back with journalctl."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from .conftest import ROOT, SPEAKERD, clean_env, need
from .realtime_server import RealtimeServer, Reply
from .speech import have_espeak, silence, speak, write_wav
from .test_e2e import KEY, request

HELPERS = ROOT / "tests" / "helpers"


class JournaledSpeaker:
    """`speakerd run` logging to a private journald; the journal read back as it grows."""

    def __init__(self, tmp: Path, pulse, server: RealtimeServer, extra: str) -> None:
        self.tmp = tmp
        self.pulse = pulse
        self.config = tmp / "speakerd.toml"
        self.config.write_text(
            '[audio]\ncapture_device = "mic"\nplayback_device = "spk"\n'
            f'[realtime]\nurl = "{server.url}"\n'
            "[conversation]\nfollow_up_seconds = 3\n" + extra)
        self.pidfile = tmp / "speakerd.pid"
        self.stderr = tmp / "stderr"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        need(os.getuid() == 0 and shutil.which("unshare") is not None,
             "root and unshare(1) to run a private journald")
        need(os.path.exists("/lib/systemd/systemd-journald"), "systemd-journald")
        with self.stderr.open("wb") as err:
            # The shell writes speakerd's pid (its own, exec'd) for the SIGTERM at the end.
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private",
                 str(HELPERS / "journald-sandbox"), str(self.tmp),
                 "sh", "-c", 'echo $$ > "$0"; exec "$@"', str(self.pidfile),
                 *SPEAKERD, "run", "--config", str(self.config)],
                env=clean_env(OPENAI_API_KEY=KEY, SPEAKERD_LOG_TARGET="journal"), cwd=ROOT,
                stdout=subprocess.DEVNULL, stderr=err)

    def entries(self) -> list[dict[str, str]]:
        journal = self.tmp / "log" / "journal"
        if not journal.exists():
            return []
        out = subprocess.run(["journalctl", "-D", str(journal), "-o", "json",
                              "SYSLOG_IDENTIFIER=speakerd"],
                             capture_output=True, text=True, timeout=30).stdout
        return [json.loads(line) for line in out.splitlines()]

    async def wait(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in e.get("MESSAGE", "") for e in self.entries()):
            assert self.proc is not None and self.proc.poll() is None, \
                self.stderr.read_text()[-3000:]
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in the journal within {timeout} s: "
                                     + "\n".join(e["MESSAGE"] for e in self.entries()[-20:]))
            await asyncio.sleep(0.2)

    def stop(self) -> list[dict[str, str]]:
        assert self.proc is not None
        if self.proc.poll() is None and self.pidfile.exists():
            os.kill(int(self.pidfile.read_text()), signal.SIGTERM)
        try:
            assert self.proc.wait(30) == 0, self.stderr.read_text()[-3000:]
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        return self.entries()


@pytest.fixture
def prerequisites(pulse):
    need(have_espeak(), "espeak-ng")
    return pulse


async def converse(tmp: Path, pulse, *, transcripts: bool, late: bool
                   ) -> tuple[RealtimeServer, list[dict[str, str]]]:
    # A 0.9 s silence window: espeak-ng's pauses between words must not split a turn.
    server = RealtimeServer(vad=True, vad_silence_ms=900,
                            heard=["what is the weather today", "and tomorrow"],
                            late_transcripts=late, replies=[
                                Reply(audio_ms=1200, transcript="Sunny, 21 degrees."),
                                Reply(audio_ms=800, transcript="Rain, I'm afraid.")])
    async with server:
        spk = JournaledSpeaker(tmp, pulse, server, "[cues]\nwake = false\nend = false\n"
                               f"[log]\ntranscripts = {'true' if transcripts else 'false'}\n")
        spk.start()
        try:
            await spk.wait("started: config")
            pulse.play_into_mic(write_wav(tmp / "turn1.wav",
                                          request("what is the weather today")))
            await spk.wait("audio_playing -> listening")
            pulse.play_into_mic(write_wav(tmp / "turn2.wav", np.concatenate(
                [speak("and tomorrow"), silence(2.0)])))
            await spk.wait("conversation over: no follow-up")
        finally:
            entries = spk.stop()
    assert server.invalid == []
    return server, entries


def transcript_lines(entries: list[dict[str, str]]) -> list[tuple[str, ...]]:
    return [(e["MESSAGE"], e["SPEAKERD_EVENT"], e["SPEAKERD_TEXT"], e["SPEAKERD_SESSION"],
             e["SPEAKERD_TURN"]) for e in entries
            if e.get("SPEAKERD_EVENT") in ("heard", "said")]


@pytest.mark.parametrize("late", [False, True], ids=["in-order", "late-transcripts"])
async def test_the_journal_shows_what_was_heard_and_said_turn_by_turn(
        tmp_path, prerequisites, late):
    server, entries = await converse(tmp_path, prerequisites, transcripts=True, late=late)
    update = server.of_type("session.update")[0].event
    assert update["session"]["audio"]["input"]["transcription"] == {
        "model": "gpt-transcribe"}
    turns = [e["type"] for e in server.sent].count("input_audio_buffer.committed")
    assert turns == 2, "the fixture VAD split a turn; the expected lines below assume two"
    lines = transcript_lines(entries)
    heard = [line for line in lines if line[1] == "heard"]
    said = [line for line in lines if line[1] == "said"]
    assert heard == [("heard: what is the weather today", "heard",
                      "what is the weather today", "1", "1"),
                     ("heard: and tomorrow", "heard", "and tomorrow", "1", "2")]
    assert said == [("said: Sunny, 21 degrees.", "said", "Sunny, 21 degrees.", "1", "1"),
                    ("said: Rain, I'm afraid.", "said", "Rain, I'm afraid.", "1", "2")]
    messages = [e["MESSAGE"] for e in entries]
    if late:  # turn 1's words came while turn 2 was answered, and still name turn 1
        assert messages.index("heard: what is the weather today") > \
            messages.index("said: Sunny, 21 degrees.")
        assert messages.index("heard: what is the weather today") > \
            [i for i, m in enumerate(messages) if "thinking -> responding" in m][1]
    for entry in entries:
        for name, value in entry.items():
            if name != "_CMDLINE":
                assert KEY not in str(value), name


async def test_no_transcripts_unless_asked_for(tmp_path, prerequisites):
    server, entries = await converse(tmp_path, prerequisites, transcripts=False, late=False)
    assert "transcription" not in server.of_type("session.update")[0].event["session"][
        "audio"]["input"]
    assert transcript_lines(entries) == []
    text = json.dumps(entries)
    assert "Sunny" not in text and "weather today" not in text
    assert any("listening -> thinking" in e["MESSAGE"] for e in entries)  # it did converse
