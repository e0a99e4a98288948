"""`announce` through a real `speakerd run`: the fixture server hears the text and sends
the audio, the PulseAudio speaker records it, the reply comes after the drain; while
muted, behind a playing answer, in order and bounded, cut off by the talk button and
the wake word, and every way it can fail with the daemon running on."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gpiozero.pins.mock import MockFactory, MockPWMPin
from openai.types import realtime as rt
from pydantic import BaseModel, TypeAdapter

from speakerd import announce
from speakerd import config as configmod
from speakerd import log as logmod
from speakerd.announce import runner as announce_runner
from speakerd.control import client as control
from speakerd.daemon import Daemon
from speakerd.leds.patterns import DEFAULT_PATTERNS
from speakerd.notify import Notifier

from .conftest import ROOT, SPEAKERD, clean_env, leds_shown, need, run_speakerd
from .realtime_server import RealtimeServer, Reply, tone
from .speech import have_espeak, silence, speak
from .test_control import Controlled, raw
from .test_e2e import KEY, tone_blocks

CLIENT_EVENT = TypeAdapter(rt.RealtimeClientEvent)
CYAN, RED = DEFAULT_PATTERNS["audio_playing"], DEFAULT_PATTERNS["muted"]
TEXT = "The laundry is done, and the oven is preheated."
ANNOUNCE_HZ = 660.0  # the announcements' tone; answers are the fixture's 440 Hz


def voice(ms: int) -> Reply:
    """The fixture's reply to an announcement: `ms` of a 660 Hz tone."""
    return Reply(pcm=tone(ms, ANNOUNCE_HZ), transcript=TEXT)


def extras(model: object, where: str = "") -> list[str]:
    """Fields the openai models accepted only as unknown extras (pydantic allows them)."""
    if isinstance(model, BaseModel):
        found = [f"{where}.{k}" for k in (model.__pydantic_extra__ or {})]
        for name in type(model).model_fields:
            found += extras(getattr(model, name), f"{where}.{name}")
        return found
    if isinstance(model, list | tuple):
        return [x for i, item in enumerate(model) for x in extras(item, f"{where}[{i}]")]
    return []


def assert_valid(events: list[dict[str, Any]]) -> None:
    for event in events:
        model = CLIENT_EVENT.validate_python(event)  # raises on a wrong shape
        assert extras(model) == [], (event, extras(model))


