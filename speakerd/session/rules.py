"""The conversation as a sans-I/O state machine: (state, input) -> actions, nothing else.

No sockets, ALSA, GPIO, asyncio or clock here: time arrives as TimerFired inputs and
leaves as StartTimer actions, so every race of a real conversation can be replayed
by feeding inputs in a chosen order. The caller carries out the returned actions in
order and feeds what comes of them back in as inputs.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from speakerd.realtime import protocol as p
from speakerd.realtime.protocol import Severity

log = logging.getLogger("speakerd.session")  # the journal name it has always had


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
    state: str  # a State value, or "muted"


@dataclass(frozen=True, slots=True)
class SetStatus:
    text: str


Action = (Connect | CloseConnection | Send | PlayAudio | FinishAudio | FlushPlayback | PlayCue
          | SayPhrase | StreamMic | SetWakeWord | ResetWakeWord | RunTool | StartTimer | CancelTimer
          | SetLeds | SetStatus)


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


class UnhandledInput(Exception):
    """Strict mode: an input the transition table does not know in this state."""


@dataclass
class _Response:
    """What the session knows of one model response."""

    id: str
    audio_ms: float = 0.0
    item_id: str | None = None  # the assistant message whose audio is played
    calls: tuple[p.FunctionCall, ...] = ()
    barged_in: bool = False  # the user spoke over it: its tool round gets no response.create


# A tool round's create_sent when it gets no response.create at all.
NO_CREATE = "none: the user moved on, or no server to answer"


@dataclass
class _Turn:
    """Tool round: outputs owed for a response's calls, and its single response.create."""

    response_id: str
    waiting: set[str]
    create_sent: str | None = None  # event_id of the response.create once sent, or NO_CREATE


@dataclass
class _Conversation:
    """Everything that lives exactly as long as one conversation."""

    number: int
    end: str | None = None  # an end asked for, carried out after the drain
    error: str | None = None  # an unrecoverable error to show after the drain
    say: str | None = None  # the situation to tell the person about when it ends
    active: str | None = None  # the response between response.created and response.done
    responses: dict[str, _Response] = field(default_factory=dict)
    playing: set[str] = field(default_factory=set)  # finished, drain not yet reported
    turns: list[_Turn] = field(default_factory=list)
    connected: bool = False
    # The user's turns by number, for transcripts that arrive after the answer began.
    user_turns: int = 0
    turn_of_item: dict[str, int] = field(default_factory=dict)
    turn_of_response: dict[str, int] = field(default_factory=dict)
    mic: bool = False  # streaming to the server, as last told


