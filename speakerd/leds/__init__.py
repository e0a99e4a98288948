"""The status lights: one pattern per session state, on GPIO LEDs or an APA102 pixel ring."""

from __future__ import annotations

import logging
import warnings
from typing import Any

from gpiozero import Device
from gpiozero.exc import GPIOZeroError, SPISoftwareFallback

from speakerd.config import LedsConfig
from speakerd.leds.apa102 import Ring, describe
from speakerd.leds.gpio import GpioLeds
from speakerd.leds.patterns import DEFAULT_PATTERNS, RING_PATTERNS, Pattern, table

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_PATTERNS", "RING_PATTERNS", "Leds", "Pattern"]


class Leds:
    """`show(state)` replaces the running pattern and returns at once: plain LEDs run
    their patterns in gpiozero's background threads, a pixel ring in its animator
    thread, so the loop never waits on a light. Without GPIO (or SPI) access it logs
    one line and shows nothing; call `close()` on the way out."""

    def __init__(self, config: LedsConfig, *, pin_factory: Any = None) -> None:
        ring = config.kind == "apa102"
        self.patterns = table(RING_PATTERNS if ring else DEFAULT_PATTERNS, config.patterns)
        self.device: GpioLeds | Ring | None = None
        self.state = ""  # the pattern shown, by its state's name
        if ring:
            what = f"LED ring ({describe(config)})"
        elif config.pins:
            what = "LEDs on GPIO " + ", ".join(f"{n} {p}" for n, p in config.pins.items())
        else:
            return
        try:
            with warnings.catch_warnings(record=True) as caught:
                # gpiozero warns once per pin factory it tries; our one line says it all.
                warnings.simplefilter("always")
                self.device = (Ring(config, pin_factory_or_default(pin_factory)) if ring
                               else GpioLeds(config, pin_factory))
        except (GPIOZeroError, OSError, RuntimeError) as e:
            log.warning("%s %s off: no GPIO access here (%s: %s); speakerd runs on "
                        "without %s", what, "is" if ring else "are", type(e).__name__, e,
                        "it" if ring else "them")
            return
        for w in caught:
            if issubclass(w.category, SPISoftwareFallback):
                log.warning("%s: no hardware SPI here (%s); clocking the pixels out in "
                            "software on the same pins", what, w.message)

    def show(self, state: str) -> None:
        log.debug("LEDs show %s", state)
        self.state = state
        if self.device is not None:
            self.device.show(self.patterns.get(state, self.patterns["idle"]))

    def close(self) -> None:
        if self.device is not None:
            self.device.close()
            self.device = None


def pin_factory_or_default(pin_factory: Any) -> Any:
    """The given pin factory, else gpiozero's default one (raising when there is none)."""
    if pin_factory is not None:
        return pin_factory
    Device.ensure_pin_factory()
    return Device.pin_factory
