"""`speakerd check` through the real command: real ALSA devices (PulseAudio null sinks fed
a silent clip, a clipped sox tone and espeak-ng's "hey jarvis"; file-backed PCMs), the
fixture realtime server (good key, 401, unknown model, nobody listening), gpiozero mock
pins, and a running `speakerd run` whose control socket answers `levels`. The output
is what a person reads, so it is asserted line by line."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from gpiozero.pins.mock import MockFactory, MockPin

from speakerd import config as configmod
from speakerd.audio import speex_echo
from speakerd.audio.levels import Meter
from speakerd.checks import echo, gpio, settings
from speakerd.checks.report import Report

from .conftest import ROOT, SPEAKERD, clean_env, need
from .realtime_server import RealtimeServer
from .room import Loopback
from .speech import have_espeak, silence, speak, write_wav
from .test_control import controlled
from .test_e2e import KEY

FILE_DEVICES = ('[audio]\ncapture_device = "filein:FILE=/dev/zero"\n'
                'playback_device = "fileout:FILE=/dev/null"\n')
PULSE_DEVICES = '[audio]\ncapture_device = "mic"\nplayback_device = "spk"\n'
KEY_FIX = ("put a valid key in /etc/speakerd/openai.key (chmod 600), then sudo systemctl "
           "restart speakerd")
SILENT_FIX = ("the wrong device or channel, or a muted capture control: unmute it and raise "
              "Capture in alsamixer (F4); speakerd reads channel 0, so on a multi-channel "
              "card name a plughw: device with the mic on its first channel")
LOUD_FIX = ("lower the capture gain in alsamixer (F4, Capture) until the peak stays below "
            "-3 dBFS while you speak: clipped audio scores lower")


async def check(tmp_path: Path, toml: str, *args: str, key: str | None = KEY,
                **env: str) -> tuple[int, list[str], str]:
    """`speakerd check` on a config holding `toml`: (exit code, stdout lines, stderr)."""
    config = tmp_path / "check.toml"
    config.write_text(toml)
    extra = {"OPENAI_API_KEY": key} if key else {}
    proc = await asyncio.create_subprocess_exec(
        *SPEAKERD, "check", "--config", str(config), "--control", str(tmp_path / "nosock"),
        *args, cwd=ROOT, env=clean_env(**extra, **env), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode().splitlines(), err.decode()


def has(lines: list[str], line: str, fix: str | None = None) -> int:
    """`line` is in the output (a regex when it starts with ^), followed by `fix` if given;
    returns its index."""
    for i, got in enumerate(lines):
        if got == line or (line.startswith("^") and re.fullmatch(line[1:], got)):
            if fix is not None:
                assert lines[i + 1] == f"      fix: {fix}", lines
            elif not got.startswith(("ok ", "skip ")):
                assert lines[i + 1].startswith("      fix: "), lines
            return i
    raise AssertionError(f"{line!r} not in:\n" + "\n".join(lines))


def statuses(lines: list[str]) -> list[str]:
    return [line.split()[0] for line in lines if not line.startswith(" ")]


# --- config and key -----------------------------------------------------------------------

async def test_a_config_error_is_the_one_fail_and_exit_1(tmp_path):
    code, lines, _ = await check(tmp_path, "[wake_word]\ntreshold = 0.5\n", "--offline")
    path = tmp_path / "check.toml"
    assert lines == [
        f"FAIL  config: {path}: wake_word.treshold: unknown key (did you mean 'threshold'?)",
        f"      fix: correct wake_word.treshold in {path}; `speakerd config --check` checks "
        "the file alone"]
    assert code == 1
    code, lines, _ = await check(tmp_path, "", "--config", str(tmp_path / "none.toml"))
    assert lines == [
        f"FAIL  config: {tmp_path / 'none.toml'}: no such file (create it from the packaged "
        "config/speakerd.toml, or pass --config)",
        "      fix: copy the packaged config/speakerd.toml there (install.sh does), or pass "
        "--config PATH"]
    assert code == 1


async def test_no_api_key_fails_and_says_where_to_put_one(tmp_path):
    code, lines, _ = await check(tmp_path, FILE_DEVICES, "--offline", "--listen", "0.5",
                                 key=None)
    has(lines, "FAIL  API key: none configured (realtime.api_key_file, the credential "
        "openai-key or $OPENAI_API_KEY)", KEY_FIX)
    has(lines, f"ok    config: {tmp_path / 'check.toml'}: valid, wake word models load")
    assert code == 1


def test_a_key_file_the_service_user_cannot_read(tmp_path):
    """The check for the service user, asked of the real `nobody` account."""
    top = Path(tempfile.mkdtemp(prefix="speakerd-key-"))
    try:
        top.chmod(0o711)
        key = top / "openai.key"
        key.write_text(KEY)
        key.chmod(0o600)
        assert settings.readable_by(str(key), "nobody") == (
            f"the service user nobody cannot read {key} (mode 0600, root:root)")
        os.chown(key, 65534, -1)
        assert settings.readable_by(str(key), "nobody") is None
        top.chmod(0o700)
        assert settings.readable_by(str(key), "nobody") == (
            f"the service user nobody cannot search {top} (mode 0700, root:root)")
        assert settings.readable_by(str(key), "root") is None
    finally:
        shutil.rmtree(top)


# --- devices ---------------------------------------------------------------------------

async def test_missing_devices_fail_and_list_the_names_to_use(tmp_path):
    code, lines, _ = await check(tmp_path, '[audio]\ncapture_device = "nomic"\n'
                                 'playback_device = "nospk"\n', "--offline")
    names = "spk, mic, spk2, mic2"  # the PCMs of tests/audio_devices.py's asoundrc
    has(lines, "FAIL  microphone: cannot open ALSA capture device 'nomic': No such file or "
        "directory [nomic]",
        f"set [audio] capture_device to one of the names `arecord -L` lists: {names}")
    has(lines, "FAIL  speaker: cannot open ALSA playback device 'nospk': No such file or "
        "directory [nospk]",
        f"set [audio] playback_device to one of the names `aplay -L` lists: {names}")
    has(lines, "skip  microphone level: no microphone")
    has(lines, "skip  speaker tone: no speaker")
    assert code == 1


@pytest.fixture
def feed(pulse, tmp_path):
    """feed(x): play `x` (16 kHz float) into the `mic` sink until the test ends."""
    players: list[subprocess.Popen[bytes]] = []

    def play(x: np.ndarray | Path) -> None:
        wav = x if isinstance(x, Path) else write_wav(tmp_path / f"feed{len(players)}.wav", x)
        players.append(pulse.play_into_mic(wav))
    yield play
    for p in players:
        p.kill()
        p.wait()


async def test_a_silent_mic_and_a_tone_that_drains(tmp_path, pulse, feed):
    feed(silence(30))
    before = len(pulse.speaker_bytes())
    code, lines, err = await check(tmp_path, PULSE_DEVICES, "--offline", "--listen", "1.5")
    assert err == 'speakerd check: listening for 1.5 s: say "hey jarvis" now\n'
    has(lines, "ok    microphone: mic opens: 16000 Hz, 1 channel, S16_LE")
    has(lines, "ok    speaker: spk opens: 24000 Hz, 1 channel, S16_LE")
    has(lines, "warn  microphone level: digital silence: every sample was 0 for 1.52 s",
        SILENT_FIX)
    has(lines, r"^warn  wake word hey_jarvis: best score 0\.0\d (\(at \d\.\d s of 1\.52 s\)|"
        r"in 1\.52 s): would not trigger \(threshold 0\.5, trigger level 1\)",
        'say "hey jarvis" while check listens (--listen SECONDS); if you did, raise the '
        "capture gain in alsamixer or move closer")
    i = has(lines, r"^ok    speaker tone: played a 0\.4 s tone on spk; the drain callback "
            r"came -?\d+ ms after its nominal end")
    late = int(re.search(r"came (-?\d+) ms", lines[i])[1])
    assert -100 <= late <= 1000
    # The tone reached the speaker: 523 Hz dominates what the sink played meanwhile.
    heard = np.frombuffer(pulse.speaker_bytes()[before:], "<i2").astype(np.float64)
    loud = heard[np.abs(heard) > 1000]
    assert loud.size > 24000 * 0.3, loud.size
    spectrum = np.abs(np.fft.rfft(heard))
    assert abs(np.argmax(spectrum) * 24000 / heard.size - 523) < 5
    has(lines, "skip  realtime: --offline")
    has(lines, "skip  GPIO: no LEDs or buttons configured")
    assert code == 0  # warnings only


async def test_a_clipped_mic_is_too_loud(tmp_path, pulse, feed):
    need(shutil.which("sox") is not None, "sox")
    wav = tmp_path / "loud.wav"
    subprocess.run(["sox", "-q", "-n", "-r", "16000", "-c", "1", "-b", "16", str(wav),
                    "synth", "30", "sine", "440", "gain", "+6"], check=True)
    feed(wav)
    code, lines, _ = await check(tmp_path, PULSE_DEVICES, "--offline", "--listen", "1.5")
    i = has(lines, r"^warn  microphone level: too loud: RMS -?\d+\.\d dBFS, peak -?0\.0 dBFS, "
            r"\d+ clipped, DC offset -?0\.0% over 1\.52 s", LOUD_FIX)
    clipped = int(re.search(r"(\d+) clipped", lines[i])[1])
    assert clipped > 1000  # a +6 dB sine sits on the rails for a third of its samples
    assert code == 0


ECHO_DEVICES = PULSE_DEVICES + 'echo_cancellation = "software"\n'


async def test_the_echo_is_measured_in_a_room(tmp_path, pulse, feed):
    need(speex_echo.available(), "libspeexdsp1")
    feed(silence(60))
    with Loopback(pulse, latency_ms=60, gain_db=-6.0):
        code, lines, _ = await check(tmp_path, ECHO_DEVICES, "--offline", "--listen", "1")
    i = has(lines, r"^ok    echo: heard \d+ ms after it played; \d+ dB removed from what the "
            r"server gets, \d+ dB by the barge-in detector's filter")
    lag, removed, linear = map(int, re.findall(r"(\d+) (?:ms|dB)", lines[i]))
    # The loopback's 60 ms, plus how late PulseAudio's sinks are (20-60 ms here).
    assert 60 <= lag <= 200, lag
    assert removed >= 20 and linear >= 6
    assert code == 0


async def test_a_mic_that_does_not_hear_the_speaker_cannot_barge_in(tmp_path, pulse, feed):
    feed(silence(60))
    code, lines, _ = await check(tmp_path, ECHO_DEVICES, "--offline", "--listen", "1")
    has(lines, "warn  echo: the microphone did not hear the speaker (digital silence while it "
        "played)", echo.BARGE_IN_FIX)
    assert code == 0


async def test_without_software_cancellation_there_is_nothing_to_measure(tmp_path, pulse,
                                                                         feed):
    feed(silence(60))
    _, lines, _ = await check(tmp_path, PULSE_DEVICES, "--offline", "--listen", "1")
    has(lines, 'skip  echo: [audio] echo_cancellation = "off": speakerd does not cancel the '
        "echo itself")


async def test_the_wake_word_said_would_trigger(tmp_path, pulse, feed):
    need(have_espeak(), "espeak-ng")
    said = np.concatenate([speak("hey jarvis", "en-gb"), silence(1.0)])
    feed(np.concatenate([silence(0.5)] + [said] * 15))
    code, lines, _ = await check(tmp_path, PULSE_DEVICES, "--offline", "--listen", "3")
    i = has(lines, r"^ok    wake word hey_jarvis: best score (0\.\d\d|1\.00) \(at \d\.\d s of "
            r"3\.04 s\): would trigger \(threshold 0\.5, trigger level 1\); the highest "
            r"threshold that still would: (0\.\d\d|1\.00)")
    best, highest = re.findall(r"(?:score|would:) (\d\.\d\d)", lines[i])
    assert float(highest) == float(best) >= 0.5  # trigger level 1: the best score itself
    has(lines, r"^ok    microphone level: RMS -\d+\.\d dBFS, peak -\d+\.\d dBFS, 0 clipped, "
        r"DC offset -?0\.0% over 3\.04 s")
    assert code == 0


def test_the_highest_threshold_that_would_trigger_at_trigger_level_2():
    """Two scores in a row must cross: the answer is the best pair's lower score."""
    reports = []
    meter = Meter(0.4, [("hey_jarvis", 0.5)], 2, reports.append)
    frame = np.zeros(1280, np.float32)
    for score in (0.9, 0.3, 0.7, 0.6, 0.2):
        meter.add(frame, {"hey_jarvis": [score]})
    (report,) = reports
    assert report["wake_word"] == {"trigger_level": 2, "models": [{
        "name": "hey_jarvis", "threshold": 0.5, "best": 0.9, "at_seconds": 0.08,
        "highest_threshold": 0.6, "would_trigger": True}]}
    meter.add(frame, {"hey_jarvis": [1.0]})  # done: later frames change nothing
    assert len(reports) == 1 and meter.report()["wake_word"] == report["wake_word"]


