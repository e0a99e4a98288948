"""Reads the TOML file into a Config: presets, [[mcp]] tables, unknown keys with a guess."""

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

from speakerd.config.rules import check_cross, check_value, type_name
from speakerd.config.schema import DEFAULT_PATH, PRESETS, SECTION_TYPES, Config, McpServerConfig
from speakerd.config.secrets import read_secret_file
from speakerd.errors import ConfigError

MCP_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")


def default_path(environ: Mapping[str, str] | None = None) -> str:
    """The file to read without --config: $SPEAKERD_CONFIG, else DEFAULT_PATH."""
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
