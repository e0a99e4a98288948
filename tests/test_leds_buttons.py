"""LEDs and buttons on gpiozero's mock pins; timings from the pins' own recorded changes."""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import time

import pytest
from gpiozero.pins.mock import MockFactory, MockPWMPin

from speakerd.buttons import Buttons
from speakerd.config import ButtonsConfig, LedsConfig
from speakerd.leds import Leds
from speakerd.session import ButtonPressed

from .conftest import ROOT, SPEAKERD, clean_env

RGB = {"red": 17, "green": 27, "blue": 22}


@pytest.fixture
def factory():
    f = MockFactory(pin_class=MockPWMPin)
    yield f
    f.reset()


def values(f: MockFactory) -> tuple[float, float, float]:
    return tuple(round(float(f.pin(p).state), 3) for p in RGB.values())  # type: ignore


def changes(f: MockFactory, pin: int, n: int, timeout: float = 10) -> list:
    """Wait until the pin has recorded n state changes; return them (intervals, values)."""
    deadline = time.monotonic() + timeout
    while len(f.pin(pin).states) < n:
        assert time.monotonic() < deadline, f.pin(pin).states
        time.sleep(0.01)
    return list(f.pin(pin).states)


class TestPatterns:
    @pytest.mark.parametrize(("state", "rgb"), [
        ("idle", (0, 0, 0)), ("listening", (0, 0, 1)), ("responding", (0, 1, 1)),
        ("audio_playing", (0, 1, 1)), ("muted", (1, 0, 0))])
    def test_solid_states(self, factory, state, rgb):
        leds = Leds(LedsConfig(RGB, True, {}), pin_factory=factory)
        leds.show(state)
        assert values(factory) == rgb
        leds.close()

    @pytest.mark.parametrize(("state", "pin", "period"), [("connecting", 22, 0.1),
                                                          ("error", 17, 0.2)])
    def test_blinks_at_the_patterns_rate(self, factory, state, pin, period):
        leds = Leds(LedsConfig(RGB, True, {}), pin_factory=factory)
        leds.show(state)
        states = changes(factory, pin, 12)
        leds.close()
        intervals = [s.timestamp for s in states[3:12]]  # MockPin stores time since last
        assert abs(statistics.median(intervals) - period) < period * 0.3, intervals
        assert {round(float(s.state)) for s in states[2:12]} == {0, 1}

    def test_thinking_pulses_through_intermediate_levels(self, factory):
        leds = Leds(LedsConfig(RGB, True, {}), pin_factory=factory)
        leds.show("thinking")
        states = changes(factory, 22, 40)
        leds.close()
        levels = {round(float(s.state), 2) for s in states}
        assert len([v for v in levels if 0.05 < v < 0.95]) >= 10  # a fade, not a blink
        assert float(factory.pin(17).state) == 0

    def test_new_state_replaces_the_pattern_at_once(self, factory):
        leds = Leds(LedsConfig(RGB, True, {}), pin_factory=factory)
        leds.show("connecting")
        changes(factory, 22, 6)
        leds.show("listening")
        assert values(factory) == (0, 0, 1)
        settled = len(factory.pin(22).states)
        time.sleep(0.5)  # five blink periods: a leftover blink thread would show here
        assert len(factory.pin(22).states) == settled
        leds.close()

    def test_config_overrides_a_pattern(self, factory):
        leds = Leds(LedsConfig(RGB, True, {"idle": {"kind": "solid",
                                                    "color": [0, 0, 0.1]}}),
                    pin_factory=factory)
        leds.show("idle")
        assert values(factory) == (0, 0, 0.1)
        leds.close()

    def test_single_status_led_uses_brightness(self, factory):
        leds = Leds(LedsConfig({"status": 4}, True, {}), pin_factory=factory)
        leds.show("listening")
        assert float(factory.pin(4).state) == 1.0
        leds.show("idle")
        assert float(factory.pin(4).state) == 0.0
        leds.close()

    def test_active_low_inverts_the_pins(self, factory):
        leds = Leds(LedsConfig(RGB, False, {}), pin_factory=factory)
        leds.show("listening")
        assert values(factory) == (1, 1, 0)
        leds.close()

    def test_pins_without_pwm_degrade_to_on_off(self):
        f = MockFactory()  # plain MockPin: no PWM, as on a factory that lacks it
        leds = Leds(LedsConfig(RGB, True, {"idle": {"kind": "solid",
                                                    "color": [0, 0, 0.6]}}), pin_factory=f)
        leds.show("idle")
        assert values(f) == (0, 0, 1)  # 0.6 rounds to on
        leds.show("thinking")  # a pulse needs PWM: it blinks instead
        states = changes(f, 22, 6)
        assert {s.state for s in states[1:6]} == {True, False}
        leds.close()
        f.reset()

    def test_no_pins_configured_does_nothing(self):
        leds = Leds(LedsConfig({}, True, {}))
        leds.show("listening")
        assert leds.device is None

    def test_no_gpio_is_one_warning_and_no_crash(self, caplog):
        leds = Leds(LedsConfig(RGB, True, {}))  # this machine has no GPIO at all
        assert leds.device is None
        leds.show("listening")
        lines = [r.getMessage() for r in caplog.records if r.name == "speakerd.leds"]
        assert lines == ["LEDs on GPIO red 17, green 27, blue 22 are off: no GPIO access "
                         "here (BadPinFactory: Unable to load any default pin factory!); "
                         "speakerd runs on without them"]


