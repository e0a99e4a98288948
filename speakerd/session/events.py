"""The session's vocabulary: its states, the inputs (facts) it takes, the actions
(commands) it returns, its settings, and the status line of each state.

Inputs and actions are plain frozen values: the caller builds inputs from what
happened and carries actions out; neither side needs the other's code.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from speakerd.realtime import protocol as p


class State(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    LISTENING = "listening"
    THINKING = "thinking"
    RESPONDING = "responding"
    AUDIO_PLAYING = "audio_playing"
    ERROR = "error"


# --- inputs: facts -------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class WakeWordDetected:
    model: str
    frame: int = -1  # capture frame index of the detection; pre-roll starts after it


@dataclass(frozen=True, slots=True)
class VoiceHeard:
    """The voice detector heard someone talk over the echo-cancelled microphone."""


@dataclass(frozen=True, slots=True)
class ButtonPressed:
    button: str  # "talk", "talk_long" (held >= 2 s), "mute"


@dataclass(frozen=True, slots=True)
class SessionReady:
    """The socket is up and session.updated has arrived."""


@dataclass(frozen=True, slots=True)
class Disconnected:
    reason: str
    unrecoverable: bool = False
    cause: str = ""  # a protocol situation (UNREACHABLE, KEY_REFUSED, ...), if known


@dataclass(frozen=True, slots=True)
class PlaybackDrained:
    response_id: str


@dataclass(frozen=True, slots=True)
class PlaybackFlushed:
    played_ms: dict[str, int]  # response id -> ms actually heard


@dataclass(frozen=True, slots=True)
class ToolDone:
    call_id: str
    output: str  # JSON text for the model
    end_conversation: bool = False


@dataclass(frozen=True, slots=True)
class TimerFired:
    name: str
    token: int


@dataclass(frozen=True, slots=True)
class EndRequested:
    reason: str  # "shutdown", ...


@dataclass(frozen=True, slots=True)
class AnnouncementPlaying:
    """An announcement started (on) or stopped (off) making sound. Announcements are
    not the conversation's, but what the LEDs and the status show is: while idle,
    they show it speaking."""

    on: bool


# --- actions: commands ---------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Connect:
    pass


@dataclass(frozen=True, slots=True)
class CloseConnection:
    pass


@dataclass(frozen=True, slots=True)
class Send:
    event: dict[str, Any]


@dataclass(frozen=True, slots=True)
class PlayAudio:
    pcm: bytes
    response_id: str


@dataclass(frozen=True, slots=True)
class FinishAudio:
    """No more audio for this response: report PlaybackDrained once it has played out."""

    response_id: str


@dataclass(frozen=True, slots=True)
class FlushPlayback:
    pass


@dataclass(frozen=True, slots=True)
class PlayCue:
    name: str


@dataclass(frozen=True, slots=True)
class SayPhrase:
    """Tell the person what is wrong: the status phrase for `situation` (a protocol
    situation), else the `fallback_cue` earcon, else nothing."""

    situation: str
    fallback_cue: str | None = "error"


@dataclass(frozen=True, slots=True)
class StreamMic:
    on: bool
    after_frame: int = -1


@dataclass(frozen=True, slots=True)
class SetWakeWord:
    enabled: bool


@dataclass(frozen=True, slots=True)
class ResetWakeWord:
    pass


@dataclass(frozen=True, slots=True)
class RunTool:
    call: p.FunctionCall


@dataclass(frozen=True, slots=True)
class StartTimer:
    name: str
    seconds: float
    token: int


@dataclass(frozen=True, slots=True)
class CancelTimer:
    name: str


@dataclass(frozen=True, slots=True)
class SetLeds:
    """Show this LED pattern: a State value, "muted" (idle and muted), or
    "audio_playing" while idle for an announcement. Precedence over all of these is
    the shell's: a missing audio device shows "error", which the session cannot know."""

    pattern: str


@dataclass(frozen=True, slots=True)
class SetStatus:
    text: str


@dataclass(frozen=True, slots=True)
class ConversationStarted:
    """For the record (the control socket's status): conversation `number` began."""

    number: int
    trigger: str  # "wake word hey_jarvis", "talk button"


@dataclass(frozen=True, slots=True)
class ConversationEnded:
    """For the record: conversation `number` is over, and why."""

    number: int
    reason: str  # "no follow-up", "end_conversation tool", what went wrong, ...


@dataclass(frozen=True, slots=True)
class Step:
    """What observers of the session are told after each input: it went from `before`
    to `after` (maybe the same), and whether the wake word is wanted now."""

    before: State
    after: State
    wake_word_needed: bool = True

    @property
    def resting(self) -> bool:
        return self.after in (State.IDLE, State.ERROR)

    @property
    def answering(self) -> bool:
        return self.after in (State.RESPONDING, State.AUDIO_PLAYING)


Action = (Connect | CloseConnection | Send | PlayAudio | FinishAudio | FlushPlayback | PlayCue
          | SayPhrase | StreamMic | SetWakeWord | ResetWakeWord | RunTool | StartTimer | CancelTimer
          | SetLeds | SetStatus | ConversationStarted | ConversationEnded)


@dataclass(frozen=True, slots=True)
class Settings:
    follow_up_seconds: float = 8.0
    follow_up_guard_ms: int = 150
    max_session_seconds: float = 600.0
    wake_cue: bool = True
    end_cue: bool = True
    audio_margin_seconds: float = 2.0  # on top of the queued audio, before a drain is late
    # A slow network gets this long to bring the session up before the person is told;
    # a definite failure (no route, refused, bad key) is told as soon as it is reported.
    connect_timeout: float = 8.0
    response_timeout: float = 20.0  # silence from the server while a turn is due
    error_seconds: float = 3.0  # the error LED shows this long before IDLE
    transcripts: bool = False  # log what was heard and said (private: off by default)
    # "voice": the echo-cancelled mic stays open while the answer plays, and speech
    # over it (VoiceHeard) barges in like the wake word. "wake_word": the mic is
    # closed from the end of the user's turn until the answer has played out.
    barge_in: str = "wake_word"

    @property
    def voice_barge_in(self) -> bool:
        return self.barge_in == "voice"


STATUS = {
    State.IDLE: "idle: listening for the wake word",
    State.CONNECTING: "connecting to the realtime service",
    State.LISTENING: "listening",
    State.THINKING: "thinking",
    State.RESPONDING: "answering",
    State.AUDIO_PLAYING: "answering (playing out)",
    State.ERROR: "error",
}


def status_text(state: State, muted: bool, doing: str = "") -> str:
    """The unit's STATUS= line for a state, or for `doing` when something else (a
    missing device, an announcement) says more about the speaker than the state."""
    return (doing or STATUS[state]) + (" (muted)" if muted else "")
