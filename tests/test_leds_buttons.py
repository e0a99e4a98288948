"""LEDs and buttons on gpiozero's mock pins; timings from the pins' own recorded changes."""

from __future__ import annotations

import asyncio
import logging
import statistics
import subprocess
import threading
import time
import warnings

import pytest
from gpiozero import Device
from gpiozero.exc import SPISoftwareFallback
from gpiozero.pins.mock import MockFactory, MockPWMPin, MockSPIDevice

from speakerd.buttons import Buttons
from speakerd.config import ButtonsConfig, LedsConfig
from speakerd.leds import Leds
from speakerd.leds.apa102 import frame
from speakerd.leds.patterns import Pattern, render
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
        lines = [r.getMessage() for r in caplog.records
                 if r.name == "speakerd.leds" and r.levelno >= logging.INFO]
        assert lines == ["LEDs on GPIO red 17, green 27, blue 22 are off: no GPIO access "
                         "here (BadPinFactory: Unable to load any default pin factory!); "
                         "speakerd runs on without them"]


# --- APA102 pixel rings on gpiozero's software SPI over mock pins --------------------

Pixel = tuple[int, int, int]
OFF, RED_PX, BLUE_PX, CYAN_PX = (0, 0, 0), (255, 0, 0), (0, 0, 255), (0, 255, 255)