class Session:
    """The conversation rules. `handle(input)` -> actions; carry them out in order."""

    def __init__(self, settings: Settings | None = None, *, strict: bool = False,
                 muted: bool = False) -> None:
        self.settings = settings or Settings()
        self.strict = strict
        self.state = State.IDLE
        self.muted = muted
        self.conv: _Conversation | None = None
        self.count = 0
        self._tokens: dict[str, int] = {}
        self._next_token = 0
        self._out: list[Action] = []

    # --- the one entry point --------------------------------------------------------

    def handle(self, inp: object) -> list[Action]:
        self._out = []
        key = (self.state, type(inp))
        if isinstance(inp, TimerFired) and self._tokens.get(inp.name) != inp.token:
            return []  # cancelled or restarted since it was set: stale
        if isinstance(inp, TimerFired):
            del self._tokens[inp.name]
        handler = TABLE.get(key)
        if handler is None:
            handler = ANY_STATE.get(type(inp))
        if handler is None:
            if key[1] in IGNORED.get(self.state, ()):
                log.debug("ignored %s in state %s", type(inp).__name__, self.state.value)
                return []
            if self.strict:
                raise UnhandledInput(f"can't handle {type(inp).__name__} in state "
                                     f"{self.state.value}")
            log.warning("unexpected %s in state %s; ignored it", type(inp).__name__,
                        self.state.value)
            return []
        handler(self, inp)
        return self._out

    # --- the one place the state changes -------------------------------------------

    def _enter(self, state: State, cause: str) -> None:
        if state is self.state:
            return
        old, self.state = self.state, state
        number = self.conv.number if self.conv else self.count
        log.info("%s -> %s: %s", old.value, state.value, cause,
                 extra={"SPEAKERD_STATE": state.value, "SPEAKERD_SESSION": str(number)})
        self._emit(SetLeds("muted" if state is State.IDLE and self.muted else state.value))
        self._emit(SetStatus(status_text(state, self.muted)))

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

    # --- starting ----------------------------------------------------------------

    def _start(self, inp: WakeWordDetected | ButtonPressed) -> None:
        if self.muted:
            log.info("%s ignored: the microphone is muted", _what(inp))
            if isinstance(inp, ButtonPressed):
                self._emit(SayPhrase(p.MUTED, None))  # a press deserves an answer
            return
        self.count += 1
        self.conv = _Conversation(self.count)
        if self.settings.wake_cue:
            self._emit(PlayCue("wake"))
        self._emit(Connect())
        after = inp.frame if isinstance(inp, WakeWordDetected) else -1
        self._stream(StreamMic(True, after))
        self._timer("connect", self.settings.connect_timeout)
        self._timer("session", self.settings.max_session_seconds)
        self._enter(State.CONNECTING, _what(inp))

    def _ready(self, inp: SessionReady) -> None:
        assert self.conv
        self.conv.connected = True
        self._cancel("connect")
        self._listen("connected")

    def _listen(self, cause: str, *, reopen_mic: bool = False) -> None:
        """LISTENING with a fresh follow-up window; the mic reopens after the guard."""
        self._timer("follow_up", self.settings.follow_up_seconds)
        if reopen_mic:
            if self.settings.follow_up_guard_ms:
                self._timer("mic_guard", self.settings.follow_up_guard_ms / 1000)
            else:
                self._stream(StreamMic(True))
        self._enter(State.LISTENING, cause)

    # --- the user's turn -----------------------------------------------------------

    def _speech_started(self, inp: p.SpeechStarted) -> None:
        self._cancel("follow_up")  # they are talking: the window is not running out

    def _note_turn(self, inp: p.AudioCommitted) -> None:
        """A user turn, committed: numbered, so that its transcript finds its place."""
        conv = self.conv
        assert conv
        if inp.item_id not in conv.turn_of_item:
            conv.user_turns += 1
            conv.turn_of_item[inp.item_id] = conv.user_turns

    def _committed(self, inp: p.AudioCommitted) -> None:
        self._note_turn(inp)
        # The assistant's own voice must not become the next turn: the mic stays
        # closed until its answer has played out (with voice barge-in, until it
        # starts: from then on the echo-cancelled mic listens for the user).
        self._cancel("follow_up", "mic_guard")
        self._stream(StreamMic(False))
        self._timer("response", self.settings.response_timeout)
        self._enter(State.THINKING, "speech committed")

    def _mic_guard(self, inp: TimerFired) -> None:
        self._stream(StreamMic(True))

    def _follow_up_over(self, inp: TimerFired) -> None:
        self._end_now("no follow-up")

    # --- the model's turn -----------------------------------------------------------

    def _response_created(self, inp: p.ResponseCreated) -> None:
        conv = self.conv
        assert conv
        conv.active = inp.response_id
        conv.responses.setdefault(inp.response_id, _Response(inp.response_id))
        conv.turn_of_response.setdefault(inp.response_id, conv.user_turns)
        self._cancel("response", "follow_up", "mic_guard")
        if self.settings.voice_barge_in:
            # The mic is open while the answer plays (LISTENING and the two playing
            # states have it already, unless a guard or a mute held it shut).
            if not conv.mic:
                self._stream(StreamMic(True))
        elif self.state is State.LISTENING:
            self._stream(StreamMic(False))
        self._timer("response", self.settings.response_timeout)
        self._enter(State.RESPONDING, f"response {inp.response_id} started")

    def _item_added(self, inp: p.OutputItemAdded) -> None:
        r = self._response(inp.response_id)
        if inp.item_type == "message" and r.item_id is None:
            r.item_id = inp.item_id
        self._timer("response", self.settings.response_timeout)

    def _audio(self, inp: p.AudioDelta) -> None:
        conv = self.conv
        assert conv
        if inp.response_id != conv.active:
            log.debug("dropped audio of response %s, which is not the active one",
                      inp.response_id)
            return
        r = self._response(inp.response_id)
        r.item_id = r.item_id or inp.item_id
        r.audio_ms += len(inp.pcm) / p.BYTES_PER_MS
        self._emit(PlayAudio(inp.pcm, inp.response_id))
        self._timer("response", self.settings.response_timeout)

    def _heard(self, inp: p.InputTranscript) -> None:
        conv = self.conv
        assert conv
        turn = conv.turn_of_item.get(inp.item_id, conv.user_turns)
        self._transcript("heard", inp.transcript, turn)

    def _said(self, inp: p.TranscriptDone) -> None:
        conv = self.conv
        assert conv
        if self.state is State.RESPONDING and inp.response_id == conv.active:
            self._keep_alive(inp)
        turn = conv.turn_of_response.get(inp.response_id, conv.user_turns)
        self._transcript("said", inp.transcript, turn)

    def _transcript(self, what: str, text: str, turn: int) -> None:
        """One journal line per user turn (heard) and per answer (said), if asked for."""
        conv = self.conv
        assert conv
        if not self.settings.transcripts:
            return
        log.info("%s: %s", what, text, extra={
            "SPEAKERD_EVENT": what, "SPEAKERD_TEXT": text,
            "SPEAKERD_SESSION": str(conv.number), "SPEAKERD_TURN": str(turn)})

    def _keep_alive(self, inp: object) -> None:
        """A sign of life from the server during a response."""
        self._timer("response", self.settings.response_timeout)

    def _response_done(self, inp: p.ResponseDone) -> None:
        conv = self.conv
        assert conv
        streaming = self.state is State.RESPONDING and conv.active == inp.response_id
        if conv.active == inp.response_id:
            conv.active = None
        if streaming:
            self._cancel("response")
        r = self._response(inp.response_id)
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
            conv.turns.append(_Turn(r.id, {c.call_id for c in r.calls},
                                    NO_CREATE if r.barged_in else None))
            for call in r.calls:
                self._emit(RunTool(call))
        if not streaming:
            # A response we stopped listening to (barge-in): its audio was flushed,
            # but its tools still run and the server no longer counts it as active.
            self._maybe_create_response()
            return
        self._finish_audio(r)
        self._maybe_create_response()
        self._after_response(f"response {r.id} {inp.status}")

    def _finish_audio(self, r: _Response) -> None:
        """Tell playback this response's audio is complete; its drain ends the turn."""
        conv = self.conv
        assert conv
        if r.audio_ms > 0 and r.id not in conv.playing:
            conv.playing.add(r.id)
            self._emit(FinishAudio(r.id))
            self._deadline()

    def _finish_active(self) -> None:
        """The active response will get no response.done (dead socket): play what came."""
        conv = self.conv
        assert conv
        if conv.active and self.state is State.RESPONDING:
            self._finish_audio(self._response(conv.active))
        conv.active = None

    def _after_response(self, cause: str) -> None:
        """Where a finished response leaves us: playing, waiting, or listening again."""
        conv = self.conv
        assert conv
        if conv.active:
            return  # another response is already streaming
        if conv.playing:
            self._enter(State.AUDIO_PLAYING, cause)
        elif conv.end or conv.error:
            self._end_now(conv.end or "error")
        elif self._tools_pending():
            if conv.mic:
                self._stream(StreamMic(False))  # shut while the model thinks
            self._timer("response", self.settings.response_timeout)
            self._enter(State.THINKING, cause + ", waiting for tool results")
        else:
            # With voice barge-in the mic stayed open through the answer (its echo
            # cancelled): no guard, nothing to reopen. Coming from THINKING it is shut.
            self._listen(cause, reopen_mic=not (self.settings.voice_barge_in and conv.mic))

    def _deadline(self) -> None:
        """Drain deadline: all audio still owed, in full, plus a margin. Never a constant."""
        conv = self.conv
        assert conv
        owed = sum(conv.responses[rid].audio_ms for rid in conv.playing) / 1000
        self._timer("drain", owed + self.settings.audio_margin_seconds)

    def _drained(self, inp: PlaybackDrained) -> None:
        conv = self.conv
        assert conv
        if inp.response_id not in conv.playing:
            return  # a cue, or a response flushed by a barge-in
        conv.playing.discard(inp.response_id)
        if conv.playing:
            self._deadline()
            return
        self._cancel("drain")
        self._after_response(f"response {inp.response_id} played out")

    def _drain_late(self, inp: TimerFired) -> None:
        conv = self.conv
        assert conv
        owed = sum(conv.responses[rid].audio_ms for rid in conv.playing)
        log.warning("the speaker did not report the end of %d ms of audio within its "
                    "deadline (%s); flushed it and went on", owed, ", ".join(conv.playing))
        self._emit(FlushPlayback())
        conv.playing.clear()
        self._after_response("drain deadline passed")

    # --- tools ---------------------------------------------------------------------

    def _tool_done(self, inp: ToolDone) -> None:
        conv = self.conv
        assert conv
        turn = next((t for t in conv.turns if inp.call_id in t.waiting), None)
        if turn is None:
            log.debug("result of tool call %s arrived for no open turn", inp.call_id)
            return
        turn.waiting.discard(inp.call_id)
        if conv.connected:
            self._send(p.function_call_output(inp.call_id, inp.output))
        if inp.end_conversation:
            self._request_end("end_conversation tool")
            if self.conv is None:
                return  # ended at once: nothing was due
        if self._maybe_create_response() and self.state is State.THINKING:
            self._timer("response", self.settings.response_timeout)

    def _tools_pending(self) -> bool:
        conv = self.conv
        return bool(conv and any(t.create_sent is None for t in conv.turns))

    def _abandon_rounds(self) -> None:
        """No tool round gets a response.create from now on (no socket, no server, or the
        user barged in). One already sent stays sent, but is not sent again if refused."""
        conv = self.conv
        assert conv
        for turn in conv.turns:
            turn.create_sent = NO_CREATE

    def _maybe_create_response(self) -> bool:
        """Exactly one response.create per tool round: all outputs sent, none active.

        True when one was sent: a response is due now."""
        conv = self.conv
        assert conv
        if conv.active or not conv.connected:
            return False
        for turn in conv.turns:
            if turn.create_sent is None and not turn.waiting:
                event = p.response_create()
                turn.create_sent = event["event_id"]
                self._send(event)
                return True  # one at a time: the next waits for this one's response
        return False

    # --- interruptions and endings ---------------------------------------------------

    def _barge_in(self, inp: WakeWordDetected | ButtonPressed | VoiceHeard) -> None:
        conv = self.conv
        assert conv
        if conv.active and conv.connected:
            self._send(p.response_cancel())
        if conv.active:
            self._response(conv.active).barged_in = True  # its round, if any, comes later
        self._abandon_rounds()
        self._emit(FlushPlayback())  # PlaybackFlushed brings the ms heard, for truncate
        self._cancel("drain", "response")
        conv.playing.clear()
        if not conv.mic:
            self._stream(StreamMic(True, inp.frame if isinstance(inp, WakeWordDetected)
                                 else -1))
        # else the mic is open already: what the user said is with the server.
        conv.end = None  # they want to talk: an earlier "end" no longer stands
        self._timer("follow_up", self.settings.follow_up_seconds)
        self._enter(State.LISTENING, f"barge-in by {_what(inp)}")

    def _flushed(self, inp: PlaybackFlushed) -> None:
        conv = self.conv
        if not conv or not conv.connected:
            return
        for rid, played in inp.played_ms.items():
            r = conv.responses.get(rid)
            if r is not None and r.item_id is not None:
                # The model must remember only what the user heard.
                self._send(p.item_truncate(r.item_id, 0, played))

    def _request_end(self, reason: str) -> None:
        """End now if nothing is due; otherwise right after the drain."""
        conv = self.conv
        assert conv
        if self.state in (State.THINKING, State.RESPONDING, State.AUDIO_PLAYING):
            if conv.end is None:
                log.info("conversation will end after the answer has played (%s)", reason)
            conv.end = conv.end or reason
            return
        self._end_now(reason)

    def _end_request(self, inp: EndRequested | ButtonPressed | TimerFired) -> None:
        reason = inp.reason if isinstance(inp, EndRequested) else (
            "talk button held" if isinstance(inp, ButtonPressed) else "maximum session length")
        self._request_end(reason)

    def _end_now(self, reason: str) -> None:
        conv = self.conv
        error = conv.error if conv else None
        self._cancel(*[n for n in list(self._tokens)])
        self._stream(StreamMic(False))
        self._emit(CloseConnection())
        self._emit(ResetWakeWord())
        self.conv = None
        say = conv.say if conv else None
        if error:
            self._emit(SayPhrase(say or p.FAILED))
            self._timer("error", self.settings.error_seconds)
            self._enter(State.ERROR, error)
        else:
            if self.settings.end_cue:
                self._emit(PlayCue("end"))
            if say:
                self._emit(SayPhrase(say, None))
            self._enter(State.IDLE, f"conversation over: {reason}")

    def _fail(self, why: str, cause: str) -> None:
        """Unrecoverable: say what to fix; end once nothing is playing."""
        conv = self.conv
        assert conv
        log.error("realtime session failed: %s", why)
        conv.error = conv.error or why
        conv.say = conv.say or cause
        conv.connected = False
        self._finish_active()
        self._emit(CloseConnection())

    def _server_error(self, inp: p.ServerError) -> None:
        severity, why = p.classify_error(inp.type, inp.code)
        if severity is Severity.UNRECOVERABLE:
            self._fail(why, p.cause_of_error(inp.type, inp.code))
            if self.state in (State.CONNECTING, State.LISTENING):
                self._end_now("error")
            return
        conv = self.conv
        assert conv
        log.warning("server refused event %s: %s (%s); the conversation goes on",
                    inp.event_id or "?", inp.message, why)
        if inp.code == "conversation_already_has_active_response":
            # Lost a race with a response we had not heard of yet: send ours again
            # once that one is done.
            for turn in conv.turns:
                if turn.create_sent and turn.create_sent == inp.event_id:
                    turn.create_sent = None

    def _disconnected(self, inp: Disconnected) -> None:
        conv = self.conv
        assert conv
        if self.state is State.CONNECTING:
            conv.say = conv.say or inp.cause or p.UNREACHABLE
        elif inp.unrecoverable or self.state in (State.THINKING, State.RESPONDING):
            # Gone while an answer was due or coming: the person is left hanging.
            conv.say = conv.say or inp.cause or p.FAILED
        conv.connected = False
        self._finish_active()
        self._cancel("connect", "response")
        if inp.unrecoverable:
            conv.error = conv.error or inp.reason
        elif not conv.end and not conv.error:
            log.warning("lost the realtime connection: %s", inp.reason)
            conv.end = f"connection lost ({inp.reason})"
        self._abandon_rounds()
        if self.state is State.CONNECTING and not inp.unrecoverable:
            conv.error = f"could not reach the realtime service: {inp.reason}"
        if conv.playing:
            self._enter(State.AUDIO_PLAYING, "connection closed, finishing the answer")
        else:
            self._end_now(conv.end or "disconnected")

    def _timed_out(self, inp: TimerFired) -> None:
        conv = self.conv
        assert conv
        if inp.name == "connect":
            conv.error = (f"the realtime service did not answer within "
                          f"{self.settings.connect_timeout:g} s (a slow or broken network?)")
            conv.say = p.UNREACHABLE
            self._end_now("connect timeout")
            return
        log.warning("no word from the realtime service for %.0f s while a %s was due",
                    self.settings.response_timeout,
                    "response" if self.state is State.THINKING else "response's end")
        if self.state is State.RESPONDING:
            self._finish_active()
            conv.end = conv.end or "the realtime service stopped answering"
            conv.say = conv.say or p.FAILED
            self._emit(CloseConnection())
            conv.connected = False
            self._after_response("response timed out")
        else:
            self._abandon_rounds()
            self._listen("no response came", reopen_mic=True)

    def _error_over(self, inp: TimerFired) -> None:
        self._enter(State.IDLE, "error shown")

    def _mute(self, inp: ButtonPressed) -> None:
        self.muted = not self.muted
        self._emit(SetWakeWord(not self.muted))
        self._emit(PlayCue("end" if self.muted else "wake"))
        log.info("microphone %s", "muted" if self.muted else "unmuted",
                 extra={"SPEAKERD_EVENT": "mute" if self.muted else "unmute"})
        if self.muted and self.conv:
            self._stream(StreamMic(False))
            self._request_end("muted")
        elif self.state is State.IDLE:
            self._emit(SetLeds("muted" if self.muted else "idle"))
        # Mid-answer the end waits for the drain: the status must not wait with it.
        self._emit(SetStatus(status_text(self.state, self.muted)))

    def _button(self, inp: ButtonPressed) -> None:
        """Buttons mean different things by state; this routes them."""
        if inp.button == "mute":
            self._mute(inp)
        elif self.state is State.IDLE and inp.button == "talk":
            self._start(inp)
        elif self.state in (State.RESPONDING, State.AUDIO_PLAYING) and inp.button == "talk":
            self._barge_in(inp)
        elif inp.button == "talk_long" and self.conv:
            self._end_request(inp)
        else:
            log.debug("%s button ignored in state %s", inp.button, self.state.value)

    def _response(self, rid: str) -> _Response:
        conv = self.conv
        assert conv
        return conv.responses.setdefault(rid, _Response(rid))


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


