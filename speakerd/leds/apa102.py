"""APA102 pixel rings on gpiozero's SPI: the frames on the wire and the animator thread."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from gpiozero import OutputDevice
from gpiozero.exc import GPIOZeroError

from speakerd.config import LedsConfig
from speakerd.leds.patterns import Pattern, Pixel, next_change, render
from speakerd.threads import name_os_thread

log = logging.getLogger(__name__)

MAX_BRIGHTNESS = 31  # the APA102's global brightness is 5 bits


def frame(pixels: Sequence[Pixel], brightness: int) -> list[int]:
    """The bytes of one update of the whole ring.

    A start frame of 32 zero bits; per pixel 0b111 and the 5-bit global brightness,
    then blue, green, red; an end frame of zeros, at least half a clock per pixel
    (each pixel delays the data by half a clock) and at least 32 bits.
    """
    out = [0, 0, 0, 0]
    head = 0xE0 | brightness
    for r, g, b in pixels:
        out += (head, b, g, r)
    return out + [0] * max(4, (len(pixels) + 15) // 16)


class Ring:
    """`count` APA102 pixels on SPI `spi_port`.`spi_device` of the pin factory, with an
    optional power pin driven high while open. Opening raises gpiozero's error when
    there is no GPIO. `show(pattern)` returns at once: one animator thread draws the
    pattern, sending a frame only when a pixel changes (a static pattern is sent once,
    a breathe at FPS frames a second)."""

    def __init__(self, config: LedsConfig, factory: Any) -> None:
        self.count = config.count
        self.brightness = round(config.brightness * MAX_BRIGHTNESS)
        self.frames_sent = 0
        self.power: OutputDevice | None = None
        self._spi = factory.spi(port=config.spi_port, device=config.spi_device)
        try:
            if config.power_pin:
                self.power = OutputDevice(config.power_pin, initial_value=True,
                                          pin_factory=factory)
        except BaseException:
            self._spi.close()
            raise
        self._cond = threading.Condition()
        self._pattern: Pattern | None = None
        self._started = 0.0
        self._generation = 0  # bumped by every show() that changes the pattern
        self._stopping = False
        self._thread = threading.Thread(target=self._animate, name="speakerd-leds",
                                        daemon=True)
        self._thread.start()

    def show(self, pattern: Pattern) -> None:
        with self._cond:
            if pattern == self._pattern:
                return  # e.g. responding -> audio_playing: the breathe runs on unbroken
            self._pattern = pattern
            self._started = time.monotonic()
            self._generation += 1
            self._cond.notify()

    def _animate(self) -> None:
        name_os_thread()
        last: tuple[Pixel, ...] | None = None
        while True:
            with self._cond:
                while self._pattern is None and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                pattern, started, generation = self._pattern, self._started, self._generation
            assert pattern is not None
            t = time.monotonic() - started
            pixels = render(pattern, self.count, t)
            if pixels != last:
                try:
                    self._write(pixels)
                except (OSError, GPIOZeroError) as e:
                    log.error("the LED ring stopped: writing to SPI failed (%s: %s)",
                              type(e).__name__, e)
                    return
                last = pixels
            wait = next_change(pattern, self.count, t)
            with self._cond:
                if self._generation == generation and not self._stopping:
                    self._cond.wait(wait)

    def _write(self, pixels: Sequence[Pixel]) -> None:
        self._spi.transfer(frame(pixels, self.brightness))
        self.frames_sent += 1

    def close(self) -> None:
        """Stop and join the animator, dark the pixels, power pin low, release SPI."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()
        try:
            self._write(((0, 0, 0),) * self.count)
        finally:
            if self.power is not None:
                self.power.off()
                self.power.close()
            self._spi.close()


def describe(config: LedsConfig) -> str:
    """How the journal names the ring: '3 APA102 pixels on SPI 0.1, power GPIO 5'."""
    power = f", power GPIO {config.power_pin}" if config.power_pin else ""
    return f"{config.count} APA102 pixels on SPI {config.spi_port}.{config.spi_device}{power}"

