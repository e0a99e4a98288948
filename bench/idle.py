"""What the `speakerd run` process costs while it listens, against bare pyopen-wakeword.

    .venv/bin/python bench/idle.py [SECONDS [REPEATS]]     (default 30 s, 3 repeats)

The product figures are measured on the process a user runs: the venv's `speakerd
run --config ...`, as systemd/speakerd.service starts it, on the paced PulseAudio
`mic`/`spk` devices of tests/audio_devices.py, read from /proc/PID. The baseline is
bare pyopen-wakeword as shipped, listening to the same mic the plainest way there is:
`arecord -D mic | python -m pyopen_wakeword --model hey_jarvis` (its own command,
default settings; for five models the same loop over its public API with one feature
extractor), both processes counted. Each variant hears the same SECONDS of paced speech
and noise without a wake word, played into the mic after a warm-up, in a fresh
process; repeats are interleaved and medians reported, since the baseline itself
moves +-10 % between runs on a shared machine.

Prints CPU seconds per minute of audio and the ratio to bare with the same models;
VmRSS after the warm-up and the audio; start to READY=1 on a real NOTIFY_SOCKET
(tests/notify_socket.py); and CPU per minute during a conversation with the fixture
server (mic streaming while the user's turn lasts, then a 3 s answer played, four
times), with its ratio to bare idle with one model. Goals are printed beside them.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import audio_devices  # noqa: I001  (sets ALSA_CONFIG_PATH before alsa-lib loads)

import numpy as np

from bench.soak import Daemon, cpu_seconds, status_kb, wake_clips
from bench.wakeword import audio
from tests.notify_socket import NotifySocket
from tests.realtime_server import RealtimeServer, Reply
from tests.speech import write_wav

ALL = ["hey_jarvis", "alexa", "okay_nabu", "hey_mycroft", "hey_rhasspy"]
NO_WAKE_WORD = ("what is the weather today", "turn on the kitchen lights",
                "set a timer for ten minutes", "did anyone feed the cat")
WARM_UP = 3.0  # seconds of (silent) mic after start-up before the audio and the count
GOAL_RATIO, GOAL_RSS_MB, GOAL_READY_S = 0.25, 70, 2.0

# pyopen_wakeword/__main__.py's live loop, for several models sharing the features.
BARE_LOOP = """
import sys
from pyopen_wakeword import Model, OpenWakeWord, OpenWakeWordFeatures
models = [OpenWakeWord.from_builtin(Model(name)) for name in sys.argv[1:]]
features = OpenWakeWordFeatures.from_builtin()
while chunk := sys.stdin.buffer.read(2048):
    for embedding in features.process_streaming(chunk):
        for name, model in zip(sys.argv[1:], models):
            for probability in model.process_streaming(embedding):
                if probability > 0.5:
                    print(name, flush=True)
