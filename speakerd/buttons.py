"""GPIO buttons: mute, talk (held: end), volume up and down, handed to the loop."""

from __future__ import annotations

import asyncio
import logging
import time
import warnings
from collections.abc import Callable
from typing import Any

from gpiozero import Button
from gpiozero.exc import GPIOZeroError

from speakerd.config import ButtonsConfig
from speakerd.session import ButtonPressed

log = logging.getLogger(__name__)

HOLD_SECONDS = 2.0  # a talk press this long ends the conversation instead


class Buttons:
    """Turns presses into ButtonPressed inputs on the loop (gpiozero calls back from its
    own threads). Talk is reported on release, so a long hold can mean "end" instead."""

    def __init__(self, config: ButtonsConfig, *, loop: asyncio.AbstractEventLoop,
                 on_input: Callable[[ButtonPressed], None], pin_factory: Any = None) -> None:
        self._loop = loop
        self._on_input = on_input
        self._bounce = config.bounce_time
        self._last: dict[str, float] = {}
        self.buttons: dict[str, Button] = {}
        wanted = {n: getattr(config, n) for n in ("mute", "talk", "volume_up", "volume_down")
                  if getattr(config, n)}
        if not wanted:
            return
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # gpiozero's per-factory fallback warnings
                for name, pin in wanted.items():
                    self.buttons[name] = Button(pin, pull_up=config.pull_up,
                                                bounce_time=config.bounce_time or None,
                                                hold_time=HOLD_SECONDS, pin_factory=pin_factory)
        except (GPIOZeroError, OSError, RuntimeError) as e:
            log.warning("buttons on GPIO %s are off: no GPIO access here (%s: %s); speakerd "
                        "runs on without them", ", ".join(f"{n} {p}" for n, p in
                                                          wanted.items()),
                        type(e).__name__, e)
            self.close()
            return
        self._talk_held = False
        for name, button in self.buttons.items():
            if name == "talk":
                button.when_held = self._talk_held_down
                button.when_released = self._talk_released
            else:
                button.when_pressed = lambda n=name: self._pressed(n)

    def _talk_held_down(self) -> None:
        self._talk_held = True
        self._hand("talk_long")

    def _talk_released(self) -> None:
        if self._talk_held:
            self._talk_held = False  # that was a hold, already reported
        else:
            self._pressed("talk")

    def _pressed(self, name: str) -> None:
        # Debounced here as well as by the pin factory: not every factory filters
        # (lgpio does, in its own thread; others and mock pins do not).
        now = time.monotonic()
        if now - self._last.get(name, -1e9) < self._bounce:
            return
        self._last[name] = now
        self._hand(name)

    def _hand(self, name: str) -> None:
        log.debug("%s button pressed", name)
        self._loop.call_soon_threadsafe(self._on_input, ButtonPressed(name))

    def close(self) -> None:
        for button in self.buttons.values():
            button.close()
        self.buttons = {}
