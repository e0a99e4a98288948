"""`speakerd run` as systemd sees it: READY, STATUS, WATCHDOG cadence, SIGHUP reload, SIGTERM."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from .conftest import ROOT, SPEAKERD, clean_env, run_speakerd
from .notify_socket import NotifySocket

KEY = "sk-proj-DAEMONTESTKEY0123456789abcdef"


class Daemon:
    def __init__(self, tmp_path: Path, config: Path, **env: str) -> None:
        self.notify = NotifySocket(tmp_path / "notify.sock")
        self.stderr_path = tmp_path / "stderr.log"
        self._stderr = self.stderr_path.open("w")
        self.proc = subprocess.Popen(
            [*SPEAKERD, "run", "--config", str(config)], cwd=ROOT, stderr=self._stderr,
            env=clean_env(NOTIFY_SOCKET=self.notify.path, **env))

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()
        self.notify.close()


# Paced PulseAudio devices: an unpaced file capture would feed the detector flat out.
DEVICES = '[audio]\ncapture_device = "mic"\nplayback_device = "spk"\n'


@pytest.fixture
def daemon(tmp_path, write_config, pulse):
    started: list[Daemon] = []

    def start(config_text: str = "", **env: str) -> Daemon:
        d = Daemon(tmp_path, write_config(DEVICES + config_text), **env)
        started.append(d)
        return d
    yield start
    for d in started:
        d.stop()


class TestReadiness:
    def test_ready_with_status_after_logging_startup(self, daemon):
        d = daemon()
        ready = d.notify.wait_for("READY", "1")
        assert ready.fields["STATUS"] == "idle: listening for the wake word"
        assert "speakerd 0.1.0 started: config" in d.stderr
        assert "[SPEAKERD_STATE=idle SPEAKERD_EVENT=start]" in d.stderr

    def test_missing_key_is_a_warning_not_a_failure(self, daemon):
        d = daemon()
        d.notify.wait_for("READY", "1")
        assert "no API key configured" in d.stderr
        assert d.proc.poll() is None


class TestWatchdog:
    def test_pings_at_half_the_watchdog_interval(self, daemon):
        d = daemon(WATCHDOG_USEC="200000")
        pings = d.notify.collect("WATCHDOG", 8)
        gaps = [b.at - a.at for a, b in itertools.pairwise(pings)]
        # Expected 0.1 s apart (half of 0.2 s); a shared machine adds jitter, never halves it.
        assert 0.08 <= statistics.median(gaps) <= 0.15, gaps
        assert min(gaps) >= 0.05, gaps

    def test_no_pings_for_another_pid(self, daemon):
        d = daemon(WATCHDOG_USEC="200000", WATCHDOG_PID="1")
        d.notify.wait_for("READY", "1")
        d.proc.send_signal(signal.SIGTERM)
        d.proc.wait(timeout=5)
        d.notify.wait_for("STOPPING", "1")
        assert not any("WATCHDOG" in m.fields for m in d.notify.messages)


class TestSignals:
    def test_sigterm_stops_cleanly_within_two_seconds(self, daemon):
        d = daemon()
        d.notify.wait_for("READY", "1")
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(timeout=2) == 0
        assert d.notify.wait_for("STOPPING", "1").fields["STATUS"] == "stopping"
        assert "stopping on SIGTERM" in d.stderr
        assert "speakerd stopped" in d.stderr

    def test_sighup_reloads_a_good_file(self, daemon, write_config):
        d = daemon()
        d.notify.wait_for("READY", "1")
        write_config(DEVICES + "[log]\nlevel = 'debug'\n")
        d.proc.send_signal(signal.SIGHUP)
        reloading = d.notify.wait_for("RELOADING", "1")
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert 0 < now_usec - int(reloading.fields["MONOTONIC_USEC"]) < 60_000_000
        after = d.notify.messages.index(reloading)
        d.notify.collect("READY", 2)
        assert any("READY" in m.fields for m in d.notify.messages[after:])
        assert "config reloaded from" in d.stderr

    def test_sighup_with_a_bad_file_keeps_the_old_config_and_runs_on(self, daemon,
                                                                     write_config):
        d = daemon()
        d.notify.wait_for("READY", "1")
        path = write_config(DEVICES + "[wake_word]\ntreshold = 0.3\n")
        d.proc.send_signal(signal.SIGHUP)
        d.notify.wait_for("STATUS", "idle: listening for the wake word; config reload "
                          "failed, old config kept")
        assert d.proc.poll() is None
        assert (f"config reload failed, keeping the running config: {path}: "
                "wake_word.treshold: unknown key (did you mean 'threshold'?)") in d.stderr
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(timeout=5) == 0

    def test_key_from_environment_never_reaches_the_log(self, daemon):
        d = daemon("[log]\nlevel = 'debug'\n", OPENAI_API_KEY=KEY)
        d.notify.wait_for("READY", "1")
        d.proc.send_signal(signal.SIGTERM)
        d.proc.wait(timeout=5)
        assert KEY not in d.stderr
        assert "no API key configured" not in d.stderr


def test_runs_without_notify_socket(tmp_path, write_config, pulse):
    proc = subprocess.Popen([*SPEAKERD, "run", "--config", str(write_config(DEVICES))],
                            cwd=ROOT,
                            env=clean_env(), stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # wait on the start-up line, not on a clock
            if "started: config" in line:
                break
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        proc.kill()


def test_the_shipped_config_starts_and_reports_ready(tmp_path, pulse):
    from .notify_socket import NotifySocket
    sock = NotifySocket(tmp_path / "n.sock")
    proc = subprocess.Popen([*SPEAKERD, "run", "--config", str(ROOT / "config/speakerd.toml")],
                            cwd=ROOT, env=clean_env(NOTIFY_SOCKET=sock.path),
                            stderr=subprocess.DEVNULL)
    try:
        assert sock.wait_for("READY", "1").fields["STATUS"] == "idle: listening for the " \
                                                              "wake word"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        proc.kill()
        sock.close()


class TestDevices:
    """A mic or speaker that is not there at start-up: start anyway, say so, keep trying."""

    @pytest.fixture
    def pulse2(self, pulse):
        from .audio_devices import Pulse
        daemon = Pulse("2")
        yield daemon  # not started: the devices mic2 and spk2 are missing until a test starts it
        daemon.stop()

    @pytest.mark.parametrize(("mic", "speaker", "what", "name"), [
        ("mic2", "spk", "microphone", "mic2"), ("mic", "spk2", "speaker", "spk2")])
    def test_missing_device_is_waited_for_then_used(self, tmp_path, write_config, pulse2,
                                                     mic, speaker, what, name):
        path = write_config(f'[audio]\ncapture_device = "{mic}"\nplayback_device = "{speaker}"\n')
        d = Daemon(tmp_path, path)
        try:
            ready = d.notify.wait_for("READY", "1", timeout=60)
            assert ready.fields["STATUS"] == f"waiting for {what} '{name}'"
            kind = "capture" if what == "microphone" else "playback"
            errors = [line for line in d.stderr.splitlines() if "cannot open" in line]
            assert len(errors) == 1, d.stderr
            assert f"cannot open ALSA {kind} device '{name}': " in errors[0]
            assert "(PCMs alsa-lib knows: " in errors[0]
            assert f"keeps trying the {what}" in errors[0]
            pulse2.start()  # the USB device is plugged in
            d.notify.wait_for("STATUS", "idle: listening for the wake word", timeout=30)
            assert f"{what} {name} is there now" in d.stderr
            assert d.proc.poll() is None
            d.proc.send_signal(signal.SIGTERM)
            assert d.proc.wait(timeout=10) == 0
        finally:
            d.stop()
        # alsa-lib's own chatter ("ALSA lib pcm.c:...") stays out of the log.
        assert "ALSA lib" not in d.stderr, d.stderr
        assert "Traceback" not in d.stderr

    def test_a_microphone_whose_open_blocks_does_not_hold_up_the_start(
            self, tmp_path, write_config, pulse):
        # alsa-lib's open of a filein PCM on a fresh FIFO waits for a writer: a device
        # that is slow to answer, for as long as the test likes.
        fifo = tmp_path / "mic.fifo"
        os.mkfifo(fifo)
        mic = f"filein:FILE={fifo}"
        path = write_config(f'[audio]\ncapture_device = "{mic}"\nplayback_device = "spk"\n')
        sockdir = Path(tempfile.mkdtemp(prefix="speakerd-open-"))
        sock = str(sockdir / "control")
        d = Daemon(tmp_path, path, WATCHDOG_USEC="200000", SPEAKERD_CONTROL=sock)
        writer: list[int] = []
        try:
            ready = d.notify.wait_for("READY", "1", timeout=10)
            assert ready.fields["STATUS"] == f"waiting for microphone '{mic}'"
            assert "started: config" in d.stderr
            assert f"microphone {mic} has not opened in 1 s" in d.stderr, d.stderr
            done = run_speakerd("status", "--control", sock)
            assert done.returncode == 0, done.stderr
            assert f"microphone:    {mic} (missing, waiting for it)" in done.stdout
            # The loop runs on: systemd's watchdog goes on hearing from it.
            pings = len(d.notify.collect("WATCHDOG", 1))
            d.notify.collect("WATCHDOG", pings + 5, timeout=10)
            opener = threading.Thread(target=lambda: writer.append(os.open(fifo, os.O_WRONLY)))
            opener.start()  # the microphone is plugged in
            opener.join(10)
            assert writer, "nothing opened the FIFO for reading"
            d.notify.wait_for("STATUS", "idle: listening for the wake word", timeout=20)
            assert f"microphone {mic} is there now" in d.stderr
            os.close(writer.pop())  # EOF: the PCM reads zeros from here on, and returns
            d.proc.send_signal(signal.SIGTERM)
            assert d.proc.wait(timeout=10) == 0
        finally:
            d.stop()
            for fd in writer:
                os.close(fd)
            shutil.rmtree(sockdir, ignore_errors=True)
        assert "Traceback" not in d.stderr
        assert "did not stop" not in d.stderr
