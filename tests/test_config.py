"""Config contract: defaults, every class of error naming file and key, key resolution."""

from __future__ import annotations

import ast
import dataclasses
import os
import pkgutil
import pwd
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from speakerd import config
from speakerd.config import loader
from speakerd.errors import EX_CONFIG, ConfigError

from .conftest import ROOT, clean_env, run_speakerd

SHIPPED = ROOT / "config" / "speakerd.toml"


class TestDefaults:
    def test_empty_file_gives_every_documented_default(self, write_config):
        c = config.load(write_config(""))
        assert c.audio == config.AudioConfig(
            capture_device="default", playback_device="default", mixer_control="PCM",
            mixer_device="", playback_volume=0.8, follow_up_guard_ms=150,
            echo_cancellation="off")
        assert c.wake_word == config.WakeWordConfig(("hey_jarvis",), 0.5, 2.0, 1, {})
        assert c.realtime.url == "wss://api.openai.com/v1/realtime"
        assert c.realtime.model == "gpt-realtime"
        assert c.realtime.voice == "marin"
        assert c.realtime.turn_detection == "semantic_vad"
        assert c.conversation == config.ConversationConfig(8.0, 600.0, "wake_word")
        assert c.cues == config.CuesConfig(True, True)
        assert c.leds == config.LedsConfig({}, True, {}, kind="gpio", count=3, spi_port=0,
                                           spi_device=0, brightness=0.5, power_pin=0)
        assert c.hardware == config.HardwareConfig(preset="")
        assert c.from_preset == ()
        assert c.buttons == config.ButtonsConfig(0, 0, 0, 0, 0.05, True, False)
        assert c.tools == config.ToolsConfig(config.BUILTIN_TOOLS, 10.0)
        assert c.log.level == "info"

    def test_shipped_file_lists_every_key_with_its_default(self):
        raw = tomllib.loads(SHIPPED.read_text())
        defaults = config.Config()
        for section in dataclasses.fields(defaults):
            if section.name in ("path", "from_preset", "mcp"):  # [[mcp]]: none by default
                continue
            want = {f.name: getattr(getattr(defaults, section.name), f.name)
                    for f in dataclasses.fields(getattr(defaults, section.name))}
            got = raw[section.name]
            assert set(got) == set(want), section.name
            for key, value in got.items():
                value = tuple(value) if isinstance(value, list) else value
                assert value == want[key], f"{section.name}.{key}"

    def test_shipped_file_passes_config_check(self):
        r = run_speakerd("config", "--check", "--config", str(SHIPPED))
        assert (r.returncode, r.stdout.strip()) == (0, f"{SHIPPED}: OK")

    def test_config_path_comes_from_environment(self, write_config):
        path = write_config("[log]\nlevel = 'debug'\n")
        r = run_speakerd("config", "--show", env=clean_env(SPEAKERD_CONFIG=str(path)))
        assert r.returncode == 0
        assert f"# effective config from {path}" in r.stdout
        assert 'level = "debug"' in r.stdout

    def test_ints_are_accepted_where_numbers_are_due(self, write_config):
        c = config.load(write_config("[conversation]\nfollow_up_seconds = 5\n"))
        assert c.conversation.follow_up_seconds == 5.0
        assert isinstance(c.conversation.follow_up_seconds, float)


