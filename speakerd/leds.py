"""GPIO LEDs: one pattern per session state, on an RGB LED or a single status LED."""

from __future__ import annotations

import collections
import logging
import warnings
from dataclasses import dataclass
from typing import Any

from gpiozero import LED, PWMLED, RGBLED
from gpiozero.exc import GPIOZeroError

from speakerd.config import LedsConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Pattern:
    kind: str  # off | solid | blink | pulse
    color: tuple[float, float, float] = (0.0, 0.0, 0.0)
    on_seconds: float = 0.5  # blink: time lit; pulse: fade-in time
    off_seconds: float = 0.5  # blink: time dark; pulse: fade-out time


BLUE, CYAN, RED = (0.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 0.0, 0.0)
# What a person across the room should read off the LED; [leds.patterns] overrides.
DEFAULT_PATTERNS: dict[str, Pattern] = {
    "idle": Pattern("off"),
    "connecting": Pattern("blink", BLUE, 0.1, 0.1),
    "listening": Pattern("solid", BLUE),
    "thinking": Pattern("pulse", BLUE, 0.5, 0.5),
    "responding": Pattern("solid", CYAN),
    "audio_playing": Pattern("solid", CYAN),
    "muted": Pattern("solid", RED),
    "error": Pattern("blink", RED, 0.2, 0.2),
}


def patterns(config: LedsConfig) -> dict[str, Pattern]:
    table = dict(DEFAULT_PATTERNS)
    for state, spec in config.patterns.items():
        base = table[state]
        table[state] = Pattern(spec.get("kind", base.kind),
                               tuple(spec.get("color", base.color)),  # type: ignore[arg-type]
                               float(spec.get("on_seconds", base.on_seconds)),
                               float(spec.get("off_seconds", base.off_seconds)))
    return table


class Leds:
    """`show(state)` replaces the running pattern at once; patterns run in gpiozero's
    own background threads, so the loop never waits on an LED."""

    def __init__(self, config: LedsConfig, *, pin_factory: Any = None) -> None:
        self.patterns = patterns(config)
        self.device: RGBLED | PWMLED | LED | None = None
        self.rgb = "status" not in config.pins
        self.pwm = False  # whether the pins could be opened for PWM (levels, fades)
        self.state = ""
        self.history: collections.deque[str] = collections.deque(maxlen=200)
        if not config.pins:
            return
        pins = ", ".join(f"{name} {pin}" for name, pin in config.pins.items())
        try:
            with warnings.catch_warnings():
                # gpiozero warns once per pin factory it tries; our one line says it all.
                warnings.simplefilter("ignore")
                self.device = self._open(config, pin_factory)
        except (GPIOZeroError, OSError, RuntimeError) as e:
            log.warning("LEDs on GPIO %s are off: no GPIO access here (%s: %s); speakerd "
                        "runs on without them", pins, type(e).__name__, e)

    def _open(self, config: LedsConfig, factory: Any) -> RGBLED | PWMLED | LED:
        p = config.pins
        kw = {"active_high": config.active_high, "pin_factory": factory}
        self.pwm = True
        try:
            if self.rgb:
                return RGBLED(p["red"], p["green"], p["blue"], pwm=True, **kw)
            return PWMLED(p["status"], **kw)
        except GPIOZeroError:  # a pin factory without PWM: levels are on/off
            self.pwm = False
        if self.rgb:
            return RGBLED(p["red"], p["green"], p["blue"], pwm=False, **kw)
        return LED(p["status"], **kw)

    def show(self, state: str) -> None:
        self.state = state
        self.history.append(state)
        if self.device is None:
            return
        pat = self.patterns.get(state, DEFAULT_PATTERNS["idle"])
        dev = self.device
        # Without PWM a level is on or off; a single LED shows the brightest channel.
        rgb = pat.color if self.pwm else tuple(float(round(c)) for c in pat.color)
        on: Any = rgb if self.rgb else max(rgb)
        if pat.kind == "off" or not max(rgb):
            dev.off()
        elif pat.kind == "solid":
            dev.value = on
        elif pat.kind == "pulse" and self.pwm:
            kw = {"on_color": on} if self.rgb else {}
            dev.pulse(fade_in_time=pat.on_seconds, fade_out_time=pat.off_seconds, **kw)
        else:  # blink, or a pulse on pins without PWM
            kw = {"on_color": on} if self.rgb else {}
            dev.blink(on_time=pat.on_seconds, off_time=pat.off_seconds, **kw)

    def close(self) -> None:
        if self.device is not None:
            self.device.close()
            self.device = None
