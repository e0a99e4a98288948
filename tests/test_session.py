"""The conversation state machine: no loop, no mocks; inputs in, exact actions out."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from speakerd import session as s
from speakerd.realtime import protocol as p
from speakerd.session import State
from speakerd.session.conversation import Turn

SETTINGS = s.Settings(follow_up_seconds=8.0, follow_up_guard_ms=150, max_session_seconds=600,
                      audio_margin_seconds=2.0)


def pcm(ms: int) -> bytes:
    return b"\x01\x00" * (24 * ms)


def brief(actions: list[object]) -> list[tuple]:
    """Actions without event ids, timer tokens or PCM, for exact comparison."""
    out: list[tuple] = []
    for a in actions:
        match a:
            case s.Send(event=e):
                fields = {k: v for k, v in e.items() if k not in ("type", "event_id")}
                if e["type"] == "conversation.item.create":
                    fields = {"call_id": e["item"]["call_id"], "output": e["item"]["output"]}
                out.append(("send", e["type"], *sorted(fields.items())))
            case s.StartTimer(name=n, seconds=sec):
                out.append(("timer", n, round(sec, 3)))
            case s.CancelTimer(name=n):
                out.append(("cancel", n))
            case s.PlayAudio(pcm=data, response_id=rid):
                out.append(("play", rid, len(data) // 48))
            case s.SetStatus():
                continue  # its text is for people; SetLeds carries the state
            case s.ConversationStarted() | s.ConversationEnded():
                continue  # for the record: TestRecord checks them
            case _:
                out.append((type(a).__name__, *tuple(getattr(a, f) for f in a.__slots__)))
    return out


class Conv:
    """A session plus helpers that walk it to a given point of a conversation."""

    def __init__(self, **settings) -> None:
        self.s = s.Session(dataclasses.replace(SETTINGS, **settings), strict=True)
        self.timers: dict[str, int] = {}

    def feed(self, inp: object) -> list[tuple]:
        actions = self.s.handle(inp)
        for a in actions:
            if isinstance(a, s.StartTimer):
                self.timers[a.name] = a.token
        return brief(actions)

    def fire(self, name: str) -> list[tuple]:
        return self.feed(s.TimerFired(name, self.timers[name]))

    def listening(self) -> None:
        self.feed(s.WakeWordDetected("hey_jarvis", 40))
        self.feed(s.SessionReady())
        assert self.s.state is State.LISTENING

    def responding(self, rid: str = "r1", audio_ms: int = 0) -> None:
        self.listening()
        self.feed(p.AudioCommitted("u1"))
        self.feed(p.ResponseCreated(rid))
        self.feed(p.OutputItemAdded(rid, f"item_{rid}", "message"))
        if audio_ms:
            self.feed(p.AudioDelta(rid, f"item_{rid}", 0, pcm(audio_ms)))
        assert self.s.state is State.RESPONDING

    def playing(self, rid: str = "r1", audio_ms: int = 3000) -> None:
        self.responding(rid, audio_ms)
        self.feed(p.ResponseDone(rid, "completed", ()))
        assert self.s.state is State.AUDIO_PLAYING


END = [("cancel", "session"), ("StreamMic", False, -1), ("CloseConnection",),
       ("ResetWakeWord",), ("PlayCue", "end"), ("SetLeds", "idle")]


class TestStart:
    def test_wake_word_connects_cues_and_streams_from_after_the_wake_word(self):
        c = Conv()
        assert c.feed(s.WakeWordDetected("hey_jarvis", 40)) == [
            ("PlayCue", "wake"), ("Connect",), ("StreamMic", True, 40),
            ("timer", "connect", 8.0), ("timer", "session", 600.0),
            ("SetLeds", "connecting")]

    def test_talk_button_starts_without_a_wake_word(self):
        c = Conv()
        assert ("Connect",) in c.feed(s.ButtonPressed("talk"))
        assert c.s.state is State.CONNECTING

    def test_ready_starts_the_follow_up_window(self):
        c = Conv()
        c.feed(s.WakeWordDetected("hey_jarvis"))
        assert c.feed(s.SessionReady()) == [("cancel", "connect"), ("timer", "follow_up", 8.0),
                                            ("SetLeds", "listening")]


class TestTurns:
    def test_speech_committed_closes_the_mic_and_thinks(self):
        c = Conv()
        c.listening()
        assert c.feed(p.SpeechStarted("u1")) == [("cancel", "follow_up")]
        assert c.feed(p.AudioCommitted("u1")) == [
            ("StreamMic", False, -1), ("timer", "response", 20.0), ("SetLeds", "thinking")]

    def test_audio_deltas_play_and_response_done_waits_for_the_drain(self):
        c = Conv()
        c.responding("r1")
        assert c.feed(p.AudioDelta("r1", "item_r1", 0, pcm(1000))) == [
            ("play", "r1", 1000), ("timer", "response", 20.0)]
        assert c.feed(p.ResponseDone("r1", "completed", ())) == [
            ("cancel", "response"), ("FinishAudio", "r1"), ("timer", "drain", 3.0),
            ("SetLeds", "audio_playing")]

    def test_drain_reopens_the_mic_after_the_guard_for_a_follow_up(self):
        c = Conv()
        c.playing("r1", 1000)
        assert c.feed(s.PlaybackDrained("r1")) == [
            ("cancel", "drain"), ("timer", "follow_up", 8.0), ("timer", "mic_guard", 0.15),
            ("SetLeds", "listening")]
        assert c.fire("mic_guard") == [("StreamMic", True, -1)]

    def test_second_turn_needs_no_wake_word(self):
        c = Conv()
        c.playing("r1", 500)
        c.feed(s.PlaybackDrained("r1"))
        c.fire("mic_guard")
        assert c.feed(p.AudioCommitted("u2"))[-1] == ("SetLeds", "thinking")
        assert c.feed(p.ResponseCreated("r2"))[-1] == ("SetLeds", "responding")

    def test_response_without_audio_goes_straight_to_the_follow_up(self):
        c = Conv()
        c.responding("r1")
        assert c.feed(p.ResponseDone("r1", "completed", ())) == [
            ("cancel", "response"), ("timer", "follow_up", 8.0), ("timer", "mic_guard", 0.15),
            ("SetLeds", "listening")]

    def test_follow_up_window_ends_the_conversation(self):
        c = Conv()
        c.listening()
        assert c.fire("follow_up") == END
        assert c.s.state is State.IDLE

    def test_audio_of_another_response_is_not_played(self):
        c = Conv()
        c.responding("r2")
        assert c.feed(p.AudioDelta("r1", "old", 0, pcm(100))) == []


class TestFailureOne:
    """conversation_already_has_active_response is logged and survived."""

    def test_active_response_error_changes_nothing(self, caplog):
        c = Conv()
        c.responding("r1", 500)
        err = p.ServerError("invalid_request_error", "conversation_already_has_active_response",
                            "Conversation already has an active response", None, "sd_9")
        assert c.feed(err) == []
        assert c.s.state is State.RESPONDING
        assert "server refused event sd_9" in caplog.text
        assert c.feed(p.ResponseDone("r1", "completed", ()))[-1] == ("SetLeds", "audio_playing")

    @pytest.mark.parametrize("state", ["listening", "thinking", "playing"])
    def test_request_errors_in_any_state_are_survived(self, state):
        c = Conv()
        {"listening": c.listening, "thinking": lambda: (c.listening(), c.feed(
            p.AudioCommitted("u"))), "playing": c.playing}[state]()
        before = c.s.state
        assert c.feed(p.ServerError("invalid_request_error", "invalid_value", "x", None,
                                    None)) == []
        assert c.s.state is before

    def test_unrecoverable_error_ends_with_an_error_cue_after_the_drain(self, caplog):
        c = Conv()
        c.playing("r1", 800)
        assert c.feed(p.ServerError("invalid_request_error", "invalid_api_key", "bad key",
                                    None, None)) == [("CloseConnection",)]
        assert c.s.state is State.AUDIO_PLAYING  # still playing what was said
        assert c.feed(s.Disconnected("closed by speakerd")) == []
        out = c.feed(s.PlaybackDrained("r1"))
        assert out[-2:] == [("timer", "error", 3.0), ("SetLeds", "error")]
        assert ("SayPhrase", p.KEY_REFUSED, "error") in out  # said after the answer
        assert "the API key was refused: check /etc/speakerd/openai.key" in caplog.text
        assert c.fire("error") == [("SetLeds", "idle")]


class TestFailureTwo:
    """After function calls: exactly one response.create, after every output."""

    def test_two_calls_two_outputs_then_one_response_create(self):
        c = Conv()
        c.responding("r1")
        calls = (p.FunctionCall("c1", "get_time", "{}"),
                 p.FunctionCall("c2", "get_volume", "{}"))
        assert c.feed(p.ResponseDone("r1", "completed", calls)) == [
            ("cancel", "response"), ("RunTool", calls[0]), ("RunTool", calls[1]),
            ("timer", "response", 20.0), ("SetLeds", "thinking")]
        assert c.feed(s.ToolDone("c2", '{"percent": 40}')) == [
            ("send", "conversation.item.create", ("call_id", "c2"),
             ("output", '{"percent": 40}'))]
        assert c.feed(s.ToolDone("c1", '{"time": "12:00"}')) == [
            ("send", "conversation.item.create", ("call_id", "c1"),
             ("output", '{"time": "12:00"}')),
            ("send", "response.create"), ("timer", "response", 20.0)]
        assert c.feed(s.ToolDone("c1", "{}")) == []  # a duplicate result sends nothing
        assert c.feed(p.ResponseCreated("r2"))[-1] == ("SetLeds", "responding")

    def test_response_create_waits_while_another_response_is_active(self):
        c = Conv()
        c.responding("r1")
        call = p.FunctionCall("c1", "get_time", "{}")
        c.feed(p.ResponseDone("r1", "completed", (call,)))
        c.feed(p.ResponseCreated("r2"))  # the server started another one meanwhile
        out = c.feed(s.ToolDone("c1", "{}"))
        assert ("send", "response.create") not in out
        assert c.feed(p.ResponseDone("r2", "completed", ()))[:2] == [
            ("cancel", "response"), ("send", "response.create")]

    def test_tools_finishing_during_playback_create_the_next_response_at_once(self):
        c = Conv()
        c.responding("r1", 1500)
        call = p.FunctionCall("c1", "get_time", "{}")
        c.feed(p.ResponseDone("r1", "completed", (call,)))
        assert c.s.state is State.AUDIO_PLAYING
        out = c.feed(s.ToolDone("c1", '"noon"'))
        assert out[-1] == ("send", "response.create")
        c.feed(p.ResponseCreated("r2"))
        assert c.s.state is State.RESPONDING
        # r1's drain while r2 streams is not the end of the turn.
        assert c.feed(s.PlaybackDrained("r1")) == [("cancel", "drain")]
        assert c.s.state is State.RESPONDING

    def test_drain_with_tools_outstanding_waits_thinking_not_listening(self):
        c = Conv()
        c.responding("r1", 500)
        c.feed(p.ResponseDone("r1", "completed", (p.FunctionCall("c1", "slow", "{}"),)))
        assert c.feed(s.PlaybackDrained("r1"))[-1] == ("SetLeds", "thinking")

    def test_rejected_response_create_is_sent_again_after_the_active_one(self):
        c = Conv()
        c.responding("r1")
        c.feed(p.ResponseDone("r1", "completed", (p.FunctionCall("c1", "t", "{}"),)))
        out = c.s.handle(s.ToolDone("c1", "{}"))
        create = next(a.event for a in out if isinstance(a, s.Send)
                      and a.event["type"] == "response.create")
        c.feed(p.ServerError("invalid_request_error", "conversation_already_has_active_response",
                             "busy", None, create["event_id"]))
        c.feed(p.ResponseCreated("r9"))
        assert ("send", "response.create") in c.feed(p.ResponseDone("r9", "completed", ()))


class TestFailureThree:
    """The session never ends while the answer is still playing."""

    @pytest.mark.parametrize("end", ["timer", "tool", "button", "shutdown"])
    def test_end_requested_while_playing_waits_for_drain(self, end):
        c = Conv()
        c.playing("r1", 4000)
        if end == "timer":
            out = c.fire("session")
        elif end == "button":
            out = c.feed(s.ButtonPressed("talk_long"))
        elif end == "shutdown":
            out = c.feed(s.EndRequested("shutdown"))
        else:
            c.s.conv.turns.append(Turn("r0", {"c9"}))
            out = c.feed(s.ToolDone("c9", "{}", end_conversation=True))
            out = [a for a in out if a[0] != "send"]
        assert out == []
        assert c.s.state is State.AUDIO_PLAYING
        end = END[1:] if end == "timer" else END  # a timer that fired has nothing to cancel
        assert c.feed(s.PlaybackDrained("r1")) == [("cancel", "drain"), *end]

    def test_end_requested_while_responding_waits_for_response_and_drain(self):
        c = Conv()
        c.responding("r1", 2000)
        assert c.feed(s.EndRequested("shutdown")) == []
        assert c.feed(p.ResponseDone("r1", "completed", ()))[-1] == ("SetLeds",
                                                                     "audio_playing")
        assert c.feed(s.PlaybackDrained("r1"))[-1] == ("SetLeds", "idle")

    def test_end_requested_while_thinking_is_carried_out_after_the_answer(self):
        c = Conv()
        c.listening()
        c.feed(p.AudioCommitted("u1"))
        assert c.feed(s.EndRequested("shutdown")) == []
        c.feed(p.ResponseCreated("r1"))
        c.feed(p.AudioDelta("r1", "i", 0, pcm(300)))
        c.feed(p.ResponseDone("r1", "completed", ()))
        assert c.s.state is State.AUDIO_PLAYING
        assert c.feed(s.PlaybackDrained("r1"))[-1] == ("SetLeds", "idle")

    def test_end_while_listening_is_immediate(self):
        c = Conv()
        c.listening()
        assert c.feed(s.EndRequested("shutdown")) == [("cancel", "session"),
                                                      ("cancel", "follow_up"), *END[1:]]

    def test_disconnect_mid_answer_plays_what_came_then_ends(self):
        c = Conv()
        c.responding("r1", 1200)
        assert c.feed(s.Disconnected("connection lost without a close frame")) == [
            ("FinishAudio", "r1"), ("timer", "drain", 3.2), ("cancel", "response"),
            ("SetLeds", "audio_playing")]
        # What came has played; then the person hears that the service failed.
        assert c.feed(s.PlaybackDrained("r1")) == [("cancel", "drain"), *END[:-1],
                                                  ("SayPhrase", p.FAILED, None), END[-1]]

    def test_disconnect_while_listening_is_no_failure_to_speak_of(self):
        c = Conv()
        c.listening()
        out = c.feed(s.Disconnected("server closed the connection (code 1000)"))
        assert out[-1] == ("SetLeds", "idle")
        assert not [a for a in out if a[0] == "SayPhrase"]


class TestFailureFour:
    """The drain deadline comes from the audio queued, never a fixed number."""

    @pytest.mark.parametrize("seconds", [1, 45, 300])
    def test_deadline_is_queued_audio_plus_margin(self, seconds):
        c = Conv()
        c.responding("r1")
        for _ in range(seconds):
            c.feed(p.AudioDelta("r1", "item_r1", 0, pcm(1000)))
        out = c.feed(p.ResponseDone("r1", "completed", ()))
        assert ("timer", "drain", seconds + 2.0) in out

    def test_a_45_second_answer_is_not_cut(self):
        c = Conv()
        c.responding("r1")
        for _ in range(450):
            c.feed(p.AudioDelta("r1", "item_r1", 0, pcm(100)))
        c.feed(p.ResponseDone("r1", "completed", ()))
        # No input but the drain moves it on: no timer shorter than the audio exists.
        assert all(sec >= 45 for name, sec in
                   [(a[1], a[2]) for a in c.feed(s.EndRequested("x")) if a[0] == "timer"])
        assert c.s.state is State.AUDIO_PLAYING
        assert c.s._tokens.keys() >= {"drain"}
        assert c.feed(s.PlaybackDrained("r1"))[-1] == ("SetLeds", "idle")

    def test_missing_drain_is_logged_flushed_and_recovered(self, caplog):
        c = Conv()
        c.playing("r1", 2500)
        assert c.fire("drain") == [("FlushPlayback",), ("timer", "follow_up", 8.0),
                                   ("timer", "mic_guard", 0.15), ("SetLeds", "listening")]
        assert "did not report the end of 2500 ms of audio" in caplog.text
        assert c.feed(s.PlaybackDrained("r1")) == []  # too late now: ignored

    def test_deadline_covers_every_response_still_owed(self):
        c = Conv()
        c.responding("r1", 3000)
        c.feed(p.ResponseDone("r1", "completed", (p.FunctionCall("c1", "t", "{}"),)))
        c.feed(s.ToolDone("c1", "{}"))
        c.feed(p.ResponseCreated("r2"))
        c.feed(p.AudioDelta("r2", "i2", 0, pcm(2000)))
        out = c.feed(p.ResponseDone("r2", "completed", ()))
        assert ("timer", "drain", 7.0) in out  # 3 s of r1 still owed + 2 s of r2 + margin


class TestBargeIn:
    def test_wake_word_while_responding_cancels_flushes_and_truncates(self):
        c = Conv()
        c.responding("r1", 3000)
        assert c.feed(s.WakeWordDetected("hey_jarvis", 300)) == [
            ("send", "response.cancel"), ("FlushPlayback",), ("cancel", "response"),
            ("StreamMic", True, 300), ("timer", "follow_up", 8.0), ("SetLeds", "listening")]
        assert c.feed(s.PlaybackFlushed({"r1": 1234})) == [
            ("send", "conversation.item.truncate", ("audio_end_ms", 1234),
             ("content_index", 0), ("item_id", "item_r1"))]
        # The cancelled response's end arrives later and is only bookkeeping.
        assert c.feed(p.ResponseDone("r1", "cancelled", ())) == []
        assert c.s.conv.active is None

    def test_talk_button_while_playing_flushes_without_cancel(self):
        c = Conv()
        c.playing("r1", 3000)
        out = c.feed(s.ButtonPressed("talk"))
        assert ("send", "response.cancel") not in out
        assert out[:2] == [("FlushPlayback",), ("cancel", "drain")]
        assert c.s.state is State.LISTENING

    def test_barge_in_withdraws_an_earlier_end_request(self):
        c = Conv()
        c.playing("r1", 3000)
        c.feed(s.EndRequested("shutdown"))
        c.feed(s.WakeWordDetected("hey_jarvis"))
        assert c.s.conv.end is None


class TestVoiceBargeIn:
    """barge_in = "voice": the echo-cancelled mic stays open while the answer plays."""

    def test_the_mic_opens_when_the_answer_starts_and_closes_only_while_thinking(self):
        c = Conv(barge_in="voice")
        c.listening()
        assert ("StreamMic", False, -1) in c.feed(p.AudioCommitted("u1"))
        assert c.feed(p.ResponseCreated("r1")) == [
            ("cancel", "response"), ("StreamMic", True, -1), ("timer", "response", 20.0),
            ("SetLeds", "responding")]

    def test_speech_over_the_answer_barges_in_like_the_wake_word(self):
        c = Conv(barge_in="voice")
        c.responding("r1", 3000)
        assert c.feed(s.VoiceHeard()) == [
            ("send", "response.cancel"), ("FlushPlayback",), ("cancel", "response"),
            ("timer", "follow_up", 8.0), ("SetLeds", "listening")]
        assert c.feed(s.PlaybackFlushed({"r1": 1234})) == [
            ("send", "conversation.item.truncate", ("audio_end_ms", 1234),
             ("content_index", 0), ("item_id", "item_r1"))]
        assert c.feed(p.ResponseDone("r1", "cancelled", ())) == []
        # The server heard the same speech: its turn goes on as any other.
        c.feed(p.SpeechStarted("u2"))
        c.feed(p.AudioCommitted("u2"))
        assert c.s.state is State.THINKING

    def test_speech_while_playing_out_flushes_without_cancel(self):
        c = Conv(barge_in="voice")
        c.playing("r1", 3000)
        out = c.feed(s.VoiceHeard())
        assert ("send", "response.cancel") not in out
        assert out[:2] == [("FlushPlayback",), ("cancel", "drain")]
        assert not any(a[0] == "StreamMic" for a in out)  # it never closed
        assert c.s.state is State.LISTENING

    def test_the_servers_own_vad_events_over_the_answer_change_nothing(self):
        # interrupt_response is off: the server does not cancel; its speech events
        # over the answer are the same speech the local detector judges.
        c = Conv(barge_in="voice")
        c.responding("r1", 3000)
        for inp in (p.SpeechStarted("u2"), p.SpeechStopped("u2"), p.AudioCommitted("u2")):
            assert c.feed(inp) == []
        assert c.s.state is State.RESPONDING

    def test_after_the_drain_the_mic_is_not_reopened_nor_guarded(self):
        c = Conv(barge_in="voice")
        c.playing("r1", 3000)
        assert c.feed(s.PlaybackDrained("r1")) == [
            ("cancel", "drain"), ("timer", "follow_up", 8.0), ("SetLeds", "listening")]

    def test_a_tool_round_closes_the_mic_while_thinking(self):
        c = Conv(barge_in="voice")
        c.responding("r1")
        out = c.feed(p.ResponseDone("r1", "completed", (p.FunctionCall("c1", "get_time",
                                                                        "{}"),)))
        assert ("StreamMic", False, -1) in out
        assert c.s.state is State.THINKING

    @pytest.mark.parametrize("state", ["listening", "thinking"])
    def test_speech_when_nothing_plays_is_not_a_barge_in(self, state):
        c = Conv(barge_in="voice")
        c.listening()
        if state == "thinking":
            c.feed(p.AudioCommitted("u1"))
        assert c.feed(s.VoiceHeard()) == []

    def test_a_barge_in_after_mute_and_unmute_opens_the_mic_again(self):
        c = Conv(barge_in="voice")
        c.responding("r1", 3000)
        assert ("StreamMic", False, -1) in c.feed(s.ButtonPressed("mute"))
        c.feed(s.ButtonPressed("mute"))  # unmuted; the conversation still ends after it
        out = c.feed(s.ButtonPressed("talk"))
        assert ("StreamMic", True, -1) in out
        assert c.s.conv.end is None

    def test_in_wake_word_mode_the_mic_stays_closed_over_the_answer(self):
        c = Conv()
        c.listening()
        c.feed(p.AudioCommitted("u1"))
        assert not any(a[0] == "StreamMic" for a in c.feed(p.ResponseCreated("r1")))


def output(call_id: str, text: str) -> tuple:
    return ("send", "conversation.item.create", ("call_id", call_id), ("output", text))


LISTEN_AGAIN = [("cancel", "response"), ("timer", "follow_up", 8.0),
                ("timer", "mic_guard", 0.15), ("SetLeds", "listening")]


class TestBargeInOnAToolRound:
    """Invariant 3's exception: a barged-in response's outputs go out, no response.create.

    The user has moved on, so the model must not speak a stale tool result after
    (or instead of) answering the new question; in whatever order things happen.
    """

    TIMER = p.FunctionCall("c1", "set_timer", '{"minutes": 5}')

    def barged_in_before_its_end(self, c: Conv) -> None:
        c.responding("r1", 2000)
        c.feed(s.WakeWordDetected("hey_jarvis", 300))
        assert c.feed(p.ResponseDone("r1", "cancelled", (self.TIMER,))) == [
            ("RunTool", self.TIMER)]

    def test_barge_in_before_response_done_sends_the_output_but_no_response_create(self):
        c = Conv()
        self.barged_in_before_its_end(c)
        assert c.feed(s.ToolDone("c1", '"set"')) == [output("c1", '"set"')]
        assert c.s.state is State.LISTENING
        c.feed(p.AudioCommitted("u2"))
        c.feed(p.ResponseCreated("r2"))
        assert c.feed(p.ResponseDone("r2", "completed", ())) == LISTEN_AGAIN

    def test_barge_in_while_its_answer_plays_sends_the_output_but_no_response_create(self):
        c = Conv()
        c.responding("r1", 2000)
        c.feed(p.ResponseDone("r1", "completed", (self.TIMER,)))
        assert c.s.state is State.AUDIO_PLAYING
        c.feed(s.ButtonPressed("talk"))
        assert c.feed(s.ToolDone("c1", '"set"')) == [output("c1", '"set"')]
        c.feed(p.AudioCommitted("u2"))
        c.feed(p.ResponseCreated("r2"))
        assert c.feed(p.ResponseDone("r2", "completed", ())) == LISTEN_AGAIN

    def test_tools_finishing_while_the_new_question_is_answered_send_only_their_output(self):
        c = Conv()
        self.barged_in_before_its_end(c)
        c.feed(p.AudioCommitted("u2"))
        c.feed(p.ResponseCreated("r2"))
        assert c.feed(s.ToolDone("c1", '"set"')) == [output("c1", '"set"')]
        assert c.feed(p.ResponseDone("r2", "completed", ())) == LISTEN_AGAIN

    def test_tools_finishing_after_the_new_answer_send_only_their_output(self):
        c = Conv()
        self.barged_in_before_its_end(c)
        c.feed(p.AudioCommitted("u2"))
        c.feed(p.ResponseCreated("r2"))
        # Not THINKING "waiting for tool results": nothing is owed to the old question.
        assert c.feed(p.ResponseDone("r2", "completed", ())) == LISTEN_AGAIN
        assert c.feed(s.ToolDone("c1", '"set"')) == [output("c1", '"set"')]
        assert c.s.state is State.LISTENING

    def test_a_response_create_refused_after_the_barge_in_is_not_sent_again(self):
        c = Conv()
        c.responding("r1", 2000)
        c.feed(p.ResponseDone("r1", "completed", (self.TIMER,)))
        out = c.s.handle(s.ToolDone("c1", '"set"'))
        create = next(a.event for a in out if isinstance(a, s.Send)
                      and a.event["type"] == "response.create")
        c.feed(s.WakeWordDetected("hey_jarvis", 300))
        assert c.feed(p.ServerError("invalid_request_error",
                                    "conversation_already_has_active_response", "busy", None,
                                    create["event_id"])) == []
        c.feed(p.AudioCommitted("u2"))
        c.feed(p.ResponseCreated("r2"))
        assert c.feed(p.ResponseDone("r2", "completed", ())) == LISTEN_AGAIN

    def test_the_new_questions_own_tool_round_still_gets_its_response_create(self):
        c = Conv()
        self.barged_in_before_its_end(c)
        c.feed(p.AudioCommitted("u2"))
        c.feed(p.ResponseCreated("r2"))
        volume = p.FunctionCall("c2", "get_volume", "{}")
        assert c.feed(p.ResponseDone("r2", "completed", (volume,))) == [
            ("cancel", "response"), ("RunTool", volume), ("timer", "response", 20.0),
            ("SetLeds", "thinking")]
        assert c.feed(s.ToolDone("c2", '{"percent": 40}')) == [
            output("c2", '{"percent": 40}'), ("send", "response.create"),
            ("timer", "response", 20.0)]
        assert c.feed(s.ToolDone("c1", '"set"')) == [output("c1", '"set"')]
        assert c.feed(p.ResponseCreated("r3"))[-1] == ("SetLeds", "responding")


class TestMute:
    def test_mute_in_idle_disables_wake_word_and_shows_it(self):
        c = Conv()
        assert c.feed(s.ButtonPressed("mute")) == [
            ("SetWakeWord", False), ("PlayCue", "end"), ("SetLeds", "muted")]
        assert c.feed(s.WakeWordDetected("hey_jarvis")) == []
        # The talk button gets an answer: the microphone is off.
        assert c.feed(s.ButtonPressed("talk")) == [("SayPhrase", p.MUTED, None)]
        assert c.s.state is State.IDLE
        assert c.feed(s.ButtonPressed("mute")) == [
            ("SetWakeWord", True), ("PlayCue", "wake"), ("SetLeds", "idle")]

    def test_mute_during_a_conversation_closes_the_mic_and_ends_after_the_answer(self):
        c = Conv()
        c.playing("r1", 1000)
        assert c.feed(s.ButtonPressed("mute")) == [
            ("SetWakeWord", False), ("PlayCue", "end"), ("StreamMic", False, -1)]
        out = c.feed(s.PlaybackDrained("r1"))
        assert out[-1] == ("SetLeds", "muted")
        assert c.s.state is State.IDLE

    def test_mute_or_unmute_mid_answer_is_in_the_status_at_once(self):
        c = Conv()
        c.playing("r1", 1000)
        state = c.s.state
        assert s.SetStatus(s.status_text(state, True)) in c.s.handle(s.ButtonPressed("mute"))
        assert c.s.state is state  # the end waits for the drain; the status does not
        assert s.SetStatus(s.status_text(state, False)) in c.s.handle(s.ButtonPressed("mute"))


class TestConnectFailures:
    def test_unreachable_service_is_an_error_then_idle(self):
        c = Conv()
        c.feed(s.WakeWordDetected("hey_jarvis"))
        out = c.feed(s.Disconnected("no connection after 5 attempts"))
        assert out[-2:] == [("timer", "error", 3.0), ("SetLeds", "error")]
        assert ("SayPhrase", p.UNREACHABLE, "error") in out

    @pytest.mark.parametrize("cause", [p.UNREACHABLE, p.KEY_REFUSED, p.QUOTA, p.FAILED])
    def test_a_definite_failure_is_told_at_once_with_its_cause(self, cause):
        c = Conv()
        c.feed(s.WakeWordDetected("hey_jarvis"))
        out = c.feed(s.Disconnected("refused", unrecoverable=True, cause=cause))
        assert out == [("cancel", "connect"), ("cancel", "session"), ("StreamMic", False, -1),
                       ("CloseConnection",), ("ResetWakeWord",), ("SayPhrase", cause, "error"),
                       ("timer", "error", 3.0), ("SetLeds", "error")]

    def test_a_slow_connection_is_told_after_8_seconds(self, caplog):
        c = Conv()
        assert ("timer", "connect", 8.0) in c.feed(s.WakeWordDetected("hey_jarvis"))
        with caplog.at_level(logging.INFO, logger="speakerd.session"):
            out = c.fire("connect")
        assert out[-1] == ("SetLeds", "error")
        assert ("CloseConnection",) in out and ("SayPhrase", p.UNREACHABLE, "error") in out
        assert "did not answer within 8 s" in caplog.text

    def test_silent_server_while_responding_is_not_waited_on_forever(self):
        c = Conv()
        c.responding("r1", 500)
        out = c.fire("response")
        assert ("CloseConnection",) in out and ("FinishAudio", "r1") in out
        assert c.feed(s.PlaybackDrained("r1"))[-1] == ("SetLeds", "idle")


class TestLogging:
    def test_every_state_change_logs_once_with_its_cause_and_field(self, caplog):
        c = Conv()
        with caplog.at_level(logging.INFO, logger="speakerd.session"):
            c.playing("r1", 100)
            c.feed(s.PlaybackDrained("r1"))
        changes = [r for r in caplog.records if hasattr(r, "SPEAKERD_STATE")]
        assert [r.SPEAKERD_STATE for r in changes] == [
            "connecting", "listening", "thinking", "responding", "audio_playing",
            "listening"]
        assert changes[0].getMessage() == "idle -> connecting: wake word hey_jarvis"
        assert changes[-1].getMessage() == "audio_playing -> listening: response r1 played out"


class TestTranscripts:
    @staticmethod
    def lines(caplog) -> list[tuple[str, str, str, str]]:
        return [(r.getMessage(), r.SPEAKERD_EVENT, r.SPEAKERD_SESSION, r.SPEAKERD_TURN)
                for r in caplog.records if getattr(r, "SPEAKERD_EVENT", "") in ("heard",
                                                                                 "said")]

    def test_each_turn_logs_what_was_heard_and_said_even_when_the_transcript_is_late(
            self, caplog):
        c = Conv(transcripts=True)
        with caplog.at_level(logging.INFO, logger="speakerd.session"):
            c.playing("r1", 500)  # turn 1 is item u1; its transcript has not come yet
            assert c.feed(p.TranscriptDone("r1", "item_r1", "It is noon.")) == []
            c.feed(s.PlaybackDrained("r1"))
            c.feed(p.AudioCommitted("u2"))  # turn 2
            c.feed(p.ResponseCreated("r2"))
            # Late: turn 1's words arrive while turn 2 is being answered.
            assert c.feed(p.InputTranscript("u1", "what time is it")) == []
            c.feed(p.InputTranscript("u2", "and the date"))
            c.feed(p.TranscriptDone("r2", "item_r2", "It is the first."))
        assert self.lines(caplog) == [
            ("said: It is noon.", "said", "1", "1"),
            ("heard: what time is it", "heard", "1", "1"),
            ("heard: and the date", "heard", "1", "2"),
            ("said: It is the first.", "said", "1", "2")]

    def test_nothing_is_logged_unless_asked_for(self, caplog):
        c = Conv()
        with caplog.at_level(logging.DEBUG, logger="speakerd.session"):
            c.playing("r1", 500)
            c.feed(p.InputTranscript("u1", "what time is it"))
            c.feed(p.TranscriptDone("r1", "item_r1", "It is noon."))
        assert self.lines(caplog) == []
        assert "what time is it" not in caplog.text and "noon" not in caplog.text

    def test_a_transcript_while_responding_keeps_the_response_alive(self):
        c = Conv(transcripts=True)
        c.responding("r1", 500)
        assert c.feed(p.TranscriptDone("r1", "item_r1", "Okay.")) == [("timer", "response",
                                                                     20.0)]


IO_MODULES = {"asyncio", "time", "socket", "alsaaudio", "websockets", "gpiozero",
              "threading", "select", "subprocess", "datetime"}


def imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth, by its full name (`from a.b import c`
    gives a.b, or a.b.c when c is a module)."""
    tree = ast.parse(path.read_text())
    names = {alias.name for n in ast.walk(tree) if isinstance(n, ast.Import)
             for alias in n.names}
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom):
            assert n.level == 0 and n.module, f"{path.name}: a relative import"
            for alias in n.names:
                full = f"{n.module}.{alias.name}"
                names.add(full if full in ("speakerd.realtime.protocol",) else n.module)
    return names