BAD = [
    ("[wake_word]\ntreshold = 0.3\n", "wake_word.treshold",
     "unknown key (did you mean 'threshold'?)"),
    ("[wakeword]\n", "wakeword", "unknown section (did you mean 'wake_word'?)"),
    ("[zzz]\n", "zzz", "unknown section (allowed: audio, wake_word, realtime, conversation, "
     "cues, hardware, leds, buttons, tools, log, phrases)"),
    ("audio = 3\n", "audio", "must be a table ([audio]), not an integer"),
    ("[wake_word]\nthreshold = 'high'\n", "wake_word.threshold", "must be a number, not a string"),
    ("[wake_word]\nthreshold = 1.5\n", "wake_word.threshold", "1.5 is out of range (0.01 to 1)"),
    ("[wake_word]\nthreshold = true\n", "wake_word.threshold", "must be a number, not a boolean"),
    ("[audio]\nfollow_up_guard_ms = 1.5\n", "audio.follow_up_guard_ms",
     "must be a whole number, not a number"),
    ("[audio]\nfollow_up_guard_ms = -1\n", "audio.follow_up_guard_ms",
     "-1 is out of range (0 to 5000)"),
    ("[audio]\nplayback_volume = 1.01\n", "audio.playback_volume",
     "1.01 is out of range (0 to 1)"),
    ("[audio]\ncapture_device = 2\n", "audio.capture_device", "must be a string, not an integer"),
    ("[cues]\nwake = 'yes'\n", "cues.wake", "must be true or false, not a string"),
    ("[log]\nlevel = 'verbose'\n", "log.level",
     "'verbose' is not allowed (one of: debug, info, warning, error)"),
    ("[realtime]\nturn_detection = 'vad'\n", "realtime.turn_detection",
     "'vad' is not allowed (one of: semantic_vad, server_vad)"),
    ("[audio]\necho_cancellation = 'on'\n", "audio.echo_cancellation",
     "'on' is not allowed (one of: software, device, off)"),
    ("[conversation]\nbarge_in = 'talk'\n", "conversation.barge_in",
     "'talk' is not allowed (one of: wake_word, voice)"),
    ("[audio]\necho_cancellation = 'off'\n[conversation]\nbarge_in = 'voice'\n",
     "conversation.barge_in", '"voice" needs the speaker\'s own sound removed from the '
     'microphone, or it interrupts itself: set audio.echo_cancellation = "software" (or '
     '"device" if the mic hardware cancels echo)'),
    ("[realtime]\nurl = 'https://api.openai.com/v1/realtime'\n", "realtime.url",
     "'https://api.openai.com/v1/realtime' must be a ws:// or wss:// URL with a host"),
    ("[realtime]\nurl = 'ws://example.com/v1/realtime'\n", "realtime.url",
     "plain ws:// to example.com would send the API key unencrypted; use wss:// "
     "(ws:// is allowed only to a loopback address)"),
    ("[realtime]\nmodel = ' '\n", "realtime.model", "must not be empty"),
    ("[conversation]\nmax_session_seconds = 5\n", "conversation.max_session_seconds",
     "5 is out of range (10 to 86400)"),
    ("[wake_word]\nmodels = []\n", "wake_word.models", "must name at least one model"),
    ("[wake_word]\nmodels = 'hey_jarvis'\n", "wake_word.models",
     "must be a list of non-empty strings"),
    ("[wake_word]\nmodels = ['hey_siri']\n", "wake_word.models",
     "'hey_siri' is neither a built-in model (alexa, hey_jarvis, hey_mycroft, hey_rhasspy, "
     "okay_nabu) nor a path to a .tflite file"),
    ("[wake_word]\nmodels = ['/nonexistent/x.tflite']\n", "wake_word.models",
     "model file /nonexistent/x.tflite is missing or not readable (built-in models: alexa, "
     "hey_jarvis, hey_mycroft, hey_rhasspy, okay_nabu)"),
    ("[wake_word]\nmodel_thresholds = { alexa = 0.4 }\n", "wake_word.model_thresholds.alexa",
     "not one of wake_word.models (hey_jarvis)"),
    ("[wake_word]\nmodel_thresholds = { hey_jarvis = 2 }\n",
     "wake_word.model_thresholds.hey_jarvis", "must be a number from 0.01 to 1"),
    ("[wake_word]\ntrigger_level = 0\n", "wake_word.trigger_level",
     "0 is out of range (1 to 10)"),
    ("[tools]\nenabled = ['get_time', 'weather']\n", "tools.enabled",
     "unknown tool 'weather' (built-in: get_time, get_volume, set_volume, end_conversation, "
     "set_timer, cancel_timer, list_timers; installed plug-ins: none)"),
    ("[tools]\nenabled = ['get_time', 'get_time']\n", "tools.enabled", "names an entry twice"),
    ("[tools]\ntimeout_seconds = 0\n", "tools.timeout_seconds", "0 is out of range (0.1 to 120)"),
    ("[leds]\npins = { purple = 5 }\n", "leds.pins.purple",
     "unknown LED (allowed: red, green, blue, status)"),
    ("[leds]\npins = { red = 40 }\n", "leds.pins.red", "must be a BCM pin number 1 to 27"),
    ("[leds]\npins = { red = 5, status = 6 }\n", "leds.pins",
     "use either status or red/green/blue, not both"),
    ("[leds]\npins = { red = 5 }\n[buttons]\nmute = 5\n", "buttons.mute",
     "pin 5 is already used by leds.pins.red"),
    ("[buttons]\ntalk = 28\n", "buttons.talk", "28 is out of range (0 to 27)"),
    ("[buttons]\ntalk = 5\nvolume_up = 5\n", "buttons.volume_up",
     "pin 5 is already used by buttons.talk"),
    ("[leds]\npatterns = { listenning = { kind = 'solid' } }\n", "leds.patterns.listenning",
     "unknown state (did you mean 'listening'?)"),
    ("[leds]\npatterns = { idle = { kind = 'glow' } }\n", "leds.patterns.idle.kind",
     "'glow' is not allowed (one of: off, solid, blink, pulse, breathe, spin)"),
    ("[leds]\npatterns = { idle = { color = 'blue' } }\n", "leds.patterns.idle.color",
     "must be [red, green, blue], each from 0 to 1"),
    ("[leds]\npatterns = { idle = { colour = [0, 0, 1] } }\n", "leds.patterns.idle.colour",
     "unknown key (allowed: kind, color, on_seconds, off_seconds, width, flash_seconds)"),
    ("[leds]\npatterns = { error = { on_seconds = 0 } }\n", "leds.patterns.error.on_seconds",
     "must be a number from 0.02 to 10"),
]


