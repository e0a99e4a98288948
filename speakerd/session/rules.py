"""The conversation's rules: one table of (state, input) -> (handler, where it may go),
and the one place the state changes.

No sockets, ALSA, GPIO, asyncio or clock here: time arrives as TimerFired inputs and
leaves as StartTimer actions, so every race of a real conversation can be replayed
by feeding inputs in a chosen order. The caller carries out the returned actions in
order and feeds what comes of them back in as inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from speakerd.realtime import protocol as p
from speakerd.session.core import Next
from speakerd.session.events import (
    Action,
    AnnouncementPlaying,
    ButtonPressed,
    Disconnected,
    EndRequested,
    PlaybackDrained,
    PlaybackFlushed,
    SessionReady,
    SetLeds,
    SetStatus,
    State,
    TimerFired,
    ToolDone,
    VoiceHeard,
    WakeWordDetected,
    status_text,
)
from speakerd.session.handlers import Handlers

# The package's one journal name (see core.py).
log = logging.getLogger("speakerd.session")


class UnhandledInput(Exception):
    """Strict mode: an input the transition table does not know in this state."""


class BadTransition(Exception):
    """Strict mode: a handler chose a next state its table entry does not allow (a bug
    in the rules: the table and the handler disagree)."""


# What the table is keyed by besides the state: the input's type, or for a button or a
# timer its type and name, since "talk" and "mute" (or "drain" and "follow_up") are
# different facts that happen to share a dataclass.
Kind = type | tuple[type, str]


def button(name: str) -> Kind:
    return (ButtonPressed, name)


def timer(name: str) -> Kind:
    return (TimerFired, name)


def kind_of(inp: object) -> Kind:
    if isinstance(inp, ButtonPressed):
        return button(inp.button)
    if isinstance(inp, TimerFired):
        return timer(inp.name)
    return type(inp)


def label(kind: Kind) -> str:
    """`SpeechStarted`, `ButtonPressed(talk)`, `TimerFired(drain)`."""
    if isinstance(kind, tuple):
        return f"{kind[0].__name__}({kind[1]})"
    return kind.__name__


Handler = Callable[[Any, Any], Next]


@dataclass(frozen=True, slots=True)
class Rule:
    """What an input does in a state: the handler that carries it out, and every state
    it may leave the session in (the state itself where the input may change nothing)."""

    handler: Handler
    next: frozenset[State]


class Session(Handlers):
    """The conversation rules. `handle(input)` -> actions; carry them out in order."""

    # --- what the outside shows ------------------------------------------------------

    @property
    def leds(self) -> str:
        """The LED pattern: the state's own, except while idle, where an announcement
        speaking shows as audio_playing and otherwise mute shows. (A missing audio
        device is the shell's to show, over this: see SetLeds.)"""
        if self.state is State.IDLE:
            if self.announcing:
                return State.AUDIO_PLAYING.value  # speaking, as in an answer
            if self.muted:
                return "muted"
        return self.state.value

    @property
    def status(self) -> str:
        """The status line (a missing device, which only the shell knows, goes first)."""
        doing = "announcing" if self.announcing and self.state is State.IDLE else ""
        return status_text(self.state, self.muted, doing)

    @property
    def wake_word_needed(self) -> bool:
        """Whether the wake-word models must run now; where the session would ignore a
        detection they may rest (see WAKE_WORD_RESTS)."""
        return self.state not in WAKE_WORD_RESTS

    # --- the one entry point --------------------------------------------------------

    def handle(self, inp: object) -> list[Action]:
        self._out = []
        if isinstance(inp, TimerFired):
            if self._tokens.get(inp.name) != inp.token:
                return []  # cancelled or restarted since it was set: stale
            del self._tokens[inp.name]
        kind = kind_of(inp)
        rule = TABLE[self.state].get(kind)
        if rule is None:
            self._unhandled(kind)
            return []
        shown = (self.state, self.leds, self.status)
        self._go(kind, rule, rule.handler(self, inp))
        self._show(*shown)
        return self._out

    def _unhandled(self, kind: Kind) -> None:
        if kind in IGNORED[self.state]:
            log.debug("ignored %s in state %s", label(kind), self.state.value)
        elif self.strict:
            raise UnhandledInput(f"can't handle {label(kind)} in state {self.state.value}")
        else:
            log.warning("unexpected %s in state %s; ignored it", label(kind),
                        self.state.value)

    # --- the one place the state changes -------------------------------------------

    def _go(self, kind: Kind, rule: Rule, went: Next) -> None:
        state, cause = went if went is not None else (self.state, "")
        if state not in rule.next:
            why = (f"{label(kind)} in state {self.state.value} left the session in "
                   f"{state.value}; the table allows only "
                   f"{', '.join(s.value for s in _ordered(rule.next))}")
            if self.strict:
                raise BadTransition(why)
            # The handler's bookkeeping is done and assumes its choice: going there
            # keeps the conversation whole; the table is what needs fixing.
            log.error("a bug in the session's rules: %s; went there all the same", why)
        if state is self.state:
            return
        old, self.state = self.state, state
        number = self.conv.number if self.conv else self.count
        log.info("%s -> %s: %s", old.value, state.value, cause,
                 extra={"SPEAKERD_STATE": state.value, "SPEAKERD_SESSION": str(number)})

    def _show(self, state: State, leds: str, status: str) -> None:
        """Every state change is shown once; so is a change of mute or announcement."""
        moved = self.state is not state
        if moved or self.leds != leds:
            self._emit(SetLeds(self.leds))
        if moved or self.status != status:
            self._emit(SetStatus(self.status))


S = State
ENDED = (S.IDLE, S.ERROR)  # an end: idle, or error when it ends on one


def go(handler: Handler, *next: State) -> Rule:
    return Rule(handler, frozenset(next))


# Every rule, by state: what each input does there and where it may lead. An input
# a state does not list here nor in IGNORED is a bug in strict mode (tests) and a
# logged oddity in production. Where an input means something else in another state,
# the handler differs ("_later": an answer is due or playing, so an end waits for the
# drain), so that no handler looks at the state.
TABLE: dict[State, dict[Kind, Rule]] = {
    S.IDLE: {
        WakeWordDetected: go(Session._start, S.CONNECTING, S.IDLE),  # idle: muted
        button("talk"): go(Session._start, S.CONNECTING, S.IDLE),
        button("mute"): go(Session._mute, S.IDLE),
    },
    S.CONNECTING: {
        SessionReady: go(Session._ready, S.LISTENING),
        Disconnected: go(Session._connect_failed, *ENDED),
        timer("connect"): go(Session._connect_timeout, S.ERROR),
        p.ServerError: go(Session._server_error, S.CONNECTING, S.ERROR),
        ToolDone: go(Session._tool_done, S.CONNECTING),  # of an earlier conversation
        EndRequested: go(Session._end_asked, *ENDED),
        button("talk_long"): go(Session._end_asked, *ENDED),
        timer("session"): go(Session._end_asked, *ENDED),
        button("mute"): go(Session._mute_ending, *ENDED),  # never muted while connecting
    },
    S.LISTENING: {
        p.SpeechStarted: go(Session._speech_started, S.LISTENING),
        p.AudioCommitted: go(Session._committed, S.THINKING),
        p.ResponseCreated: go(Session._response_created_listening, S.RESPONDING),
        p.ResponseDone: go(Session._response_done, S.LISTENING),  # a barged-in one
        p.InputTranscript: go(Session._heard, S.LISTENING),
        p.TranscriptDone: go(Session._said, S.LISTENING),
        PlaybackFlushed: go(Session._flushed, S.LISTENING),
        timer("mic_guard"): go(Session._mic_guard, S.LISTENING),
        timer("follow_up"): go(Session._follow_up_over, *ENDED),
        p.ServerError: go(Session._server_error, S.LISTENING, S.ERROR),
        Disconnected: go(Session._disconnected, *ENDED),
        ToolDone: go(Session._tool_done, S.LISTENING, *ENDED),
        EndRequested: go(Session._end_asked, *ENDED),
        button("talk_long"): go(Session._end_asked, *ENDED),
        timer("session"): go(Session._end_asked, *ENDED),
        button("mute"): go(Session._mute_ending, S.LISTENING, *ENDED),
    },
    S.THINKING: {
        p.ResponseCreated: go(Session._response_created, S.RESPONDING),
        p.AudioCommitted: go(Session._note_turn, S.THINKING),
        p.ResponseDone: go(Session._response_done, S.THINKING),  # a barged-in one
        p.InputTranscript: go(Session._heard, S.THINKING),
        p.TranscriptDone: go(Session._said, S.THINKING),
        PlaybackFlushed: go(Session._flushed, S.THINKING),
        timer("response"): go(Session._no_response, S.LISTENING),
        p.ServerError: go(Session._server_error_later, S.THINKING),
        Disconnected: go(Session._disconnected_answer_due, *ENDED),
        ToolDone: go(Session._tool_done_thinking, S.THINKING),
        EndRequested: go(Session._end_asked_later, S.THINKING),
        button("talk_long"): go(Session._end_asked_later, S.THINKING),
        timer("session"): go(Session._end_asked_later, S.THINKING),
        button("mute"): go(Session._mute_after_answer, S.THINKING),
    },
    S.RESPONDING: {
        p.OutputItemAdded: go(Session._item_added, S.RESPONDING),
        p.AudioDelta: go(Session._audio, S.RESPONDING),
        p.AudioDone: go(Session._keep_alive, S.RESPONDING),
        p.ResponseDone: go(Session._response_done_responding, S.RESPONDING,
                           S.AUDIO_PLAYING, S.THINKING, S.LISTENING, *ENDED),
        p.AudioCommitted: go(Session._note_turn, S.RESPONDING),
        p.InputTranscript: go(Session._heard, S.RESPONDING),
        p.TranscriptDone: go(Session._said_responding, S.RESPONDING),
        PlaybackDrained: go(Session._drained, S.RESPONDING, S.ERROR),  # an earlier answer's
        PlaybackFlushed: go(Session._flushed, S.RESPONDING),
        WakeWordDetected: go(Session._barge_in, S.LISTENING),
        button("talk"): go(Session._barge_in, S.LISTENING),
        # Only reported with barge_in = "voice" (the daemon runs no detector otherwise).
        VoiceHeard: go(Session._barge_in, S.LISTENING),
        timer("response"): go(Session._response_stalled, S.AUDIO_PLAYING, *ENDED),
        timer("drain"): go(Session._drain_late, S.RESPONDING, S.ERROR),
        p.ServerError: go(Session._server_error_later, S.RESPONDING),
        Disconnected: go(Session._disconnected_answer_due, S.AUDIO_PLAYING, *ENDED),
        ToolDone: go(Session._tool_done_later, S.RESPONDING),
        EndRequested: go(Session._end_asked_later, S.RESPONDING),
        button("talk_long"): go(Session._end_asked_later, S.RESPONDING),
        timer("session"): go(Session._end_asked_later, S.RESPONDING),
        button("mute"): go(Session._mute_after_answer, S.RESPONDING),
    },
    S.AUDIO_PLAYING: {
        p.ResponseCreated: go(Session._response_created, S.RESPONDING),
        p.ResponseDone: go(Session._response_done, S.AUDIO_PLAYING),  # a barged-in one
        p.AudioCommitted: go(Session._note_turn, S.AUDIO_PLAYING),
        p.InputTranscript: go(Session._heard, S.AUDIO_PLAYING),
        p.TranscriptDone: go(Session._said, S.AUDIO_PLAYING),
        PlaybackDrained: go(Session._drained, S.AUDIO_PLAYING, S.THINKING, S.LISTENING,
                            *ENDED),
        PlaybackFlushed: go(Session._flushed, S.AUDIO_PLAYING),
        WakeWordDetected: go(Session._barge_in, S.LISTENING),
        button("talk"): go(Session._barge_in, S.LISTENING),
        VoiceHeard: go(Session._barge_in, S.LISTENING),
        timer("drain"): go(Session._drain_late, S.THINKING, S.LISTENING, *ENDED),
        p.ServerError: go(Session._server_error_later, S.AUDIO_PLAYING),
        # What came plays out; the end follows its drain.
        Disconnected: go(Session._disconnected, S.AUDIO_PLAYING),
        ToolDone: go(Session._tool_done_later, S.AUDIO_PLAYING),
        EndRequested: go(Session._end_asked_later, S.AUDIO_PLAYING),
        button("talk_long"): go(Session._end_asked_later, S.AUDIO_PLAYING),
        timer("session"): go(Session._end_asked_later, S.AUDIO_PLAYING),
        button("mute"): go(Session._mute_after_answer, S.AUDIO_PLAYING),
    },
    S.ERROR: {
        timer("error"): go(Session._error_over, S.IDLE),
        button("mute"): go(Session._mute, S.ERROR),
    },
}
# What the lights and the status show depends on an announcement, in every state.
for _state, _rules in TABLE.items():
    _rules[AnnouncementPlaying] = go(Session._announcement, _state)

# Inputs a state receives in normal operation and deliberately does nothing with:
# late events of a conversation that is over, cues draining, events of no interest.
_LATE = (p.SessionCreated, p.SessionUpdated, p.ServerError, p.SpeechStarted, p.SpeechStopped,
         p.AudioCommitted, p.ResponseCreated, p.OutputItemAdded, p.AudioDelta, p.AudioDone,
         p.TranscriptDone, p.InputTranscript, p.ResponseDone, SessionReady, Disconnected,
         PlaybackDrained, PlaybackFlushed, ToolDone, EndRequested)
IGNORED: dict[State, tuple[Kind, ...]] = {
    # The voice detector runs while a conversation is open; speech matters only
    # over an answer. Outside one it is a late report from the capture thread.
    S.IDLE: (*_LATE, VoiceHeard, button("talk_long")),
    S.ERROR: (*_LATE, WakeWordDetected, VoiceHeard, button("talk"), button("talk_long")),
    # Before session.updated nothing of a response can be ours: a stray of a socket
    # that is gone.
    S.CONNECTING: (WakeWordDetected, VoiceHeard, PlaybackDrained, PlaybackFlushed, p.SpeechStarted,
                   p.SpeechStopped, p.SessionCreated, p.SessionUpdated, p.AudioCommitted,
                   p.ResponseCreated, p.OutputItemAdded, p.AudioDelta, p.AudioDone,
                   p.TranscriptDone, p.InputTranscript, p.ResponseDone, button("talk")),
    # The user has the floor already: the wake word, a voice or a talk press add nothing.
    S.LISTENING: (WakeWordDetected, VoiceHeard, p.SpeechStopped, PlaybackDrained,
                  SessionReady, p.OutputItemAdded, p.AudioDelta, p.AudioDone,
                  p.SessionUpdated, button("talk")),
    S.THINKING: (WakeWordDetected, VoiceHeard, p.SpeechStarted, p.SpeechStopped,
                 PlaybackDrained, SessionReady, p.OutputItemAdded, p.AudioDelta,
                 p.AudioDone, p.SessionUpdated, button("talk")),
    S.RESPONDING: (p.SpeechStarted, p.SpeechStopped, SessionReady, p.ResponseCreated,
                   p.SessionUpdated),
    S.AUDIO_PLAYING: (p.SpeechStarted, p.SpeechStopped, SessionReady, p.OutputItemAdded,
                      p.AudioDelta, p.AudioDone, p.SessionUpdated),
}

# While connecting and while the person speaks the session ignores the wake word: the
# models may rest then, which keeps a slow Pi's capture thread up with the speech that
# matters. They run again from THINKING (ignored there too, but they need their windows
# refilled by the time the answer plays, to barge in), and in ERROR (IDLE follows).
WAKE_WORD_RESTS = frozenset({S.CONNECTING, S.LISTENING})


def _ordered(states: frozenset[State]) -> list[State]:
    return [s for s in State if s in states]


def table_text() -> str:
    """The whole table as text, one line per (state, input): the states it may lead to,
    or that it is ignored. tests/session_table.txt holds a copy, so that a change to a
    transition shows as a diff in review."""
    rows = {state: sorted([(label(kind), "-> " + " | ".join(s.value for s in
                                                           _ordered(rule.next)))
                           for kind, rule in TABLE[state].items()]
                          + [(label(kind), "ignored") for kind in IGNORED[state]])
            for state in State}
    width = max(len(name) for lines in rows.values() for name, _ in lines)
    out = ["# speakerd's conversation: in each state, each input and the states it may "
           "lead to", "# (the state itself: it may stay); generated by "
           "speakerd.session.table_text()"]
    for state, lines in rows.items():
        out.append("")
        out += [f"{state.value:<14}{name:<{width}}  {where}" for name, where in lines]
    return "\n".join(out) + "\n"