class Pressed:
    def __init__(self) -> None:
        self.got: list[str] = []
        self.event = asyncio.Event()

    def __call__(self, inp: ButtonPressed) -> None:
        self.got.append(inp.button)
        self.event.set()

    async def wait(self, n: int, timeout: float = 10) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(self.got) < n:
            self.event.clear()
            await asyncio.wait_for(self.event.wait(), deadline - time.monotonic())
        return self.got


def buttons(factory, pressed, **kw) -> Buttons:
    cfg = ButtonsConfig(**{"mute": 5, "talk": 6, "volume_up": 13, "volume_down": 19,
                           "bounce_time": 0.05, **kw})
    return Buttons(cfg, loop=asyncio.get_running_loop(), on_input=pressed,
                   pin_factory=factory)


class TestButtons:
    async def test_each_button_is_an_input_on_the_loop(self):
        f, pressed = MockFactory(), Pressed()
        b = buttons(f, pressed)
        for pin in (5, 13, 19):
            f.pin(pin).drive_low()
            f.pin(pin).drive_high()
        assert await pressed.wait(3) == ["mute", "volume_up", "volume_down"]
        b.close()

    async def test_short_talk_press_is_talk(self):
        f, pressed = MockFactory(), Pressed()
        b = buttons(f, pressed)
        f.pin(6).drive_low()
        f.pin(6).drive_high()
        assert await pressed.wait(1) == ["talk"]
        b.close()

    async def test_holding_talk_two_seconds_is_talk_long_not_talk(self):
        f, pressed = MockFactory(), Pressed()
        b = buttons(f, pressed)
        f.pin(6).drive_low()
        assert await pressed.wait(1, timeout=5) == ["talk_long"]
        f.pin(6).drive_high()
        f.pin(5).drive_low()  # a later press proves the release reported nothing
        assert await pressed.wait(2) == ["talk_long", "mute"]
        b.close()

    async def test_bounce_is_ignored(self):
        f, pressed = MockFactory(), Pressed()
        b = buttons(f, pressed, bounce_time=0.2)
        pin = f.pin(5)
        for _ in range(3):  # contact bounce: three edges within a few ms
            pin.drive_low()
            pin.drive_high()
        await pressed.wait(1)
        time.sleep(0.3)
        pin.drive_low()  # a real second press, after the bounce time
        assert await pressed.wait(2) == ["mute", "mute"]
        b.close()


def test_unavailable_gpio_with_pins_configured_runs_on(tmp_path, pulse):
    """Pins configured on a machine without GPIO: one line each, then the daemon runs."""
    from .notify_socket import NotifySocket
    cfg = tmp_path / "c.toml"
    cfg.write_text('[audio]\ncapture_device = "mic"\nplayback_device = "spk"\n'
                   "[leds]\npins = { status = 4 }\n[buttons]\nmute = 5\n")
    sock = NotifySocket(tmp_path / "n.sock")
    log = tmp_path / "log"
    with log.open("w") as err:
        proc = subprocess.Popen([*SPEAKERD, "run", "--config", str(cfg)], cwd=ROOT,
                                stderr=err, env=clean_env(NOTIFY_SOCKET=sock.path))
    try:
        sock.wait_for("READY", "1")
        proc.terminate()
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        sock.close()
    text = log.read_text()
    assert text.count("no GPIO access here") == 2
    assert "LEDs on GPIO status 4 are off" in text and "buttons on GPIO mute 5 are off" in text
    assert "Warning" not in text and "warn" not in text
