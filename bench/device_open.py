"""How long speakerd's event loop stalls while an ALSA device takes SECONDS to open.

    .venv/bin/python bench/device_open.py [SECONDS]     (default 2 s, about 30 s)

The slow device is a `filein:FILE=<fresh FIFO>` capture PCM (tests/audio_devices.py):
alsa-lib's open blocks until something opens the FIFO for writing, which another
process does SECONDS after the open began (and then feeds it 16 kHz silence in real
time, as a microphone would). pyalsaaudio keeps the GIL through that open. Figures,
each beside a baseline measured in the same run:

- in-process: speakerd's negotiate() of that PCM in a thread while the loop ticks every
  10 ms: the longest gap between ticks. Baseline: a thread that sleeps SECONDS.
- `speakerd run` with WATCHDOG_USEC=100000 (a ping from its loop every 50 ms on a real
  NOTIFY_SOCKET) and the FIFO as its microphone, the writer coming SECONDS after the
  process started: start to the first ping, start to READY=1, the longest gap
  between two pings until SECONDS + 2 s, and how many pings came before the writer
  (none while the open holds the whole process). Baseline: the same with the paced
  PulseAudio `mic`, which opens at once.

Asserts nothing.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import audio_devices  # noqa: I001  (sets ALSA_CONFIG_PATH before alsa-lib loads)

from tests.conftest import ROOT, SPEAKERD, clean_env
from tests.notify_socket import NotifySocket

# Opens the FIFO after a delay, says when it did, then writes 80 ms of 16 kHz s16
# silence every 80 ms.
WRITER = """
import os, sys, time
time.sleep(float(sys.argv[2]))
fd = os.open(sys.argv[1], os.O_WRONLY)
print(time.time(), flush=True)
try:
    while True:
        os.write(fd, bytes(2560))
        time.sleep(0.08)
except BrokenPipeError:
    pass  # the reader has closed it
"""


def writer(fifo: Path, after: float) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(fifo), str(after)],
                            stdout=subprocess.PIPE, text=True)


async def longest_tick_gap(work, seconds: float) -> float:
    """The longest gap between 10 ms ticks of this loop while `work()` runs in a thread."""
    done = threading.Event()
    worker = threading.Thread(target=lambda: (work(), done.set()), daemon=True)
    last, worst = time.monotonic(), 0.0
    worker.start()
    deadline = time.monotonic() + seconds + 30
    while not done.is_set() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        now = time.monotonic()
        worst, last = max(worst, now - last), now
    return worst


async def in_process(seconds: float, tmp: Path) -> tuple[float, float]:
    import alsaaudio

    from speakerd.audio import capture, device

    device.quiet_alsa_lib()
    fifo = tmp / "in-process.fifo"
    os.mkfifo(fifo)
    feed = writer(fifo, seconds)
    opened: list[float] = []

    def open_it() -> None:
        began = time.monotonic()
        pcm, _ = device.negotiate(alsaaudio.PCM_CAPTURE, f"filein:FILE={fifo}",
                                  capture.PREFERRED, capture.PERIOD_MS)
        opened.append(time.monotonic() - began)
        pcm.close()
    try:
        gap = await longest_tick_gap(open_it, seconds)
    finally:
        feed.kill()
        feed.wait()
    baseline = await longest_tick_gap(lambda: time.sleep(seconds), seconds)
    print(f"in-process: negotiate() took {opened[0]:.2f} s; the loop's longest gap "
          f"{gap * 1000:.0f} ms (a thread sleeping {seconds:g} s instead: "
          f"{baseline * 1000:.0f} ms)")
    return gap, baseline


def daemon_run(mic: str, tmp: Path, seconds: float, fifo: Path | None) -> dict[str, float]:
    config = tmp / f"{fifo.stem if fifo else 'mic'}.toml"
    config.write_text(f'[audio]\ncapture_device = "{mic}"\nplayback_device = "spk"\n')
    notify = NotifySocket(tmp / f"{config.stem}.sock")
    log = (tmp / f"{config.stem}.log").open("w")
    began = time.time()
    proc = subprocess.Popen([*SPEAKERD, "run", "--config", str(config)], cwd=ROOT,
                            stderr=log, env=clean_env(NOTIFY_SOCKET=notify.path,
                                                      WATCHDOG_USEC="100000"))
    feed = writer(fifo, seconds) if fifo else None
    try:
        messages = notify.listen(seconds + 2)
    finally:
        proc.terminate()
        proc.wait(10)
        came = float("inf")
        if feed:
            feed.kill()
            out, _ = feed.communicate()
            came = float(out.split()[0]) if out else came
        log.close()
        notify.close()
    pings = [m.at for m in messages if "WATCHDOG" in m.fields]
    ready = next((m.at for m in messages if m.fields.get("READY") == "1"), float("nan"))
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    return {"first_ping": pings[0] - began if pings else float("nan"),
            "ready": ready - began, "gap": max(gaps, default=float("nan")),
            "came": came - began, "before": sum(at < came for at in pings)}


def show(what: str, r: dict[str, float]) -> None:
    came = (f"; the writer came at {r['came']:.2f} s, {r['before']:.0f} pings before it"
            if r["came"] != float("inf") else "")
    print(f"  {what:<34} first ping {r['first_ping']:5.2f} s, READY {r['ready']:5.2f} s, "
          f"longest gap between pings {r['gap'] * 1000:5.0f} ms{came}")


async def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 2.0
    pulse = audio_devices.Pulse()
    pulse.start()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-open-") as name:
            tmp = Path(name)
            await in_process(seconds, tmp)
            fifo = tmp / "daemon.fifo"
            os.mkfifo(fifo)
            slow = daemon_run(f"filein:FILE={fifo}", tmp, seconds, fifo)
            quick = daemon_run("mic", tmp, seconds, None)
            print(f"speakerd run, a ping every 50 ms expected (the writer comes after "
                  f"{seconds:g} s):")
            show("microphone on the FIFO", slow)
            show("microphone 'mic' (opens at once)", quick)
    finally:
        pulse.stop()


if __name__ == "__main__":
    asyncio.run(main())
