"""Soak the `speakerd run` process: conversations back to back, watching what it holds.

    .venv/bin/python bench/soak.py [--conversations N]     (default 200)

Starts the daemon as the unit does (the venv's `speakerd run --config ...`) on the
paced PulseAudio devices of tests/audio_devices.py, with the fixture server as the
model. Each conversation is started by a pre-rendered "hey jarvis" clip played into
the mic and has two turns, ended by the server as its VAD would (`end_turn()`); every
third conversation the first answer calls a tool, every fifth the user barges in on
the first answer with the wake word. Prints RSS, open fds and threads of the process
at the start and every 50 conversations, each time after the conversation has ended
and the speaker device has been released again.

The driver here is shared with tests/test_soak.py and tests/test_idle.py.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import audio_devices  # noqa: I001  (sets ALSA_CONFIG_PATH before alsa-lib loads)

import numpy as np

from tests.conftest import ROOT, clean_env
from tests.realtime_server import Call, RealtimeServer, Reply
from tests.speech import silence, speak, write_wav
from tests.test_e2e import KEY, Speaker

# What systemd/speakerd.service runs, from this checkout's venv.
UNIT_COMMAND = [str(Path(sys.executable).with_name("speakerd"))]
RELEASED = "released after"  # speakerd.audio.playback, debug: the speaker device is closed
# Short everything: a turn needs no speech (the server ends it), answers are short,
# and the follow-up window only has to outlast the driver's reaction to the log.
FAST = "[conversation]\nfollow_up_seconds = 1.0\n[log]\nlevel = 'debug'\n"


# --- the process, from /proc ----------------------------------------------------------

TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(path: str) -> list[str]:
    # The comm field may hold spaces and parentheses: split after the last ')'.
    return Path(path).read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all its threads), in seconds."""
    f = _stat_fields(f"/proc/{pid}/stat")
    return (int(f[11]) + int(f[12])) / TICK


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """{tid: (comm, utime + stime seconds)} for each thread of `pid`."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            f = _stat_fields(f"/proc/{pid}/task/{tid}/stat")
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended meanwhile
        out[int(tid)] = (comm, (int(f[11]) + int(f[12])) / TICK)
    return out


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


@dataclass(frozen=True)
class Holdings:
    """What the process holds: resident memory, open file descriptors, threads."""

    rss_mb: float
    fds: int
    threads: int

    @classmethod
    def of(cls, pid: int) -> Holdings:
        return cls(status_kb(pid, "VmRSS") / 1024, len(os.listdir(f"/proc/{pid}/fd")),
                   len(os.listdir(f"/proc/{pid}/task")))

    def __str__(self) -> str:
        return f"RSS {self.rss_mb:6.1f} MB   fds {self.fds:3d}   threads {self.threads:2d}"


# --- the daemon --------------------------------------------------------------------------

class Daemon(Speaker):
    """`speakerd run` (tests/test_e2e.Speaker) followed through its log with a cursor.

    `expect(text)` waits for the next `text` after what the previous expect found, so
    a long soak reads each line of the log once.
    """

    def __init__(self, tmp_path: Path, pulse: audio_devices.Pulse, server: RealtimeServer,
                 extra: str = "", command: list[str] | None = None) -> None:
        super().__init__(tmp_path, pulse, server, extra)
        self.command = command or UNIT_COMMAND
        self.text = ""
        self._read = 0
        self._cursor = 0
        self._players: list[subprocess.Popen[bytes]] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, **env: str) -> None:  # type: ignore[override]
        """Start it as the unit does; `env` adds to its environment (NOTIFY_SOCKET=...)."""
        self.speaker_start = len(self.pulse.speaker_bytes())
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen([*self.command, "run", "--config", str(self.config)],
                                         cwd=ROOT, stderr=log,
                                         env=clean_env(OPENAI_API_KEY=KEY, **env))
        await self.expect("started: config")

    def _pull(self) -> None:
        with self.log_path.open("rb") as f:
            f.seek(self._read)
            data = f.read()
        end = data.rfind(b"\n") + 1  # whole lines only
        self._read += end
        self.text += data[:end].decode(errors="replace")

    async def expect(self, text: str | tuple[str, ...], timeout: float = 30) -> str:
        """Wait for `text` (or the first of several) in the log after the last expected
        one, then move past it; -> what was found."""
        texts = (text,) if isinstance(text, str) else text
        deadline = time.monotonic() + timeout
        while True:
            self._pull()
            found = [(at, t) for t in texts if (at := self.text.find(t, self._cursor)) >= 0]
            if found:
                at, t = min(found)
                self._cursor = at + len(t)
                return t
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"speakerd exited with {self.proc.returncode} while "
                                     f"waiting for {text!r}:\n{self.text[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged in {timeout} s:\n"
                                     + self.text[self._cursor:][-3000:])
            await asyncio.sleep(0.02)

    def play(self, wav: Path) -> None:
        """Play `wav` into the mic (in the background)."""
        self._players = [p for p in self._players if p.poll() is None]
        self._players.append(self.pulse.play_into_mic(wav))

    def stop(self) -> int:
        for p in self._players:
            p.wait(10)
        return super().stop()


async def until(predicate, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{predicate} still false after {timeout} s")
        await asyncio.sleep(0.01)


def wake_clips(tmp: Path) -> tuple[Path, Path]:
    """"hey jarvis" to start a conversation, and the same after 1.5 s for a barge-in
    (the detector's 2 s refractory period runs from the word that started it)."""
    word = speak("hey jarvis", "en-gb")
    return (write_wav(tmp / "wake.wav", np.concatenate([silence(0.3), word, silence(0.3)])),
            write_wav(tmp / "barge.wav", np.concatenate([silence(1.5), word, silence(0.3)])))


KINDS = ("plain", "tool", "barge-in")


def kind_of(n: int) -> str:
    """Conversation n (from 0): a barge-in every fifth, a tool round every third."""
    return "barge-in" if n % 5 == 4 else "tool" if n % 3 == 2 else "plain"


async def converse(d: Daemon, server: RealtimeServer, kind: str, clips: tuple[Path, Path],
                   answer_ms: int = 300) -> None:
    """One conversation of two turns, from the wake word back to idle."""
    first = [Reply(audio_ms=answer_ms)]
    if kind == "tool":  # a short answer with a call, then the answer after the tool round
        first = [Reply(audio_ms=200, function_calls=[Call("get_time")]),
                 Reply(audio_ms=answer_ms)]
    elif kind == "barge-in":  # a long answer still streaming, cut short by the wake word
        # (at 2x real time: the server stays ahead of playback, as the real one does)
        first = [Reply(audio_ms=10000, speed=2.0)]
    server.replies += [*first, Reply(audio_ms=answer_ms)]
    d.play(clips[0])
    await d.expect("idle -> connecting")
    await d.expect("connecting -> listening")
    await server.end_turn()
    if kind == "barge-in":
        await d.expect("thinking -> responding")
        d.play(clips[1])
        await d.expect("-> listening: barge-in by")
        # The fixture starts no reply while the cancelled one is still active.
        await until(lambda: server.active_response is None)
        await server.end_turn()
    await d.expect("audio_playing -> listening")
    if kind != "barge-in":
        await server.end_turn()
        await d.expect("audio_playing -> listening")
    await d.expect("listening -> idle: conversation over: no follow-up")
    assert not server.replies, f"{kind} conversation left replies unplayed: {server.replies}"


async def soak(tmp: Path, pulse: audio_devices.Pulse, conversations: int, *,
               every: int = 50, command: list[str] | None = None,
               report=print) -> tuple[Daemon, RealtimeServer, list[tuple[int, Holdings]]]:
    """Run `conversations`; report Holdings at the start and every `every` (after the
    speaker device has been released). Returns the stopped daemon, the server and the
    checkpoints [(conversations done, Holdings)]."""
    clips = wake_clips(tmp)
    server = RealtimeServer()
    checkpoints: list[tuple[int, Holdings]] = []
    kinds = dict.fromkeys(KINDS, 0)
    async with server:
        d = Daemon(tmp, pulse, server, FAST, command)
        await d.start()
        try:
            # espeak-ng renders the status phrases just after the start (a child process,
            # its pipes and asyncio's watcher thread): count from once that is done.
            await d.expect("status phrases ready", timeout=30)
            checkpoints.append((0, Holdings.of(d.pid)))
            report(f"{0:4d} conversations  {checkpoints[-1][1]}")
            started = time.monotonic()
            for n in range(conversations):
                kind = kind_of(n)
                await converse(d, server, kind, clips)
                kinds[kind] += 1
                if (n + 1) % every == 0 or n + 1 == conversations:
                    await d.expect(RELEASED, timeout=20)
                    checkpoints.append((n + 1, Holdings.of(d.pid)))
                    rate = (n + 1) / (time.monotonic() - started) * 60
                    report(f"{n + 1:4d} conversations  {checkpoints[-1][1]}   "
                           f"({rate:.0f} conversations a minute)")
        finally:
            d.stop()
    report("kinds: " + ", ".join(f"{k} {v}" for k, v in kinds.items())
           + f"; exit code {d.proc.returncode if d.proc else None}")
    return d, server, checkpoints


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument("--every", type=int, default=50)
    args = parser.parse_args()
    pulse = audio_devices.Pulse()
    pulse.start()
    try:
        with tempfile.TemporaryDirectory(prefix="speakerd-soak-") as tmp:
            d, server, _ = asyncio.run(soak(Path(tmp), pulse, args.conversations,
                                            every=args.every))
            tracebacks = d.text.count("Traceback")
            print(f"server: {len(server.handshakes)} connections, "
                  f"{len(server.of_type('response.create'))} response.create, "
                  f"{len(server.invalid)} invalid client events; "
                  f"log: {tracebacks} tracebacks, {d.text.count(' WARNING ')} warnings, "
                  f"{d.text.count(' ERROR ')} errors")
            for line in d.text.splitlines():
                if " WARNING " in line or " ERROR " in line or " CRITICAL " in line:
                    print("  " + line)
    finally:
        pulse.stop()


if __name__ == "__main__":
    main()
