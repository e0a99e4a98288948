"""Audio path figures: capture CPU, enqueue->write latency, flush->silence, drain accuracy.

    .venv/bin/python bench/audio.py [RUNS]

Needs pulseaudio and pulseaudio-utils (./run-tests installs them). Starts its own
PulseAudio daemon with the test fixture's null sinks, so nothing on the host is
touched. Prints medians and p95s, in ms and as multiples of the 20 ms period.
"""

from __future__ import annotations

import asyncio
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import audio_devices  # noqa: I001  (sets ALSA_CONFIG_PATH before alsa-lib loads)

import numpy as np
import soxr

from speakerd.audio import capture as cap
from speakerd.audio import playback as pb
from speakerd.audio import resample

PERIOD_MS = pb.PERIOD_MS


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def line(name: str, seconds: list[float]) -> None:
    med, p95 = statistics.median(seconds) * 1000, pct(seconds, 0.95) * 1000
    print(f"{name:34s} median {med:7.1f} ms ({med / PERIOD_MS:4.1f} periods)   "
          f"p95 {p95:7.1f} ms ({p95 / PERIOD_MS:4.1f} periods)   n={len(seconds)}")


async def capture_cpu(tmp: Path, seconds: int = 60) -> None:
    """CPU per second of audio: the whole capture path vs soxr alone on the same audio."""
    rng = np.random.default_rng(1)
    x = (0.2 * rng.standard_normal((48000 * seconds, 2))).astype(np.float32)
    raw = np.clip(np.rint(x.astype(np.float64) * 2**31), -2**31, 2**31 - 1).astype("<i4").tobytes()
    (tmp / "in.raw").write_bytes(raw)
    fmt = resample.DeviceFormat(48000, 2, "S32_LE")

    start = cpu()
    stream = soxr.ResampleStream(48000, 16000, 1, dtype="float32", quality="HQ")
    mono = x[:, 0].copy()
    for i in range(0, mono.size, 960):
        stream.resample_chunk(mono[i:i + 960])
    soxr_alone = cpu() - start

    done = asyncio.Event()
    frames = seconds * 1000 // cap.FRAME_MS
    count = 0

    def on_frame(frame: bytes) -> None:
        nonlocal count
        count += 1
        if count >= frames:
            done.set()

    c = cap.Capture(f"filein:FILE={tmp}/in.raw", loop=asyncio.get_running_loop(),
                    on_frame=on_frame, fmt=fmt, max_pending_frames=100_000)
    start = cpu()
    c.start()
    await done.wait()
    c.stop()
    full = cpu() - start
    print(f"capture 48k/2ch/S32 -> 16k frames: {full / seconds * 1000:.2f} ms CPU per second "
          f"of audio; soxr alone {soxr_alone / seconds * 1000:.2f} ms; ratio "
          f"{full / soxr_alone:.2f}")


class Monitor:
    """parec on spk.monitor, with the arrival time of every 10 ms block."""

    def __init__(self, pulse: audio_devices.Pulse) -> None:
        self.blocks: list[tuple[float, float]] = []  # (arrival, rms)
        self.proc = subprocess.Popen(
            ["parec", "-d", "spk.monitor", "--raw", "--format=s16le", "--rate=24000",
             "--channels=1", "--latency-msec=5"], env=pulse.env, stdout=subprocess.PIPE)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while block := self.proc.stdout.read(480):
            x = np.frombuffer(block, "<i2").astype(np.float64)
            self.blocks.append((time.monotonic(), float(np.sqrt(np.mean(x**2)))))

    def last_loud_after(self, t: float) -> float | None:
        loud = [at for at, level in self.blocks if at >= t and level > 500]
        return loud[-1] if loud else None

    def first_quiet_after(self, t: float) -> float | None:
        return next((at for at, level in self.blocks if at >= t and level < 50), None)

    def stop(self) -> None:
        self.proc.terminate()


async def paced(pulse: audio_devices.Pulse, runs: int) -> None:
    loop = asyncio.get_running_loop()
    drained: asyncio.Queue[float] = asyncio.Queue()
    flushed: asyncio.Queue[float] = asyncio.Queue()
    p = pb.Playback("spk", loop=loop, on_drained=lambda rid: drained.put_nowait(
        time.monotonic()), on_flushed=lambda played: flushed.put_nowait(time.monotonic()))
    p.start()
    monitor = Monitor(pulse)
    tone = resample.float_to_s16(0.5 * np.sin(2 * np.pi * 440 * np.arange(12000) / 24000))
    to_write, drain_error, to_silence = [], [], []
    for n in range(runs):
        before = p.frames_written
        t0 = time.monotonic()
        p.enqueue(tone, f"d{n}")
        while p.frames_written == before:  # busy-wait: this is the figure measured
            await asyncio.sleep(0)
        to_write.append(time.monotonic() - t0)
        p.finish(f"d{n}")
        at = await drained.get()
        await asyncio.sleep(0.15)  # let the monitor catch the tail
        end = monitor.last_loud_after(t0)
        if end is not None:
            drain_error.append(at - end)
    for n in range(runs):
        p.enqueue(tone * 4, f"f{n}")
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        p.flush()
        await flushed.get()
        await asyncio.sleep(0.3)
        quiet = monitor.first_quiet_after(t0)
        if quiet is not None:
            to_silence.append(quiet - t0)
    p.stop()
    monitor.stop()
    print(f"playback: {PERIOD_MS} ms periods x {pb.PERIODS} = {PERIOD_MS * pb.PERIODS} ms "
          f"buffer at {p.got.rate if p.got else '?'} Hz")
    line("enqueue -> written to ALSA", to_write)
    line("flush -> silence at the monitor", to_silence)
    # Positive: the callback came after the last loud block reached the monitor.
    line("drain callback - play-out end", drain_error)
    print("  (play-out end = arrival of the last loud 10 ms block at spk.monitor through "
          "parec with 5 ms latency; it includes the sink's own latency)")


async def main(runs: int) -> None:
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        await capture_cpu(Path(tmp))
    pulse = audio_devices.Pulse()
    pulse.start()
    try:
        await paced(pulse, runs)
    finally:
        pulse.stop()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 30))
