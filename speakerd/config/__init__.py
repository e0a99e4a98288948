"""Loads /etc/speakerd/speakerd.toml into frozen dataclasses, naming file and key on every error.

The package's modules, each one job: schema (the sections), loader (reading the file),
rules (what a value must be), secrets (the API key), show (`speakerd config --show`).
The rest of speakerd imports from here: `from speakerd import config as configmod`.
"""

from __future__ import annotations

from speakerd.config.loader import MCP_NAME, default_path, from_dict, load
from speakerd.config.rules import (
    BUILTIN_WAKE_WORDS,
    LED_NAMES,
    LED_STATES,
    PATTERN_KEYS,
    PATTERN_KINDS,
    PLUGIN_GROUP,
    SPI0_PINS,
    SPI0_SELECT,
    check_realtime_url,
    plugin_names,
)
from speakerd.config.schema import (
    BUILTIN_TOOLS,
    DEFAULT_PATH,
    MAX_BCM_PIN,
    MAX_PIXELS,
    MCP_TRANSPORTS,
    PRESETS,
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
from speakerd.config.show import to_toml

__all__ = [
    "BUILTIN_TOOLS", "BUILTIN_WAKE_WORDS", "CREDENTIAL_NAME", "DEFAULT_PATH", "LED_NAMES",
    "LED_STATES", "MAX_BCM_PIN", "MAX_PIXELS", "MCP_NAME", "MCP_TRANSPORTS", "PATTERN_KEYS",
    "PATTERN_KINDS", "PLUGIN_GROUP", "PRESETS", "SPI0_PINS", "SPI0_SELECT", "AudioConfig",
    "ButtonsConfig", "Config", "ConversationConfig", "CuesConfig", "HardwareConfig",
    "LedsConfig", "LogConfig", "McpServerConfig", "PhrasesConfig", "RealtimeConfig",
    "Secret", "ToolsConfig", "WakeWordConfig", "check_realtime_url", "default_path",
    "from_dict", "load", "plugin_names", "read_secret_file", "resolve_api_key", "to_toml",
]