# --- the realtime service ----------------------------------------------------------------

async def test_the_realtime_service_step_by_step(tmp_path):
    async with RealtimeServer() as server:
        code, lines, _ = await check(tmp_path, FILE_DEVICES + f'[realtime]\nurl = '
                                     f'"{server.url}"\n', "--listen", "0.5")
    port = server.port
    has(lines, r"^ok    realtime DNS: 127\.0\.0\.1 is 127\.0\.0\.1 \(\d+ ms\)")
    has(lines, rf"^ok    realtime TCP: connected to 127\.0\.0\.1 port {port} \(\d+ ms\)")
    has(lines, "skip  realtime TLS: ws:// to a loopback address")
    has(lines, rf"^ok    realtime handshake: ws://127\.0\.0\.1:{port}/v1/realtime\?model="
        r"gpt-realtime \(\d+ ms\)")
    has(lines, r"^ok    realtime session\.created: \d+ ms after the handshake")
    has(lines, r"^ok    realtime session\.updated: model gpt-realtime, voice marin, 7 tools "
        r"\(\d+ ms\)")
    assert [r.type for r in server.received] == ["session.update"]
    assert server.invalid == []  # what check sent is a valid RealtimeClientEvent
    session = server.received[0].event["session"]
    assert session["model"] == "gpt-realtime"
    assert session["audio"]["output"]["voice"] == "marin"
    assert len(session["tools"]) == 7
    assert server.handshakes[0][1]["Authorization"] == f"Bearer {KEY}"
    assert code == 0


