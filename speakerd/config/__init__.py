"""Loads /etc/speakerd/speakerd.toml into frozen dataclasses, naming file and key on every error."""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import shutil
import tomllib
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from speakerd.config.rules import (
    BUILTIN_WAKE_WORDS,
    LED_NAMES,
    LED_STATES,
    PATTERN_KEYS,
    PATTERN_KINDS,
    PLUGIN_GROUP,
    SPI0_PINS,
    SPI0_SELECT,
    check_cross,
    check_realtime_url,
    check_value,
    plugin_names,
    type_name,
)
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
                              f"not {type_name(value)}")
        sections[name] = _section(cls, value, path, name)
    config = Config(**sections, mcp=_mcp_servers(raw.get("mcp", []), path), path=path,
                    from_preset=from_preset)
    check_cross(config, path)
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
    values = {name: check_value(f, raw[name], path, f"{section}.{name}")
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
