"""What each input does to a conversation: the handlers that the table in rules.py names.

A handler carries its input out (actions, bookkeeping) and returns where the session
goes next, `(state, cause)`, or None to stay where it is. It never changes the state
itself, nor looks at it to choose: where an input means different things in different
states, the table names a different handler for each. rules.py checks the choice
against the table and changes the state, in one place.
"""

from __future__ import annotations

from speakerd.realtime import protocol as p
from speakerd.realtime.protocol import Severity
from speakerd.session.conversation import Conversation
from speakerd.session.core import Core, Next, end_reason, log, what
from speakerd.session.events import (
    AnnouncementPlaying,
    ButtonPressed,
    CloseConnection,
    Connect,
    ConversationStarted,
    Disconnected,
    EndRequested,
    FlushPlayback,
    PlayAudio,
    PlaybackDrained,
    PlaybackFlushed,
    PlayCue,
    SayPhrase,
    SessionReady,
    SetWakeWord,
    State,
    StreamMic,
    TimerFired,
    ToolDone,
    VoiceHeard,
    WakeWordDetected,
)


class Handlers(Core):
    """What each input does; Session (rules.py) adds the table that picks the handler."""

    # --- starting ----------------------------------------------------------------

    def _start(self, inp: WakeWordDetected | ButtonPressed) -> Next:
        if self.muted:
            log.info("%s ignored: the microphone is muted", what(inp))
            if isinstance(inp, ButtonPressed):
                self._emit(SayPhrase(p.MUTED, None))  # a press deserves an answer
            return None
        self.count += 1
        self.conv = Conversation(self.count)
        self._emit(ConversationStarted(self.count, what(inp)))
        if self.settings.wake_cue:
            self._emit(PlayCue("wake"))
        self._emit(Connect())
        after = inp.frame if isinstance(inp, WakeWordDetected) else -1
        self._stream(StreamMic(True, after))
        self._timer("connect", self.settings.connect_timeout)
        self._timer("session", self.settings.max_session_seconds)
        return State.CONNECTING, what(inp)

    def _ready(self, inp: SessionReady) -> Next:
        self._conv().connected = True
        self._cancel("connect")
        return self._listen("connected")

    # --- the user's turn -----------------------------------------------------------

    def _speech_started(self, inp: p.SpeechStarted) -> Next:
        self._cancel("follow_up")  # they are talking: the window is not running out
        return None

    def _note_turn(self, inp: p.AudioCommitted) -> Next:
        self._conv().note_turn(inp.item_id)
        return None

    def _committed(self, inp: p.AudioCommitted) -> Next:
        self._conv().note_turn(inp.item_id)
        # The assistant's own voice must not become the next turn: the mic stays
        # closed until its answer has played out (with voice barge-in, until it
        # starts: from then on the echo-cancelled mic listens for the user).
        self._cancel("follow_up", "mic_guard")
        self._stream(StreamMic(False))
        self._timer("response", self.settings.response_timeout)
        return State.THINKING, "speech committed"

    def _mic_guard(self, inp: TimerFired) -> Next:
        self._stream(StreamMic(True))
        return None

    def _follow_up_over(self, inp: TimerFired) -> Next:
        return self._end_now("no follow-up")

    # --- the model's turn -----------------------------------------------------------

    def _response_created(self, inp: p.ResponseCreated) -> Next:
        return self._answer_starts(inp, mic_open_for_the_user=False)

    def _response_created_listening(self, inp: p.ResponseCreated) -> Next:
        """While listening the mic is the user's; with wake-word barge-in it shuts now."""
        return self._answer_starts(inp, mic_open_for_the_user=True)

    def _answer_starts(self, inp: p.ResponseCreated, *, mic_open_for_the_user: bool) -> Next:
        conv = self._conv()
        conv.active = inp.response_id
        conv.response(inp.response_id)
        conv.turn_of_response.setdefault(inp.response_id, conv.user_turns)
        self._cancel("response", "follow_up", "mic_guard")
        if self.settings.voice_barge_in:
            # The mic is open while the answer plays (LISTENING and the two playing
            # states have it already, unless a guard or a mute held it shut).
            if not conv.mic:
                self._stream(StreamMic(True))
        elif mic_open_for_the_user:
            self._stream(StreamMic(False))
        self._timer("response", self.settings.response_timeout)
        return State.RESPONDING, f"response {inp.response_id} started"

    def _item_added(self, inp: p.OutputItemAdded) -> Next:
        r = self._conv().response(inp.response_id)
        if inp.item_type == "message" and r.item_id is None:
            r.item_id = inp.item_id
        self._timer("response", self.settings.response_timeout)
        return None

    def _audio(self, inp: p.AudioDelta) -> Next:
        conv = self._conv()
        if inp.response_id != conv.active:
            log.debug("dropped audio of response %s, which is not the active one",
                      inp.response_id)
            return None
        r = conv.response(inp.response_id)
        r.item_id = r.item_id or inp.item_id
        r.audio_ms += len(inp.pcm) / p.BYTES_PER_MS
        self._emit(PlayAudio(inp.pcm, inp.response_id))
        self._timer("response", self.settings.response_timeout)
        return None

    def _keep_alive(self, inp: object) -> Next:
        """A sign of life from the server during a response."""
        self._timer("response", self.settings.response_timeout)
        return None

    def _heard(self, inp: p.InputTranscript) -> Next:
        conv = self._conv()
        self._transcript("heard", inp.transcript,
                         conv.turn_of_item.get(inp.item_id, conv.user_turns))
        return None

    def _said(self, inp: p.TranscriptDone) -> Next:
        conv = self._conv()
        self._transcript("said", inp.transcript,
                         conv.turn_of_response.get(inp.response_id, conv.user_turns))
        return None

    def _said_responding(self, inp: p.TranscriptDone) -> Next:
        if inp.response_id == self._conv().active:
            self._keep_alive(inp)
        return self._said(inp)

    def _response_done(self, inp: p.ResponseDone) -> Next:
        """A response we are not streaming ended (the user barged in on it, or it is a
        stray): its audio is gone, but its tools still run and the server no longer
        counts it as active."""
        self._response_ended(inp)
        self._maybe_create_response()
        return None

    def _response_done_responding(self, inp: p.ResponseDone) -> Next:
        conv = self._conv()
        if conv.active != inp.response_id:
            return self._response_done(inp)
        self._cancel("response")
        r = self._response_ended(inp)
        self._finish_audio(r)
        self._maybe_create_response()
        return self._after_response(f"response {r.id} {inp.status}")

    def _drained(self, inp: PlaybackDrained) -> Next:
        conv = self._conv()
        if inp.response_id not in conv.playing:
            return None  # a cue, or a response flushed by a barge-in
        conv.playing.discard(inp.response_id)
        if conv.playing:
            self._deadline()
            return None
        self._cancel("drain")
        return self._after_response(f"response {inp.response_id} played out")

    def _drain_late(self, inp: TimerFired) -> Next:
        conv = self._conv()
        log.warning("the speaker did not report the end of %d ms of audio within its "
                    "deadline (%s); flushed it and went on", conv.owed_ms(),
                    ", ".join(conv.playing))
        self._emit(FlushPlayback())
        conv.playing.clear()
        return self._after_response("drain deadline passed")

    # --- tools ---------------------------------------------------------------------

    def _tool_done(self, inp: ToolDone) -> Next:
        """Nothing due: an end the tool asks for is carried out at once."""
        if not self._tool_output(inp):
            return None
        if inp.end_conversation:
            return self._end_now("end_conversation tool")
        self._maybe_create_response()
        return None

    def _tool_done_later(self, inp: ToolDone) -> Next:
        """An answer is due or playing: an end the tool asks for waits for its drain."""
        self._tool_done_answer_due(inp)
        return None

    def _tool_done_thinking(self, inp: ToolDone) -> Next:
        """As _tool_done_later; a response.create sent now starts the wait for it."""
        if self._tool_done_answer_due(inp):
            self._timer("response", self.settings.response_timeout)
        return None

    def _tool_done_answer_due(self, inp: ToolDone) -> bool:
        """True when it sent a response.create."""
        if not self._tool_output(inp):
            return False
        if inp.end_conversation:
            self._end_later("end_conversation tool")
        return self._maybe_create_response()

    def _tool_output(self, inp: ToolDone) -> bool:
        """Send the result to the model; False when no open round waits for it."""
        conv = self._conv()
        turn = conv.round_of(inp.call_id)
        if turn is None:
            log.debug("result of tool call %s arrived for no open turn", inp.call_id)
            return False
        turn.waiting.discard(inp.call_id)
        if conv.connected:
            self._send(p.function_call_output(inp.call_id, inp.output))
        return True

    # --- interruptions and endings ---------------------------------------------------

    def _barge_in(self, inp: WakeWordDetected | ButtonPressed | VoiceHeard) -> Next:
        conv = self._conv()
        if conv.active and conv.connected:
            self._send(p.response_cancel())
        if conv.active:
            conv.response(conv.active).barged_in = True  # its round, if any, comes later
        conv.abandon_rounds()
        self._emit(FlushPlayback())  # PlaybackFlushed brings the ms heard, for truncate
        self._cancel("drain", "response")
        conv.playing.clear()
        if not conv.mic:
            self._stream(StreamMic(True, inp.frame if isinstance(inp, WakeWordDetected)
                                   else -1))
        # else the mic is open already: what the user said is with the server.
        conv.end = None  # they want to talk: an earlier "end" no longer stands
        self._timer("follow_up", self.settings.follow_up_seconds)
        return State.LISTENING, f"barge-in by {what(inp)}"

    def _flushed(self, inp: PlaybackFlushed) -> Next:
        conv = self._conv()
        if not conv.connected:
            return None
        for rid, played in inp.played_ms.items():
            r = conv.responses.get(rid)
            if r is not None and r.item_id is not None:
                # The model must remember only what the user heard.
                self._send(p.item_truncate(r.item_id, 0, played))
        return None

    def _end_asked(self, inp: EndRequested | ButtonPressed | TimerFired) -> Next:
        """Nothing is due: the conversation ends now."""
        return self._end_now(end_reason(inp))

    def _end_asked_later(self, inp: EndRequested | ButtonPressed | TimerFired) -> Next:
        """An answer is due or playing: the conversation ends right after its drain."""
        self._end_later(end_reason(inp))
        return None

    def _server_error(self, inp: p.ServerError) -> Next:
        """Nothing is due: an unrecoverable error ends the conversation now."""
        if self._refused(inp):
            return self._end_now("error")
        return None

    def _server_error_later(self, inp: p.ServerError) -> Next:
        """An answer is due or playing: an unrecoverable error ends it after the drain."""
        self._refused(inp)
        return None

    def _refused(self, inp: p.ServerError) -> bool:
        """True when the error is unrecoverable (the conversation has failed)."""
        severity, why = p.classify_error(inp.type, inp.code)
        if severity is Severity.UNRECOVERABLE:
            self._fail(why, p.cause_of_error(inp.type, inp.code))
            return True
        conv = self._conv()
        log.warning("server refused event %s: %s (%s); the conversation goes on",
                    inp.event_id or "?", inp.message, why)
        if inp.code == "conversation_already_has_active_response":
            # Lost a race with a response we had not heard of yet: send ours again
            # once that one is done.
            for turn in conv.turns:
                if turn.create_sent and turn.create_sent == inp.event_id:
                    turn.create_sent = None
        return False

    def _connect_failed(self, inp: Disconnected) -> Next:
        """Gone before the session was up: nothing was said, nothing plays."""
        conv = self._conv()
        conv.say = conv.say or inp.cause or p.UNREACHABLE
        self._connection_gone(inp)
        if not inp.unrecoverable:
            conv.error = f"could not reach the realtime service: {inp.reason}"
        return self._end_now(conv.end or "disconnected")

    def _disconnected(self, inp: Disconnected) -> Next:
        """Gone while no answer was due (listening, or playing one that came whole)."""
        conv = self._conv()
        if inp.unrecoverable:
            conv.say = conv.say or inp.cause or p.FAILED
        self._connection_gone(inp)
        return self._after_disconnect()

    def _disconnected_answer_due(self, inp: Disconnected) -> Next:
        """Gone while an answer was due or coming: the person is left hanging."""
        conv = self._conv()
        conv.say = conv.say or inp.cause or p.FAILED
        self._connection_gone(inp)
        return self._after_disconnect()

    def _connect_timeout(self, inp: TimerFired) -> Next:
        conv = self._conv()
        conv.error = (f"the realtime service did not answer within "
                      f"{self.settings.connect_timeout:g} s (a slow or broken network?)")
        conv.say = p.UNREACHABLE
        return self._end_now("connect timeout")

    def _no_response(self, inp: TimerFired) -> Next:
        """THINKING, and the server said nothing: listen again, the user may retry."""
        self._silent_server("response")
        self._conv().abandon_rounds()
        return self._listen("no response came", reopen_mic=True)

    def _response_stalled(self, inp: TimerFired) -> Next:
        """RESPONDING, and the server went quiet mid-answer: play what came, then end."""
        conv = self._conv()
        self._silent_server("response's end")
        self._finish_active()
        conv.end = conv.end or "the realtime service stopped answering"
        conv.say = conv.say or p.FAILED
        self._emit(CloseConnection())
        conv.connected = False
        return self._after_response("response timed out")

    def _silent_server(self, due: str) -> None:
        log.warning("no word from the realtime service for %.0f s while a %s was due",
                    self.settings.response_timeout, due)

    def _error_over(self, inp: TimerFired) -> Next:
        return State.IDLE, "error shown"

    # --- mute and announcements --------------------------------------------------------

    def _mute(self, inp: ButtonPressed) -> Next:
        """No conversation: mute or unmute, nothing else."""
        self._toggle_mute()
        return None

    def _mute_ending(self, inp: ButtonPressed) -> Next:
        """Nothing is due: muting ends the conversation now."""
        if self._toggle_mute():
            self._stream(StreamMic(False))
            return self._end_now("muted")
        return None

    def _mute_after_answer(self, inp: ButtonPressed) -> Next:
        """An answer is due or playing: the mic shuts now, the end waits for the drain
        (the status says "muted" at once all the same)."""
        if self._toggle_mute():
            self._stream(StreamMic(False))
            self._end_later("muted")
        return None

    def _toggle_mute(self) -> bool:
        """True when it is muted now."""
        self.muted = not self.muted
        self._emit(SetWakeWord(not self.muted))
        self._emit(PlayCue("end" if self.muted else "wake"))
        log.info("microphone %s", "muted" if self.muted else "unmuted",
                 extra={"SPEAKERD_EVENT": "mute" if self.muted else "unmute"})
        return self.muted

    def _announcement(self, inp: AnnouncementPlaying) -> Next:
        self.announcing = inp.on
        return None


