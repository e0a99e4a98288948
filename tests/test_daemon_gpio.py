"""The daemon in-process with mock GPIO pins: LEDs follow a whole conversation, buttons
steer it. Real audio (PulseAudio), real models, the fixture server as the model."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time

import numpy as np
import pytest
from gpiozero import Device
from gpiozero.pins.mock import MockFactory, MockPWMPin

from speakerd import config as configmod
from speakerd import log as logmod
from speakerd.daemon import Daemon
from speakerd.notify import Notifier

from .conftest import leds_shown, need
from .realtime_server import RealtimeServer, Reply
from .speech import have_espeak, silence, speak, write_wav
from .test_e2e_phrases import espeak_pcm, heard_phrase
from .test_leds_buttons import BLUE_PX, CYAN_PX, OFF, Apa102Decoder


async def until(predicate, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


@pytest.fixture
async def running(tmp_path, pulse):
    factory = MockFactory(pin_class=MockPWMPin)
    async with daemon_on(tmp_path, pulse, factory,
                         "[leds]\npins = { red = 17, green = 27, blue = 22 }\n"
                         "[buttons]\nmute = 5\ntalk = 6\nremember_mute = true\n") as running:
        yield running


@pytest.fixture
async def running_ring(tmp_path, pulse, monkeypatch):
    """The daemon on a ReSpeaker 2-mic HAT's preset: 3 APA102 pixels on SPI 0.1."""
    factory = MockFactory()
    monkeypatch.setattr(Device, "pin_factory", factory)  # gpiozero's software SPI bus
    wire = Apa102Decoder(factory, 3, select_pin=7)
    async with daemon_on(tmp_path, pulse, factory,
                         '[hardware]\npreset = "respeaker-2mic"\n') as running:
        yield (*running, wire)


@contextlib.asynccontextmanager
async def daemon_on(tmp_path, pulse, factory: MockFactory, gpio_toml: str):
    need(have_espeak(), "espeak-ng")
    server = RealtimeServer(vad=True, replies=[Reply(audio_ms=800), Reply(audio_ms=600)])
    async with server:
        path = tmp_path / "speakerd.toml"
        path.write_text(
            '[audio]\ncapture_device = "mic"\nplayback_device = "spk"\n'
            f'[realtime]\nurl = "{server.url}"\n[conversation]\nfollow_up_seconds = 3\n'
            + gpio_toml)
        daemon = Daemon(configmod.load(path), notifier=Notifier({}),
                        redact=logmod.RedactFilter(), pin_factory=factory,
                        state_dir=str(tmp_path))
        with leds_shown() as shown:
            task = asyncio.create_task(daemon.run())
            await until(lambda: shown == ["idle"])

            def say(x: np.ndarray, name: str):
                return pulse.play_into_mic(write_wav(tmp_path / f"{name}.wav", x))

            try:
                yield daemon, server, factory, say, shown
            finally:
                daemon.request_stop()
                assert await asyncio.wait_for(task, 20) == 0
                factory.reset()


def press(factory: MockFactory, pin: int) -> None:
    factory.pin(pin).drive_low()
    factory.pin(pin).drive_high()


def request(text: str) -> np.ndarray:
    # People go on right after the wake word; a pause as long as the fixture VAD's
    # 500 ms silence window would commit the wake word's tail as a turn of its own.
    return np.concatenate([silence(0.5), speak("hey jarvis", "en-gb"), silence(0.3),
                           speak(text), silence(2.0)])


async def test_leds_follow_a_two_turn_conversation(running):
    _daemon, server, factory, say, shown = running
    say(request("what is the weather today"), "one")
    await until(lambda: shown.count("listening") == 2)
    assert factory.pin(22).state == 1 and factory.pin(27).state == 0  # listening: blue
    say(np.concatenate([speak("and tomorrow"), silence(2)]), "two")
    await until(lambda: shown.count("listening") >= 3)
    await until(lambda: shown[-1] == "idle")
    # The fixture's energy VAD may split an utterance in two: one turn per commit.
    turns = [e["type"] for e in server.sent].count("input_audio_buffer.committed")
    assert turns >= 2
    assert list(shown) == [
        "idle", "connecting", "listening",
        *["thinking", "responding", "audio_playing", "listening"] * turns, "idle"]
    assert (factory.pin(17).state, factory.pin(27).state, factory.pin(22).state) == (0, 0, 0)
    assert len(server.handshakes) == 1


# What each state may put on a 3-pixel ring with the default ring patterns.
RING_LOOKS = {"idle": {"off"}, "connecting": {"blue", "blue spin"}, "listening": {"blue"},
              "thinking": {"cyan spin"}, "responding": {"cyan", "off"},
              "audio_playing": {"cyan", "off"}}


