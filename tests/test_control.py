"""The control socket through a real `speakerd run` (under UMask 0077, as the unit runs
it), a real unix socket and clients in this and other processes, some under another
uid: status, `speakerd status`, talk, mute, volume, levels, and abuse the daemon
survives."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from speakerd.control import client as control
from speakerd.control import server as control_server

from .conftest import ROOT, SPEAKERD, clean_env, need, run_speakerd
from .notify_socket import NotifySocket
from .realtime_server import RealtimeServer
from .speech import have_espeak, silence, speak
from .test_e2e import KEY, Speaker

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


class Controlled(Speaker):
    """`speakerd run --control SOCK`, started as the unit would (umask 0077)."""

    def __init__(self, tmp_path: Path, pulse, server: RealtimeServer, sock: str,
                 extra: str = "") -> None:
        super().__init__(tmp_path, pulse, server, extra)
        self.sock = sock
        self.server = server
        self.notify = NotifySocket(tmp_path / "notify.sock")

    async def start(self) -> None:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [*SPEAKERD, "run", "--config", str(self.config), "--control", self.sock],
                cwd=ROOT, stderr=log, umask=0o077,
                env=clean_env(OPENAI_API_KEY=KEY, NOTIFY_SOCKET=self.notify.path))
        await self.wait_log("control socket listening on")
        await self.wait_log("started: config")

    async def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        """One request on a fresh connection, from a thread: the loop (and the fixture
        server on it) runs on meanwhile. Retries while the daemon says it is busy."""
        deadline = time.monotonic() + 20
        while True:
            reply = await asyncio.to_thread(control.ask, self.sock, request, 20)
            if reply.get("code") != "busy" or time.monotonic() > deadline:
                return reply
            await asyncio.sleep(0.05)  # a refused client's slot frees once it is closed

    async def status(self) -> dict[str, Any]:
        reply = await self.ask({"request": "status"})
        assert reply["ok"], reply
        return reply


@pytest.fixture
def sockdir():
    """A short directory for the socket (sun_path is 108 bytes), 0700 like /run/speakerd."""
    path = Path(tempfile.mkdtemp(prefix="speakerd-ctl-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


FAST = "[conversation]\nfollow_up_seconds = 1\n[cues]\nwake = false\nend = false\n"


@contextlib.asynccontextmanager
async def controlled(tmp_path: Path, pulse, sock: str, server: RealtimeServer,
                     audio: str = ""):
    """A started `Controlled`; on the way out it must still answer, then exit 0."""
    async with server:
        spk = Controlled(tmp_path, pulse, server, sock, FAST)
        if audio:
            spk.config.write_text(spk.config.read_text().replace(
                '[audio]\ncapture_device = "mic"\nplayback_device = "spk"\n', audio))
        await spk.start()
        try:
            yield spk
            # Whatever a test did, the daemon runs on and answers.
            assert spk.proc is not None and spk.proc.poll() is None, spk.log[-3000:]
            assert (await spk.status())["state"] in ("idle", "listening", "connecting")
        finally:
            assert spk.stop() == 0, spk.log[-3000:]
            spk.notify.close()
    assert not Path(spk.sock).exists()  # removed on the way out
    assert "Traceback" not in spk.log, spk.log


@pytest.fixture
async def speaker(tmp_path, pulse, sockdir):
    async with controlled(tmp_path, pulse, str(sockdir / "control"), RealtimeServer()) as spk:
        yield spk


def raw(path: str, data: bytes, timeout: float = 20) -> list[dict[str, Any]]:
    """Send `data` as is on one connection; every reply line until the daemon closes it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sender = threading.Thread(target=_send_all, args=(sock, data))
        sender.start()  # a long line fills the socket buffers: read while sending
        received = b""
        while chunk := _recv(sock):
            received += chunk
        sender.join(timeout)
    return [json.loads(line) for line in received.splitlines()]


def _send_all(sock: socket.socket, data: bytes) -> None:
    # The daemon may stop reading and close: its reply says why.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)  # as `printf ... | socat` does at the end of input


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except ConnectionResetError:  # closed with our unread bytes still queued: that is EOF
        return b""