@pytest.fixture
def sockdir():
    path = Path(tempfile.mkdtemp(prefix="speakerd-ann-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextlib.asynccontextmanager
async def speaker_for(tmp_path: Path, pulse, sockdir: Path, server: RealtimeServer,
                      extra: str = "", url: str | None = None, speaker: str = "spk"):
    """`speakerd run --control` against `server` (or `url`) playing on `speaker`; it
    must run on, then exit 0."""
    async with server:
        spk = Controlled(tmp_path, pulse, server, str(sockdir / "control"),
                         "[cues]\nwake = false\nend = false\n" + extra)
        if url:
            spk.config.write_text(spk.config.read_text().replace(server.url, url))
        spk.config.write_text(spk.config.read_text().replace(
            'playback_device = "spk"', f'playback_device = "{speaker}"'))
        spk.speaker_start = len(pulse.speaker_bytes())  # Controlled.start() does not
        await spk.start()
        try:
            yield spk
            assert spk.proc is not None and spk.proc.poll() is None, spk.log[-3000:]
            assert (await spk.status())["state"] in ("idle", "listening")
        finally:
            assert spk.stop() == 0, spk.log[-3000:]
            spk.notify.close()
    assert "Traceback" not in spk.log, spk.log


def say(text: str = TEXT) -> dict[str, Any]:
    return {"request": "announce", "text": text}


async def ask(spk: Controlled, request: dict[str, Any]) -> dict[str, Any]:
    """One request from a thread, with room for an announcement to wait and play."""
    return await asyncio.to_thread(control.ask, spk.sock, request, 120)


async def until(predicate, timeout: float = 60) -> None:
    """Wait for a condition, looking every 50 ms."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def announcement_texts(server: RealtimeServer) -> list[str]:
    return [r.event["item"]["content"][0]["text"]
            for r in server.of_type("conversation.item.create")
            if r.event["item"]["type"] == "message"]


def order_of_tones(x: np.ndarray) -> list[float]:
    """The tones heard, in order, one entry per run of 100 ms blocks of the same tone."""
    runs: list[float] = []
    for i in range(0, x.size - 2400, 2400):
        b = x[i:i + 2400]
        if np.sqrt(np.mean(b**2)) < 1000:
            continue
        peak = float(np.argmax(np.abs(np.fft.rfft(b))) * 24000 / 2400)
        hz = next((f for f in (440.0, ANNOUNCE_HZ) if abs(peak - f) < 20), None)
        if hz and (not runs or runs[-1] != hz):
            runs.append(hz)
    return runs


class TestSpoken:
    async def test_the_text_goes_out_the_audio_is_heard_then_the_reply(
            self, tmp_path, pulse, sockdir):
        server = RealtimeServer(replies=[voice(1500)])
        async with speaker_for(tmp_path, pulse, sockdir, server) as spk:
            reply = await ask(spk, say("  The laundry is done,\n and the oven is preheated. "))
            heard_at_reply = tone_blocks(spk.heard(), ANNOUNCE_HZ)
            st = await spk.status()
        assert reply["ok"] is True, reply
        assert set(reply) == {"ok", "played_ms", "waited_ms"}
        assert 1400 <= reply["played_ms"] <= 1600, reply
        assert reply["waited_ms"] < 5000
        # The reply came after the drain: the speaker had played it all by then.
        assert heard_at_reply >= 13, heard_at_reply
        # One socket of its own, which speaks and never listens.
        assert len(server.handshakes) == 1
        assert server.handshakes[0][1]["Authorization"] == f"Bearer {KEY}"
        assert server.types() == ["session.update", "conversation.item.create",
                                  "response.create"]
        assert server.invalid == []
        assert_valid([r.event for r in server.received])
        session = server.of_type("session.update")[0].event["session"]
        assert session["tools"] == [] and session["tool_choice"] == "none"
        assert session["output_modalities"] == ["audio"]
        assert session["audio"]["input"] == {"turn_detection": None}
        assert session["audio"]["output"]["voice"] == "marin"
        assert session["model"] == "gpt-realtime"
        assert announcement_texts(server) == [announce.prompt(TEXT)]
        item = server.of_type("conversation.item.create")[0].event["item"]
        assert item["role"] == "user"
        create = server.of_type("response.create")[0].event
        assert create["response"] == {"output_modalities": ["audio"]}
        # Outside the conversation: the session never left idle, nothing was counted.
        assert st["state"] == "idle" and st["conversations"] == 0
        assert st["realtime_connects"] == 0
        assert st["announcements"] == {"played": 1, "failed": 0, "queued": 0,
                                       "speaking": False}
        assert " -> " not in "".join(line for line in spk.log.splitlines()
                                     if "speakerd.session" in line)
        # The journal: one line, the length and not the words (those are at debug).
        assert spk.log.count("announcement 1 played: 47 characters, ") == 1
        assert "laundry" not in spk.log

    async def test_played_while_muted(self, tmp_path, pulse, sockdir):
        server = RealtimeServer(replies=[voice(800)])
        async with speaker_for(tmp_path, pulse, sockdir, server) as spk:
            assert (await spk.ask({"request": "mute"}))["muted"] is True
            reply = await ask(spk, say())
            assert reply["ok"] is True, reply
            st = await spk.status()
            assert st["muted"] is True and st["state"] == "idle"
            assert st["status"] == "idle: listening for the wake word (muted)"
            await asyncio.to_thread(spk.notify.wait_for, "STATUS", "announcing (muted)")
        assert tone_blocks(spk.heard(), ANNOUNCE_HZ) >= 6

    async def test_the_cli_says_it_and_prints_the_result(self, tmp_path, pulse, sockdir):
        server = RealtimeServer(replies=[voice(1000), voice(600)])
        async with speaker_for(tmp_path, pulse, sockdir, server) as spk:
            done = await asyncio.to_thread(
                subprocess.run, [*SPEAKERD, "announce", "--control", spk.sock, "The", "laundry",
                                 "is", "done."],
                capture_output=True, text=True, cwd=ROOT, env=clean_env(), timeout=120)
            assert done.returncode == 0, done.stderr
            assert done.stdout == "announced: 1.0 s of speech\n"
            done = await asyncio.to_thread(
                subprocess.run, [*SPEAKERD, "announce", "--json", "--control", spk.sock, "Hi"],
                capture_output=True, text=True, cwd=ROOT, env=clean_env(), timeout=120)
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout)["ok"] is True
        assert announcement_texts(server) == [announce.prompt("The laundry is done."),
                                              announce.prompt("Hi")]


class TestWithAConversation:
    async def test_waits_for_the_playing_answer_and_the_conversation_to_end(
            self, tmp_path, pulse, sockdir):
        server = RealtimeServer(replies=[Reply(audio_ms=2500), voice(1000)])
        async with speaker_for(tmp_path, pulse, sockdir, server,
                               "[conversation]\nfollow_up_seconds = 2\n") as spk:
            assert (await spk.ask({"request": "talk"}))["started"] is True
            await spk.wait_log("connecting -> listening")
            await server.end_turn()  # the user's turn: the 2.5 s answer streams
            await spk.wait_log("responding -> audio_playing")
            asked = time.monotonic()
            reply = await ask(spk, say())
            took = time.monotonic() - asked
        assert reply["ok"] is True, reply
        assert reply["waited_ms"] >= 1500  # the rest of the answer, then the follow-up
        assert took * 1000 >= reply["waited_ms"] + reply["played_ms"] - 100
        log = spk.log
        assert log.index("announcement 1 waits for the conversation to end") < \
            log.index("audio_playing -> listening") < log.index("listening -> idle") < \
            log.index("announcement 1 played")
        # Heard in that order, never mixed: the whole answer, then the announcement.
        assert order_of_tones(spk.heard()) == [440.0, ANNOUNCE_HZ]
        assert tone_blocks(spk.heard()) >= 23 and tone_blocks(spk.heard(), ANNOUNCE_HZ) >= 9
        assert len(server.handshakes) == 2  # the conversation's socket, then its own

    async def test_waits_while_listening_and_plays_once_mute_ends_it(
            self, tmp_path, pulse, sockdir):
        server = RealtimeServer(replies=[voice(500)])
        async with speaker_for(tmp_path, pulse, sockdir, server,
                               "[conversation]\nfollow_up_seconds = 30\n") as spk:
            assert (await spk.ask({"request": "talk"}))["started"] is True
            await spk.wait_log("connecting -> listening")
            pending = asyncio.create_task(ask(spk, say()))
            await spk.wait_log("announcement 1 waits for the conversation to end "
                               "(at most 60 s more)")
            assert (await spk.ask({"request": "mute"}))["muted"] is True  # ends it
            reply = await pending
            assert reply["ok"] is True, reply  # played once it was over: mute or not
            await spk.ask({"request": "unmute"})

    @pytest.mark.parametrize("how", ["talk", "wake word"])
    async def test_the_talk_button_or_wake_word_cuts_it_off(self, tmp_path, pulse, sockdir,
                                                           how):
        if how == "wake word":
            need(have_espeak(), "espeak-ng")
        server = RealtimeServer(replies=[voice(8000)])
        async with speaker_for(tmp_path, pulse, sockdir, server) as spk:
            pending = asyncio.create_task(ask(spk, say()))
            # Wait until the whole announcement has reached speakerd and the speaker
            # is playing it: the fixture sends the next socket's events on the last one.
            await server.wait_until(lambda: any(e["type"] == "response.done"
                                                for e in server.sent))
            async def speaking() -> bool:  # heard for a moment
                return tone_blocks(spk.heard(), ANNOUNCE_HZ) >= 5
            await until(speaking)
            if how == "talk":
                assert (await spk.ask({"request": "talk"}))["started"] is True
            else:
                spk.say(np.concatenate([speak("hey jarvis", "en-gb"), silence(1.0)]),
                        "wake")
            reply = await pending
            await spk.wait_log("connecting -> listening")
        assert reply["ok"] is False and reply["code"] == "interrupted", reply
        who = "talk button" if how == "talk" else "wake word hey_jarvis"
        assert reply["error"].startswith(f"interrupted by the {who} after ")
        assert 0 < reply["played_ms"] < 8000
        assert tone_blocks(spk.heard(), ANNOUNCE_HZ) < 70  # not the whole 8 s
        assert "announcement 1 not played: interrupted by the " in spk.log


class TestQueue:
    async def test_in_order_and_bounded(self, tmp_path, pulse, sockdir):
        server = RealtimeServer(replies=[voice(300), voice(300), voice(300)])
        async with speaker_for(tmp_path, pulse, sockdir, server,
                               "[conversation]\nfollow_up_seconds = 4\n"
                               "[log]\nlevel = 'debug'\n") as spk:
            assert (await spk.ask({"request": "talk"}))["started"] is True
            await spk.wait_log("connecting -> listening")
            pending = []
            for n in (1, 2, 3):  # queued one after the other behind the conversation
                pending.append(asyncio.create_task(ask(spk, say(f"Message {n}."))))
                await spk.wait_log(f"announcement {n} asked")
            refused = await ask(spk, say("Message 4."))
            replies = await asyncio.gather(*pending)
        assert refused == {"ok": False, "code": "queue_full",
                           "error": "3 announcements are queued already (at most 3); "
                                    "try again later"}
        assert [r["ok"] for r in replies] == [True, True, True], replies
        assert announcement_texts(server) == [announce.prompt(f"Message {n}.")
                                              for n in (1, 2, 3)]
        log = spk.log
        assert log.index("announcement 1 played") < log.index("announcement 2 played") < \
            log.index("announcement 3 played")
        assert 'announcement 1 asked: 10 characters, "Message 1."' in log  # at debug


class TestRefused:
    async def test_text_missing_empty_or_too_long_and_the_connection_stays_open(
            self, tmp_path, pulse, sockdir):
        server = RealtimeServer()
        async with speaker_for(tmp_path, pulse, sockdir, server) as spk:
            long = "a" * (announce.MAX_TEXT + 1)
            lines = b"".join(json.dumps(r).encode() + b"\n" for r in (
                {"request": "announce"}, say("  \n "), say(long), {"request": "status"}))
            replies = await asyncio.to_thread(raw, spk.sock, lines)
        assert [r["ok"] for r in replies] == [False, False, False, True]
        assert [r["code"] for r in replies[:3]] == ["bad_argument"] * 3
        assert replies[2]["error"] == "text too long: 1001 characters, at most 1000"
        assert server.handshakes == []

    async def test_a_refused_key_is_a_clear_error_and_the_daemon_runs_on(
            self, tmp_path, pulse, sockdir):
        server = RealtimeServer(reject_status=401)
        async with speaker_for(tmp_path, pulse, sockdir, server) as spk:
            reply = await ask(spk, say())
            assert reply == {"ok": False, "code": "unavailable", "error":
                             "service unreachable: the API key was refused (HTTP 401): "
                             "check the key"}
            done = await asyncio.to_thread(
                subprocess.run, [*SPEAKERD, "announce", "--control", spk.sock, "Hello"],
                capture_output=True, text=True, cwd=ROOT, env=clean_env(), timeout=120)
            assert done.returncode == 69
            assert done.stderr == ("speakerd: not announced: service unreachable: the API "
                                   "key was refused (HTTP 401): check the key\n")
            st = await spk.status()
            assert st["announcements"]["failed"] == 2
        assert len(server.handshakes) == 2  # once each: a refused key is not retried
        assert KEY not in spk.log

    async def test_an_unreachable_service_is_a_clear_error(self, tmp_path, pulse, sockdir):
        port = free_port()
        async with speaker_for(tmp_path, pulse, sockdir, RealtimeServer(),
                               url=f"ws://127.0.0.1:{port}/v1/realtime") as spk:
            reply = await ask(spk, say())
        assert reply["ok"] is False and reply["code"] == "unavailable", reply
        # Refused is definite: said at once, not after retries.
        assert reply["error"].startswith("service unreachable: cannot reach 127.0.0.1: "
                                         "connection refused"), reply
        assert "announcement 1 not played: service unreachable: " in spk.log

    async def test_a_missing_speaker(self, tmp_path, pulse, sockdir):
        server = RealtimeServer()
        async with speaker_for(tmp_path, pulse, sockdir, server, speaker="nospk") as spk:
            reply = await ask(spk, say())
        assert reply == {"ok": False, "code": "no_speaker", "error":
                         "the speaker 'nospk' is missing; speakerd is waiting for it"}
        assert server.handshakes == []

    def test_no_daemon_is_exit_69(self, tmp_path):
        path = tmp_path / "control"
        done = run_speakerd("announce", "--control", str(path), "Hello")
        assert done.returncode == 69
        assert done.stderr == f"speakerd: speakerd is not running (no {path})\n"


# --- in-process, with mock GPIO pins: the LEDs, and bounds too long to sit through ----

@contextlib.asynccontextmanager
async def in_process(tmp_path: Path, pulse, server: RealtimeServer, extra: str = "",
                     key: bool = True):
    factory = MockFactory(pin_class=MockPWMPin)
    async with server:
        path = tmp_path / "speakerd.toml"
        path.write_text(
            '[audio]\ncapture_device = "mic"\nplayback_device = "spk"\n'
            f'[realtime]\nurl = "{server.url}"\n[cues]\nwake = false\nend = false\n'
            "[leds]\npins = { red = 17, green = 27, blue = 22 }\n" + extra)
        daemon = Daemon(configmod.load(path), notifier=Notifier({}),
                        redact=logmod.RedactFilter(), pin_factory=factory,
                        api_key=configmod.Secret(KEY, "test") if key else None,
                        state_dir=str(tmp_path))
        with leds_shown() as shown:
            task = asyncio.create_task(daemon.run())

            async def started() -> bool:
                return shown == ["idle"]
            await until(started)
            try:
                yield daemon, shown
            finally:
                daemon.request_stop()
                assert await asyncio.wait_for(task, 20) == 0
                factory.reset()


class TestInProcess:
    async def test_the_leds_show_speaking_while_it_plays_then_what_they_showed(
            self, tmp_path, pulse):
        server = RealtimeServer(replies=[voice(600), voice(600)])
        async with in_process(tmp_path, pulse, server) as (daemon, shown):
            assert (await daemon.announcer.announce(TEXT))["ok"] is True
            assert list(shown) == ["idle", "audio_playing", "idle"]
            daemon.press("mute")
            await daemon.settled()
            assert (await daemon.announcer.announce(TEXT))["ok"] is True
            assert list(shown)[-3:] == ["muted", "audio_playing", "muted"]
            pins = [daemon.pin_factory.pin(n) for n in (17, 27, 22)]
        # The pins themselves: off at first, solid cyan while it spoke, then (off, at
        # once muted) red, cyan while it spoke muted, red again.
        shown = colors(pins)
        assert shown[0] == (0, 0, 0)
        assert [c for c in shown if c != (0, 0, 0)] == [CYAN.color, RED.color, CYAN.color,
                                                         RED.color], shown

    async def test_gives_up_when_a_conversation_outlasts_the_wait(self, tmp_path, pulse,
                                                                  monkeypatch):
        monkeypatch.setattr(announce_runner, "WAIT_SECONDS", 1.0)
        server = RealtimeServer()
        async with in_process(tmp_path, pulse, server,
                              "[conversation]\nfollow_up_seconds = 30\n") as (daemon, _shown):
            daemon.press("talk")

            async def listening() -> bool:
                return daemon.session.state.value == "listening"
            await until(listening)
            reply = await daemon.announcer.announce(TEXT)
            assert reply == {"ok": False, "code": "in_conversation", "error":
                             "a conversation was still going on 1 s after the request; "
                             "not played"}
            assert daemon.session.state.value == "listening"  # left alone
            assert daemon.announcer.status()["failed"] == 1
        assert len(server.handshakes) == 1  # the conversation's only

    async def test_cut_off_before_a_sound_it_waits_for_that_conversation(self, tmp_path,
                                                                       pulse):
        # Its first connect attempt is turned away (503: retried after ~0.5 s); the talk
        # button is pressed in that gap, before anything was heard.
        server = RealtimeServer(reject_status=[503], replies=[voice(600)])
        async with in_process(tmp_path, pulse, server,
                              "[conversation]\nfollow_up_seconds = 1\n") as (daemon, shown):
            pending = asyncio.create_task(daemon.announcer.announce(TEXT))

            async def turned_away() -> bool:
                return len(server.handshakes) == 1
            await until(turned_away)
            daemon.press("talk")
            reply = await pending
            history = list(shown)
        assert reply["ok"] is True, reply
        assert reply["waited_ms"] >= 1000  # the whole conversation, follow-up included
        # The conversation first, then the announcement: never both at once.
        assert history[:5] == ["idle", "connecting", "listening", "idle", "audio_playing"]
        assert len(server.handshakes) == 3  # turned away, the conversation, then it
        assert announcement_texts(server) == [announce.prompt(TEXT)]

    async def test_no_api_key(self, tmp_path, pulse):
        server = RealtimeServer()
        async with in_process(tmp_path, pulse, server, key=False) as (daemon, _shown):
            reply = await daemon.announcer.announce(TEXT)
        assert reply == {"ok": False, "code": "no_api_key", "error":
                         "no API key configured (realtime.api_key_file, the systemd "
                         "credential openai-key, or $OPENAI_API_KEY)"}
        assert server.handshakes == []


def colors(pins: list[Any], settle: float = 0.001) -> list[tuple[float, ...]]:
    """The colours an RGB LED showed, from its mock pins' recorded states: each pin's
    changes at their times (gpiozero records the time since the pin's last change),
    the three merged, a colour held shorter than `settle` (pins set one by one) left
    out, repeats collapsed."""
    changes: list[tuple[float, int, float]] = []
    for i, pin in enumerate(pins):
        t = 0.0
        for state in pin.states:
            t += state.timestamp
            changes.append((t, i, float(state.state)))
    changes.sort()
    shown: list[tuple[float, tuple[float, ...]]] = []
    now = [0.0, 0.0, 0.0]
    for t, i, value in changes:
        now[i] = value
        shown.append((t, tuple(now)))
    out: list[tuple[float, ...]] = []
    for (t, color), (t_next, _) in zip(shown, [*shown[1:], (float("inf"), ())],
                                       strict=True):
        if t_next - t >= settle and (not out or out[-1] != color):
            out.append(color)
    return out
