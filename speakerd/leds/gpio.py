"""Plain GPIO LEDs: an RGB LED or one status LED, patterns run by gpiozero's own threads."""

from __future__ import annotations

from typing import Any

from gpiozero import LED, PWMLED, RGBLED
from gpiozero.exc import GPIOZeroError

from speakerd.config import LedsConfig
from speakerd.leds.patterns import Pattern


class GpioLeds:
    """Opens the pins at construction (raising gpiozero's error when it cannot);
    `show(pattern)` replaces the running pattern at once."""

    def __init__(self, config: LedsConfig, factory: Any) -> None:
        self.rgb = "status" not in config.pins
        self.pwm = False  # whether the pins could be opened for PWM (levels, fades)
        self.device = self._open(config, factory)

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

    def show(self, pat: Pattern) -> None:
        dev = self.device
        # Without PWM a level is on or off; a single LED shows the brightest channel.
        rgb = pat.color if self.pwm else tuple(float(round(c)) for c in pat.color)
        on: Any = rgb if self.rgb else max(rgb)
        if pat.kind == "off" or not max(rgb):
            dev.off()
        elif pat.kind == "solid":
            dev.value = on
        elif pat.kind in ("pulse", "breathe") and self.pwm:
            kw = {"on_color": on} if self.rgb else {}
            dev.pulse(fade_in_time=pat.on_seconds, fade_out_time=pat.off_seconds, **kw)
        else:  # blink, or a pulse on pins without PWM
            kw = {"on_color": on} if self.rgb else {}
            dev.blink(on_time=pat.on_seconds, off_time=pat.off_seconds, **kw)

    def close(self) -> None:
        self.device.close()