def test_session_module_imports_nothing_that_does_io():
    modules = sorted(Path(s.__file__).parent.glob("*.py"))
    assert {m.name for m in modules} >= {"__init__.py", "events.py", "rules.py"}
    for module in modules:
        full = imports(module)
        imported = {name.split(".")[0] for name in full}
        assert not imported & IO_MODULES, module.name
        assert imported <= {"__future__", "enum", "logging", "collections", "dataclasses",
                            "typing", "speakerd"}, module.name
        # Of speakerd itself, only the protocol's events and the session's own modules.
        ours = {name for name in full if name.split(".")[0] == "speakerd"}
        assert all(name == "speakerd.realtime.protocol" or name.startswith("speakerd.session.")
                   for name in ours), (module.name, ours)
    # ...and the protocol module imports nothing that does I/O either.
    protocol = Path(p.__file__)
    full = imports(protocol)
    assert not {name.split(".")[0] for name in full} & IO_MODULES
    assert {name for name in full if name.split(".")[0] == "speakerd"} <= {"speakerd.errors"}
    assert imports(protocol.parent.parent / "errors.py") <= {"__future__"}
    assert all(name.split(".")[0] in sys.stdlib_module_names
               for name in full if name.split(".")[0] != "speakerd")


def test_importing_the_session_loads_no_io_module_nor_any_other_part_of_speakerd():
    code = ("import sys, speakerd.session; print(' '.join(sorted(m for m in sys.modules if "
            "m.split('.')[0] in ('speakerd', 'asyncio', 'socket', 'select', 'subprocess', "
            "'websockets', 'alsaaudio', 'gpiozero'))))")
    loaded = set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                text=True).stdout.split())
    assert loaded <= {"speakerd", "speakerd.errors", "speakerd.realtime",
                      "speakerd.realtime.protocol", "speakerd.session"} | {
        f"speakerd.session.{m.stem}" for m in Path(s.__file__).parent.glob("*.py")}, loaded