async def speakerd_status(*args: str, user: list[str] | None = None
                          ) -> subprocess.CompletedProcess[str]:
    cmd = [*(user or []), *SPEAKERD, "status", *args]
    return await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True,
                                   cwd=ROOT, env=clean_env(), timeout=30)


class TestStatus:
    async def test_status_reports_state_devices_wake_word_and_counters(self, speaker):
        mode = os.stat(speaker.sock).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660  # despite umask 0077
        st = await speaker.status()
        assert st["state"] == "idle" and st["muted"] is False
        assert st["status"] == "idle: listening for the wake word"
        assert st["pid"] == speaker.proc.pid
        assert 0 < st["uptime_seconds"] < 120
        assert st["conversations"] == 0 and st["last_conversation"] is None
        assert st["wake_word"] == {"models": [{"name": "hey_jarvis", "threshold": 0.5}],
                                   "threshold": 0.5}
        mic, spk = st["devices"]["microphone"], st["devices"]["speaker"]
        assert mic == {"device": "mic", "missing": False,
                       "format": {"rate": mic["format"]["rate"], "channels": 1,
                                  "format": mic["format"]["format"]}}
        assert spk["device"] == "spk" and spk["format"]["rate"] > 0 and not spk["missing"]
        assert st["waiting_for"] == {}
        assert st["underruns"] == 0 and st["overruns"] >= 0
        assert st["realtime"]["model"] == "gpt-realtime"
        assert st["realtime"]["url"].startswith("ws://127.0.0.1:")
        assert st["realtime_connects"] == 0 and st["realtime_failures"] == 0
        assert st["last_error"] is None

    async def test_speakerd_status_prints_for_a_person_and_raw_json(self, speaker):
        done = await speakerd_status("--control", speaker.sock)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[0].startswith(f"speakerd 0.1.0 (pid {speaker.proc.pid}), up ")
        assert "state:         idle: listening for the wake word" in lines
        assert "conversations: 0" in lines
        assert "wake word:     hey_jarvis (threshold 0.5)" in lines
        assert any(line.startswith("microphone:    mic (") and " Hz, 1 channel, " in line
                   for line in lines), lines
        assert "last error:    none" in lines
        done = await speakerd_status("--json", "--control", speaker.sock)
        assert done.returncode == 0, done.stderr
        reply = json.loads(done.stdout)
        assert reply["ok"] is True and reply["state"] == "idle"


class TestStatusOfTrouble:
    async def test_a_missing_microphone_and_the_last_error(self, tmp_path, pulse, sockdir):
        audio = '[audio]\ncapture_device = "nomic"\nplayback_device = "spk"\n'
        async with controlled(tmp_path, pulse, str(sockdir / "control"), RealtimeServer(),
                              audio) as spk:
            st = await spk.status()
            assert st["status"] == "waiting for microphone 'nomic'"
            assert st["waiting_for"] == {"microphone": "nomic"}
            assert st["devices"]["microphone"] == {"device": "nomic", "format": None,
                                                   "missing": True}
            assert st["last_error"]["message"].startswith(
                "cannot open ALSA capture device 'nomic': ")
            assert st["last_error"]["at"] <= time.time()
            done = await speakerd_status("--control", spk.sock)
            assert "microphone:    nomic (missing, waiting for it)" in done.stdout
            assert "last error:    " in done.stdout and "cannot open ALSA" in done.stdout

    async def test_a_refused_key_counts_as_a_realtime_failure(self, tmp_path, pulse,
                                                              sockdir):
        server = RealtimeServer(reject_status=401)
        async with controlled(tmp_path, pulse, str(sockdir / "control"), server) as spk:
            assert (await spk.ask({"request": "talk"}))["started"] is True
            await spk.wait_log("error -> idle")
            st = await spk.status()
            assert st["realtime_connects"] == 0 and st["realtime_failures"] == 1
            why = "the API key was refused (HTTP 401): check the key"
            assert st["realtime_last_failure"] == why
            assert st["last_conversation"]["reason"] == why
            assert why in st["last_error"]["message"]
            assert KEY not in json.dumps(st)


