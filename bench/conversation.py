"""Conversation latencies through the real daemon (in-process), PulseAudio, fixture server.

It wraps a few of the daemon's own handlers to timestamp them: a bench's liberty.

    .venv/bin/python bench/conversation.py [RUNS]

Per run, one turn of the model's answer (500 ms of audio), then a barge-in into a
3 s answer. Prints, as median and p95 and as multiples of the 20 ms playback period:
  drain callback -> mic streaming again (includes audio.follow_up_guard_ms, 150 ms)
  audio delta received -> written to ALSA
  barge-in (wake word) -> playback silent at the speaker's monitor
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import audio_devices  # noqa: I001  (sets ALSA_CONFIG_PATH before alsa-lib loads)

from bench.audio import Monitor
from speakerd import config as configmod
from speakerd import log as logmod
from speakerd import session as s
from speakerd.daemon import Daemon
from speakerd.notify import Notifier
from speakerd.realtime import protocol
from tests.realtime_server import RealtimeServer, Reply

PERIOD_MS = 20


def line(name: str, seconds: list[float]) -> None:
    med = statistics.median(seconds) * 1000
    p95 = sorted(seconds)[int(0.95 * (len(seconds) - 1))] * 1000
    print(f"{name:40s} median {med:7.1f} ms ({med / PERIOD_MS:5.1f} periods)   "
          f"p95 {p95:7.1f} ms ({p95 / PERIOD_MS:5.1f} periods)   n={len(seconds)}")


async def until(predicate, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError
        await asyncio.sleep(0.002)


async def main(runs: int) -> None:
    pulse = audio_devices.Pulse()
    pulse.start()
    server = RealtimeServer(replies=[])
    async with server:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "speakerd.toml"
            path.write_text('[audio]\ncapture_device = "mic"\nplayback_device = "spk"\n'
                            f'[realtime]\nurl = "{server.url}"\n'
                            "[conversation]\nfollow_up_seconds = 60\n"
                            "[cues]\nwake = false\nend = false\n")
            d = Daemon(configmod.load(path), notifier=Notifier({}),
                       redact=logmod.RedactFilter())
            events: dict[str, list[float]] = {"drained": [], "mic_on": [], "delta": []}
            drained, stream = d._drained, d._handlers[s.StreamMic]
            d._drained = lambda rid: (events["drained"].append(time.monotonic()),
                                      drained(rid))[1]

            def on_stream(a: s.StreamMic) -> None:
                stream(a)
                if a.on:
                    events["mic_on"].append(time.monotonic())
            d._handlers[s.StreamMic] = on_stream
            play, first_play = d._handlers[s.PlayAudio], {}

            def on_play(a: s.PlayAudio) -> None:
                first_play.setdefault(a.response_id, (time.monotonic(),
                                                      d.playback.frames_written))
                play(a)
            d._handlers[s.PlayAudio] = on_play
            task = asyncio.create_task(d.run())
            await until(lambda: d.playback is not None and d.session.state is s.State.IDLE)
            d.put(s.ButtonPressed("talk"))
            await until(lambda: d.session.state is s.State.LISTENING)
            monitor = Monitor(pulse)
            to_mic, to_alsa, to_silence = [], [], []
            for _ in range(runs):
                # One answer, played out, then the mic back on.
                server.replies.append(Reply(audio_ms=500, speed=50))
                n_drained, n_mic = len(events["drained"]), len(events["mic_on"])
                seen = set(first_play)
                assert d._client is not None
                d._client.send(protocol.input_audio_commit())
                await until(lambda seen=seen: set(first_play) - seen)
                rid = (set(first_play) - seen).pop()
                got, written = first_play[rid]
                await until(lambda written=written: d.playback.frames_written > written)
                to_alsa.append(time.monotonic() - got)
                await until(lambda n_mic=n_mic, n_drained=n_drained:
                            len(events["mic_on"]) > n_mic
                            and len(events["drained"]) > n_drained)
                to_mic.append(events["mic_on"][-1] - events["drained"][-1])
                # A barge-in into a long answer.
                server.replies.append(Reply(audio_ms=3000, speed=50))
                d._client.send(protocol.input_audio_commit())
                await until(lambda: d.session.state is s.State.AUDIO_PLAYING)
                await asyncio.sleep(0.3)  # let it be heard for a moment
                asked = time.monotonic()
                d.put(s.WakeWordDetected("hey_jarvis"))
                await asyncio.sleep(0.3)
                quiet = monitor.first_quiet_after(asked)
                if quiet is not None:
                    to_silence.append(quiet - asked)
                await until(lambda: d.session.state is s.State.LISTENING)
            monitor.stop()
            d.request_stop()
            await task
    pulse.stop()
    print(f"{runs} runs; playback period {PERIOD_MS} ms; follow_up_guard_ms 150")
    line("drain callback -> mic streaming again", to_mic)
    line("  the same less the 150 ms guard", [t - 0.150 for t in to_mic])
    line("audio delta received -> written to ALSA", to_alsa)
    line("barge-in -> playback silent (monitor)", to_silence)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 100))
