"""Realtime protocol: builders match openai.types.realtime; the parser raises only ParseError."""

from __future__ import annotations

import base64
import contextlib
import inspect
import json
import re
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types import realtime as rt
from pydantic import TypeAdapter

from speakerd import config as configmod
from speakerd.realtime import protocol as p
from speakerd.realtime.protocol import Severity

CLIENT = TypeAdapter(rt.RealtimeClientEvent)
GA_SERVER_TYPES = {m.model_fields["type"].annotation.__args__[0]
                   for m in typing.get_args(typing.get_args(rt.RealtimeServerEvent)[0])}

def deprecated_transcription_models() -> set[str]:
    """What the installed openai package marks deprecated for a session's input
    transcription: only the model field's docstring says it ("Deprecated values:")."""
    source = inspect.getsource(rt.AudioTranscription)
    block = source.split("Deprecated values:", 1)[1].split('"""', 1)[0]
    return set(re.findall(r'"([\w.-]+)"', block))


BUILT = {
    "session.update": p.session_update(
        model="gpt-realtime", instructions="Be brief.", voice="marin",
        turn_detection="semantic_vad", tools=[{
            "type": "function", "name": "get_time", "description": "The local time.",
            "parameters": {"type": "object", "properties": {}}}]),
    "input_audio_buffer.append": p.input_audio_append(b"\x01\x00\x02\x00"),
    "conversation.item.create": p.function_call_output("call_1", '{"ok": true}'),
    "conversation.item.truncate": p.item_truncate("item_1", 0, 1234),
    "response.create": p.response_create(),
    "response.cancel": p.response_cancel(),
    "response.cancel(id)": p.response_cancel("resp_1"),
}