class Apa102Decoder(MockSPIDevice):
    """The ring's side of the wire: SPI0 clock GPIO11, data GPIO10, the chip select of
    spi_device 0 (GPIO8) or 1 (GPIO7). Keeps the bytes of each transfer (select low to
    high) and decodes them as APA102 frames, asserting the framing."""

    def __init__(self, factory: MockFactory, count: int, select_pin: int = 8) -> None:
        super().__init__(clock_pin=11, mosi_pin=10, select_pin=select_pin,
                         pin_factory=factory)
        self.count = count
        self.transfers: list[bytes] = []

    def on_select(self) -> None:
        super().on_select()  # selected: a new transfer starts
        if self.select_pin.state != self.select_high and self.rx_buf:
            bits = "".join("1" if b else "0" for b in self.rx_buf)
            self.transfers.append(bytes(int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)))
            self.rx_buf = []

    def frames(self) -> list[tuple[int, tuple[Pixel, ...]]]:
        """(global brightness, pixels as (r, g, b)) per transfer."""
        return [self.decode(t) for t in list(self.transfers)]

    def pixels(self) -> list[tuple[Pixel, ...]]:
        return [px for _, px in self.frames()]

    def decode(self, data: bytes) -> tuple[int, tuple[Pixel, ...]]:
        n = self.count
        assert data[:4] == bytes(4), data.hex()  # start frame: 32 zero bits
        body, end = data[4:4 + 4 * n], data[4 + 4 * n:]
        assert end == bytes(max(4, (n + 15) // 16)), data.hex()  # >= n/2 clocks of zeros
        heads = {body[i] for i in range(0, 4 * n, 4)}
        assert len(heads) == 1 and heads.pop() >> 5 == 0b111, data.hex()
        pixels = tuple((body[i + 3], body[i + 2], body[i + 1]) for i in range(0, 4 * n, 4))
        return body[0] & 0x1F, pixels  # brightness, then B, G, R on the wire

    def wait(self, n: int, timeout: float = 10) -> list[tuple[Pixel, ...]]:
        deadline = time.monotonic() + timeout
        while len(self.transfers) < n:
            assert time.monotonic() < deadline, self.transfers
            time.sleep(0.01)
        return self.pixels()


@pytest.fixture
def spi_factory(monkeypatch):
    """Mock pins for a ring. gpiozero's software SPI bus asks for the default pin
    factory even when given one (gpiozero 2.0.1), so it is set to the same one."""
    f = MockFactory()
    monkeypatch.setattr(Device, "pin_factory", f)
    yield f
    f.reset()


def ring(factory: MockFactory, count: int = 3, select_pin: int = 8, **kw
         ) -> tuple[Leds, Apa102Decoder]:
    wire = Apa102Decoder(factory, count, select_pin)
    cfg = LedsConfig(kind="apa102", count=count, spi_device=(8, 7).index(select_pin), **kw)
    return Leds(cfg, pin_factory=factory), wire


def head(pixels: tuple[Pixel, ...]) -> int:
    return max(range(len(pixels)), key=lambda i: sum(pixels[i]))


class TestRingFraming:
    def test_frame_is_start_pixels_with_brightness_bgr_and_end(self):
        assert frame([(255, 0, 0), (0, 255, 0), (1, 2, 3)], 16) == [
            0, 0, 0, 0, 0xF0, 0, 0, 255, 0xF0, 0, 255, 0, 0xF0, 3, 2, 1, 0, 0, 0, 0]

    def test_end_frame_grows_with_long_rings(self):
        assert len(frame([(0, 0, 0)] * 100, 31)) == 4 + 400 + 7  # 100 pixels: 50 clocks

    @pytest.mark.parametrize(("state", "pixel"), [
        ("idle", OFF), ("listening", BLUE_PX), ("muted", RED_PX)])
    def test_solid_states_clock_out_exact_frames(self, spi_factory, state, pixel):
        leds, wire = ring(spi_factory)
        leds.show(state)
        wire.wait(1)
        leds.close()
        assert wire.transfers[0] == bytes([0, 0, 0, 0, *(0xF0, pixel[2], pixel[1], pixel[0]) * 3,
                                           0, 0, 0, 0])

    @pytest.mark.parametrize(("brightness", "five_bits"), [(1.0, 31), (0.5, 16), (0.0, 0),
                                                           (0.1, 3)])
    def test_brightness_is_the_global_five_bits(self, spi_factory, brightness, five_bits):
        leds, wire = ring(spi_factory, brightness=brightness)
        leds.show("listening")
        wire.wait(1)
        leds.close()
        assert wire.frames()[0] == (five_bits, (BLUE_PX,) * 3)

    def test_config_colour_override_on_every_pixel(self, spi_factory):
        leds, wire = ring(spi_factory, count=5,
                          patterns={"idle": {"kind": "solid", "color": [1, 0.5, 0.2]}})
        leds.show("idle")
        assert wire.wait(1)[0] == ((255, 128, 51),) * 5
        leds.close()

    def test_a_static_pattern_is_sent_once(self, spi_factory):
        leds, wire = ring(spi_factory)
        leds.show("listening")
        wire.wait(1)
        time.sleep(0.5)  # fifteen frame times
        leds.show("listening")  # the same state again changes nothing
        time.sleep(0.2)
        assert len(wire.transfers) == 1
        leds.close()
        assert wire.pixels()[-1] == (OFF,) * 3  # close darkens the ring

    def test_spin_moves_one_pixel_per_step_and_wraps(self, spi_factory):
        # 4 pixels, one lit, a turn a second: a step every 0.25 s.
        leds, wire = ring(spi_factory, count=4, patterns={
            "thinking": {"kind": "spin", "color": [1, 0, 0], "on_seconds": 1.0, "width": 1}})
        leds.show("thinking")
        frames = wire.wait(7)
        leds.close()
        assert all(sorted(px) == [OFF, OFF, OFF, RED_PX] for px in frames[:7])
        heads = [head(px) for px in frames[:7]]
        assert heads == [0, 1, 2, 3, 0, 1, 2]

    def test_spin_draws_a_fading_tail_behind_the_head(self):
        p = Pattern("spin", (0.0, 1.0, 1.0), 1.2, width=3)
        step = 1.2 / 12
        for k in (0, 1, 11, 12, 13):
            px = render(p, 12, k * step + step / 2)
            h = k % 12
            assert px[h] == CYAN_PX
            assert px[(h - 1) % 12] == (0, 170, 170) and px[(h - 2) % 12] == (0, 85, 85)
            assert sum(map(sum, px)) == 2 * (255 + 170 + 85)  # nothing else lit

    def test_spin_is_a_quarter_of_the_ring_by_default(self):
        p = Pattern("spin", (1.0, 0.0, 0.0), 1.0)
        assert sum(1 for px in render(p, 12, 0.0) if px != OFF) == 3
        assert sum(1 for px in render(p, 3, 0.0) if px != OFF) == 1

    def test_speaking_breathes_through_levels_at_most_30_frames_a_second(self, spi_factory):
        leds, wire = ring(spi_factory)
        leds.show("responding")  # breathe, 1 s in, 1 s out
        time.sleep(1.0)
        leds.show("audio_playing")  # same pattern: the breathe runs on unbroken
        time.sleep(1.0)
        leds.show("idle")
        leds.close()
        frames = wire.pixels()
        levels = [px[0][1] for px in frames[:-2]]  # green of the first pixel
        assert all(len(set(px)) == 1 and px[0][1] == px[0][2] and px[0][0] == 0
                   for px in frames)
        assert len(set(levels)) >= 15  # a fade, not a blink
        assert max(levels) >= 250
        assert levels.index(max(levels)) not in (0, len(levels) - 1)  # up, then down
        assert len(frames) <= 2 * 30 + 4

    def test_connecting_flashes_every_pixel_then_spins(self, spi_factory):
        leds, wire = ring(spi_factory, count=12)
        leds.show("connecting")
        frames = wire.wait(3)
        leds.close()
        assert frames[0] == (BLUE_PX,) * 12  # the wake flash
        assert frames[1][0] == BLUE_PX and frames[1][4:9] == (OFF,) * 5  # the spin

    def test_error_blinks_red(self, spi_factory):
        leds, wire = ring(spi_factory)
        leds.show("error")
        frames = wire.wait(5)
        leds.close()
        assert frames[:5] == [(RED_PX,) * 3, (OFF,) * 3] * 2 + [(RED_PX,) * 3]

    def test_power_pin_high_while_running_low_after_close(self, spi_factory):
        leds, wire = ring(spi_factory, count=12, select_pin=7, power_pin=5)
        assert spi_factory.pin(5).state is True
        leds.show("listening")
        wire.wait(1)
        leds.close()
        assert spi_factory.pin(5).state is False
        assert [s.state for s in spi_factory.pin(5).states] == [False, True, False]
        assert wire.pixels()[-1] == (OFF,) * 12  # dark before the power goes

    def test_close_joins_the_animator(self, spi_factory):
        leds, wire = ring(spi_factory)
        leds.show("thinking")
        wire.wait(2)
        leds.close()
        assert not [t for t in threading.enumerate() if t.name == "speakerd-leds"]
        sent = len(wire.transfers)
        time.sleep(0.3)
        assert len(wire.transfers) == sent

    def test_without_hardware_spi_one_line_and_software_spi(self, spi_factory, caplog):
        class NoSpidev(MockFactory):
            def spi(self, **spi_args):
                warnings.warn(SPISoftwareFallback(
                    "failed to initialize hardware SPI, falling back to software (error "
                    "was: failed to import spidev)"), stacklevel=2)
                return spi_factory.spi(**spi_args)

        wire = Apa102Decoder(spi_factory, 3, 7)
        leds = Leds(LedsConfig(kind="apa102", count=3, spi_device=1), pin_factory=NoSpidev())
        leds.show("muted")
        assert wire.wait(1) == [(RED_PX,) * 3]
        leds.close()
        lines = [r.getMessage() for r in caplog.records
                 if r.name == "speakerd.leds" and r.levelno >= logging.INFO]
        assert lines == ["LED ring (3 APA102 pixels on SPI 0.1): no hardware SPI here "
                         "(failed to initialize hardware SPI, falling back to software "
                         "(error was: failed to import spidev)); clocking the pixels out "
                         "in software on the same pins"]

    def test_no_gpio_is_one_warning_and_no_crash(self, caplog):
        leds = Leds(LedsConfig(kind="apa102", count=12, spi_device=1, power_pin=5))
        assert leds.device is None
        leds.show("thinking")
        leds.close()
        lines = [r.getMessage() for r in caplog.records
                 if r.name == "speakerd.leds" and r.levelno >= logging.INFO]
        assert lines == ["LED ring (12 APA102 pixels on SPI 0.1, power GPIO 5) is off: no "
                         "GPIO access here (BadPinFactory: Unable to load any default pin "
                         "factory!); speakerd runs on without it"]


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


def run_until_ready(tmp_path, config_text: str) -> str:
    """`speakerd run` on the paced devices until READY=1, then SIGTERM; its log."""
    from .notify_socket import NotifySocket
    cfg = tmp_path / "c.toml"
    cfg.write_text('[audio]\ncapture_device = "mic"\nplayback_device = "spk"\n' + config_text)
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
    assert "Warning" not in text and "warn" not in text
    return text


def test_unavailable_gpio_with_pins_configured_runs_on(tmp_path, pulse):
    """Pins configured on a machine without GPIO: one line each, then the daemon runs."""
    text = run_until_ready(tmp_path, "[leds]\npins = { status = 4 }\n[buttons]\nmute = 5\n")
    assert text.count("no GPIO access here") == 2
    assert "LEDs on GPIO status 4 are off" in text and "buttons on GPIO mute 5 are off" in text


def test_preset_board_without_gpio_runs_on(tmp_path, pulse):
    """A ReSpeaker preset on a machine without GPIO or SPI: one line each, then READY."""
    text = run_until_ready(tmp_path, '[hardware]\npreset = "respeaker-2mic"\n')
    assert text.count("no GPIO access here") == 2
    assert "LED ring (3 APA102 pixels on SPI 0.1) is off" in text
    assert "buttons on GPIO talk 17 are off" in text