def test_strict_mode_refuses_an_input_the_table_does_not_know():
    c = Conv()
    with pytest.raises(s.UnhandledInput, match="can't handle object in state idle"):
        c.s.handle(object())


class TestTheTable:
    def test_strict_mode_refuses_a_button_no_state_knows(self):
        c = Conv()
        with pytest.raises(s.UnhandledInput,
                           match=r"can't handle ButtonPressed\(volume_up\) in state idle"):
            c.s.handle(s.ButtonPressed("volume_up"))

    def test_strict_mode_refuses_a_live_timer_its_state_does_not_list(self):
        c = Conv()
        c.listening()
        c.s._timer("nap", 1.0)  # set as the session sets its own; no state expects it
        with pytest.raises(s.UnhandledInput,
                           match=r"can't handle TimerFired\(nap\) in state listening"):
            c.s.handle(s.TimerFired("nap", c.s._tokens["nap"]))

    def test_a_known_timer_in_a_state_that_does_not_list_it_is_refused_too(self):
        c = Conv()
        c.listening()
        c.feed(p.AudioCommitted("u1"))
        c.s._timer("mic_guard", 0.15)  # the guard belongs to LISTENING only
        with pytest.raises(s.UnhandledInput, match=r"TimerFired\(mic_guard\) in state thinking"):
            c.s.handle(s.TimerFired("mic_guard", c.s._tokens["mic_guard"]))

    def test_in_production_an_unhandled_button_is_logged_and_changes_nothing(self, caplog):
        c = Conv()
        c.s.strict = False
        c.listening()
        assert c.feed(s.ButtonPressed("volume_up")) == []
        assert c.s.state is State.LISTENING
        assert "unexpected ButtonPressed(volume_up) in state listening" in caplog.text

    def test_buttons_a_state_ignores_are_ignored_not_refused(self):
        c = Conv()
        assert c.feed(s.ButtonPressed("talk_long")) == []  # idle: nothing to end
        c.listening()
        assert c.feed(s.ButtonPressed("talk")) == []  # the user has the floor already

    def test_a_handler_leading_where_its_entry_does_not_allow_is_caught(self, monkeypatch):
        # What a bug looks like: the table says a wake word in IDLE leads nowhere.
        monkeypatch.setitem(s.TABLE[State.IDLE], s.WakeWordDetected,
                            s.Rule(s.Session._start, frozenset({State.IDLE})))
        c = Conv()
        with pytest.raises(s.BadTransition, match="WakeWordDetected in state idle left the "
                           "session in connecting; the table allows only idle"):
            c.feed(s.WakeWordDetected("hey_jarvis"))

    def test_a_handler_staying_where_its_entry_wants_a_move_is_caught(self, monkeypatch):
        monkeypatch.setitem(s.TABLE[State.LISTENING], p.SpeechStarted,
                            s.Rule(s.Session._speech_started, frozenset({State.THINKING})))
        c = Conv()
        c.listening()
        with pytest.raises(s.BadTransition, match="left the session in listening"):
            c.feed(p.SpeechStarted("u1"))

    def test_in_production_a_bad_transition_is_logged_and_carried_out(self, monkeypatch,
                                                                      caplog):
        monkeypatch.setitem(s.TABLE[State.IDLE], s.WakeWordDetected,
                            s.Rule(s.Session._start, frozenset({State.IDLE})))
        c = Conv()
        c.s.strict = False
        out = c.feed(s.WakeWordDetected("hey_jarvis"))
        assert out[-1] == ("SetLeds", "connecting")  # the bookkeeping assumed it
        assert c.s.state is State.CONNECTING
        assert "a bug in the session's rules: WakeWordDetected in state idle" in caplog.text

    def test_no_input_is_both_handled_and_ignored_and_every_entry_leads_somewhere(self):
        for state in State:
            assert not set(s.TABLE[state]) & set(s.IGNORED[state]), state
            assert all(rule.next for rule in s.TABLE[state].values()), state

    def test_every_button_and_timer_the_session_uses_is_in_every_states_table(self):
        # A press or a timer never falls through: each state handles it or ignores it.
        for state in State:
            known = set(s.TABLE[state]) | set(s.IGNORED[state])
            for name in ("talk", "talk_long", "mute"):
                assert s.button(name) in known, (state, name)


