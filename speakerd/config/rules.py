"""The rules a loaded value must keep: its type and range, and the rules that span keys."""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
from typing import Any
from urllib.parse import urlsplit

from speakerd.config.schema import BUILTIN_TOOLS, MAX_BCM_PIN, Config, LedsConfig
from speakerd.errors import ConfigError

# Wake-word models pyopen-wakeword ships in its wheel.
BUILTIN_WAKE_WORDS = ("alexa", "hey_jarvis", "hey_mycroft", "hey_rhasspy", "okay_nabu")
LED_NAMES = ("red", "green", "blue", "status")
# SPI0 on the header (BCM): what a pixel ring on spi_device 0 or 1 occupies.
SPI0_PINS = {"clock": 11, "mosi": 10, "miso": 9}
SPI0_SELECT = (8, 7)


def check_value(f: dataclasses.Field[Any], value: Any, path: str, key: str) -> Any:
    """`value` as field `f` holds it; ConfigError at `key` for a wrong type, range or choice."""
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    meta = f.metadata
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(path, key, f"must be true or false, not {type_name(value)}")
        return value
    if isinstance(default, (int, float)):
        want_float = isinstance(default, float)
        ok = isinstance(value, (int, float)) if want_float else isinstance(value, int)
        if isinstance(value, bool) or not ok:
            kind = "a number" if want_float else "a whole number"
            raise ConfigError(path, key, f"must be {kind}, not {type_name(value)}")
        lo, hi = meta["lo"], meta["hi"]
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ConfigError(path, key, f"{value} is out of range ({lo:g} to {hi:g})")
        return float(value) if want_float else value
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(path, key, f"must be a string, not {type_name(value)}")
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
            raise ConfigError(path, key, f"must be a table, not {type_name(value)}")
        return dict(value)
    raise AssertionError(f"no validator for {key}")  # a field type this module forgot


def check_cross(config: Config, path: str) -> None:
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


def type_name(value: Any) -> str:
    """What a TOML reader calls the type of `value`, for error messages."""
    return {str: "a string", bool: "a boolean", int: "an integer", float: "a number",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)
