"""The unit's STATUS= line through `speakerd run` and a real NOTIFY_SOCKET: once the
microphone is muted, every line after it says so, whatever sent it (a reload, a failed
reload, a microphone that turns up, a connection lost mid-answer, an announcement)."""

from __future__ import annotations

import asyncio
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

from .audio_devices import Pulse
from .notify_socket import NotifySocket
from .realtime_server import RealtimeServer, Reply
from .test_control import Controlled, controlled

IDLE = "idle: listening for the wake word"
MUTED = f"{IDLE} (muted)"
RELOAD_FAILED = "config reload failed, old config kept"


@pytest.fixture
def sockdir():
    path = Path(tempfile.mkdtemp(prefix="speakerd-st-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def mute(spk: Controlled) -> int:
    """Mute on the control socket and wait for the STATUS that says so; the index of
    the messages that come after it."""
    since = len(spk.notify.messages)
    assert (await spk.ask({"request": "mute"}))["muted"] is True
    await asyncio.to_thread(spk.notify.wait_until, "STATUS", lambda v: "(muted)" in v, since)
    return len(spk.notify.messages)


async def next_ready(notify: NotifySocket, since: int) -> str:
    """The STATUS of the first READY=1 (the end of a reload) from message `since` on."""
    msg = await asyncio.to_thread(notify.wait_until, "READY", lambda v: v == "1", since)
    return msg.fields["STATUS"]


def statuses(notify: NotifySocket, since: int) -> list[str]:
    return [m.fields["STATUS"] for m in notify.messages[since:] if "STATUS" in m.fields]


async def test_a_reload_keeps_muted(tmp_path, pulse, sockdir):
    async with controlled(tmp_path, pulse, str(sockdir / "control"), RealtimeServer()) as spk:
        since = await mute(spk)
        spk.config.write_text(spk.config.read_text() + "[log]\nlevel = 'debug'\n")
        assert spk.proc is not None
        spk.proc.send_signal(signal.SIGHUP)
        assert await next_ready(spk.notify, since) == MUTED
        assert "config reloaded from" in spk.log
        assert (await spk.status())["status"] == MUTED


async def test_a_failed_reload_keeps_muted_and_says_so_until_a_reload_succeeds(
        tmp_path, pulse, sockdir):
    async with controlled(tmp_path, pulse, str(sockdir / "control"), RealtimeServer()) as spk:
        since = await mute(spk)
        good = spk.config.read_text()
        spk.config.write_text(good + "[wake_word]\ntreshold = 0.3\n")
        assert spk.proc is not None
        spk.proc.send_signal(signal.SIGHUP)
        assert await next_ready(spk.notify, since) == f"{MUTED}; {RELOAD_FAILED}"
        assert "wake_word.treshold: unknown key (did you mean 'threshold'?)" in spk.log
        # The file is still not what runs: a later change of state keeps saying so.
        since = len(spk.notify.messages)
        assert (await spk.ask({"request": "unmute"}))["muted"] is False
        got = await asyncio.to_thread(spk.notify.wait_until, "STATUS",
                                      lambda v: "(muted)" not in v, since)
        assert got.fields["STATUS"] == f"{IDLE}; {RELOAD_FAILED}"
        await mute(spk)
        since = len(spk.notify.messages)
        spk.config.write_text(good)
        spk.proc.send_signal(signal.SIGHUP)
        assert await next_ready(spk.notify, since) == MUTED
        assert (await spk.status())["status"] == MUTED


async def test_a_microphone_that_turns_up_keeps_muted(tmp_path, pulse, sockdir):
    late = Pulse("2")  # mic2 is not there until the test starts its sound server
    audio = '[audio]\ncapture_device = "mic2"\nplayback_device = "spk"\n'
    try:
        async with controlled(tmp_path, pulse, str(sockdir / "control"), RealtimeServer(),
                              audio) as spk:
            ready = await asyncio.to_thread(spk.notify.wait_for, "READY", "1")
            assert ready.fields["STATUS"] == "waiting for microphone 'mic2'"
            assert (await spk.ask({"request": "mute"}))["muted"] is True
            await asyncio.to_thread(spk.notify.wait_for, "STATUS",
                                    "waiting for microphone 'mic2' (muted)")
            since = len(spk.notify.messages)
            await asyncio.to_thread(late.start)  # the USB microphone is plugged in
            await spk.wait_log("microphone mic2 is there now")
            got = await asyncio.to_thread(spk.notify.wait_until, "STATUS",
                                          lambda v: not v.startswith("waiting"), since)
            assert got.fields["STATUS"] == MUTED
    finally:
        late.stop()


async def test_a_connection_lost_mid_answer_keeps_muted(tmp_path, pulse, sockdir):
    # 2 s of the answer arrive, then the server drops the connection.
    server = RealtimeServer(replies=[Reply(audio_ms=6000, drop_after_ms=2000)])
    async with controlled(tmp_path, pulse, str(sockdir / "control"), server) as spk:
        assert (await spk.ask({"request": "talk"}))["started"] is True
        await spk.wait_log("connecting -> listening")
        await server.end_turn()
        await spk.wait_log("responding -> audio_playing: connection")
        await asyncio.to_thread(spk.notify.wait_for, "STATUS", "answering (playing out)")
        since = len(spk.notify.messages)
        # Muted while the answer plays: it ends after the drain, and says muted at once.
        assert (await spk.ask({"request": "mute"}))["muted"] is True
        got = await asyncio.to_thread(spk.notify.wait_until, "STATUS", lambda v: True, since)
        assert got.fields["STATUS"] == "answering (playing out) (muted)"
        await spk.wait_log("audio_playing -> idle: conversation over: connection lost")
        await asyncio.to_thread(spk.notify.wait_for, "STATUS", MUTED)
        assert statuses(spk.notify, since)[-1] == MUTED
        assert all(s.endswith("(muted)") for s in statuses(spk.notify, since)), \
            statuses(spk.notify, since)


async def test_an_announcement_keeps_muted(tmp_path, pulse, sockdir):
    server = RealtimeServer(replies=[Reply(audio_ms=800)])
    async with controlled(tmp_path, pulse, str(sockdir / "control"), server) as spk:
        since = await mute(spk)
        reply = await spk.ask({"request": "announce", "text": "The laundry is done."})
        assert reply["ok"] is True, reply
        await spk.wait_log("announcement 1 played")
        await asyncio.to_thread(spk.notify.wait_until, "STATUS", lambda v: v == MUTED, since)
        assert statuses(spk.notify, since) == ["announcing (muted)", MUTED]
        assert (await spk.status())["status"] == MUTED