class TestWhatTheOutsideShows:
    """The session decides the LEDs, the status line and when the wake word may rest."""

    def test_the_wake_word_models_rest_while_connecting_and_listening_only(self):
        c = Conv()
        needed = [c.s.wake_word_needed]
        c.feed(s.WakeWordDetected("hey_jarvis"))
        needed.append(c.s.wake_word_needed)
        c.feed(s.SessionReady())
        needed.append(c.s.wake_word_needed)
        c.feed(p.AudioCommitted("u1"))  # it runs again here, to be ready to barge in
        needed.append(c.s.wake_word_needed)
        c.feed(p.ResponseCreated("r1"))
        needed.append(c.s.wake_word_needed)
        assert needed == [True, False, False, True, True]

    def test_an_announcement_while_idle_shows_speaking_and_says_so(self):
        c = Conv()
        out = c.s.handle(s.AnnouncementPlaying(True))
        assert out == [s.SetLeds("audio_playing"), s.SetStatus("announcing")]
        assert c.s.state is State.IDLE
        assert c.s.handle(s.AnnouncementPlaying(False)) == [
            s.SetLeds("idle"), s.SetStatus(s.status_text(State.IDLE, False))]

    def test_muted_an_announcement_still_shows_speaking_then_muted_again(self):
        c = Conv()
        c.feed(s.ButtonPressed("mute"))
        assert c.s.leds == "muted"
        assert c.s.handle(s.AnnouncementPlaying(True)) == [
            s.SetLeds("audio_playing"), s.SetStatus("announcing (muted)")]
        assert c.s.handle(s.AnnouncementPlaying(False))[0] == s.SetLeds("muted")

    def test_mute_while_an_announcement_speaks_changes_the_status_not_the_leds(self):
        c = Conv()
        c.s.handle(s.AnnouncementPlaying(True))
        out = c.s.handle(s.ButtonPressed("mute"))
        assert not [a for a in out if isinstance(a, s.SetLeds)]
        assert s.SetStatus("announcing (muted)") in out

    def test_during_a_conversation_the_leds_show_its_state_whatever_announces(self):
        c = Conv()
        c.listening()
        assert c.s.handle(s.AnnouncementPlaying(True)) == []
        assert c.s.leds == "listening"
        c.feed(s.ButtonPressed("mute"))  # ends it: the announcement, still on, shows
        assert c.s.state is State.IDLE and c.s.leds == "audio_playing"

    def test_an_announcement_is_taken_in_every_state(self):
        for state in State:
            assert s.AnnouncementPlaying in s.TABLE[state], state

    def test_a_session_started_over_mid_announcement_shows_it(self):
        assert s.Session(muted=True, announcing=True).leds == "audio_playing"
        assert s.Session(muted=True).leds == "muted"
        assert s.Session(muted=True).status == s.status_text(State.IDLE, True)


