"""Hypothesis drives random, adversarial orders of every input through the session.

The harness plays the server, the speaker, the tools and the clock: it answers
only what a real peer could (responses get ids, drains come only for audio handed
to playback, timers fire only while set) but in any order, early, late, twice or
never. After every step it checks DESIGN.md's six invariants and that no action is
out of place; at the end it lets time run out and checks the session comes to rest.
It runs twice: with barge_in = "wake_word", where the mic is closed from the end of
the user's turn until the answer has played out, and with "voice", where the
echo-cancelled mic is open while the answer plays (closed only while THINKING) and
speech over the answer (VoiceHeard) barges in like the wake word.
"""

from __future__ import annotations

import logging
import os

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from speakerd import session as s
from speakerd.realtime import protocol as p
from speakerd.session import State

MARGIN = 2.0
SETTINGS = s.Settings(audio_margin_seconds=MARGIN, transcripts=True)
ENDED = (State.IDLE, State.ERROR)
SURVIVABLE = [("invalid_request_error", "conversation_already_has_active_response"),
              ("invalid_request_error", "invalid_value"), ("server_error", None),
              ("invalid_request_error", "response_cancel_not_active")]
UNRECOVERABLE = [("invalid_request_error", "invalid_api_key"),
                 ("invalid_request_error", "insufficient_quota")]


class Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.state_lines = 0

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "SPEAKERD_STATE"):
            self.state_lines += 1


class Turn:
    def __init__(self, rid: str, calls: set[str], barged: bool = False) -> None:
        self.rid = rid
        self.calls = calls
        self.outputs: set[str] = set()
        self.creates = 0
        self.open = True  # on a connection that is still up
        self.barged = barged  # the user barged in on it: outputs yes, response.create no