async def test_a_refused_key(tmp_path):
    async with RealtimeServer(reject_status=401) as server:
        code, lines, err = await check(tmp_path, FILE_DEVICES + f'[realtime]\nurl = '
                                       f'"{server.url}"\n', "--listen", "0.5")
    has(lines, "FAIL  realtime handshake: the API key was refused (HTTP 401): check the key",
        KEY_FIX)
    assert not any(line.startswith("ok    realtime session") for line in lines)
    assert KEY not in "\n".join(lines) + err
    assert code == 1


async def test_an_unknown_model(tmp_path):
    async with RealtimeServer(models=("gpt-realtime",)) as server:
        code, lines, _ = await check(tmp_path, FILE_DEVICES + f'[realtime]\nurl = '
                                     f'"{server.url}"\nmodel = "gpt-nonesuch"\n',
                                     "--listen", "0.5")
    has(lines, "FAIL  realtime session.created: unknown realtime model: check realtime.model "
        "(model_not_found: The model 'gpt-nonesuch' does not exist or you do not have "
        "access to it.)",
        "set [realtime] model to a realtime model your key may use, e.g. gpt-realtime "
        "(now: gpt-nonesuch)")
    assert code == 1


async def test_nobody_listening(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: nothing listens there
    code, lines, _ = await check(tmp_path, FILE_DEVICES + f'[realtime]\nurl = '
                                 f'"ws://127.0.0.1:{port}/v1/realtime"\n', "--listen", "0.5")
    has(lines, f"FAIL  realtime TCP: cannot connect to 127.0.0.1 port {port}: Connection "
        "refused", "check the network, a firewall or proxy, and [realtime] url; is the "
        "server up?")
    assert not any(line.startswith("ok    realtime handshake") for line in lines)
    assert code == 1


# --- GPIO ----------------------------------------------------------------------------------

GPIO_TOML = ("[leds]\npins = { red = 17, green = 27, blue = 22 }\n"
             "[buttons]\nmute = 5\ntalk = 6\n")


async def test_leds_and_buttons_on_mock_pins(tmp_path):
    code, lines, _ = await check(tmp_path, FILE_DEVICES + GPIO_TOML, "--offline", "--listen",
                                 "0.5", GPIOZERO_PIN_FACTORY="mock")
    has(lines, "ok    LEDs: LEDs on GPIO red 17, green 27, blue 22: open, blinked once")
    has(lines, "ok    mute button: GPIO 5 reads released (high, pulled up)")
    has(lines, "ok    talk button: GPIO 6 reads released (high, pulled up)")
    assert code == 0


class ShortedToGround(MockPin):
    """A button input whose wire touches ground: the pull-up cannot lift it."""

    def drive_high(self) -> None:
        self.drive_low()


def test_a_stuck_button_is_a_warn_and_the_leds_blink(tmp_path):
    factory = MockFactory()
    factory.pin(5, pin_class=ShortedToGround)
    config = configmod.from_dict({"leds": {"pins": {"status": 17}},
                                  "buttons": {"mute": 5, "talk": 6}}, "speakerd.toml")
    out = io.StringIO()
    gpio.check(Report(out), config, running=False, pin_factory=factory)
    assert out.getvalue().splitlines() == [
        "ok    LEDs: LEDs on GPIO status 17: open, blinked once",
        "warn  mute button: GPIO 5 reads pressed at rest (low, pulled up)",
        "      fix: a stuck button or a wiring fault: check the wire from GPIO 5; a button "
        "wired to 3.3 V instead of ground needs [buttons] pull_up = false",
        "ok    talk button: GPIO 6 reads released (high, pulled up)"]
    # The blink: the LED's pin went high, then low again.
    assert [s.state for s in factory.pin(17).states][-2:] == [True, False]
    factory.reset()


def test_gpio_is_left_alone_while_the_service_runs():
    config = configmod.from_dict({"buttons": {"talk": 6}}, "speakerd.toml")
    out = io.StringIO()
    gpio.check(Report(out), config, running=True, pin_factory=MockFactory())
    assert out.getvalue().splitlines() == [
        "skip  GPIO: the running speakerd holds the pins; to test them: sudo systemctl stop "
        "speakerd, check, then start it"]


# --- the service ---------------------------------------------------------------------------

async def test_without_systemd_the_service_is_skipped(tmp_path):
    need(not Path("/run/systemd/system").exists(), "a machine not booted with systemd")
    code, lines, _ = await check(tmp_path, FILE_DEVICES, "--offline", "--listen", "0.5")
    has(lines, "skip  service: this machine does not run systemd")
    assert statuses(lines)[:4] == ["ok", "ok", "skip", "ok"]
    assert code == 0


def test_the_service_as_systemd_reports_it(tmp_path):
    """A real systemd (user) manager: no unit, a running one, a failed one."""
    need(os.getuid() == 0 and shutil.which("unshare") is not None,
         "root and unshare(1) for a private user manager")
    need(os.path.exists("/lib/systemd/systemd"), "systemd")
    helpers = ROOT / "tests" / "helpers"
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", str(helpers / "user-manager-sandbox"),
         str(tmp_path), sys.executable, str(helpers / "service_check_scenario.py")],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    lines = json.loads(done.stdout)
    assert lines["missing"] == [
        "warn  service: speakerd.service is not installed (not-found)",
        "      fix: sudo ./install.sh installs, enables and starts it"]
    assert lines["running"] == [
        "ok    service: speakerd.service installed, enabled, active (running), restarted 0 "
        "times, last exit status 0"]
    failed = ("FAIL  service: speakerd.service installed, {}, failed, restarted 0 times, last "
              "exit status 3, result exit-code")
    fix = ("      fix: journalctl -u speakerd -n 20 says why; after fixing it: sudo systemctl "
           "restart speakerd")
    assert lines["failed"] == [failed.format("enabled"), fix]
    assert lines["disabled_failed"] == [failed.format("disabled"), fix]