class TestBuilders:
    @pytest.mark.parametrize("name", list(BUILT))
    def test_validates_against_the_ga_client_event_union(self, name):
        event = json.loads(json.dumps(BUILT[name]))
        model = CLIENT.validate_python(event)
        assert model.type == name.split("(")[0]
        assert model.event_id == event["event_id"]
        # Nothing speakerd sends is dropped by the model as unknown.
        assert model.model_dump(mode="json", exclude_none=True) == event

    def test_event_ids_are_unique(self):
        ids = {p.response_create()["event_id"] for _ in range(1000)}
        assert len(ids) == 1000

    def test_session_update_carries_the_config(self):
        s = BUILT["session.update"]["session"]
        assert s["audio"]["input"]["turn_detection"] == {
            "type": "semantic_vad", "create_response": True, "interrupt_response": False}
        assert s["audio"]["output"]["voice"] == "marin"
        assert s["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
        assert s["tools"][0]["name"] == "get_time"

    def test_server_vad_validates_too(self):
        event = p.session_update(model="m", instructions="", voice="cedar",
                                 turn_detection="server_vad")
        CLIENT.validate_python(event)

    def test_the_announcement_events_validate_and_nothing_is_dropped(self):
        update = p.announce_session_update(model="gpt-realtime", voice="cedar",
                                           instructions="Read it out.")
        model = CLIENT.validate_python(update)
        # turn_detection null switches the server's VAD off: it must go out as null.
        assert model.model_dump(mode="json", exclude_unset=True) == update
        assert update["session"]["audio"]["input"] == {"turn_detection": None}
        assert update["session"]["tools"] == [] and update["session"]["tool_choice"] == "none"
        for event in (p.user_text("Say: the laundry is done."),
                      p.response_create(output_modalities=["audio"])):
            model = CLIENT.validate_python(event)
            assert model.model_dump(mode="json", exclude_none=True) == event
        assert p.user_text("hi")["item"] == {
            "type": "message", "role": "user", "content": [{"type": "input_text",
                                                            "text": "hi"}]}
        assert "response" not in p.response_create()  # the conversation's, unchanged
    def test_transcripts_ask_for_input_transcription_and_validate(self):
        event = p.session_update(model="m", instructions="", voice="cedar",
                                 turn_detection="server_vad",
                                 transcription_model="gpt-transcribe")
        model = CLIENT.validate_python(event)
        assert model.session.audio.input.transcription.model == "gpt-transcribe"
        plain = p.session_update(model="m", instructions="", voice="cedar",
                                 turn_detection="server_vad")
        assert "transcription" not in plain["session"]["audio"]["input"]

    def test_the_default_transcription_model_is_one_openai_names_and_not_deprecated(self):
        default = configmod.LogConfig().transcription_model
        named = next(typing.get_args(a) for a in typing.get_args(
            rt.AudioTranscription.model_fields["model"].annotation)
            if typing.get_origin(a) is typing.Literal)
        assert default in named
        deprecated = deprecated_transcription_models()
        assert "gpt-4o-mini-transcribe" in deprecated  # the list was found and read
        assert default not in deprecated, deprecated
        event = p.session_update(model="m", instructions="", voice="cedar",
                                 turn_detection="semantic_vad", transcription_model=default)
        model = CLIENT.validate_python(event)
        assert model.session.audio.input.transcription.model == default

    def test_audio_is_base64_of_the_bytes(self):
        pcm = bytes(range(256)) * 4
        assert base64.b64decode(p.input_audio_append(pcm)["audio"]) == pcm


def _ev(**kw):
    return json.dumps(kw)


REAL_SHAPED = [
    (_ev(type="session.created", event_id="e", session={"type": "realtime"}), p.SessionCreated()),
    (_ev(type="session.updated", event_id="e", session={}), p.SessionUpdated()),
    (_ev(type="error", event_id="e", error={
        "type": "invalid_request_error", "code": "conversation_already_has_active_response",
        "message": "busy", "param": None, "event_id": "sd_1"}),
     p.ServerError("invalid_request_error", "conversation_already_has_active_response",
                   "busy", None, "sd_1")),
    (_ev(type="input_audio_buffer.speech_started", event_id="e", item_id="i1",
         audio_start_ms=10), p.SpeechStarted("i1")),
    (_ev(type="input_audio_buffer.speech_stopped", event_id="e", item_id="i1",
         audio_end_ms=900), p.SpeechStopped("i1")),
    (_ev(type="input_audio_buffer.committed", event_id="e", item_id="i1",
         previous_item_id=None), p.AudioCommitted("i1")),
    (_ev(type="response.created", event_id="e", response={"id": "r1", "status": "in_progress"}),
     p.ResponseCreated("r1")),
    (_ev(type="response.output_item.added", event_id="e", response_id="r1", output_index=0,
         item={"id": "it", "type": "message", "role": "assistant", "content": []}),
     p.OutputItemAdded("r1", "it", "message")),
    (_ev(type="response.output_audio.delta", event_id="e", response_id="r1", item_id="it",
         output_index=0, content_index=0, delta=base64.b64encode(b"\x00\x01" * 3).decode()),
     p.AudioDelta("r1", "it", 0, b"\x00\x01" * 3)),
    (_ev(type="response.output_audio.done", event_id="e", response_id="r1", item_id="it",
         output_index=0, content_index=0), p.AudioDone("r1", "it")),
    (_ev(type="response.output_audio_transcript.done", event_id="e", response_id="r1",
         item_id="it", output_index=0, content_index=0, transcript="Hi."),
     p.TranscriptDone("r1", "it", "Hi.")),
    (_ev(type="conversation.item.input_audio_transcription.completed", event_id="e",
         item_id="u1", content_index=0, transcript="what time is it",
         usage={"type": "duration", "seconds": 1.2}),
     p.InputTranscript("u1", "what time is it")),
    (_ev(type="response.done", event_id="e", response={
        "id": "r1", "status": "completed", "output": [
            {"type": "message", "id": "it", "role": "assistant", "content": []},
            {"type": "function_call", "id": "f1", "call_id": "c1", "name": "get_time",
             "arguments": "{}"},
            {"type": "function_call", "id": "f2", "call_id": "c2", "name": "set_volume",
             "arguments": '{"percent": 40}'}]}),
     p.ResponseDone("r1", "completed", (p.FunctionCall("c1", "get_time", "{}"),
                                        p.FunctionCall("c2", "set_volume",
                                                       '{"percent": 40}')))),
    (_ev(type="response.done", event_id="e", response={
        "id": "r2", "status": "failed", "status_details": {
            "type": "failed", "error": {"type": "invalid_request_error",
                                        "code": "insufficient_quota"}}}),
     p.ResponseDone("r2", "failed", (), "invalid_request_error", "insufficient_quota")),
    (_ev(type="rate_limits.updated", event_id="e", rate_limits=[]),
     p.Ignored("rate_limits.updated")),
    (_ev(type="response.output_audio_transcript.delta", event_id="e", delta="Hi"),
     p.Ignored("response.output_audio_transcript.delta")),
    (_ev(type="response.teleport", event_id="e"), p.Unknown("response.teleport")),
]


class TestParser:
    @pytest.mark.parametrize(("frame", "want"), REAL_SHAPED,
                             ids=[json.loads(f)["type"] for f, _ in REAL_SHAPED])
    def test_real_shaped_events(self, frame, want):
        assert p.parse(frame) == want

    def test_every_ga_type_is_handled_or_deliberately_ignored(self):
        assert p.HANDLED_TYPES | p.IGNORED_TYPES == GA_SERVER_TYPES
        assert not p.HANDLED_TYPES & p.IGNORED_TYPES

    @pytest.mark.parametrize(("frame", "message"), [
        ("{not json", "bad server event (frame): not valid JSON: "),
        ("[1, 2]", "bad server event (frame): expected a JSON object, got list"),
        ('{"event_id": "x"}', "bad server event (frame).type: missing or not a string"),
        (_ev(type="response.output_audio.delta", response_id="r", item_id="i",
             content_index=0, delta="@@@not base64"),
         "bad server event response.output_audio.delta.delta: not valid base64"),
        (_ev(type="response.output_audio.delta", response_id="r", item_id="i",
             content_index=0, delta=base64.b64encode(b"abc").decode()),
         "bad server event response.output_audio.delta.delta: odd byte count 3 for 16-bit "
         "audio"),
        (_ev(type="response.output_audio.delta", response_id="r", item_id="i", delta="AAAAAA=="),
         "bad server event response.output_audio.delta.content_index: missing"),
        (_ev(type="response.created", response={"id": 5}),
         "bad server event response.created.response.id: expected string, got int"),
        (_ev(type="response.done", response={"id": "r", "status": "completed", "output": [
            {"type": "function_call", "call_id": "c", "arguments": "{}"}]}),
         "bad server event response.done.response.output[0].name: missing"),
        (_ev(type="response.done", response={"id": "r", "status": "completed",
                                             "output": "nope"}),
         "bad server event response.done.response.output: expected list, got str"),
        (_ev(type="error", error="boom"), "bad server event error.error.type: missing"),
    ])
    def test_malformed_frames_name_event_and_field(self, frame, message):
        with pytest.raises(p.ParseError) as e:
            p.parse(frame)
        assert str(e.value).startswith(message)

    @settings(max_examples=400, deadline=None)
    @given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                        lambda children: st.lists(children, max_size=4)
                        | st.dictionaries(st.text(max_size=8), children, max_size=4),
                        max_leaves=20))
    def test_random_json_raises_only_parse_errors(self, value):
        with contextlib.suppress(p.ParseError):
            p.parse(json.dumps(value))

    @settings(max_examples=400, deadline=None)
    @given(st.sampled_from(sorted(p.HANDLED_TYPES)),
           st.dictionaries(st.sampled_from(["response", "item", "error", "delta", "item_id",
                                            "response_id", "content_index", "transcript",
                                            "id", "status", "output", "type", "code"]),
                           st.none() | st.integers() | st.text(max_size=6)
                           | st.lists(st.dictionaries(st.sampled_from(
                               ["type", "call_id", "name", "arguments"]),
                               st.text(max_size=4) | st.integers(), max_size=4), max_size=3)
                           | st.dictionaries(st.sampled_from(
                               ["id", "status", "output", "type", "code", "message"]),
                               st.text(max_size=4) | st.integers() | st.none(), max_size=4),
                           max_size=6))
    def test_known_types_with_random_fields_raise_only_parse_errors(self, kind, fields):
        try:
            p.parse(json.dumps({**fields, "type": kind}))
        except p.ParseError as e:
            assert e.event_type == kind

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=64))
    def test_random_bytes_raise_only_parse_errors(self, data):
        with contextlib.suppress(p.ParseError):
            p.parse(data)