class SessionMachine(RuleBasedStateMachine):
    SETTINGS = SETTINGS

    def __init__(self) -> None:
        super().__init__()
        self.s = s.Session(self.SETTINGS, strict=True)
        self.voice = self.SETTINGS.voice_barge_in
        self.mic = False  # streaming, as the StreamMic actions left it
        self.muted_in_conv = False  # muted during this conversation: the mic stays shut
        self.log = Count()
        logger = logging.getLogger("speakerd.session")
        self.old_level = logger.level
        logger.setLevel(logging.INFO)
        logger.addHandler(self.log)
        self.n = 0
        self.timers: dict[str, int] = {}
        self.started: set[str] = set()
        self.stale: list[tuple[str, int]] = []
        self.connected = False  # the socket as the server sees it
        self.server_active: str | None = None
        self.responses: list[str] = []
        self.audio_ms: dict[str, float] = {}
        self.finished: set[str] = set()  # FinishAudio given, drain not yet fed
        self.unheard: set[str] = set()  # audio handed to playback, not drained or flushed
        self.tools: dict[str, str] = {}  # call id -> response id, RunTool not yet answered
        self.turns: list[Turn] = []
        self.creates: dict[str, Turn] = {}  # response.create event id -> its turn
        self.barged: set[str] = set()  # responses the user barged in on while active
        self.open_ended = False  # the connection was lost while tools were owed

    def teardown(self) -> None:
        try:
            self.settle()
        finally:
            logger = logging.getLogger("speakerd.session")
            logger.removeHandler(self.log)
            logger.setLevel(self.old_level)

    # --- feeding and checking -------------------------------------------------------

    def feed(self, inp: object) -> list[object]:
        before = self.s.state
        lines_before = self.log.state_lines
        was_active = self.server_active
        talk = (isinstance(inp, s.WakeWordDetected) or inp == s.ButtonPressed("talk")
                or (self.voice and isinstance(inp, s.VoiceHeard)))
        if talk and before in (State.RESPONDING, State.AUDIO_PLAYING):
            self.user_moved_on()  # a barge-in
        owed_output = (isinstance(inp, s.ToolDone) and self.connected
                       and any(t.open and inp.call_id in t.calls - t.outputs
                               for t in self.turns))
        if before in ENDED and isinstance(inp, (s.WakeWordDetected, s.ButtonPressed)):
            self.muted_in_conv = False  # a new conversation, perhaps
        if inp == s.ButtonPressed("mute") and before not in ENDED:
            self.muted_in_conv = True
        actions = self.s.handle(inp)
        after = self.s.state
        self.n += 1
        event(f"state {after.value}")
        leds = [a for a in actions if isinstance(a, s.SetLeds)]
        mute_toggle = isinstance(inp, s.ButtonPressed) and inp.button == "mute"
        # 6. every state change is logged once and shown once; nothing else is.
        if before is not after:
            assert self.log.state_lines == lines_before + 1, inp
            assert leds and leds[-1].pattern in (after.value, "muted"), (inp, leds)
        else:
            assert self.log.state_lines == lines_before
            assert not leds or mute_toggle, (inp, leds)
        for a in actions:
            self.check_action(a, inp, was_active, after)
        # The mic: shut while the model thinks and whenever muted; while its answer
        # plays, shut too with wake-word barge-in, open (echo cancelled) with voice
        # barge-in, unless a mute in this conversation shut it.
        if after in ENDED or after is State.THINKING or self.s.muted:
            assert not self.mic, (inp, after)
        elif after in (State.RESPONDING, State.AUDIO_PLAYING):
            if not self.voice:
                assert not self.mic, (inp, after)
            elif not self.muted_in_conv:
                assert self.mic, (inp, after)
        # 3. a tool's result goes out on the connection its call came on, barge-in or not.
        if owed_output:
            assert any(isinstance(a, s.Send) and a.event.get("item", {}).get("call_id")
                       == inp.call_id for a in actions), ("output not sent", inp)
        # 1. never ends while audio is still owed (a deadline flushes it first).
        if after in ENDED and before not in ENDED:
            assert not self.unheard, (inp, self.unheard)
        # 7. the person is told what went wrong, once, when it goes wrong: a failed
        # connection at once, an error when the conversation ends on it; and a talk press
        # while muted gets its phrase. No phrase otherwise.
        phrases = [a for a in actions if isinstance(a, s.SayPhrase)]
        assert len(phrases) <= 1, actions
        ended_now = after in ENDED and before not in ENDED
        if after is State.ERROR and before is not State.ERROR:
            assert phrases and phrases[0].fallback_cue == "error", (inp, actions)
            assert phrases[0].situation in p.SITUATIONS
        if phrases:
            assert ended_now or (inp == s.ButtonPressed("talk") and self.s.muted
                                 and phrases[0] == s.SayPhrase(p.MUTED, None)), (inp, actions)
        if before is State.CONNECTING and isinstance(inp, s.Disconnected):
            assert after is State.ERROR, "a failed connection is told at once"
            if inp.cause:
                assert phrases[0].situation == inp.cause
        # 4. survivable errors never end anything.
        if isinstance(inp, p.ServerError) and (inp.type, inp.code) in SURVIVABLE:
            assert after is before and not any(isinstance(a, s.CloseConnection)
                                               for a in actions)
        return actions

    def check_action(self, a: object, inp: object, was_active: str | None,
                     after: State) -> None:
        match a:
            case s.StartTimer(name=name, seconds=sec, token=tok):
                self.started.add(name)
                if name in self.timers:
                    self.stale.append((name, self.timers[name]))
                self.timers[name] = tok
                if name == "drain":
                    # 5. the deadline is the audio still owed plus a margin.
                    owed = sum(self.audio_ms.get(r, 0) for r in self.finished) / 1000
                    assert abs(sec - (owed + MARGIN)) < 1e-6, (sec, owed)
            case s.CancelTimer(name=name):
                assert name in self.started, name
                if name in self.timers:
                    self.stale.append((name, self.timers.pop(name)))
            case s.Connect():
                assert after is State.CONNECTING
            case s.CloseConnection():
                self.connected = False
                self.server_active = None
                self.close_rounds()
            case s.Send(event=e):
                assert self.connected, ("sent on a closed connection", e)
                if e["type"] == "response.create":
                    # 2. never while a response is active.
                    assert was_active is None and self.server_active is None, e
                    self.attribute_create(e)
                    event("response.create sent")
                elif e["type"] == "conversation.item.create":
                    call = e["item"]["call_id"]
                    turn = next(t for t in self.turns if call in t.calls and t.open)
                    assert call not in turn.outputs, "an output sent twice"
                    turn.outputs.add(call)
            case s.PlayAudio(response_id=rid, pcm=data):
                assert after is State.RESPONDING
                self.unheard.add(rid)
                self.audio_ms[rid] = self.audio_ms.get(rid, 0) + len(data) / 48
            case s.FinishAudio(response_id=rid):
                self.finished.add(rid)
            case s.FlushPlayback():
                self.finished.clear()
                self.unheard.clear()
            case s.RunTool(call=call):
                self.tools[call.call_id] = call.name
                rid = call.call_id.rsplit("_c", 1)[0]
                turn = next((t for t in self.turns if t.rid == rid and t.open), None)
                if turn is None:
                    turn = Turn(rid, set(), barged=rid in self.barged)
                    self.turns.append(turn)
                turn.calls.add(call.call_id)
            case s.StreamMic(on=on):
                assert after not in ENDED or not on
                # Opened twice would send the pre-roll to the server twice.
                assert not (on and self.mic), ("mic opened while open", inp)
                self.mic = on

    def user_moved_on(self) -> None:
        """The user barged in on the answer: the rounds open now, and the round of the
        response still active, get no response.create (one already sent stays sent)."""
        for t in self.turns:
            t.barged = True
        if self.server_active:
            self.barged.add(self.server_active)

    def close_rounds(self) -> None:
        """The connection is gone: rounds still open can never get their create."""
        for t in self.turns:
            t.open = False

    def attribute_create(self, e: dict) -> None:
        """3. one response.create per tool round, only after all of its outputs; none for
        a round the user barged in on."""
        due = [t for t in self.turns if t.open and t.creates == 0]
        assert due, "a response.create that no tool round asked for"
        turn = next((t for t in due if t.outputs == t.calls and not t.barged), None)
        assert turn is not None, ("response.create before every output, or for a round "
                                  "the user barged in on",
                                  [(t.rid, "barged" if t.barged else "") for t in due])
        turn.creates += 1
        self.creates[e["event_id"]] = turn

    @invariant()
    def at_most_one_create_per_round(self) -> None:
        assert all(t.creates <= 1 for t in self.turns)

    # --- progress: the conversation moving the way it usually does -------------------

    @precondition(lambda self: self.s.state is State.IDLE)
    @rule(frame=st.integers(-1, 500))
    def start(self, frame: int) -> None:
        self.wake_word(frame)

    @precondition(lambda self: self.s.state is State.CONNECTING and not self.connected)
    @rule()
    def ready(self) -> None:
        self.connected = True
        self.feed(s.SessionReady())

    @precondition(lambda self: self.connected)
    @rule()
    def speech(self) -> None:
        self.feed(p.SpeechStarted("u"))
        self.feed(p.SpeechStopped("u"))
        self.feed(p.AudioCommitted("u"))

    @precondition(lambda self: self.connected and self.server_active is None)
    @rule()
    def response_created(self) -> None:
        rid = f"r{len(self.responses)}"
        self.responses.append(rid)
        self.server_active = rid
        self.feed(p.ResponseCreated(rid))
        self.feed(p.OutputItemAdded(rid, f"item_{rid}", "message"))

    @precondition(lambda self: self.connected and self.server_active is not None)
    @rule(ms=st.integers(1, 5000))
    def audio(self, ms: int) -> None:
        assert self.server_active
        self.feed(p.AudioDelta(self.server_active, f"item_{self.server_active}", 0,
                               b"\x00\x00" * (24 * ms)))

    @precondition(lambda self: self.connected and self.server_active is not None)
    @rule(ncalls=st.integers(0, 3), status=st.sampled_from(["completed", "cancelled",
                                                            "incomplete"]))
    def response_done(self, ncalls: int, status: str) -> None:
        rid = self.server_active
        assert rid
        calls = tuple(p.FunctionCall(f"{rid}_c{i}", "tool", "{}") for i in range(ncalls))
        self.server_active = None
        self.feed(p.ResponseDone(rid, status, calls))

    @precondition(lambda self: self.s.state in (State.RESPONDING, State.AUDIO_PLAYING))
    @rule(button=st.booleans(), frame=st.integers(-1, 500))
    def barge_in(self, button: bool, frame: int) -> None:
        """The user speaks over the answer: the talk button or the wake word, or (with
        voice barge-in) just speech."""
        if self.voice and frame % 2:
            self.feed(s.VoiceHeard())
        elif button:
            self.button("talk")
        else:
            self.wake_word(frame)

    @precondition(lambda self: bool(self.finished))
    @rule(data=st.data())
    def drained(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.finished)))
        self.finished.discard(rid)
        self.unheard.discard(rid)
        self.feed(s.PlaybackDrained(rid))

    @precondition(lambda self: bool(self.tools))
    @rule(data=st.data(), end=st.booleans())
    def tool_done(self, data: st.DataObject, end: bool) -> None:
        call = data.draw(st.sampled_from(sorted(self.tools)))
        del self.tools[call]
        # Asking to end is rare in life; a tenth of tool results do it here.
        self.feed(s.ToolDone(call, '{"ok": true}', end_conversation=end and
                             data.draw(st.integers(0, 9)) == 0))

    # --- disruption: everything else, in any state, a step in eight or so --------------

    @rule(data=st.data())
    def disrupt(self, data: st.DataObject) -> None:
        choices = [("wake_word", lambda: self.wake_word(data.draw(st.integers(-1, 500)))),
                   ("button", lambda: self.button(data.draw(st.sampled_from(
                       ["talk", "talk_long", "mute"])))),
                   ("shutdown", self.shutdown),
                   ("disconnect", lambda: self.disconnect(
                       data.draw(st.booleans()), data.draw(st.sampled_from(
                           ["", *p.SITUATIONS[:-1]])))),
                   ("stray_event", lambda: self.stray_event(data.draw(st.sampled_from(
                       ["session.updated", "speech_stopped", "late_audio", "late_done",
                        "heard", "said", "said_old"])))),
                   ("drained_twice_or_early", lambda: self.drained_twice_or_early(
                       data.draw(st.sampled_from(["r0", "r1", "cue:wake"])))),
                   ("flushed", lambda: self.flushed(data.draw(st.integers(0, 5000)))),
                   # The detector reports speech whenever it hears some, in any state.
                   ("voice", lambda: self.feed(s.VoiceHeard()))]
        if self.connected:
            choices.append(("server_error", lambda: self.server_error(
                data.draw(st.sampled_from(SURVIVABLE + UNRECOVERABLE)),
                data.draw(st.booleans()))))
        if self.connected and self.server_active is not None:
            choices.append(("response_failed", lambda: self.response_failed(
                data.draw(st.sampled_from(UNRECOVERABLE)))))
        if self.timers:
            choices.append(("timer", lambda: self.timer(data)))
        if self.stale:
            choices.append(("stale_timer", lambda: self.stale_timer(data)))
        name, act = data.draw(st.sampled_from(choices), label="disruption")
        event(f"disruption {name}")
        act()

    # --- the user ---------------------------------------------------------------------

    def wake_word(self, frame: int) -> None:
        self.feed(s.WakeWordDetected("hey_jarvis", frame))

    def button(self, button: str) -> None:
        self.feed(s.ButtonPressed(button))

    def shutdown(self) -> None:
        self.feed(s.EndRequested("shutdown"))

    # --- the socket and the server -----------------------------------------------------

    def disconnect(self, unrecoverable: bool, cause: str) -> None:
        self.connected = False
        self.server_active = None
        self.close_rounds()
        self.feed(s.Disconnected("lost", unrecoverable, cause))

    def response_failed(self, error: tuple[str, str]) -> None:
        rid = self.server_active
        assert rid
        self.server_active = None
        self.feed(p.ResponseDone(rid, "failed", (), *error))

    def server_error(self, error: tuple[str, str | None], echo: bool) -> None:
        event_id = None
        if echo and error[1] == "conversation_already_has_active_response" and self.creates:
            # The server refusing our last response.create: it never counted.
            event_id, turn = list(self.creates.items())[-1]
            if turn.creates:
                turn.creates -= 1
                del self.creates[event_id]
        self.feed(p.ServerError(error[0], error[1], "m", None, event_id))

    def stray_event(self, kind: str) -> None:
        """Events of an old response or a closed socket, which must change nothing."""
        inp = {"session.updated": p.SessionUpdated(), "speech_stopped": p.SpeechStopped("u"),
               "late_audio": p.AudioDelta("old", "x", 0, b"\x00\x00"),
               "late_done": p.ResponseDone("old", "cancelled", ()),
               # Transcripts come when they are ready: before or after the answer began.
               "heard": p.InputTranscript("u", "what time is it"),
               "said": p.TranscriptDone(self.server_active or "r0", "x", "It is noon."),
               "said_old": p.TranscriptDone("old", "x", "Earlier.")}[kind]
        before = self.s.state
        actions = self.feed(inp)
        if kind in ("heard", "said", "said_old"):  # a transcript is a log line, nothing more
            assert self.s.state is before
            assert all(isinstance(a, (s.StartTimer, s.CancelTimer)) for a in actions), actions

    # --- the speaker, the tools, the clock -----------------------------------------------

    def drained_twice_or_early(self, rid: str) -> None:
        if rid in self.finished or rid in self.unheard:
            return  # that would be a real drain; the drained rule covers it
        self.feed(s.PlaybackDrained(rid))

    def flushed(self, ms: int) -> None:
        self.feed(s.PlaybackFlushed({r: ms for r in self.responses[-2:]}))

    def timer(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.timers)))
        token = self.timers.pop(name)
        self.feed(s.TimerFired(name, token))

    def stale_timer(self, data: st.DataObject) -> None:
        name, token = data.draw(st.sampled_from(self.stale))
        before = self.s.state
        assert self.feed(s.TimerFired(name, token)) == []
        assert self.s.state is before

    # --- coming to rest ------------------------------------------------------------------

    def settle(self) -> None:
        """No more user or server: tools finish, audio drains, timers run out."""
        for _ in range(200):
            if self.tools:
                call = sorted(self.tools)[0]
                del self.tools[call]
                self.feed(s.ToolDone(call, "{}"))
            elif self.finished:
                rid = sorted(self.finished)[0]
                self.finished.discard(rid)
                self.unheard.discard(rid)
                self.feed(s.PlaybackDrained(rid))
            elif self.timers:
                name = sorted(self.timers)[0]
                self.feed(s.TimerFired(name, self.timers.pop(name)))
            else:
                break
        assert self.s.state in (State.IDLE, State.LISTENING), self.s.state
        # 3. never zero: every round whose outputs all went out, on a connection that
        # stayed up, got its response.create, unless the user barged in on it.
        if self.connected and self.s.conv is not None:
            for t in self.turns:
                if t.open and t.outputs == t.calls and not t.barged:
                    assert t.creates == 1, t.rid


# 150 runs of up to 40 steps in the suite (about 6,000 inputs); bench/session_soak.py
# sets SPEAKERD_SOAK_EXAMPLES for a long run.
SessionMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("SPEAKERD_SOAK_EXAMPLES", "150")),
    stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestSessionInvariants = SessionMachine.TestCase


class VoiceSessionMachine(SessionMachine):
    SETTINGS = s.Settings(audio_margin_seconds=MARGIN, barge_in="voice")


VoiceSessionMachine.TestCase.settings = SessionMachine.TestCase.settings
TestVoiceSessionInvariants = VoiceSessionMachine.TestCase