def _what(inp: object) -> str:
    if isinstance(inp, WakeWordDetected):
        return f"wake word {inp.model}"
    if isinstance(inp, ButtonPressed):
        return f"{inp.button} button"
    if isinstance(inp, VoiceHeard):
        return "voice"
    return type(inp).__name__


S = State
Handler = Callable[[Session, Any], None]

# Every rule in one table: (state, input type) -> handler. A pair that is not here,
# nor in ANY_STATE, nor in IGNORED, is a bug in strict mode and a logged oddity in
# production.
TABLE: dict[tuple[State, type], Handler] = {
    (S.IDLE, WakeWordDetected): Session._start,
    (S.CONNECTING, SessionReady): Session._ready,
    (S.CONNECTING, Disconnected): Session._disconnected,
    (S.LISTENING, p.SpeechStarted): Session._speech_started,
    (S.LISTENING, p.AudioCommitted): Session._committed,
    (S.LISTENING, p.ResponseCreated): Session._response_created,
    (S.THINKING, p.ResponseCreated): Session._response_created,
    (S.AUDIO_PLAYING, p.ResponseCreated): Session._response_created,
    (S.RESPONDING, p.OutputItemAdded): Session._item_added,
    (S.RESPONDING, p.AudioDelta): Session._audio,
    (S.RESPONDING, p.AudioDone): Session._keep_alive,
    (S.RESPONDING, p.ResponseDone): Session._response_done,
    (S.LISTENING, p.ResponseDone): Session._response_done,
    (S.THINKING, p.ResponseDone): Session._response_done,
    (S.AUDIO_PLAYING, p.ResponseDone): Session._response_done,
    (S.RESPONDING, WakeWordDetected): Session._barge_in,
    (S.AUDIO_PLAYING, WakeWordDetected): Session._barge_in,
    # Only reported with barge_in = "voice" (the daemon runs no detector otherwise).
    (S.RESPONDING, VoiceHeard): Session._barge_in,
    (S.AUDIO_PLAYING, VoiceHeard): Session._barge_in,
    (S.RESPONDING, PlaybackDrained): Session._drained,
    (S.AUDIO_PLAYING, PlaybackDrained): Session._drained,
}
for _state in (S.LISTENING, S.THINKING, S.RESPONDING, S.AUDIO_PLAYING):
    TABLE[(_state, p.ServerError)] = Session._server_error
    TABLE[(_state, Disconnected)] = Session._disconnected
    TABLE[(_state, ToolDone)] = Session._tool_done
    TABLE[(_state, EndRequested)] = Session._end_request
    TABLE[(_state, PlaybackFlushed)] = Session._flushed