class TestErrorClasses:
    @pytest.mark.parametrize(("type_", "code", "severity"), [
        ("invalid_request_error", "conversation_already_has_active_response",
         Severity.SURVIVABLE),
        ("invalid_request_error", "response_cancel_not_active", Severity.SURVIVABLE),
        ("invalid_request_error", "invalid_value", Severity.SURVIVABLE),
        ("server_error", None, Severity.SURVIVABLE),
        ("invalid_request_error", "invalid_api_key", Severity.UNRECOVERABLE),
        ("authentication_error", None, Severity.UNRECOVERABLE),
        ("permission_error", None, Severity.UNRECOVERABLE),
        ("invalid_request_error", "model_not_found", Severity.UNRECOVERABLE),
        ("insufficient_quota", "insufficient_quota", Severity.UNRECOVERABLE),
        ("invalid_request_error", "session_expired", Severity.UNRECOVERABLE),
    ])
    def test_classify_error(self, type_, code, severity):
        assert p.classify_error(type_, code)[0] is severity

    def test_unrecoverable_says_what_to_fix(self):
        assert p.classify_error("invalid_request_error", "model_not_found")[1] == \
            "unknown realtime model: check realtime.model"

    @pytest.mark.parametrize(("status", "severity"), [
        (401, Severity.UNRECOVERABLE), (403, Severity.UNRECOVERABLE),
        (404, Severity.UNRECOVERABLE), (400, Severity.UNRECOVERABLE),
        (429, Severity.UNRECOVERABLE), (500, Severity.RETRY), (502, Severity.RETRY),
        (503, Severity.RETRY), (418, Severity.UNRECOVERABLE)])
    def test_classify_handshake_status(self, status, severity):
        assert p.classify_status(status)[0] is severity

    @pytest.mark.parametrize(("status", "cause"), [
        (401, p.KEY_REFUSED), (403, p.KEY_REFUSED), (429, p.QUOTA), (404, p.FAILED),
        (500, p.FAILED)])
    def test_a_refused_handshake_names_the_situation_to_speak(self, status, cause):
        assert p.cause_of_status(status) == cause

    @pytest.mark.parametrize(("error", "cause"), [
        (("invalid_request_error", "invalid_api_key"), p.KEY_REFUSED),
        (("authentication_error", None), p.KEY_REFUSED),
        (("invalid_request_error", "insufficient_quota"), p.QUOTA),
        (("invalid_request_error", "model_not_found"), p.FAILED)])
    def test_an_unrecoverable_error_names_the_situation_to_speak(self, error, cause):
        assert p.cause_of_error(*error) == cause