def ring_look(pixels) -> str:
    lit = [p for p in pixels if p != OFF]
    if not lit:
        return "off"
    if len(lit) == len(pixels) and len(set(pixels)) == 1:
        r, g, b = pixels[0]
        return "blue" if pixels[0] == BLUE_PX else "cyan" if r == 0 and g == b else "?"
    if len(lit) == 1:
        return {BLUE_PX: "blue spin", CYAN_PX: "cyan spin"}.get(lit[0], "?")
    return "?"


async def test_ring_follows_a_two_turn_conversation(running_ring):
    _daemon, server, _, say, shown, wire = running_ring
    say(request("what is the weather today"), "one")
    await until(lambda: shown.count("listening") == 2)
    say(np.concatenate([speak("and tomorrow"), silence(2)]), "two")
    await until(lambda: shown.count("listening") >= 3)
    await until(lambda: shown[-1] == "idle")
    await until(lambda: wire.pixels()[-1] == (OFF,) * 3)
    turns = [e["type"] for e in server.sent].count("input_audio_buffer.committed")
    history = list(shown)
    assert history == ["idle", "connecting", "listening",
                       *["thinking", "responding", "audio_playing", "listening"] * turns,
                       "idle"]
    # Every frame on the wire is one the state of that moment draws, in the states'
    # order (a state shorter than a frame may leave none).
    looks = [ring_look(px) for px in wire.pixels()]
    at = 0
    for n, look in enumerate(looks):
        while look not in RING_LOOKS[history[at]]:
            at += 1
            assert at < len(history), f"frame {n} ({look}) out of order: {looks}"
    runs = [look for look, _ in itertools.groupby(looks)]
    assert runs[0] == "off" and runs[-1] == "off"
    assert runs.count("blue") >= turns + 1  # listening before each turn and after the last
    assert runs.count("cyan") >= turns  # an answer breathing each turn


async def test_mute_stops_wake_word_and_mic_until_unmuted(running, tmp_path):
    _daemon, server, factory, say, shown = running
    press(factory, 5)
    await until(lambda: shown[-1] == "muted")
    assert factory.pin(17).state == 1  # solid red
    assert (tmp_path / "muted").exists()  # remember_mute
    say(request("are you there"), "muted").wait(30)
    assert server.handshakes == []  # the wake word was not heard while muted
    press(factory, 5)
    await until(lambda: shown[-1] == "idle")
    assert not (tmp_path / "muted").exists()
    say(request("what time is it"), "unmuted")
    await until(lambda: len(server.handshakes) == 1)


async def test_the_talk_button_while_muted_says_the_microphone_is_off(running, pulse,
                                                                    tmp_path):
    daemon, server, factory, _, shown = running
    await until(lambda: daemon.sounds is not None and daemon.sounds.phrases is not None
                and "muted" in daemon.sounds.phrases.espeak)  # rendered at start-up
    press(factory, 5)
    await until(lambda: shown[-1] == "muted")
    start = len(pulse.speaker_bytes()) // 2
    press(factory, 6)
    phrase = espeak_pcm("The microphone is off.", tmp_path)
    _, _, match = await heard_phrase(pulse, start, phrase)
    assert match > 0.99
    assert server.handshakes == []  # no conversation: the microphone is off
    assert shown[-1] == "muted"


async def test_mute_during_a_conversation_closes_the_mic(running):
    _daemon, server, factory, say, shown = running
    say(np.concatenate([silence(0.5), speak("hey jarvis", "en-gb"), silence(0.3)]), "wake")
    await until(lambda: shown[-1] == "listening")
    await until(lambda: len(server.of_type("input_audio_buffer.append")) > 5)
    press(factory, 5)
    await until(lambda: shown[-1] == "muted")
    sent = len(server.of_type("input_audio_buffer.append"))
    say(np.concatenate([speak("this must not be sent anywhere"), silence(0.5)]),
        "private").wait(30)
    assert len(server.of_type("input_audio_buffer.append")) == sent


async def test_talk_button_starts_without_a_wake_word(running):
    _daemon, server, factory, _, shown = running
    press(factory, 6)
    await until(lambda: len(server.handshakes) == 1)
    await until(lambda: shown[-1] == "listening")


async def test_a_bug_in_the_session_is_logged_and_the_speaker_starts_over(running, caplog):
    daemon, server, factory, _, _shown = running

    class Boom:
        """An input the rules cannot handle: what a bug in them looks like."""

    daemon.session.strict = True
    daemon.put(Boom())
    await until(lambda: "the session failed on Boom" in caplog.text)
    assert daemon.session.state.value == "idle"
    press(factory, 6)  # and it still works
    await until(lambda: len(server.handshakes) == 1)