for _state in (S.LISTENING, S.THINKING, S.RESPONDING, S.AUDIO_PLAYING):
    TABLE[(_state, p.InputTranscript)] = Session._heard
    TABLE[(_state, p.TranscriptDone)] = Session._said
for _state in (S.THINKING, S.RESPONDING, S.AUDIO_PLAYING):
    TABLE[(_state, p.AudioCommitted)] = Session._note_turn
TABLE[(S.CONNECTING, EndRequested)] = Session._end_request
TABLE[(S.CONNECTING, p.ServerError)] = Session._server_error
TABLE[(S.CONNECTING, ToolDone)] = Session._tool_done

# Timers by name, in the states where they mean something.
TIMERS: dict[tuple[State, str], Handler] = {
    (S.LISTENING, "follow_up"): Session._follow_up_over,
    (S.LISTENING, "mic_guard"): Session._mic_guard,
    (S.CONNECTING, "connect"): Session._timed_out,
    (S.THINKING, "response"): Session._timed_out,
    (S.RESPONDING, "response"): Session._timed_out,
    (S.AUDIO_PLAYING, "drain"): Session._drain_late,
    (S.RESPONDING, "drain"): Session._drain_late,
    (S.ERROR, "error"): Session._error_over,
}
for _state in (S.CONNECTING, S.LISTENING, S.THINKING, S.RESPONDING, S.AUDIO_PLAYING):
    TIMERS[(_state, "session")] = Session._end_request


