"""Echo cancellation and voice barge-in in a simulated room, through `speakerd run`.

    PYTHONPATH=. .venv/bin/python bench/echo.py [ANSWERS [TRIALS [CPU_SECONDS]]]
                                                 (default 200, 20, 30; ~75 min)

A 0 skips that part (`bench/echo.py 0 20 0`: the talk-overs alone, ~10 min;
`bench/echo.py 200 0 0`: the echo-only answers alone, ~60 min).

The room is tests/room.py: a PulseAudio loopback from the speaker's monitor into the
microphone sink, 60 ms late and 6 dB down (the delay moves to 120 ms and back every
few answers); the model's answers are espeak-ng speech (6-10 s, several voices); the
fixture server records every appended byte. Prints:

1. echo only, ANSWERS answers with barge_in = "voice", while a second process spins
   on one core (as CI runs beside other work), a new daemon every 20 answers (each
   one's first answer is the first after a start), one answer in four stalling for
   1.5 s after 1 s (the speaker underruns), the room's delay changing every fifth:
   false barge-ins (goal 0), what reached the server while answers played (silence:
   the stream is gated until a voice is heard), and per answer how close echo alone
   came to being taken for a voice (the daemon's own figure from its journal line),
   and why voice barge-in waited;
2. the user talking over the answer, TRIALS times, 12 dB below the echo at a random
   point: barge-ins (goal >= 19 of 20), speech onset -> playback silent at the
   speaker's monitor (median, p95; goal 400 ms), truncate's audio_end_ms against what
   the speaker played; for each talk-over not heard, the daemon's debug lines on it;
3. CPU seconds per minute of the `speakerd run` process (from /proc) in a
   conversation (answers playing, mic streaming) with echo_cancellation "software"
   and "off", and idle for CPU_SECONDS with each: the ratio software/off (idle
   should be 1.0: the canceller does not run while idle).

SPEAKERD_BENCH_KEEP=DIR keeps the daemons' logs and configs in DIR.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import audio_devices  # noqa: I001  (sets ALSA_CONFIG_PATH before alsa-lib loads)

import numpy as np

from bench.soak import Daemon, cpu_seconds
from tests.realtime_server import RealtimeServer, Reply
from tests.room import (
    Loopback,
    Monitor,
    a_core_burning,
    answer_pcm,
    appended,
    user_wav,
)
from tests.speech import silence, speak, write_wav
from tests.test_e2e import request

VOICE = ("[conversation]\nbarge_in = 'voice'\nfollow_up_seconds = 20\n"
         "max_session_seconds = 3600\n[log]\nlevel = 'debug'\n")


def voice_daemon(tmp: Path, pulse: audio_devices.Pulse, server: RealtimeServer) -> Daemon:
    d = Daemon(tmp, pulse, server, VOICE)
    d.config.write_text(d.config.read_text().replace(
        "[audio]\n", "[audio]\necho_cancellation = 'software'\n", 1))
    return d
FOLLOW_UP = "tell me more about that"


def pct(xs: list[float], q: float) -> float:
    return sorted(xs)[int(q * (len(xs) - 1))]


async def follow_up(d: Daemon, tmp: Path, name: str, text: str = FOLLOW_UP) -> None:
    d.play(write_wav(tmp / f"{name}.wav", np.concatenate([speak(text), silence(1.5)])))


@dataclass
class EchoOnly:
    """What `speakerd run` did over echo-only answers (no one talking over them)."""

    answers: int = 0  # answers that ended, played out or cut off
    false: int = 0  # of which cut off by a voice barge-in: nobody spoke
    cut_off: int = 0  # answers cut off by anything at all
    answered_over: int = 0  # answers the server started over one still playing
    underruns: int = 0
    starts: int = 0  # daemons started: each one's first answer is one after start
    echo_lines: list[str] = field(default_factory=list)  # the daemon's, per answer
    # Per answer heard at the speaker's monitor: did the server get silence over it?
    silent: list[bool] = field(default_factory=list)
    invalid: list[object] = field(default_factory=list)  # events not valid by openai's types

    def headroom(self) -> list[float | None]:
        """Per answer, how many dB echo alone lacked of being taken for a voice (None:
        the detector never listened over it)."""
        return [float(m.group(1)) if (m := re.search(r"came within (\d+) dB", line))
                else None for line in self.echo_lines]

    def explained(self) -> int:
        return sum(int(m.group(1)) for line in self.echo_lines
                   if (m := re.search(r"; (\d+) voice-like sound", line)))

    def held(self) -> dict[str, float]:
        """Seconds voice barge-in waited, by reason, over all answers."""
        out: dict[str, float] = {}
        for line in self.echo_lines:
            if m := re.search(r"voice barge-in waited [\d.]+ s: ([^;\[]*)", line):
                for part in m.group(1).strip().split(", "):
                    seconds, why = part.split(" s ", 1)
                    out[why] = out.get(why, 0.0) + float(seconds)
        return out


async def echo_only(pulse: audio_devices.Pulse, loop: Loopback, tmp: Path, answers: int,
                    *, per_start: int = 20) -> EchoOnly:
    """`answers` echo-only answers of 6-10 s through `speakerd run` with barge_in =
    "voice", a new daemon every `per_start` (its first answer is the first after
    start), one in four stalling mid-answer (the speaker underruns), the room's delay
    moving between 60 and 120 ms every fifth. The caller loads the machine."""
    pcms = [answer_pcm(i)[0] for i in range(answers)]
    # One in four: the model goes quiet for 1.5 s after 1 s of audio, so the speaker
    # runs dry for about half a second (an underrun) in the middle of the answer.
    replies = [Reply(pcm=p, speed=20, stall_at_ms=1000 if i % 4 == 3 else None,
                     stall_seconds=1.5) for i, p in enumerate(pcms)]
    server = RealtimeServer(vad=True, replies=replies)
    monitor = Monitor(pulse)
    got = EchoOnly()
    ended = ("audio_playing -> listening", "responding -> listening")
    async with server:
        while got.answers < answers:
            where = tmp / f"echo{got.starts}"
            where.mkdir()
            d = voice_daemon(where, pulse, server)
            await d.start()
            got.starts += 1
            d.play(write_wav(where / "wake.wav", request("what is the weather tomorrow")))
            for k in range(min(per_start, answers - got.answers)):
                await d.expect(ended, timeout=120)
                got.answers += 1
                if k + 1 < per_start and got.answers < answers:
                    if got.answers % 5 == 0:  # the room changes between answers
                        loop.change(latency_ms=120 if loop.latency_ms == 60 else 60)
                    await follow_up(d, where, f"f{k}")
            d.stop()
            got.false += d.text.count("barge-in by voice")
            got.cut_off += d.text.count("cut off after")
            got.answered_over += d.text.count("audio_playing -> responding")
            got.underruns += d.text.count("underran in the middle")
            got.echo_lines += [line.split(": ", 2)[2] for line in d.text.splitlines()
                               if "echo cancellation over answer" in line]
    monitor.stop()
    got.invalid = list(server.invalid)
    for a, b in [s for s in monitor.loud_spans() if s[1] - s[0] > 3.0]:
        # The drain callback comes a little before the monitor's last sound (the
        # sink's own latency): the stream opens for the follow-up from then on.
        heard = appended(server, a + 0.4, b - 0.6)
        got.silent.append(heard.size > 0 and not heard.any())
    return got


def print_echo_only(got: EchoOnly, seconds: float) -> None:
    room = " ".join("-" if h is None else f"{h:.0f}" for h in got.headroom())
    print(f"1. echo only, the machine loaded (a second process spinning on a core): "
          f"{got.answers} answers ({got.starts} right after a start, {got.underruns} "
          f"underruns, the room's delay changed every fifth), {seconds / 60:.0f} min")
    print(f"   false barge-ins: {got.false} (goal 0); answers the server started over one "
          f"still playing: {got.answered_over}; the server got silence over "
          f"{sum(got.silent)} of {len(got.silent)}")
    print("   per answer, dB that echo alone lacked of being taken for a voice (a voice "
          "needs 0; - where voice barge-in never listened):\n   " + room)
    known = [h for h in got.headroom() if h is not None]
    if known:
        print(f"   the worst: {min(known):.0f} dB; median {statistics.median(known):.0f} dB; "
              f"voice-like sounds explained as echo: {got.explained()}")
    held = got.held()
    total = sum(held.values())
    print(f"   voice barge-in waited {total:.0f} s in all: " + ", ".join(
        f"{s:.0f} s {why}" for why, s in sorted(held.items(), key=lambda x: -x[1])))


async def barge_ins(pulse: audio_devices.Pulse, loop: Loopback, tmp: Path,
                    trials: int) -> None:
    rng = random.Random(11)
    # Each trial takes two answers: the one talked over, and the answer to what the
    # user said over it.
    pcms = [answer_pcm(i) for i in range(2 * trials + 2)]
    server = RealtimeServer(vad=True, replies=[Reply(pcm=p, speed=20) for p, _ in pcms])
    monitor = Monitor(pulse)
    delays, detect, flush, errors, hits, early, unanswered = [], [], [], [], 0, 0, 0
    async with server:
        (tmp / "barge").mkdir()
        d = voice_daemon(tmp / "barge", pulse, server)
        await d.start()
        d.play(write_wav(tmp / "b0.wav", request("what is the weather tomorrow")))
        await d.expect("-> listening: response", timeout=120)  # adapted on answer 0
        for n in range(1, trials + 1):
            await follow_up(d, tmp, f"b{n}")
            await d.expect("thinking -> responding", timeout=60)
            answering = time.monotonic()
            await d.expect("responding -> audio_playing", timeout=60)
            level = statistics.mean(v for _, v in pcms) + loop.gain_db - 12
            wav, onset = user_wav(tmp / f"u{n}.wav", "no, I meant the weather on Saturday",
                                  level, lead_s=rng.uniform(0.5, 4.0))
            before = len(server.of_type("conversation.item.truncate"))
            mark = len(d.text)
            started = time.monotonic()
            player = pulse.play_into_mic(wav)
            try:
                await d.expect("barge-in by voice", timeout=12)
            except AssertionError:
                await asyncio.to_thread(player.wait, 10)
                await d.expect("-> listening: response", timeout=60)
                # What the detector made of it: the debug lines of the voice path.
                said = [line for line in d.text[mark:].splitlines() if any(
                    w in line for w in ("voice", "echo delay", "realigned", "echo cancellation"))]
                print(f"   trial {n}: no barge-in; the user spoke {onset:.1f} s into the "
                      "file; the daemon said:\n     " + "\n     ".join(said or ["nothing"]))
                continue
            # Not player.wait() on the loop: the fixture server stamps each event as its
            # handler reads it, and a blocked loop stamped the truncate when the user's
            # sentence ended (a constant 3.2 s "latency" in earlier runs).
            await asyncio.to_thread(player.wait, 10)
            spoke = started + onset
            await asyncio.sleep(0.6)
            truncates = server.of_type("conversation.item.truncate")[before:]
            if truncates and truncates[0].at < spoke:
                early += 1  # cut off by something before the user spoke: a false one
            else:
                hits += 1
            silent = monitor.silent_by(truncates[0].at) if truncates else None
            if silent is not None:
                delays.append(silent - spoke)
            if truncates:
                detect.append(truncates[0].at - spoke)
                if silent is not None:
                    flush.append(silent - truncates[0].at)
            began = next((at for at, rms in monitor.blocks
                          if at > answering - 0.3 and rms >= 300), None)
            if truncates and began and silent:
                errors.append(truncates[0].event["audio_end_ms"] - (silent - began) * 1000)
            # The server commits the user's words as a turn once they end, and answers
            # them: let that answer play out before the next trial.
            try:
                await d.expect("listening -> thinking", timeout=15)
                await d.expect("-> listening: response", timeout=60)
            except AssertionError:
                # The server did not take it for a turn (the detector was late and
                # too little of it reached the server): the conversation ends; start
                # the next one with the wake word.
                unanswered += 1
                await d.expect("-> idle", timeout=60)
                d.play(write_wav(tmp / f"w{n}.wav", request("what is the weather tomorrow")))
                await d.expect("-> listening: response", timeout=120)
        d.stop()
    monitor.stop()
    print(f"2. talking over the answer at 12 dB below the echo: {hits} of {trials} "
          f"barged in (goal >= 19 of 20); {early} cut off before the user spoke; after "
          f"{unanswered} the server heard too little of the words to answer them")
    if delays:
        print(f"   speech onset -> playback silent: median {statistics.median(delays) * 1000:.0f}"
              f" ms, p95 {pct(delays, 0.95) * 1000:.0f} ms (goal 400 ms; n={len(delays)})")
    if detect:
        print(f"   of which onset -> truncate at the server: median "
              f"{statistics.median(detect) * 1000:.0f} ms, p95 {pct(detect, 0.95) * 1000:.0f} ms"
              f"; truncate -> silent: median "
              f"{statistics.median(flush or [0]) * 1000:.0f} ms, p95 "
              f"{pct(flush or [0], 0.95) * 1000:.0f} ms")
    if errors:
        print(f"   truncate audio_end_ms - played at the monitor: median "
              f"{statistics.median(errors):.0f} ms, worst {max(errors, key=abs):.0f} ms")


async def cpu(pulse: audio_devices.Pulse, tmp: Path, mode: str, seconds: float
              ) -> tuple[float, float]:
    """(CPU s per minute idle, per minute of a conversation) with echo_cancellation=mode."""
    pcms = [answer_pcm(i)[0] for i in range(4)]
    server = RealtimeServer(vad=True, replies=[Reply(pcm=p, speed=20) for p in pcms])
    extra = ("[conversation]\nfollow_up_seconds = 20\n"
             + ("barge_in = 'voice'\n" if mode == "software" else ""))
    async with server:
        (tmp / f"cpu-{mode}").mkdir()
        d = Daemon(tmp / f"cpu-{mode}", pulse, server, extra)
        d.config.write_text(d.config.read_text().replace(
            "[audio]\n", f"[audio]\necho_cancellation = '{mode}'\n", 1))
        await d.start()
        await asyncio.sleep(3)
        c0, t0 = cpu_seconds(d.pid), time.monotonic()
        await asyncio.sleep(seconds)
        idle = (cpu_seconds(d.pid) - c0) / (time.monotonic() - t0) * 60
        d.play(write_wav(tmp / f"c-{mode}.wav", request("what is the weather tomorrow")))
        await d.expect("thinking -> responding", timeout=60)
        c0, t0 = cpu_seconds(d.pid), time.monotonic()
        for n in range(len(pcms)):
            await d.expect("-> listening: response", timeout=120)
            if n + 1 < len(pcms):
                await follow_up(d, tmp, f"c-{mode}-{n}")
        talk = (cpu_seconds(d.pid) - c0) / (time.monotonic() - t0) * 60
        d.stop()
    return idle, talk


async def main(answers: int, trials: int, cpu_s: float) -> None:
    pulse = audio_devices.Pulse()
    pulse.start()
    try:
        with tempfile.TemporaryDirectory(prefix="speakerd-echo-") as t:
            tmp = Path(os.environ.get("SPEAKERD_BENCH_KEEP") or t)
            with Loopback(pulse, latency_ms=60, gain_db=-6.0) as loop:
                print("room: loopback 60 ms (120 ms every fifth answer), -6 dB; espeak-ng "
                      "answers at -6 dBFS peak\n")
                if answers:
                    began = time.monotonic()
                    with a_core_burning():
                        got = await echo_only(pulse, loop, tmp, answers)
                    print_echo_only(got, time.monotonic() - began)
                    loop.change(latency_ms=60)
                if trials:
                    await barge_ins(pulse, loop, tmp, trials)
                if not cpu_s:
                    return
                off_idle, off_talk = await cpu(pulse, tmp, "off", cpu_s)
                sw_idle, sw_talk = await cpu(pulse, tmp, "software", cpu_s)
            print("3. CPU s per minute of the speakerd run process   off   software  ratio")
            print(f"   idle (wake-word listening)                   {off_idle:5.2f}  {sw_idle:5.2f}"
                  f"     {sw_idle / off_idle:4.2f} (goal 1.0)")
            print(f"   conversation (answers playing, mic open)     {off_talk:5.2f}  {sw_talk:5.2f}"
                  f"     {sw_talk / off_talk:4.2f}")
    finally:
        pulse.stop()


if __name__ == "__main__":
    args = [float(a) for a in sys.argv[1:]]
    asyncio.run(main(int(args[0]) if args else 200, int(args[1]) if len(args) > 1 else 20,
                     args[2] if len(args) > 2 else 30.0))
