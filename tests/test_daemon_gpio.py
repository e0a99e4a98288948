"""The daemon in-process with mock GPIO pins: LEDs follow a whole conversation, buttons
steer it. Real audio (PulseAudio), real models, the fixture server as the model."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from gpiozero.pins.mock import MockFactory, MockPWMPin

from speakerd import config as configmod
from speakerd import log as logmod
from speakerd.daemon import Daemon
from speakerd.notify import Notifier

from .conftest import need
from .realtime_server import RealtimeServer, Reply
from .speech import have_espeak, silence, speak, write_wav


async def until(predicate, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


@pytest.fixture
async def running(tmp_path, pulse):
    need(have_espeak(), "espeak-ng")
    server = RealtimeServer(vad=True, replies=[Reply(audio_ms=800), Reply(audio_ms=600)])
    factory = MockFactory(pin_class=MockPWMPin)
    async with server:
        path = tmp_path / "speakerd.toml"
        path.write_text(
            '[audio]\ncapture_device = "mic"\nplayback_device = "spk"\n'
            f'[realtime]\nurl = "{server.url}"\n[conversation]\nfollow_up_seconds = 3\n'
            "[leds]\npins = { red = 17, green = 27, blue = 22 }\n"
            "[buttons]\nmute = 5\ntalk = 6\nremember_mute = true\n")
        daemon = Daemon(configmod.load(path), notifier=Notifier({}),
                        redact=logmod.RedactFilter(), pin_factory=factory,
                        state_dir=str(tmp_path))
        task = asyncio.create_task(daemon.run())
        await until(lambda: list(daemon.leds.history) == ["idle"])

        def say(x: np.ndarray, name: str):
            return pulse.play_into_mic(write_wav(tmp_path / f"{name}.wav", x))

        try:
            yield daemon, server, factory, say
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
    daemon, server, factory, say = running
    say(request("what is the weather today"), "one")
    await until(lambda: daemon.leds.history.count("listening") == 2)
    assert factory.pin(22).state == 1 and factory.pin(27).state == 0  # listening: blue
    say(np.concatenate([speak("and tomorrow"), silence(2)]), "two")
    await until(lambda: daemon.leds.history.count("listening") >= 3)
    await until(lambda: daemon.leds.history[-1] == "idle")
    # The fixture's energy VAD may split an utterance in two: one turn per commit.
    turns = [e["type"] for e in server.sent].count("input_audio_buffer.committed")
    assert turns >= 2
    assert list(daemon.leds.history) == [
        "idle", "connecting", "listening",
        *["thinking", "responding", "audio_playing", "listening"] * turns, "idle"]
    assert (factory.pin(17).state, factory.pin(27).state, factory.pin(22).state) == (0, 0, 0)
    assert len(server.handshakes) == 1


async def test_mute_stops_wake_word_and_mic_until_unmuted(running, tmp_path):
    daemon, server, factory, say = running
    press(factory, 5)
    await until(lambda: daemon.leds.history[-1] == "muted")
    assert factory.pin(17).state == 1  # solid red
    assert (tmp_path / "muted").exists()  # remember_mute
    say(request("are you there"), "muted").wait(30)
    assert server.handshakes == []  # the wake word was not heard while muted
    press(factory, 5)
    await until(lambda: daemon.leds.history[-1] == "idle")
    assert not (tmp_path / "muted").exists()
    say(request("what time is it"), "unmuted")
    await until(lambda: len(server.handshakes) == 1)


async def test_mute_during_a_conversation_closes_the_mic(running):
    daemon, server, factory, say = running
    say(np.concatenate([silence(0.5), speak("hey jarvis", "en-gb"), silence(0.3)]), "wake")
    await until(lambda: daemon.leds.history[-1] == "listening")
    await until(lambda: len(server.of_type("input_audio_buffer.append")) > 5)
    press(factory, 5)
    await until(lambda: daemon.leds.history[-1] == "muted")
    sent = len(server.of_type("input_audio_buffer.append"))
    say(np.concatenate([speak("this must not be sent anywhere"), silence(0.5)]),
        "private").wait(30)
    assert len(server.of_type("input_audio_buffer.append")) == sent


async def test_talk_button_starts_without_a_wake_word(running):
    daemon, server, factory, _ = running
    press(factory, 6)
    await until(lambda: len(server.handshakes) == 1)
    await until(lambda: daemon.leds.history[-1] == "listening")


async def test_a_bug_in_the_session_is_logged_and_the_speaker_starts_over(running, caplog):
    daemon, server, factory, _ = running

    class Boom:
        """An input the rules cannot handle: what a bug in them looks like."""

    daemon.session.strict = True
    daemon.put(Boom())
    await until(lambda: "the session failed on Boom" in caplog.text)
    assert daemon.session.state.value == "idle"
    press(factory, 6)  # and it still works
    await until(lambda: len(server.handshakes) == 1)