"""
ARECORD = ["arecord", "-q", "-D", "mic", "-t", "raw", "-f", "S16_LE", "-r", "16000", "-c", "1"]


async def hear(pulse: audio_devices.Pulse, pids: list[int], wav: Path) -> float:
    """CPU seconds `pids` used while `wav` played into the mic."""
    before = sum(cpu_seconds(p) for p in pids)
    await asyncio.to_thread(pulse.play_into_mic(wav).wait)
    return sum(cpu_seconds(p) for p in pids) - before


async def bare(models: list[str], pulse: audio_devices.Pulse, wav: Path) -> dict[str, float]:
    listen = ([sys.executable, "-m", "pyopen_wakeword", "--model", models[0]]
              if len(models) == 1 else [sys.executable, "-c", BARE_LOOP, *models])
    mic = subprocess.Popen(ARECORD, stdout=subprocess.PIPE)
    assert mic.stdout is not None
    ww = subprocess.Popen(listen, stdin=mic.stdout, stdout=subprocess.PIPE)
    mic.stdout.close()
    try:
        await asyncio.sleep(WARM_UP)
        used = await hear(pulse, [mic.pid, ww.pid], wav)
        rss = (status_kb(mic.pid, "VmRSS") + status_kb(ww.pid, "VmRSS")) / 1024
    finally:
        mic.terminate()  # its pipe closes; the listener reads EOF and exits
        out, _ = ww.communicate(timeout=20)
        mic.wait(10)
    return {"cpu": used, "rss": rss, "wakes": len(out.splitlines())}


async def speakerd(models: list[str], pulse: audio_devices.Pulse, server: RealtimeServer,
                   wav: Path, tmp: Path) -> dict[str, float]:
    notify = NotifySocket(tmp / "notify")
    d = Daemon(tmp, pulse, server, f"[wake_word]\nmodels = {json.dumps(models)}\n")
    started = time.time()  # CLOCK_REALTIME, as the socket's receive timestamps
    await d.start(NOTIFY_SOCKET=notify.path)
    try:
        ready = (await asyncio.to_thread(notify.wait_for, "READY", "1")).at - started
        await asyncio.sleep(WARM_UP)
        used = await hear(pulse, [d.pid], wav)
        rss = status_kb(d.pid, "VmRSS") / 1024
    finally:
        assert d.stop() == 0
        notify.close()
    return {"cpu": used, "rss": rss, "ready": ready, "wakes": d.log.count("idle -> connecting")}


async def conversation(pulse: audio_devices.Pulse, tmp: Path, turns: int = 4,
                       listen: float = 3.0, answer_ms: int = 3000) -> dict[str, float]:
    """CPU per minute of one conversation: `turns` x (mic streamed `listen` s, answer)."""
    server = RealtimeServer()
    async with server:
        d = Daemon(tmp, pulse, server, "[conversation]\nfollow_up_seconds = 10\n")
        await d.start()
        try:
            d.play(wake_clips(tmp)[0])
            await d.expect("connecting -> listening")
            before, started = cpu_seconds(d.pid), time.monotonic()
            for _ in range(turns):
                await asyncio.sleep(listen)  # the user's turn: the mic streams to the server
                server.replies.append(Reply(audio_ms=answer_ms))
                await server.end_turn()
                await d.expect("audio_playing -> listening")
            used, wall = cpu_seconds(d.pid) - before, time.monotonic() - started
        finally:
            assert d.stop() == 0
    return {"cpu_per_min": used / wall * 60, "seconds": wall}


async def run(seconds: int, repeats: int) -> None:
    pulse = audio_devices.Pulse()
    pulse.start()
    runs: dict[str, list[dict[str, float]]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="speakerd-idle-") as name:
            tmp = Path(name)
            pcm = np.frombuffer(audio(seconds, NO_WAKE_WORD), "<i2")
            wav = write_wav(tmp / "kitchen.wav", pcm.astype(np.float32) / 32768)
            async with RealtimeServer() as server:  # there if a false wake connects
                for r in range(repeats):
                    for models in (ALL[:1], ALL):
                        n = len(models)
                        runs.setdefault(f"bare{n}", []).append(await bare(models, pulse, wav))
                        sub = tmp / f"run{r}-{n}"
                        sub.mkdir()
                        runs.setdefault(f"speakerd{n}", []).append(
                            await speakerd(models, pulse, server, wav, sub))
                    sub = tmp / f"conversation{r}"
                    sub.mkdir()
                    runs.setdefault("conversation", []).append(await conversation(pulse, sub))
    finally:
        pulse.stop()
    med = {key: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
           for key, rs in runs.items()}
    report(med, seconds, repeats)


def report(med: dict[str, dict[str, float]], seconds: int, repeats: int) -> None:
    def per_min(key: str) -> float:
        return med[key]["cpu"] / seconds * 60

    print(f"{seconds} s of paced speech and noise (no wake word) per run, after "
          f"{WARM_UP:.0f} s of warm-up; median of {repeats} interleaved runs; "
          f"{os.cpu_count()} CPUs")
    print(f"{'':44s} {'CPU s/min':>9s} {'ratio':>6s} {'RSS MB':>7s} {'READY s':>7s} "
          f"{'wakes':>5s}  goal")
    for n in (1, 5):
        base = per_min(f"bare{n}")
        b, s = med[f"bare{n}"], med[f"speakerd{n}"]
        print(f"{f'bare pyopen-wakeword + arecord, {n} model(s)':44s} {base:9.2f} "
              f"{1:6.2f} {b['rss']:7.0f} {'':>7s} {b['wakes']:5.0f}")
        ok = "ok" if per_min(f"speakerd{n}") / base <= GOAL_RATIO else "MISSED"
        print(f"{f'speakerd run, idle, {n} model(s)':44s} {per_min(f'speakerd{n}'):9.2f} "
              f"{per_min(f'speakerd{n}') / base:6.2f} {s['rss']:7.0f} {s['ready']:7.2f} "
              f"{s['wakes']:5.0f}  ratio <= {GOAL_RATIO} ({ok}), "
              f"RSS <= {GOAL_RSS_MB} MB ({'ok' if s['rss'] <= GOAL_RSS_MB else 'MISSED'}), "
              f"READY <= {GOAL_READY_S:.0f} s ({'ok' if s['ready'] <= GOAL_READY_S else 'MISSED'})")
    c = med["conversation"]
    print(f"{'speakerd run, conversation, 1 model':44s} {c['cpu_per_min']:9.2f} "
          f"{c['cpu_per_min'] / per_min('bare1'):6.2f}  (ratio to bare idle, 1 model; "
          f"{c['seconds']:.0f} s: 4 turns of 3 s mic streaming + a 3 s answer played)")


if __name__ == "__main__":
    asyncio.run(run(int(sys.argv[1]) if len(sys.argv) > 1 else 30,
                    int(sys.argv[2]) if len(sys.argv) > 2 else 3))