# Pixel rings and board presets (issue 16).
RING_BAD = [
    ("[leds]\nkind = 'apa102'\ncount = 0\n", "leds.count", "0 is out of range (1 to 256)"),
    ("[leds]\nkind = 'apa102'\nbrightness = 2\n", "leds.brightness",
     "2 is out of range (0 to 1)"),
    ("[leds]\nkind = 'ws2812'\n", "leds.kind", "'ws2812' is not allowed (one of: gpio, apa102)"),
    ("[hardware]\npreset = 'respeaker-6mic'\n", "hardware.preset",
     "unknown preset 'respeaker-6mic' (known: respeaker-2mic, respeaker-4mic; \"\" for none)"),
    ("[leds]\nspi_device = 2\n", "leds.spi_device", "2 is out of range (0 to 1)"),
    ("[leds]\nkind = 'apa102'\npins = { status = 4 }\n", "leds.pins",
     'is for kind = "gpio"; a pixel ring (kind = "apa102") is wired to SPI: set count and '
     "spi_device instead"),
    ("[leds]\npatterns = { thinking = { kind = 'spin' } }\n", "leds.patterns.thinking.kind",
     "'spin' needs a pixel ring (leds.kind = \"apa102\")"),
    ("[leds]\nkind = 'apa102'\ncount = 3\npatterns = { thinking = { width = 4 } }\n",
     "leds.patterns.thinking.width",
     "must be a whole number of pixels from 1 to leds.count (3), or 0 for a quarter of the ring"),
    ("[hardware]\npreset = 'respeaker-2mic'\n[buttons]\nmute = 11\n", "buttons.mute",
     "pin 11 is already used by leds (SPI0 clock)"),
    ("[hardware]\npreset = 'respeaker-4mic'\n[buttons]\nmute = 5\n", "buttons.mute",
     "pin 5 is already used by leds.power_pin"),
]


