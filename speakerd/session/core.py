"""What the session's handlers share: its memory, how actions are emitted, and the
moves many handlers end with (listen again, after an answer, end now or later, fail).

Nothing here chooses by the state: a move returns where it leads, and the table in
rules.py says whether the handler that made it may go there.
"""

from __future__ import annotations

import logging
from typing import Any

from speakerd.realtime import protocol as p
from speakerd.realtime.protocol import Severity
from speakerd.session.conversation import NO_CREATE, Conversation, Response, Turn
from speakerd.session.events import (
    Action,
    ButtonPressed,
    CancelTimer,
    CloseConnection,
    ConversationEnded,
    Disconnected,
    EndRequested,
    FinishAudio,
    PlayCue,
    ResetWakeWord,
    RunTool,
    SayPhrase,
    Send,
    Settings,
    StartTimer,
    State,
    StreamMic,
    TimerFired,
    VoiceHeard,
    WakeWordDetected,
)

# One logger for the package: the journal has always said "speakerd.session", and what
# reads it (people, tests) looks for that name, whichever module logs.
log = logging.getLogger("speakerd.session")

# Where a handler sends the session, and why (the cause in "x -> y: cause"); None: stay.
Next = tuple[State, str] | None


class Core:
    """The session's memory, and what its handlers share."""

    def __init__(self, settings: Settings | None = None, *, strict: bool = False,
                 muted: bool = False, announcing: bool = False) -> None:
        self.settings = settings or Settings()
        self.strict = strict
        self.state = State.IDLE
        self.muted = muted
        self.announcing = announcing  # an announcement is making sound
        self.conv: Conversation | None = None
        self.count = 0
        self._tokens: dict[str, int] = {}
        self._next_token = 0
        self._out: list[Action] = []

    # --- emitting ---------------------------------------------------------------------

    def _emit(self, action: Action) -> None:
        self._out.append(action)

    def _timer(self, name: str, seconds: float) -> None:
        self._next_token += 1
        self._tokens[name] = self._next_token
        self._emit(StartTimer(name, seconds, self._next_token))

    def _cancel(self, *names: str) -> None:
        for name in names:
            if self._tokens.pop(name, None) is not None:
                self._emit(CancelTimer(name))

    def _send(self, event: dict[str, Any]) -> None:
        self._emit(Send(event))

    def _stream(self, a: StreamMic) -> None:
        """Open or shut the mic; the conversation remembers which (voice barge-in
        keeps it open across states, and an open mic opened again would send its
        pre-roll twice). Muted, it is never opened."""
        if a.on and self.muted:
            log.debug("the mic stays shut: muted")
            return
        if self.conv:
            self.conv.mic = a.on
        self._emit(a)

    def _conv(self) -> Conversation:
        conv = self.conv
        assert conv, "the table sends this input here only while a conversation is open"
        return conv

    # --- the conversation's course ----------------------------------------------------

    def _listen(self, cause: str, *, reopen_mic: bool = False) -> Next:
        """LISTENING with a fresh follow-up window; the mic reopens after the guard."""
        self._timer("follow_up", self.settings.follow_up_seconds)
        if reopen_mic:
            if self.settings.follow_up_guard_ms:
                self._timer("mic_guard", self.settings.follow_up_guard_ms / 1000)
            else:
                self._stream(StreamMic(True))
        return State.LISTENING, cause

    def _response_ended(self, inp: p.ResponseDone) -> Response:
        """Any response's end: no longer active; its calls run now; a failure noted."""
        conv = self._conv()
        if conv.active == inp.response_id:
            conv.active = None
        r = conv.response(inp.response_id)
        r.calls = inp.function_calls
        log.debug("turn: response %s %s, %.0f ms of audio, tools: %s", r.id, inp.status,
                  r.audio_ms, ", ".join(c.name for c in r.calls) or "none")
        if inp.status == "failed":
            severity, why = p.classify_error(inp.error_type, inp.error_code)
            if severity is Severity.UNRECOVERABLE:
                self._fail(why, p.cause_of_error(inp.error_type, inp.error_code))
            else:
                log.warning("response %s failed (%s); the conversation goes on", r.id, why)
        if r.calls:
            # A barged-in response's outputs are still sent (the conversation stays
            # valid), but the user has moved on: no response.create for its round.
            conv.turns.append(Turn(r.id, {c.call_id for c in r.calls},
                                   NO_CREATE if r.barged_in else None))
            for call in r.calls:
                self._emit(RunTool(call))
        return r

    def _finish_audio(self, r: Response) -> None:
        """Tell playback this response's audio is complete; its drain ends the turn."""
        conv = self._conv()
        if r.audio_ms > 0 and r.id not in conv.playing:
            conv.playing.add(r.id)
            self._emit(FinishAudio(r.id))
            self._deadline()

    def _finish_active(self) -> None:
        """The active response will get no response.done (dead socket): play what came,
        unless the user barged in on it (its audio is flushed already)."""
        conv = self._conv()
        if conv.active and not conv.response(conv.active).barged_in:
            self._finish_audio(conv.response(conv.active))
        conv.active = None

    def _deadline(self) -> None:
        """Drain deadline: all audio still owed, in full, plus a margin. Never a constant."""
        owed = self._conv().owed_ms() / 1000
        self._timer("drain", owed + self.settings.audio_margin_seconds)

    def _after_response(self, cause: str) -> Next:
        """Where a finished response leaves us: playing, waiting, or listening again."""
        conv = self._conv()
        if conv.active:
            return None  # another response is already streaming
        if conv.playing:
            return State.AUDIO_PLAYING, cause
        if conv.end or conv.error:
            return self._end_now(conv.end or "error")
        if conv.tools_pending():
            if conv.mic:
                self._stream(StreamMic(False))  # shut while the model thinks
            self._timer("response", self.settings.response_timeout)
            return State.THINKING, cause + ", waiting for tool results"
        # With voice barge-in the mic stayed open through the answer (its echo
        # cancelled): no guard, nothing to reopen. Coming from THINKING it is shut.
        return self._listen(cause, reopen_mic=not (self.settings.voice_barge_in and conv.mic))

    def _maybe_create_response(self) -> bool:
        """Exactly one response.create per tool round: all outputs sent, none active.

        True when one was sent: a response is due now."""
        turn = self._conv().round_due()
        if turn is None:
            return False
        event = p.response_create()
        turn.create_sent = event["event_id"]
        self._send(event)
        return True

    def _transcript(self, what: str, text: str, turn: int) -> None:
        """One journal line per user turn (heard) and per answer (said), if asked for."""
        if not self.settings.transcripts:
            return
        log.info("%s: %s", what, text, extra={
            "SPEAKERD_EVENT": what, "SPEAKERD_TEXT": text,
            "SPEAKERD_SESSION": str(self._conv().number), "SPEAKERD_TURN": str(turn)})

    # --- endings ----------------------------------------------------------------------

    def _end_later(self, reason: str) -> None:
        conv = self._conv()
        if conv.end is None:
            log.info("conversation will end after the answer has played (%s)", reason)
        conv.end = conv.end or reason

    def _end_now(self, reason: str) -> Next:
        conv = self.conv
        error = conv.error if conv else None
        self._cancel(*list(self._tokens))
        self._stream(StreamMic(False))
        self._emit(CloseConnection())
        self._emit(ResetWakeWord())
        self.conv = None
        if conv:
            self._emit(ConversationEnded(conv.number, error or reason))
        say = conv.say if conv else None
        if error:
            self._emit(SayPhrase(say or p.FAILED))
            self._timer("error", self.settings.error_seconds)
            return State.ERROR, error
        if self.settings.end_cue:
            self._emit(PlayCue("end"))
        if say:
            self._emit(SayPhrase(say, None))
        return State.IDLE, f"conversation over: {reason}"

    def _fail(self, why: str, cause: str) -> None:
        """Unrecoverable: say what to fix; end once nothing is playing."""
        conv = self._conv()
        log.error("realtime session failed: %s", why)
        conv.error = conv.error or why
        conv.say = conv.say or cause
        conv.connected = False
        self._finish_active()
        self._emit(CloseConnection())

    def _connection_gone(self, inp: Disconnected) -> None:
        conv = self._conv()
        conv.connected = False
        self._finish_active()
        self._cancel("connect", "response")
        if inp.unrecoverable:
            conv.error = conv.error or inp.reason
        elif not conv.end and not conv.error:
            log.warning("lost the realtime connection: %s", inp.reason)
            conv.end = f"connection lost ({inp.reason})"
        conv.abandon_rounds()

    def _after_disconnect(self) -> Next:
        conv = self._conv()
        if conv.playing:
            return State.AUDIO_PLAYING, "connection closed, finishing the answer"
        return self._end_now(conv.end or "disconnected")


def what(inp: object) -> str:
    """What started a conversation or barged in, as the journal says it."""
    if isinstance(inp, WakeWordDetected):
        return f"wake word {inp.model}"
    if isinstance(inp, ButtonPressed):
        return f"{inp.button} button"
    if isinstance(inp, VoiceHeard):
        return "voice"
    return type(inp).__name__


def end_reason(inp: EndRequested | ButtonPressed | TimerFired) -> str:
    if isinstance(inp, EndRequested):
        return inp.reason
    return "talk button held" if isinstance(inp, ButtonPressed) else "maximum session length"
