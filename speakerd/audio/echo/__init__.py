"""Software echo cancellation and the voice-over-the-answer detector for barge-in.

reference: the played audio on the device's clock; canceller: AEC3 on each microphone
frame, with speex's linear filter beside it for the detector; delay: the echo's lag;
talkover: the detector; micpath: what the capture thread streams while an answer plays.
"""

from speakerd.audio.echo.canceller import (
    LEARNING,
    MEASURING,
    MOVED,
    RELEARNING,
    TOO_LITTLE,
    EchoCanceller,
    EchoStats,
)
from speakerd.audio.echo.delay import (
    DELAY_CONFIDENCE,
    DELAY_MAX,
    DELAY_WINDOW,
    SINC_TAPS,
    SPEEX_LEAD,
    EchoDelay,
    fractional_delay,
    gcc_phat,
)
from speakerd.audio.echo.micpath import MicPath, VoiceOnset
from speakerd.audio.echo.reference import RATE, RING_SAMPLES, Reference, dbfs, loudest_dbfs
from speakerd.audio.echo.talkover import TalkOver, VoiceActivity

__all__ = [
    "DELAY_CONFIDENCE",
    "DELAY_MAX",
    "DELAY_WINDOW",
    "LEARNING",
    "MEASURING",
    "MOVED",
    "RATE",
    "RELEARNING",
    "RING_SAMPLES",
    "SINC_TAPS",
    "SPEEX_LEAD",
    "TOO_LITTLE",
    "EchoCanceller",
    "EchoDelay",
    "EchoStats",
    "MicPath",
    "Reference",
    "TalkOver",
    "VoiceActivity",
    "VoiceOnset",
    "dbfs",
    "fractional_delay",
    "gcc_phat",
    "loudest_dbfs",
]