class TestRingAndPresets:
    @pytest.mark.parametrize(("text", "key", "reason"), RING_BAD, ids=[b[1] for b in RING_BAD])
    def test_error_names_file_key_and_reason(self, write_config, text, key, reason):
        path = write_config(text)
        with pytest.raises(ConfigError) as e:
            config.load(path)
        assert str(e.value) == f"{path}: {key}: {reason}"

    @pytest.mark.parametrize(("text", "key", "reason"), RING_BAD[:4],
                             ids=[b[1] for b in RING_BAD[:4]])
    def test_cli_exits_78_naming_the_key(self, write_config, text, key, reason):
        path = write_config(text)
        r = run_speakerd("config", "--check", "--config", str(path))
        assert (r.returncode, r.stdout) == (EX_CONFIG, "")
        assert r.stderr == f"speakerd: {path}: {key}: {reason}\n"

    def test_2mic_preset_fills_the_ring_and_the_talk_button(self, write_config):
        c = config.load(write_config("[hardware]\npreset = 'respeaker-2mic'\n"))
        assert (c.leds.kind, c.leds.count, c.leds.spi_port, c.leds.spi_device,
                c.leds.power_pin) == ("apa102", 3, 0, 1, 0)
        assert c.buttons.talk == 17
        assert c.from_preset == ("leds.kind", "leds.count", "leds.spi_port",
                                 "leds.spi_device", "buttons.talk")

    def test_4mic_preset_powers_twelve_pixels(self, write_config):
        c = config.load(write_config("[hardware]\npreset = 'respeaker-4mic'\n"))
        assert (c.leds.kind, c.leds.count, c.leds.spi_device, c.leds.power_pin) == (
            "apa102", 12, 1, 5)
        assert c.buttons.talk == 0

    def test_explicit_keys_override_the_preset(self, write_config):
        c = config.load(write_config("[hardware]\npreset = 'respeaker-2mic'\n"
                                     "[leds]\ncount = 6\n[buttons]\ntalk = 0\nmute = 17\n"))
        assert (c.leds.kind, c.leds.count, c.buttons.talk, c.buttons.mute) == (
            "apa102", 6, 0, 17)
        assert "leds.count" not in c.from_preset and "buttons.talk" not in c.from_preset

    def test_show_marks_what_the_preset_filled_in(self, write_config):
        path = write_config("[hardware]\npreset = 'respeaker-2mic'\n[leds]\nbrightness = 0.2\n")
        r = run_speakerd("config", "--show", "--config", str(path))
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        for line in ('kind = "apa102"  # from preset respeaker-2mic',
                     "count = 3  # from preset respeaker-2mic",
                     "spi_device = 1  # from preset respeaker-2mic",
                     "talk = 17  # from preset respeaker-2mic",
                     "brightness = 0.2", "power_pin = 0", 'preset = "respeaker-2mic"'):
            assert line in lines
        shown = write_config(r.stdout, "shown.toml")
        assert dataclasses.replace(config.load(shown), path=str(path)) == config.load(path)


class TestErrors:
    @pytest.mark.parametrize(("text", "key", "reason"), BAD, ids=[b[1] for b in BAD])
    def test_error_names_file_key_and_reason(self, write_config, text, key, reason):
        path = write_config(text)
        with pytest.raises(ConfigError) as e:
            config.load(path)
        assert str(e.value) == f"{path}: {key}: {reason}"

    @pytest.mark.parametrize(("text", "key", "reason"), BAD[:3] + BAD[-3:])
    def test_cli_prints_one_line_and_exits_78(self, write_config, text, key, reason):
        path = write_config(text)
        for command in (["config", "--check"], ["run"]):
            r = run_speakerd(*command, "--config", str(path))
            assert r.returncode == EX_CONFIG
            assert r.stderr == f"speakerd: {path}: {key}: {reason}\n"
            assert r.stdout == ""

    def test_toml_syntax_error_keeps_line_and_column(self, write_config):
        path = write_config("[audio]\nplayback_volume = = 0.5\n")
        r = run_speakerd("run", "--config", str(path))
        assert r.returncode == EX_CONFIG
        assert r.stderr.startswith(f"speakerd: {path}: invalid TOML: ")
        assert "(at line 2, column 19)" in r.stderr
        assert r.stderr.count("\n") == 1

    def test_missing_file(self, tmp_path):
        r = run_speakerd("run", "--config", str(tmp_path / "nope.toml"))
        assert r.returncode == EX_CONFIG
        assert r.stderr == (f"speakerd: {tmp_path / 'nope.toml'}: no such file (create it "
                            "from the packaged config/speakerd.toml, or pass --config)\n")

    def test_unreadable_file(self, write_config):
        path = write_config("")
        path.chmod(0)
        if os.getuid() == 0:
            message, uid = _load_error_as_nobody(path), 65534
        else:
            with pytest.raises(ConfigError) as e:
                config.load(path)
            message, uid = str(e.value), os.getuid()
        # A person is told to use sudo, not that the file is wrong for the service.
        name = pwd.getpwuid(uid).pw_name
        assert message == (f"{path}: not readable by uid {uid} ({name}): run it with sudo, "
                           f"or join the speakerd group (sudo adduser {name} speakerd, then "
                           "log in again)")

    def test_unreadable_file_as_the_service_user(self, write_config, monkeypatch):
        path = write_config("")
        monkeypatch.setattr(pwd, "getpwuid", lambda uid: SimpleNamespace(pw_name="speakerd"))
        monkeypatch.setattr(loader, "open", _refuse, raising=False)
        with pytest.raises(ConfigError) as e:
            config.load(path)
        assert str(e.value) == (
            f"{path}: not readable by the speakerd user (uid {os.getuid()}); install.sh "
            "leaves it root:speakerd, mode 0640, in /etc/speakerd (0750 root:speakerd)")

    def test_directory_instead_of_file(self, tmp_path):
        r = run_speakerd("config", "--check", "--config", str(tmp_path))
        assert (r.returncode, r.stderr) == (
            EX_CONFIG, f"speakerd: {tmp_path}: is a directory, not a TOML file\n")

    def test_not_utf8(self, tmp_path):
        path = tmp_path / "bad.toml"
        path.write_bytes(b"[log]\nlevel = '\xff'\n")
        r = run_speakerd("config", "--check", "--config", str(path))
        assert r.returncode == EX_CONFIG
        assert r.stderr.startswith(f"speakerd: {path}: ")


