"""Loads /etc/speakerd/speakerd.toml into frozen dataclasses, naming file and key on every error."""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
import shutil
import tomllib
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from speakerd.config.schema import (
    BUILTIN_TOOLS,
    DEFAULT_PATH,
    MAX_BCM_PIN,
    MAX_PIXELS,
    MCP_TRANSPORTS,
    PRESETS,
    SECTION_TYPES,
    AudioConfig,
    ButtonsConfig,
    Config,
    ConversationConfig,
    CuesConfig,
    HardwareConfig,
    LedsConfig,
    LogConfig,
    McpServerConfig,
    PhrasesConfig,
    RealtimeConfig,
    ToolsConfig,
    WakeWordConfig,
)
from speakerd.config.secrets import CREDENTIAL_NAME, Secret, read_secret_file, resolve_api_key
from speakerd.errors import ConfigError

# What the rest of speakerd uses: `from speakerd import config as configmod`.
__all__ = [
    "BUILTIN_TOOLS", "BUILTIN_WAKE_WORDS", "CREDENTIAL_NAME", "DEFAULT_PATH", "LED_NAMES",
    "LED_STATES", "MAX_BCM_PIN", "MAX_PIXELS", "MCP_NAME", "MCP_TRANSPORTS", "PATTERN_KEYS",
    "PATTERN_KINDS", "PLUGIN_GROUP", "PRESETS", "SPI0_PINS", "SPI0_SELECT", "AudioConfig",
    "ButtonsConfig", "Config", "ConversationConfig", "CuesConfig", "HardwareConfig",
    "LedsConfig", "LogConfig", "McpServerConfig", "PhrasesConfig", "RealtimeConfig",
    "Secret", "ToolsConfig", "WakeWordConfig", "check_realtime_url", "default_path",
    "from_dict", "load", "plugin_names", "read_secret_file", "resolve_api_key", "to_toml",
]

# Wake-word models pyopen-wakeword ships in its wheel.
BUILTIN_WAKE_WORDS = ("alexa", "hey_jarvis", "hey_mycroft", "hey_rhasspy", "okay_nabu")
LED_NAMES = ("red", "green", "blue", "status")
# SPI0 on the header (BCM): what a pixel ring on spi_device 0 or 1 occupies.
SPI0_PINS = {"clock": 11, "mosi": 10, "miso": 9}
SPI0_SELECT = (8, 7)

MCP_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")