class TestNoDaemon:
    def test_no_socket_is_one_line_and_exit_69(self, tmp_path):
        path = tmp_path / "control"
        done = run_speakerd("status", "--control", str(path))
        assert done.returncode == 69
        assert done.stderr == f"speakerd: speakerd is not running (no {path})\n"
        assert done.stdout == ""

    def test_the_default_path_and_the_environment_variable(self, tmp_path):
        if not Path(control.DEFAULT_PATH).exists():  # no speakerd.service on this machine
            done = run_speakerd("status")
            assert done.returncode == 69
            assert done.stderr == ("speakerd: speakerd is not running "
                                   "(no /run/speakerd/control)\n")
        path = tmp_path / "elsewhere"
        done = run_speakerd("status", env=clean_env(SPEAKERD_CONTROL=str(path)))
        assert done.stderr == f"speakerd: speakerd is not running (no {path})\n"

    def test_a_stale_socket_nobody_listens_on(self, tmp_path):
        path = tmp_path / "control"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
            dead.bind(str(path))  # a crashed daemon's leftover: bound, not listening
            done = run_speakerd("status", "--control", str(path))
        assert done.returncode == 69
        assert done.stderr == f"speakerd: speakerd is not running (nothing answers on {path})\n"


class TestRequests:
    async def test_talk_starts_a_conversation_like_the_talk_button(self, speaker):
        reply = await speaker.ask({"request": "talk"})
        assert reply == {"ok": True, "state": "connecting", "started": True}
        await speaker.wait_log("idle -> connecting: talk button")
        await speaker.wait_log("connecting -> listening: connected")
        await speaker.wait_log("listening -> idle: conversation over: no follow-up")
        st = await speaker.status()
        assert st["conversations"] == 1 and st["realtime_connects"] == 1
        last = st["last_conversation"]
        assert last["number"] == 1 and last["trigger"] == "talk button"
        assert last["reason"] == "no follow-up" and last["turns"] == 0
        assert last["started"] <= last["ended"] <= time.time()
        assert len(speaker.server.handshakes) == 1
        assert speaker.server.handshakes[0][1]["Authorization"] == f"Bearer {KEY}"
        done = await speakerd_status("--control", speaker.sock)
        assert "conversations: 1; the last (#1, by talk button) began " in done.stdout
        assert "0 turns, ended after " in done.stdout and ": no follow-up" in done.stdout

    async def test_mute_and_unmute_change_status_and_the_unit_status(self, speaker):
        assert await speaker.ask({"request": "mute"}) == {"ok": True, "muted": True,
                                                          "changed": True}
        assert await speaker.ask({"request": "mute"}) == {"ok": True, "muted": True,
                                                          "changed": False}
        st = await speaker.status()
        assert st["muted"] is True
        assert st["status"] == "idle: listening for the wake word (muted)"
        await asyncio.to_thread(speaker.notify.wait_for, "STATUS",
                                "idle: listening for the wake word (muted)")
        reply = await speaker.ask({"request": "talk"})
        assert reply["ok"] is False and reply["code"] == "muted"
        assert await speaker.ask({"request": "unmute"}) == {"ok": True, "muted": False,
                                                            "changed": True}
        st = await speaker.status()
        assert st["muted"] is False and st["status"] == "idle: listening for the wake word"
        assert "microphone muted" in speaker.log and "microphone unmuted" in speaker.log

    async def test_volume_get_set_and_change(self, speaker):
        reply = await speaker.ask({"request": "volume", "percent": 40})
        assert reply["ok"] is True and reply["percent"] == 40, reply
        assert (await speaker.ask({"request": "volume"}))["percent"] == 40
        assert (await speaker.ask({"request": "volume", "change": -15}))["percent"] == 25
        assert (await speaker.ask({"request": "volume"}))["percent"] == 25
        assert "volume set to 25%" in speaker.log
        for bad in ({"percent": 101}, {"percent": True}, {"percent": "40"},
                    {"change": 500}, {"percent": 10, "change": 10}):
            reply = await speaker.ask({"request": "volume", **bad})
            assert reply["ok"] is False and reply["code"] == "bad_argument", (bad, reply)
        assert (await speaker.ask({"request": "volume"}))["percent"] == 25

    async def test_several_requests_on_one_connection(self, speaker):
        replies = await asyncio.to_thread(raw, speaker.sock, b'{"request": "volume"}\n'
                                          b'{"request": "nonsense"}\n{"request": "status"}')
        assert [r["ok"] for r in replies] == [True, False, True]
        assert replies[1]["code"] == "unknown_request"
        assert "one of: status, talk, mute, unmute, volume, levels" in replies[1]["error"]
        assert replies[2]["state"] == "idle"  # the last request needs no newline


