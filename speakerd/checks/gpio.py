"""Checks of the GPIO parts: the LEDs open and blink, each button reads released at rest."""

from __future__ import annotations

import time
import warnings
from typing import Any

from gpiozero import Button
from gpiozero.exc import GPIOZeroError

from speakerd import config as configmod
from speakerd.checks.report import Report, fail, ok, skip, warn
from speakerd.leds.apa102 import Ring, describe
from speakerd.leds.gpio import GpioLeds
from speakerd.leds.patterns import Pattern

ACCESS_FIX = ("run check with sudo (the service's user is in the gpio group); on a Pi "
              "gpiozero needs python3-lgpio (install.sh installs it); check that nothing "
              "else holds these pins")
BUTTONS = ("mute", "talk", "volume_up", "volume_down")


def check(report: Report, config: configmod.Config, *, running: bool,
          pin_factory: Any = None) -> None:
    leds = config.leds
    buttons = {n: getattr(config.buttons, n) for n in BUTTONS if getattr(config.buttons, n)}
    if leds.kind != "apa102" and not leds.pins and not buttons:
        report.add(skip("GPIO", "no LEDs or buttons configured"))
        return
    if running:
        report.add(skip("GPIO", "the running speakerd holds the pins; to test them: sudo "
                        "systemctl stop speakerd, check, then start it"))
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gpiozero's fallback warnings; the lines say it
        if leds.kind == "apa102":
            _ring(report, leds, pin_factory)
        elif leds.pins:
            _leds(report, leds, pin_factory)
        for name, pin in buttons.items():
            _button(report, name, pin, config.buttons.pull_up, pin_factory)


def _leds(report: Report, leds: configmod.LedsConfig, pin_factory: Any) -> None:
    what = "LEDs on GPIO " + ", ".join(f"{n} {p}" for n, p in leds.pins.items())
    try:
        device = GpioLeds(leds, pin_factory)
    except (GPIOZeroError, OSError, RuntimeError) as e:
        report.add(fail("LEDs", f"{what}: cannot open: {type(e).__name__}: {e}", ACCESS_FIX))
        return
    try:
        # Blocks for the blink: the person looking at the LEDs sees it now.
        device.device.blink(on_time=0.3, off_time=0.2, n=1, background=False)
    finally:
        device.close()
    report.add(ok("LEDs", f"{what}: open, blinked once"))


def _ring(report: Report, leds: configmod.LedsConfig, pin_factory: Any) -> None:
    from speakerd.leds import pin_factory_or_default
    what = f"LED ring ({describe(leds)})"
    try:
        ring = Ring(leds, pin_factory_or_default(pin_factory))
    except (GPIOZeroError, OSError, RuntimeError) as e:
        report.add(fail("LEDs", f"{what}: cannot open: {type(e).__name__}: {e}", ACCESS_FIX))
        return
    try:
        ring.show(Pattern("solid", (1.0, 1.0, 1.0)))
        time.sleep(0.3)  # on long enough for a person to see; nothing waits on it
    finally:
        ring.close()
    report.add(ok("LEDs", f"{what}: open, lit for 0.3 s"))


def _button(report: Report, name: str, pin: int, pull_up: bool, pin_factory: Any) -> None:
    what = f"{name} button"
    try:
        button = Button(pin, pull_up=pull_up, pin_factory=pin_factory)
    except (GPIOZeroError, OSError, RuntimeError) as e:
        report.add(fail(what, f"GPIO {pin}: cannot open: {type(e).__name__}: {e}",
                        ACCESS_FIX))
        return
    try:
        pressed, high = button.is_pressed, bool(button.pin.state)
    finally:
        button.close()
    level = f"{'high' if high else 'low'}, pulled {'up' if pull_up else 'down'}"
    if pressed:
        report.add(warn(what, f"GPIO {pin} reads pressed at rest ({level})",
                        f"a stuck button or a wiring fault: check the wire from GPIO {pin}; "
                        "a button wired to 3.3 V instead of ground needs [buttons] "
                        f"pull_up = {'false' if pull_up else 'true'}"))
    else:
        report.add(ok(what, f"GPIO {pin} reads released ({level})"))
