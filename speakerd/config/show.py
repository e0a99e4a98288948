"""The effective config as TOML for `speakerd config --show`: preset marks, the key masked."""

from __future__ import annotations

import dataclasses
from typing import Any

from speakerd.config.schema import SECTION_TYPES, Config
from speakerd.config.secrets import Secret


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