class TestLevels:
    async def test_levels_of_a_silent_mic_and_what_the_wake_word_scored(self, speaker):
        reply = await speaker.ask({"request": "levels", "seconds": 1})
        model = reply["wake_word"]["models"][0]
        assert reply == {
            "ok": True, "device": "mic", "seconds": 1.04, "rms_dbfs": -120.0,
            "peak_dbfs": -120.0, "clipped": 0, "samples": 13 * 1280, "dc_offset": 0.0,
            "wake_word": {"trigger_level": 1, "models": [model]}}
        assert model == {"name": "hey_jarvis", "threshold": 0.5, "best": model["best"],
                         "at_seconds": model["at_seconds"],
                         "highest_threshold": model["best"], "would_trigger": False}
        assert 0 <= model["best"] < 0.05

    async def test_levels_of_speech_name_the_wake_word_and_when(self, speaker, tmp_path):
        need(have_espeak(), "espeak-ng")
        said = np.concatenate([speak("hey jarvis", "en-gb"), silence(1.0)])
        assert (await speaker.ask({"request": "mute"}))["muted"] is True
        player = speaker.say(np.concatenate([silence(0.3)] + [said] * 10), "levels")
        try:
            reply = await speaker.ask({"request": "levels", "seconds": 3})
        finally:
            player.kill()
            player.wait()
        assert reply["ok"] and reply["seconds"] == 3.04
        assert -40 < reply["rms_dbfs"] < reply["peak_dbfs"] < 0 and reply["clipped"] == 0
        model = reply["wake_word"]["models"][0]
        assert model["best"] >= 0.5 and model["would_trigger"] is True
        assert 0 < model["at_seconds"] <= 3.04

    async def test_bad_seconds_are_refused(self, speaker):
        for bad in (0, 0.4, 31, "3", True, None):
            reply = await speaker.ask({"request": "levels", "seconds": bad})
            assert reply == {"ok": False, "code": "bad_argument",
                             "error": '"seconds" is a number from 0.5 to 30'}, bad

    async def test_no_levels_without_a_microphone(self, tmp_path, pulse, sockdir):
        audio = '[audio]\ncapture_device = "nomic"\nplayback_device = "spk"\n'
        async with controlled(tmp_path, pulse, str(sockdir / "control"), RealtimeServer(),
                              audio) as spk:
            reply = await spk.ask({"request": "levels", "seconds": 1})
            assert reply == {"ok": False, "code": "unavailable",
                             "error": "the microphone 'nomic' is missing: no levels to report"}