# --- while speakerd runs ------------------------------------------------------------------

@pytest.fixture
def short_dir():
    """A directory for the control socket (sun_path holds 108 bytes; tmp_path is long)."""
    path = Path(tempfile.mkdtemp(prefix="speakerd-ck-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_while_speakerd_runs_the_figures_come_from_its_levels(tmp_path, pulse, short_dir,
                                                                    feed):
    need(have_espeak(), "espeak-ng")
    sock = str(short_dir / "control")
    async with controlled(tmp_path, pulse, sock, RealtimeServer()) as spk:
        # Muted, the detector still scores every frame; it only starts no conversation.
        assert (await spk.ask({"request": "mute"}))["muted"] is True
        said = np.concatenate([speak("hey jarvis", "en-gb"), silence(1.0)])
        feed(np.concatenate([silence(0.5)] + [said] * 15))
        config = spk.config
        proc = await asyncio.create_subprocess_exec(
            *SPEAKERD, "check", "--config", str(config), "--control", sock, "--offline",
            "--listen", "3", cwd=ROOT, env=clean_env(OPENAI_API_KEY=KEY),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        lines = out.decode().splitlines()
        pid = spk.proc.pid
    has(lines, f"ok    speakerd: running (pid {pid}, idle: listening for the wake word "
        "(muted)): it holds the devices, so the audio figures come from it")
    has(lines, "ok    microphone: mic is open in the running speakerd: 16000 Hz, 1 channel, "
        "S16_LE")
    has(lines, "ok    speaker: spk is open in the running speakerd: 24000 Hz, 1 channel, "
        "S16_LE")
    has(lines, r"^ok    wake word hey_jarvis: best score (0\.\d\d|1\.00) \(at \d\.\d s of "
        r"3\.04 s\): would trigger \(threshold 0\.5, trigger level 1\); the highest "
        r"threshold that still would: (0\.\d\d|1\.00)")
    has(lines, "skip  speaker tone: the running speakerd holds the speaker; to test the tone "
        "and its drain: sudo systemctl stop speakerd, check, then start it")
    assert err.decode() == 'speakerd check: listening for 3 s: say "hey jarvis" now\n'
    assert proc.returncode == 0, lines
    assert "wake word hey_jarvis heard" not in spk.log  # muted: scored, never acted on