def default_path(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    return env.get("SPEAKERD_CONFIG") or DEFAULT_PATH


def _unreadable() -> str:
    """Why the config cannot be read, with the fix for whoever is running speakerd.

    The service runs as the speakerd user; a person running `speakerd config --check`
    is usually not in the speakerd group (install.sh makes /etc/speakerd 0750
    root:speakerd), and the fix for them is sudo, not a change to the file.
    """
    uid = os.getuid()
    try:
        import pwd
        name = pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        name = ""
    if name == "speakerd":
        return (f"not readable by the speakerd user (uid {uid}); install.sh leaves it "
                "root:speakerd, mode 0640, in /etc/speakerd (0750 root:speakerd)")
    who = f"uid {uid} ({name})" if name else f"uid {uid}"
    return (f"not readable by {who}: run it with sudo, or join the speakerd group "
            f"(sudo adduser {name or '$USER'} speakerd, then log in again)")


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate the config file; raises ConfigError naming file and key."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(path, "", "no such file (create it from the packaged "
                          "config/speakerd.toml, or pass --config)") from None
    except PermissionError:
        raise ConfigError(path, "", _unreadable()) from None
    except IsADirectoryError:
        raise ConfigError(path, "", "is a directory, not a TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "", f"invalid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(path, "", f"not UTF-8 text: {e.reason} at byte {e.start}") from None
    return from_dict(raw, path)


def from_dict(raw: Mapping[str, Any], path: str = "<config>") -> Config:
    # [[mcp]] is checked in _mcp_servers; the hint lists the [sections].
    _reject_unknown({k: v for k, v in raw.items() if k != "mcp"}, SECTION_TYPES, path, "",
                    "section")
    raw, from_preset = _apply_preset(raw, path)
    sections: dict[str, Any] = {}
    for name, cls in SECTION_TYPES.items():
        value = raw.get(name, {})
        if not isinstance(value, dict):
            raise ConfigError(path, name, f"must be a table ([{name}]), "
                              f"not {_tname(value)}")
        sections[name] = _section(cls, value, path, name)
    config = Config(**sections, mcp=_mcp_servers(raw.get("mcp", []), path), path=path,
                    from_preset=from_preset)
    _check_cross(config, path)
    return config


def _mcp_servers(raw: Any, path: str) -> tuple[McpServerConfig, ...]:
    """The [[mcp]] tables, each checked on its own (keys are named mcp[i].key)."""
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise ConfigError(path, "mcp", "must be tables written [[mcp]], one per server")
    servers: list[McpServerConfig] = []
    for i, table in enumerate(raw):
        key = f"mcp[{i}]"
        server = _section(McpServerConfig, table, path, key)
        if not MCP_NAME.fullmatch(server.name):
            raise ConfigError(path, f"{key}.name", "is required: 1-32 letters, digits, _ or -")
        if server.name in {s.name for s in servers}:
            raise ConfigError(path, f"{key}.name", f"'{server.name}' names two servers")
        if bool(server.url) == bool(server.command):
            raise ConfigError(path, key, "set either url (an HTTP server) or command (a "
                              "local stdio server), not both or neither")
        if server.url:
            parts = urlsplit(server.url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(path, f"{key}.url", f"'{server.url}' must be an http:// or "
                                  "https:// URL with a host")
        if server.command:
            program = server.command[0]
            found = shutil.which(program)
            if not found:
                raise ConfigError(path, f"{key}.command", f"{program}: no such executable "
                                  "(give an absolute path, or one on $PATH)")
            if server.token_file:
                raise ConfigError(path, f"{key}.token_file", "is for url servers; a stdio "
                                  "server takes its secrets from its own config")
            if server.transport != "auto":
                raise ConfigError(path, f"{key}.transport", "is for url servers")
        if server.token_file:
            read_secret_file(server.token_file, path, f"{key}.token_file", check_mode=True)
        servers.append(server)
    return tuple(servers)


def _apply_preset(raw: Mapping[str, Any], path: str
                  ) -> tuple[Mapping[str, Any], tuple[str, ...]]:
    """The file with [hardware] preset's keys filled in where the file has none."""
    hardware = raw.get("hardware", {})
    name = hardware.get("preset", "") if isinstance(hardware, dict) else ""
    if not isinstance(name, str) or not name:
        return raw, ()  # a wrong type is reported with the section's other keys
    if name not in PRESETS:
        raise ConfigError(path, "hardware.preset", f"unknown preset '{name}' (known: "
                          + ", ".join(PRESETS) + '; "" for none)')
    out, filled = dict(raw), []
    for section, values in PRESETS[name].items():
        given = raw.get(section, {})
        if not isinstance(given, dict):
            continue  # reported as a section that is not a table
        out[section] = {**values, **given}
        filled += [f"{section}.{key}" for key in values if key not in given]
    return out, tuple(filled)


def _section(cls: type, raw: dict[str, Any], path: str, section: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(raw, fields, path, section + ".", "key")
    values = {name: _value(f, raw[name], path, f"{section}.{name}")
              for name, f in fields.items() if name in raw}
    return cls(**values)


def _reject_unknown(raw: Mapping[str, Any], known: Mapping[str, Any], path: str,
                    prefix: str, what: str) -> None:
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = (f"did you mean '{close[0]}'?" if close
                    else "allowed: " + ", ".join(known))
            raise ConfigError(path, prefix + key, f"unknown {what} ({hint})")


def _value(f: dataclasses.Field[Any], value: Any, path: str, key: str) -> Any:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    meta = f.metadata
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(path, key, f"must be true or false, not {_tname(value)}")
        return value
    if isinstance(default, (int, float)):
        want_float = isinstance(default, float)
        ok = isinstance(value, (int, float)) if want_float else isinstance(value, int)
        if isinstance(value, bool) or not ok:
            kind = "a number" if want_float else "a whole number"
            raise ConfigError(path, key, f"must be {kind}, not {_tname(value)}")
        lo, hi = meta["lo"], meta["hi"]
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ConfigError(path, key, f"{value} is out of range ({lo:g} to {hi:g})")
        return float(value) if want_float else value
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(path, key, f"must be a string, not {_tname(value)}")
        if meta["choices"] and value not in meta["choices"]:
            raise ConfigError(path, key, f"'{value}' is not allowed (one of: "
                              + ", ".join(meta["choices"]) + ")")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(path, key, "must be a list of non-empty strings")
        if len(set(value)) != len(value):
            raise ConfigError(path, key, "names an entry twice")
        return tuple(value)
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise ConfigError(path, key, f"must be a table, not {_tname(value)}")
        return dict(value)
    raise AssertionError(f"no validator for {key}")  # a field type this module forgot


def _check_cross(config: Config, path: str) -> None:
    """Rules that span a key's own type: model names, URL scheme, pin clashes."""
    if config.conversation.barge_in == "voice" and config.audio.echo_cancellation == "off":
        raise ConfigError(path, "conversation.barge_in", '"voice" needs the speaker\'s own '
                          'sound removed from the microphone, or it interrupts itself: set '
                          'audio.echo_cancellation = "software" (or "device" if the mic '
                          'hardware cancels echo)')
    ww = config.wake_word
    if not ww.models:
        raise ConfigError(path, "wake_word.models", "must name at least one model")
    for name in ww.models:
        if name in BUILTIN_WAKE_WORDS:
            continue
        if not name.endswith(".tflite"):
            raise ConfigError(path, "wake_word.models", f"'{name}' is neither a built-in "
                              "model (" + ", ".join(BUILTIN_WAKE_WORDS)
                              + ") nor a path to a .tflite file")
        if not os.access(name, os.R_OK):
            raise ConfigError(path, "wake_word.models", f"model file {name} is missing or "
                              "not readable (built-in models: "
                              + ", ".join(BUILTIN_WAKE_WORDS) + ")")

    ids = {m if m in BUILTIN_WAKE_WORDS else os.path.splitext(os.path.basename(m))[0]
           for m in ww.models}
    for name, value in ww.model_thresholds.items():
        key = f"wake_word.model_thresholds.{name}"
        if name not in ids:
            raise ConfigError(path, key, "not one of wake_word.models (" + ", ".join(
                sorted(ids)) + ")")
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not 0.01 <= value <= 1.0:
            raise ConfigError(path, key, "must be a number from 0.01 to 1")

    url_error = check_realtime_url(config.realtime.url)
    if url_error:
        raise ConfigError(path, "realtime.url", url_error)
    for key in ("model", "voice"):
        if not getattr(config.realtime, key).strip():
            raise ConfigError(path, f"realtime.{key}", "must not be empty")

    pins = config.leds.pins
    for name, pin in pins.items():
        if name not in LED_NAMES:
            raise ConfigError(path, f"leds.pins.{name}", "unknown LED (allowed: "
                              + ", ".join(LED_NAMES) + ")")
        if isinstance(pin, bool) or not isinstance(pin, int) or not 1 <= pin <= MAX_BCM_PIN:
            raise ConfigError(path, f"leds.pins.{name}",
                              f"must be a BCM pin number 1 to {MAX_BCM_PIN}")
    if "status" in pins and len(pins) > 1:
        raise ConfigError(path, "leds.pins", "use either status or red/green/blue, not both")
    ring = config.leds.kind == "apa102"
    if ring and pins:
        raise ConfigError(path, "leds.pins", 'is for kind = "gpio"; a pixel ring (kind = '
                          '"apa102") is wired to SPI: set count and spi_device instead')
    _check_patterns(config.leds.patterns, path, config.leds)
    available = (*BUILTIN_TOOLS, *plugin_names())
    for name in config.tools.enabled:
        if name not in available:
            raise ConfigError(path, "tools.enabled", f"unknown tool '{name}' (built-in: "
                              + ", ".join(BUILTIN_TOOLS) + "; installed plug-ins: "
                              + (", ".join(plugin_names()) or "none") + ")")
    used: dict[int, str] = {}
    buttons = {f"buttons.{n}": getattr(config.buttons, n)
               for n in ("mute", "talk", "volume_up", "volume_down")}
    leds = [(f"leds.pins.{n}", p) for n, p in pins.items()]
    if ring:
        leds = [*((f"leds (SPI0 {n})", p) for n, p in SPI0_PINS.items()),
                ("leds.spi_device", SPI0_SELECT[config.leds.spi_device]),
                ("leds.power_pin", config.leds.power_pin)]
    for key, pin in [*leds, *buttons.items()]:
        if pin == 0:
            continue
        if pin in used:
            raise ConfigError(path, key, f"pin {pin} is already used by {used[pin]}")
        used[pin] = key


# The states LEDs show, and what each pattern may say.
LED_STATES = ("idle", "connecting", "listening", "thinking", "responding", "audio_playing",
              "muted", "error")
PATTERN_KINDS = ("off", "solid", "blink", "pulse", "breathe", "spin")
PATTERN_KEYS = {"kind": str, "color": list, "on_seconds": float, "off_seconds": float,
                "width": int, "flash_seconds": float}


def _check_patterns(patterns: dict[str, Any], path: str, leds: LedsConfig) -> None:
    for state, spec in patterns.items():
        key = f"leds.patterns.{state}"
        if state not in LED_STATES:
            close = difflib.get_close_matches(state, LED_STATES, n=1)
            hint = f"did you mean '{close[0]}'?" if close else "allowed: " + ", ".join(
                LED_STATES)
            raise ConfigError(path, key, f"unknown state ({hint})")
        if not isinstance(spec, dict):
            raise ConfigError(path, key, "must be a table, e.g. { kind = \"solid\", "
                              "color = [0, 0, 1] }")
        for name, value in spec.items():
            if name not in PATTERN_KEYS:
                raise ConfigError(path, f"{key}.{name}", "unknown key (allowed: "
                                  + ", ".join(PATTERN_KEYS) + ")")
            if name == "kind" and value not in PATTERN_KINDS:
                raise ConfigError(path, f"{key}.kind", f"'{value}' is not allowed (one of: "
                                  + ", ".join(PATTERN_KINDS) + ")")
            if name == "kind" and value == "spin" and leds.kind != "apa102":
                raise ConfigError(path, f"{key}.kind", "'spin' needs a pixel ring "
                                  '(leds.kind = "apa102")')
            if name == "width" and (isinstance(value, bool) or not isinstance(value, int)
                                    or not 0 <= value <= leds.count):
                raise ConfigError(path, f"{key}.width", "must be a whole number of pixels "
                                  f"from 1 to leds.count ({leds.count}), or 0 for a quarter "
                                  "of the ring")
            if name == "color" and (not isinstance(value, list) or len(value) != 3 or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1
                    for v in value)):
                raise ConfigError(path, f"{key}.color", "must be [red, green, blue], each "
                                  "from 0 to 1")
            if name == "flash_seconds" and (isinstance(value, bool) or not isinstance(
                    value, (int, float)) or not 0 <= value <= 10):
                raise ConfigError(path, f"{key}.{name}", "must be a number from 0 to 10")
            elif name.endswith("_seconds") and name != "flash_seconds" and (
                    isinstance(value, bool) or not isinstance(value, (int, float))
                    or not 0.02 <= value <= 10):
                raise ConfigError(path, f"{key}.{name}", "must be a number from 0.02 to 10")


PLUGIN_GROUP = "speakerd.tools"


def plugin_names() -> tuple[str, ...]:
    """Tool plug-ins installed in this environment (their names, nothing imported)."""
    from importlib.metadata import entry_points
    return tuple(sorted({ep.name for ep in entry_points(group=PLUGIN_GROUP)}))


def check_realtime_url(url: str) -> str | None:
    """Why `url` may not be used for the realtime socket, or None when it may."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        return f"'{url}' must be a ws:// or wss:// URL with a host"
    if parts.scheme == "ws" and not _is_loopback(parts.hostname):
        return (f"plain ws:// to {parts.hostname} would send the API key unencrypted; "
                "use wss:// (ws:// is allowed only to a loopback address)")
    return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _tname(value: Any) -> str:
    return {str: "a string", bool: "a boolean", int: "an integer", float: "a number",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)


# --- showing it ----------------------------------------------------------------

def to_toml(config: Config, api_key: Secret | None = None) -> str:
    """The effective config as TOML, secrets masked, for `speakerd config --show`."""
    lines = [f"# effective config from {config.path}"]
    for name in SECTION_TYPES:
        lines.append(f"\n[{name}]")
        section = getattr(config, name)
        for f in dataclasses.fields(section):
            line = f"{f.name} = {_toml_value(getattr(section, f.name))}"
            if f"{name}.{f.name}" in config.from_preset:
                line += f"  # from preset {config.hardware.preset}"
            lines.append(line)
    for server in config.mcp:
        lines.append("\n[[mcp]]")
        lines += [f"{f.name} = {_toml_value(getattr(server, f.name))}"
                  for f in dataclasses.fields(server)]
    source = api_key.source if api_key else "none configured"
    lines.append(f"\n# API key: {'****' if api_key else '(none)'} (from {source})")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))
