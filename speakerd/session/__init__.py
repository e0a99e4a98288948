"""The conversation as a sans-I/O state machine: (state, input) -> actions, nothing else.

`events` holds the vocabulary (states, inputs, actions, settings), `rules` the table
and the Session that applies it, `handlers` what each input does, `conversation` what
a conversation remembers. Everything the rest of speakerd uses is importable from here.
"""

from speakerd.session.events import (
    STATUS,
    Action,
    AnnouncementPlaying,
    ButtonPressed,
    CancelTimer,
    CloseConnection,
    Connect,
    ConversationEnded,
    ConversationStarted,
    Disconnected,
    EndRequested,
    FinishAudio,
    FlushPlayback,
    PlayAudio,
    PlaybackDrained,
    PlaybackFlushed,
    PlayCue,
    ResetWakeWord,
    RunTool,
    SayPhrase,
    Send,
    SessionReady,
    SetLeds,
    SetStatus,
    Settings,
    SetWakeWord,
    StartTimer,
    State,
    Step,
    StreamMic,
    TimerFired,
    ToolDone,
    VoiceHeard,
    WakeWordDetected,
    status_text,
)
from speakerd.session.rules import (
    IGNORED,
    TABLE,
    WAKE_WORD_RESTS,
    BadTransition,
    Kind,
    Rule,
    Session,
    UnhandledInput,
    button,
    kind_of,
    table_text,
    timer,
)

__all__ = [
    "IGNORED", "STATUS", "TABLE", "WAKE_WORD_RESTS", "Action", "AnnouncementPlaying",
    "BadTransition", "ButtonPressed", "CancelTimer", "CloseConnection", "Connect",
    "ConversationEnded", "ConversationStarted",
    "Disconnected", "EndRequested", "FinishAudio", "FlushPlayback", "Kind", "PlayAudio",
    "PlayCue", "PlaybackDrained", "PlaybackFlushed", "ResetWakeWord", "Rule", "RunTool",
    "SayPhrase", "Send", "Session", "SessionReady", "SetLeds", "SetStatus", "SetWakeWord",
    "Settings", "StartTimer", "State", "Step", "StreamMic", "TimerFired", "ToolDone",
    "UnhandledInput", "VoiceHeard", "WakeWordDetected", "button", "kind_of", "status_text",
    "table_text", "timer",
]