def _timer_fired(self: Session, inp: TimerFired) -> None:
    handler = TIMERS.get((self.state, inp.name))
    if handler is None:
        log.debug("timer %s ran out in state %s: nothing to do", inp.name, self.state.value)
        return
    handler(self, inp)


# Inputs every state handles the same way.
ANY_STATE: dict[type, Handler] = {
    ButtonPressed: Session._button,
    TimerFired: _timer_fired,
}

# Inputs a state receives in normal operation and deliberately does nothing with:
# late events of a conversation that is over, cues draining, events of no interest.
_LATE = (p.SessionCreated, p.SessionUpdated, p.ServerError, p.SpeechStarted, p.SpeechStopped,
         p.AudioCommitted, p.ResponseCreated, p.OutputItemAdded, p.AudioDelta, p.AudioDone,
         p.TranscriptDone, p.InputTranscript, p.ResponseDone, SessionReady, Disconnected,
         PlaybackDrained, PlaybackFlushed, ToolDone, EndRequested)
IGNORED: dict[State, tuple[type, ...]] = {
    # The voice detector runs while a conversation is open; speech matters only
    # over an answer. Outside one it is a late report from the capture thread.
    S.IDLE: (*_LATE, VoiceHeard),
    S.ERROR: (*_LATE, WakeWordDetected, VoiceHeard),
    # Before session.updated nothing of a response can be ours: a stray of a socket
    # that is gone.
    S.CONNECTING: (WakeWordDetected, VoiceHeard, PlaybackDrained, PlaybackFlushed, p.SpeechStarted,
                   p.SpeechStopped, p.SessionCreated, p.SessionUpdated, p.AudioCommitted,
                   p.ResponseCreated, p.OutputItemAdded, p.AudioDelta, p.AudioDone,
                   p.TranscriptDone, p.InputTranscript, p.ResponseDone),
    S.LISTENING: (WakeWordDetected, VoiceHeard, p.SpeechStopped, PlaybackDrained,
                  SessionReady, p.OutputItemAdded, p.AudioDelta, p.AudioDone,
                  p.SessionUpdated),
    S.THINKING: (WakeWordDetected, VoiceHeard, p.SpeechStarted, p.SpeechStopped,
                 PlaybackDrained, SessionReady, p.OutputItemAdded, p.AudioDelta,
                 p.AudioDone, p.SessionUpdated),
    S.RESPONDING: (p.SpeechStarted, p.SpeechStopped, SessionReady, p.ResponseCreated,
                   p.SessionUpdated),
    S.AUDIO_PLAYING: (p.SpeechStarted, p.SpeechStopped, SessionReady, p.OutputItemAdded,
                      p.AudioDelta, p.AudioDone, p.SessionUpdated),
}