def _refuse(*args, **kwargs):
    raise PermissionError(13, "Permission denied")


def _load_error_as_nobody(path: Path) -> str:
    """config.load(path) in a forked child running as nobody (root bypasses file modes)."""
    os.chmod(path.parent, 0o755)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop to nobody, report the error text, never return to pytest
        try:
            os.setgid(65534)
            os.setuid(65534)
            config.load(path)
            os.write(write, b"loaded")
        except ConfigError as e:
            os.write(write, str(e).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        message = f.read().decode()
    os.waitpid(pid, 0)
    return message


KEY = "sk-proj-TESTKEYabcdefghijklmnop0123456789"


class TestApiKey:
    def test_key_file_wins_over_credential_and_env(self, write_config, tmp_path):
        key_file = tmp_path / "key"
        key_file.write_text(KEY + "\n")
        key_file.chmod(0o600)
        c = config.load(write_config(f"[realtime]\napi_key_file = '{key_file}'\n"))
        cred = tmp_path / "cred"
        cred.mkdir()
        (cred / "openai-key").write_text("sk-other-credential-key")
        secret = config.resolve_api_key(
            c, {"CREDENTIALS_DIRECTORY": str(cred), "OPENAI_API_KEY": "sk-env-key-xxxx"})
        assert secret is not None and secret.reveal() == KEY and secret.source == str(key_file)

    def test_systemd_credential_before_environment(self, write_config, tmp_path):
        (tmp_path / "openai-key").write_text(KEY)
        (tmp_path / "openai-key").chmod(0o444)  # systemd's own mode for credentials
        c = config.load(write_config(""))
        secret = config.resolve_api_key(
            c, {"CREDENTIALS_DIRECTORY": str(tmp_path), "OPENAI_API_KEY": "sk-env-key-xxxx"})
        assert secret is not None and secret.reveal() == KEY

    def test_empty_credential_means_no_key_yet(self, write_config, tmp_path):
        (tmp_path / "openai-key").write_text("")
        c = config.load(write_config(""))
        assert config.resolve_api_key(c, {"CREDENTIALS_DIRECTORY": str(tmp_path)}) is None
        secret = config.resolve_api_key(
            c, {"CREDENTIALS_DIRECTORY": str(tmp_path), "OPENAI_API_KEY": KEY})
        assert secret is not None and secret.source == "$OPENAI_API_KEY"

    def test_environment_last(self, write_config):
        c = config.load(write_config(""))
        secret = config.resolve_api_key(c, {"OPENAI_API_KEY": KEY})
        assert secret is not None and secret.reveal() == KEY
        assert config.resolve_api_key(c, {}) is None

    @pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
    def test_key_file_readable_by_others_is_refused_with_the_fix(self, write_config,
                                                                tmp_path, mode):
        key_file = tmp_path / "key"
        key_file.write_text(KEY)
        key_file.chmod(mode)
        path = write_config(f"[realtime]\napi_key_file = '{key_file}'\n")
        r = run_speakerd("run", "--config", str(path))
        assert r.returncode == EX_CONFIG
        assert r.stderr == (f"speakerd: {path}: realtime.api_key_file: {key_file} is readable "
                            f"by group or others (mode {mode:04o}); run: chmod 600 {key_file}\n")
        assert KEY not in r.stderr

    @pytest.mark.parametrize(("content", "reason"), [(None, "no such file"),
                                                     ("  \n", "is empty")])
    def test_missing_or_empty_key_file(self, write_config, tmp_path, content, reason):
        key_file = tmp_path / "key"
        if content is not None:
            key_file.write_text(content)
            key_file.chmod(0o600)
        path = write_config(f"[realtime]\napi_key_file = '{key_file}'\n")
        with pytest.raises(ConfigError, match=reason):
            config.resolve_api_key(config.load(path), {})

    def test_secret_never_formats_itself(self):
        s = config.Secret(KEY, "test")
        assert KEY not in repr(s) and KEY not in str(s) and KEY not in f"{s}"
        assert KEY not in repr(ValueError(s))

    def test_show_masks_the_key(self, write_config, tmp_path):
        key_file = tmp_path / "key"
        key_file.write_text(KEY)
        key_file.chmod(0o600)
        path = write_config(f"[realtime]\napi_key_file = '{key_file}'\n")
        r = run_speakerd("config", "--show", "--config", str(path),
                         env=clean_env(OPENAI_API_KEY=KEY))
        assert r.returncode == 0
        assert KEY not in r.stdout + r.stderr
        assert f"# API key: **** (from {key_file})" in r.stdout

    def test_show_prints_valid_toml_that_loads_to_the_same_config(self, write_config,
                                                                  tmp_path):
        path = write_config("[leds]\npins = { red = 17, green = 27, blue = 22 }\n"
                            "[realtime]\ninstructions = 'Say \"hi\"\\nthen stop'\n")
        r = run_speakerd("config", "--show", "--config", str(path))
        shown = write_config(r.stdout, "shown.toml")
        again = config.load(shown)
        assert dataclasses.replace(again, path=str(path)) == config.load(path)


class TestBargeIn:
    @pytest.mark.parametrize("echo", ["software", "device"])
    def test_voice_barge_in_with_echo_cancellation_loads(self, write_config, echo):
        c = config.load(write_config(f"[audio]\necho_cancellation = '{echo}'\n"
                                     "[conversation]\nbarge_in = 'voice'\n"))
        assert (c.audio.echo_cancellation, c.conversation.barge_in) == (echo, "voice")

    def test_wake_word_barge_in_needs_no_echo_cancellation(self, write_config):
        c = config.load(write_config("[audio]\necho_cancellation = 'off'\n"))
        assert c.conversation.barge_in == "wake_word"


# Each module of speakerd/config/ and the package modules it may import: imports
# point down (schema at the bottom), so a new edge is a visible change here.
LAYERS = {"schema": [], "secrets": ["schema"], "rules": ["schema"],
          "loader": ["rules", "schema", "secrets"], "show": ["schema", "secrets"]}


class TestPackage:
    def test_layers_name_every_module(self):
        assert sorted(m.name for m in pkgutil.iter_modules(config.__path__)) == sorted(LAYERS)

    @pytest.mark.parametrize("module", sorted(LAYERS))
    def test_each_module_imports_alone_in_a_fresh_interpreter(self, module):
        r = subprocess.run([sys.executable, "-c", f"import speakerd.config.{module}"],
                           capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert (r.returncode, r.stderr) == (0, "")

    @pytest.mark.parametrize("module", sorted(LAYERS))
    def test_each_module_imports_only_the_modules_below_it(self, module):
        # __init__ imports every module, always in one order, so the import above
        # would not see a circle or a module that works only after another: here
        # the package is a bare one, and the module brings in what it needs.
        code = (
            "import sys, types\n"
            "package = types.ModuleType('speakerd.config')\n"
            f"package.__path__ = [{str(ROOT / 'speakerd' / 'config')!r}]\n"
            "sys.modules['speakerd.config'] = package\n"
            f"import speakerd.config.{module}\n"
            "print(sorted(n.rpartition('.')[2] for n in sys.modules\n"
            "             if n.startswith('speakerd.config.')))\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           cwd=ROOT, timeout=60)
        assert (r.returncode, r.stderr) == (0, "")
        assert r.stdout == f"{sorted([module, *LAYERS[module]])}\n"

    def test_no_module_uses_a_private_name_of_the_config(self):
        found = []
        for file in sorted((ROOT / "speakerd").rglob("*.py")):
            found += [f"{file.relative_to(ROOT)}:{line}: {name}"
                      for line, name in _private_config_names(file)]
        assert found == []


def _private_config_names(file: Path) -> list[tuple[int, str]]:
    """Where `file` imports or reads a _name of speakerd.config or one of its modules."""
    tree = ast.parse(file.read_text(encoding="utf-8"))
    aliases: set[str] = set()
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if _in_config(node.module) and alias.name.startswith("_"):
                    found.append((node.lineno, full))
                elif _in_config(full):
                    aliases.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.asname and _in_config(a.name)}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases and node.attr.startswith("_")):
            found.append((node.lineno, f"{node.value.id}.{node.attr}"))
    return found


def _in_config(module: str) -> bool:
    return module == "speakerd.config" or module.startswith("speakerd.config.")
