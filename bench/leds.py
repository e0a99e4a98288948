"""CPU of the LED ring's animator thread, against the wake-word detector in the same run.

    .venv/bin/python bench/leds.py [SECONDS]      # default 30 s per variant, ~3 min

Each variant drives a 12-pixel ring (the ReSpeaker 4-mic array) through speakerd's
Leds for SECONDS of wall time with nothing else running, and reads the animator
thread's own CPU clock (pthread_getcpuclockid):

- spin (thinking), frames handed to an SPI that only takes the bytes: the animator's
  own cost, as with the Pi's spidev driver (one ioctl a frame on top of it);
- spin, bit-banged through gpiozero's software SPI on mock pins: the order of the
  fallback path's cost without spidev (mock pins also record every edge);
- breathe (speaking, 30 frames a second), taken bytes;
- solid (listening): a static pattern, written once.

The baseline is speakerd's wake-word Detector (hey_jarvis) on 80 ms frames of quiet
noise: CPU seconds per minute of audio, measured in the same process. Prints CPU
seconds per minute and the ratio to the detector; asserts nothing.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))


def thread_cpu(thread: threading.Thread) -> float:
    """CPU seconds (user and system) that `thread` has used, to the nanosecond."""
    assert thread.ident is not None
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


class TakeBytes:
    """An SPI that takes each frame and does nothing with it."""

    def transfer(self, data: list[int]) -> list[int]:
        return [0] * len(data)

    def close(self) -> None:
        pass


class TakeBytesFactory:
    def spi(self, **spi_args: int) -> TakeBytes:
        return TakeBytes()


def animator(state: str, seconds: float, factory) -> tuple[float, int]:
    """CPU seconds per minute of the animator thread showing `state`, frames sent."""
    from speakerd.config import LedsConfig
    from speakerd.leds import Leds

    leds = Leds(LedsConfig(kind="apa102", count=12, spi_device=1), pin_factory=factory)
    assert leds.device is not None, "the ring did not open"
    thread = next(t for t in threading.enumerate() if t.name == "speakerd-leds")
    leds.show(state)
    start, t0 = thread_cpu(thread), time.monotonic()
    pins = getattr(factory, "pins", {})
    while time.monotonic() - t0 < seconds:
        time.sleep(0.5)
        for pin in list(pins.values()):  # mock pins keep every edge: drop them
            pin.clear_states()
    cpu = thread_cpu(thread) - start
    frames = leds.device.frames_sent
    leds.close()
    return cpu * 60 / seconds, frames


def detector_cpu_per_minute(seconds: float) -> float:
    """The wake-word detector's CPU seconds per minute of audio (one model)."""
    import numpy as np

    from speakerd.config import WakeWordConfig
    from speakerd.wakeword import Detector

    det = Detector.from_config(WakeWordConfig())
    det.warm_up()
    rng = np.random.default_rng(5)
    frames = int(seconds / 0.08)
    audio = (300 * rng.standard_normal(1280 * frames)).astype("<i2").tobytes()
    start = time.thread_time()
    for i in range(frames):
        det.process(audio[i * 2560:(i + 1) * 2560])
    cpu = time.thread_time() - start
    det.close()
    return cpu * 60 / seconds


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 30.0
    from gpiozero import Device
    from gpiozero.pins.mock import MockFactory

    base = detector_cpu_per_minute(seconds)
    print(f"wake-word detector (hey_jarvis): {base:6.3f} CPU s per minute of audio")
    mock = MockFactory()
    Device.pin_factory = mock  # gpiozero's software SPI bus wants a default factory
    variants = [("spin, bytes taken (as spidev)", "thinking", TakeBytesFactory()),
                ("spin, software SPI on mock pins", "thinking", mock),
                ("breathe, bytes taken (as spidev)", "responding", TakeBytesFactory()),
                ("solid, bytes taken (as spidev)", "listening", TakeBytesFactory())]
    for name, state, factory in variants:
        cpu, frames = animator(state, seconds, factory)
        print(f"ring animator, {name:34s} {cpu:6.3f} CPU s/min  {frames / seconds:5.1f} "
              f"frames/s  {cpu / base:6.3f} x the detector")


if __name__ == "__main__":
    main()