TABLE_FILE = Path(__file__).with_name("session_table.txt")
REGENERATE = (""".venv/bin/python -c 'from speakerd.session import table_text; """
              """print(table_text(), end="")' > tests/session_table.txt""")


def test_the_transition_table_is_the_one_checked_in():
    # A change to a transition must show as a diff in review, not hide in a handler.
    want, got = TABLE_FILE.read_text(), s.table_text()
    if got != want:
        diff = "".join(difflib.unified_diff(
            want.splitlines(keepends=True), got.splitlines(keepends=True),
            "tests/session_table.txt", "speakerd.session.table_text()"))
        pytest.fail(f"the session's transitions are not those checked in:\n{diff}\n"
                    f"If the change is meant, regenerate the file (from the repository) "
                    f"and commit it with the change:\n  {REGENERATE}",
                    pytrace=False)


class TestRecord:
    """What the control socket's status records of each conversation comes from the
    session itself: what started it, and why it ended."""

    def record(self, c: Conv, inp: object) -> list[tuple[str, int, str]]:
        return [(type(a).__name__, a.number, getattr(a, "trigger", getattr(a, "reason", "")))
                for a in c.s.handle(inp)
                if isinstance(a, (s.ConversationStarted, s.ConversationEnded))]

    def test_started_by_the_wake_word_and_over_with_no_follow_up(self) -> None:
        c = Conv()
        assert self.record(c, s.WakeWordDetected("hey_jarvis", 40)) == [
            ("ConversationStarted", 1, "wake word hey_jarvis")]
        c.feed(s.SessionReady())
        assert self.record(c, s.TimerFired("follow_up", c.timers["follow_up"])) == [
            ("ConversationEnded", 1, "no follow-up")]

    def test_an_unrecoverable_error_is_the_reason(self) -> None:
        c = Conv()
        assert self.record(c, s.ButtonPressed("talk")) == [
            ("ConversationStarted", 1, "talk button")]
        ended = self.record(c, s.Disconnected("refused", unrecoverable=True))
        assert len(ended) == 1 and ended[0][:2] == ("ConversationEnded", 1)
        assert "refused" in ended[0][2]

    def test_an_end_asked_for_during_the_answer_is_the_reason_after_the_drain(self) -> None:
        c = Conv()
        c.playing("r1", 2000)
        assert self.record(c, s.ButtonPressed("talk_long")) == []
        assert self.record(c, s.PlaybackDrained("r1")) == [
            ("ConversationEnded", 1, "talk button held")]