class TestAbuse:
    async def test_another_uid_is_refused(self, speaker, sockdir):
        sockdir.chmod(0o755)  # nobody may reach the socket; its 0660 keeps them out
        done = await speakerd_status("--control", speaker.sock, user=NOBODY)
        assert done.returncode == 69
        assert done.stderr == (f"speakerd: permission denied on {speaker.sock}: run it with "
                               "sudo, or join the speakerd group (sudo adduser $USER "
                               "speakerd)\n")
        # With the file mode out of the way, the daemon's own check (SO_PEERCRED) refuses.
        os.chmod(speaker.sock, 0o666)
        done = await speakerd_status("--control", speaker.sock, user=NOBODY)
        assert done.returncode == 69
        assert done.stderr.startswith("speakerd: permission denied: uid 65534 (pid ")
        assert "is not root, speakerd's user or a member of group " in done.stderr
        assert done.stderr.endswith("run it with sudo, or join the speakerd group "
                                    "(sudo adduser $USER speakerd)\n")
        await speaker.wait_log("refused a control client: permission denied: uid 65534")
        assert (await speaker.status())["state"] == "idle"

    @pytest.mark.parametrize("junk", [
        b"\x00\xff\xfe\x1b[2Jjunk\n", b"status\n", b"[1, 2]\n", b'{"request": 7}\n',
        b"[" * 4000 + b"\n", b"\xff" * 100])
    async def test_junk_gets_an_error_and_the_connection_closed(self, speaker, junk):
        replies = await asyncio.to_thread(raw, speaker.sock, junk + b'{"request": "status"}\n')
        assert len(replies) == 1, replies  # the status after the junk is not answered
        assert replies[0]["ok"] is False and replies[0]["code"] == "bad_request"
        await speaker.wait_log("closed a control connection after a malformed request")

    async def test_a_one_mib_line_is_refused(self, speaker):
        replies = await asyncio.to_thread(raw, speaker.sock, b"x" * (1 << 20) + b"\n")
        assert replies == [{"ok": False, "code": "too_long",
                            "error": f"a request is at most {control_server.MAX_LINE} bytes"}]
        await speaker.wait_log("whose request was longer than 4096 bytes")

    async def test_a_client_that_never_sends_is_timed_out(self, speaker):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
            silent.settimeout(30)
            silent.connect(speaker.sock)
            started = time.monotonic()
            # Meanwhile others are served: the silent one holds only its own slot.
            assert (await speaker.status())["state"] == "idle"
            line = await asyncio.to_thread(silent.recv, 4096)
            waited = time.monotonic() - started
            assert await asyncio.to_thread(silent.recv, 4096) == b""  # then closed
        assert json.loads(line) == {"ok": False, "code": "timeout",
                                    "error": "no request within "
                                    f"{control_server.IDLE_TIMEOUT:.0f} s"}
        assert control_server.IDLE_TIMEOUT - 0.5 < waited < control_server.IDLE_TIMEOUT + 10
        await speaker.wait_log("closed a control connection that sent no request")

    async def test_twenty_clients_at_once(self, speaker):
        clients = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(20)]
        try:
            for c in clients:
                c.settimeout(30)
                c.connect(speaker.sock)

            def first_line(c: socket.socket) -> dict[str, Any]:
                return json.loads(c.recv(4096).splitlines()[0])
            replies = await asyncio.gather(*(asyncio.to_thread(first_line, c)
                                             for c in clients))
        finally:
            for c in clients:
                c.close()
        # The first MAX_CLIENTS were served (and, sending nothing, timed out); the rest
        # were refused at once.
        codes = Counter(r["code"] for r in replies)
        most = control_server.MAX_CLIENTS
        assert codes == {"busy": 20 - most, "timeout": most}
        busy = next(r for r in replies if r["code"] == "busy")
        assert busy["error"] == "too many control clients (at most 4); try again"
        assert (await speaker.status())["state"] == "idle"
        # One line for the burst, and its count once a client is served again.
        assert speaker.log.count("refusing control clients: 4 are connected already") == 1
        assert speaker.log.count(f"refused {20 - control_server.MAX_CLIENTS} control client(s) "
                                 "while busy") == 1


def test_no_socket_by_hand_without_a_path(tmp_path, pulse):
    """`speakerd run` by hand, with neither --control nor the variables: no socket."""
    config = tmp_path / "speakerd.toml"
    config.write_text('[audio]\ncapture_device = "mic"\nplayback_device = "spk"\n')
    proc = subprocess.Popen([*SPEAKERD, "run", "--config", str(config)], cwd=ROOT,
                            env=clean_env(), stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:  # wait on the start-up line, not on a clock
            seen.append(line)
            if "started: config" in line:
                break
        assert any("no control socket: run under the unit" in line for line in seen), seen
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
