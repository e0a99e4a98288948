"""The config's shape: a frozen dataclass per [section]; each field's default, unit, range."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DEFAULT_PATH = "/etc/speakerd/speakerd.toml"

# BCM numbering on the 40-pin header.
MAX_BCM_PIN = 27
MAX_PIXELS = 256  # an APA102 ring; one SPI transfer stays within spidev's 4096 bytes

# [hardware] preset: the keys each board fills in, unless the file sets them.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # ReSpeaker 2-Mics Pi HAT: 3 APA102 pixels on SPI, the user button on GPIO17
    # (Seeed wiki https://wiki.seeedstudio.com/ReSpeaker_2_Mics_Pi_HAT/, "Hardware
    # Overview"; its source: github.com/SeeedDocument/MIC_HATv1.0_for_raspberrypi,
    # Respeaker_2_Mics_Pi_HAT.md). The vendor's APA102 driver opens /dev/spidev0.1
    # (github.com/respeaker/pixel_ring, pixel_ring/apa102.py: bus=0, device=1).
    "respeaker-2mic": {"leds": {"kind": "apa102", "count": 3, "spi_port": 0,
                                "spi_device": 1},
                       "buttons": {"talk": 17}},
    # ReSpeaker 4-Mic Array for Raspberry Pi: 12 APA102 pixels, their power switched
    # by GPIO5 (github.com/respeaker/4mics_hat, pixels.py: PIXELS_N = 12, LED(5).on();
    # github.com/respeaker/pixel_ring, examples/respeaker_4mic_array.py), same SPI
    # driver as above. The vendor's code reads no button, so the preset sets none.
    "respeaker-4mic": {"leds": {"kind": "apa102", "count": 12, "spi_port": 0,
                                "spi_device": 1, "power_pin": 5}},
}


def _opt(default: Any, doc: str, *, lo: float | None = None, hi: float | None = None,
         choices: tuple[str, ...] = (), secret: bool = False) -> Any:
    """A config field: default, unit/meaning, and the range or choices it must lie in."""
    meta = {"doc": doc, "lo": lo, "hi": hi, "choices": choices, "secret": secret}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True, slots=True)
class AudioConfig:
    capture_device: str = _opt("default", "ALSA PCM name of the microphone")
    playback_device: str = _opt("default", "ALSA PCM name of the speaker")
    mixer_control: str = _opt("PCM", 'ALSA mixer control for volume; "" disables')
    mixer_device: str = _opt("", 'ALSA ctl device of that control; "" = the playback card')
    playback_volume: float = _opt(0.8, "software gain before ALSA, 0.0-1.0", lo=0.0, hi=1.0)
    follow_up_guard_ms: int = _opt(150, "ms the mic stays closed after the drain", lo=0, hi=5000)
    echo_cancellation: str = _opt("off", "remove the speaker's own sound from the mic "
                                  "during a conversation: software (WebRTC AEC3 here), "
                                  "device (the mic hardware does it), off",
                                  choices=("software", "device", "off"))


@dataclass(frozen=True, slots=True)
class WakeWordConfig:
    models: tuple[str, ...] = _opt(("hey_jarvis",), "built-in names or paths to .tflite files")
    threshold: float = _opt(0.5, "detection score, 0-1 (exclusive of 0)", lo=0.01, hi=1.0)
    refractory_seconds: float = _opt(2.0, "seconds after a detection with no new one",
                                     lo=0.0, hi=60.0)
    trigger_level: int = _opt(1, "consecutive 80 ms frames above threshold to trigger",
                              lo=1, hi=10)
    model_thresholds: dict[str, float] = _opt({}, "per-model threshold overrides by model "
                                              "name (file stem for a path)")


@dataclass(frozen=True, slots=True)
class RealtimeConfig:
    url: str = _opt("wss://api.openai.com/v1/realtime", "wss:// URL (ws:// only to loopback)")
    model: str = _opt("gpt-realtime", "realtime model name")
    api_key_file: str = _opt("", "file holding the API key; else the systemd credential "
                                 "openai-key, else $OPENAI_API_KEY")
    voice: str = _opt("marin", "voice of the spoken answers")
    instructions: str = _opt("You are a helpful voice assistant. Keep answers short.",
                             "system instructions for the model")
    turn_detection: str = _opt("semantic_vad", "server-side turn detection",
                               choices=("semantic_vad", "server_vad"))


@dataclass(frozen=True, slots=True)
class ConversationConfig:
    follow_up_seconds: float = _opt(8.0, "seconds of listening after an answer has played",
                                    lo=0.0, hi=120.0)
    max_session_seconds: float = _opt(600, "seconds before a conversation is ended",
                                      lo=10.0, hi=86400.0)
    barge_in: str = _opt("wake_word", "what interrupts an answer: wake_word (and the talk "
                         "button), or voice (also any speech over it; needs "
                         "audio.echo_cancellation)", choices=("wake_word", "voice"))


@dataclass(frozen=True, slots=True)
class CuesConfig:
    wake: bool = _opt(True, "play an earcon when the wake word is heard")
    end: bool = _opt(True, "play an earcon when a conversation ends")


@dataclass(frozen=True, slots=True)
class LedsConfig:
    pins: dict[str, int] = _opt({}, "BCM pin per LED: red/green/blue (RGB) or status")
    active_high: bool = _opt(True, "true when a high pin lights the LED")
    patterns: dict[str, dict[str, Any]] = _opt({}, "per-state overrides of the default "
                                               "patterns: { kind, color, on_seconds, "
                                               "off_seconds, width, flash_seconds }")
    kind: str = _opt("gpio", "gpio: LEDs on pins; apa102: a ring of APA102 pixels on SPI",
                     choices=("gpio", "apa102"))
    count: int = _opt(3, "apa102: number of pixels", lo=1, hi=MAX_PIXELS)
    spi_port: int = _opt(0, "apa102: SPI port (gpiozero drives SPI0)", lo=0, hi=0)
    spi_device: int = _opt(0, "apa102: SPI chip select, 0 (CE0, GPIO8) or 1 (CE1, GPIO7)",
                           lo=0, hi=1)
    brightness: float = _opt(0.5, "apa102: global brightness, 0-1 (5 bits on the wire)",
                             lo=0.0, hi=1.0)
    power_pin: int = _opt(0, "apa102: BCM pin driven high while speakerd runs (LED "
                          "power); 0 = none", lo=0, hi=MAX_BCM_PIN)


@dataclass(frozen=True, slots=True)
class ButtonsConfig:
    mute: int = _opt(0, "BCM pin of the mute button; 0 disables", lo=0, hi=MAX_BCM_PIN)
    talk: int = _opt(0, "BCM pin of the talk button; 0 disables", lo=0, hi=MAX_BCM_PIN)
    volume_up: int = _opt(0, "BCM pin of the volume-up button; 0 disables", lo=0,
                          hi=MAX_BCM_PIN)
    volume_down: int = _opt(0, "BCM pin of the volume-down button; 0 disables", lo=0,
                            hi=MAX_BCM_PIN)
    bounce_time: float = _opt(0.05, "seconds a press must settle (debounce)", lo=0.0, hi=1.0)
    pull_up: bool = _opt(True, "true for buttons wired to ground")
    remember_mute: bool = _opt(False, "keep the mute state across restarts")


@dataclass(frozen=True, slots=True)
class HardwareConfig:
    preset: str = _opt("", "a board whose LEDs and button to set up: " + ", ".join(
        PRESETS) + '; "" for none; explicit [leds]/[buttons] keys win')


BUILTIN_TOOLS = ("get_time", "get_volume", "set_volume", "end_conversation", "set_timer",
                 "cancel_timer", "list_timers")


@dataclass(frozen=True, slots=True)
class ToolsConfig:
    enabled: tuple[str, ...] = _opt(BUILTIN_TOOLS, "tools the model may call: built-in "
                                    "names and installed plug-ins (speakerd.tools entry points)")
    timeout_seconds: float = _opt(10.0, "seconds a tool may run before it is abandoned",
                                  lo=0.1, hi=120.0)


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = _opt("info", "journal verbosity",
                      choices=("debug", "info", "warning", "error"))
    transcripts: bool = _opt(False, "log what was heard and said (private: off by default)")
    transcription_model: str = _opt("gpt-transcribe", "the realtime service's model "
                                    "that transcribes the user's turns (transcripts only)")


@dataclass(frozen=True, slots=True)
class PhrasesConfig:
    """What the speaker says when something is wrong; "" says nothing for that case."""

    enabled: bool = _opt(True, "say status phrases; false: the error earcon only")
    espeak_voice: str = _opt("en-us", "espeak-ng voice for the phrases (espeak-ng --voices)")
    unreachable: str = _opt("Sorry, I can't reach the internet right now.",
                            "no network, no answer, or too slow")
    key_refused: str = _opt("Sorry, the assistant service refused my key.",
                            "the API key was refused")
    quota: str = _opt("Sorry, the assistant service is out of credit or too busy right now.",
                      "out of quota or rate-limited")
    failed: str = _opt("Sorry, something went wrong with the assistant service.",
                       "the service failed, mid-answer or otherwise")
    muted: str = _opt("The microphone is off.", "the talk button pressed while muted")


MCP_TRANSPORTS = ("auto", "streamable_http", "sse")


@dataclass(frozen=True, slots=True)
class McpServerConfig:
    """One [[mcp]] table: an MCP server whose tools the model may call."""

    name: str = _opt("", "short name; prefixes its tool names on a clash (required)")
    url: str = _opt("", "http(s):// endpoint (streamable HTTP, or SSE); or set command")
    command: tuple[str, ...] = _opt((), "a local stdio server: program and arguments")
    token_file: str = _opt("", "file holding a Bearer token (mode 0600); url only")
    transport: str = _opt("auto", "auto: SSE when the URL path ends in /sse, else "
                          "streamable HTTP", choices=MCP_TRANSPORTS)
    tools: tuple[str, ...] = _opt(("*",), "tool names to offer (shell patterns; * = all)")
    timeout_seconds: float = _opt(10.0, "seconds a call (or the connect) may take",
                                  lo=0.1, hi=120.0)


@dataclass(frozen=True, slots=True)
class Config:
    """The whole file: one section per [table], the [[mcp]] servers, where it was read."""

    audio: AudioConfig = field(default_factory=AudioConfig)
    wake_word: WakeWordConfig = field(default_factory=WakeWordConfig)
    realtime: RealtimeConfig = field(default_factory=RealtimeConfig)
    conversation: ConversationConfig = field(default_factory=ConversationConfig)
    cues: CuesConfig = field(default_factory=CuesConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    leds: LedsConfig = field(default_factory=LedsConfig)
    buttons: ButtonsConfig = field(default_factory=ButtonsConfig)
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    phrases: PhrasesConfig = field(default_factory=PhrasesConfig)
    mcp: tuple[McpServerConfig, ...] = ()
    path: str = DEFAULT_PATH
    # Dotted keys whose values came from [hardware] preset, not from the file.
    from_preset: tuple[str, ...] = field(default=(), compare=False)


# Field types are strings under `from __future__ import annotations`: name them here.
SECTION_TYPES = {"audio": AudioConfig, "wake_word": WakeWordConfig,
                 "realtime": RealtimeConfig, "conversation": ConversationConfig,
                 "cues": CuesConfig, "hardware": HardwareConfig, "leds": LedsConfig,
                 "buttons": ButtonsConfig, "tools": ToolsConfig, "log": LogConfig,
                 "phrases": PhrasesConfig}

