"""Realtime API events, no I/O: builders for what speakerd sends, a parser for what it gets."""

from __future__ import annotations

import base64
import binascii
import enum
import itertools
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from speakerd.errors import ProtocolError

SAMPLE_RATE = 24000  # both directions: 24 kHz, s16le, mono
BYTES_PER_MS = SAMPLE_RATE * 2 // 1000

# --- client events -----------------------------------------------------------------

# Unique per process and per event: errors echo event_id back, and the journal line
# for an error names the event that caused it.
_ids = itertools.count(1)
_prefix = os.urandom(3).hex()


def _event(type_: str, **fields: Any) -> dict[str, Any]:
    return {"type": type_, "event_id": f"sd_{_prefix}_{next(_ids)}", **fields}


def session_update(*, model: str, instructions: str, voice: str, turn_detection: str,
                   tools: Iterable[Mapping[str, Any]] = (),
                   transcription_model: str = "") -> dict[str, Any]:
    """The first event after session.created: audio formats, VAD, voice and tools;
    with `transcription_model`, the user's turns are transcribed too (for the log)."""
    event = _event("session.update", session={
        "type": "realtime",
        "model": model,
        "output_modalities": ["audio"],
        "instructions": instructions,
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": SAMPLE_RATE},
                # create_response: the server answers each committed turn itself.
                # interrupt_response off: barge-in is decided here (the wake word, or
                # the voice detector on the echo-cancelled mic), which also sends the
                # truncate; a server that cancelled by itself on the same speech
                # would race our response.cancel and leave the item untruncated.
                "turn_detection": {"type": turn_detection, "create_response": True,
                                   "interrupt_response": False},
                "noise_reduction": {"type": "far_field"},
            },
            "output": {"format": {"type": "audio/pcm", "rate": SAMPLE_RATE},
                       "voice": voice},
        },
        "tools": [dict(t) for t in tools],
        "tool_choice": "auto",
    })
    if transcription_model:
        event["session"]["audio"]["input"]["transcription"] = {"model": transcription_model}
    return event


def input_audio_append(pcm: bytes) -> dict[str, Any]:
    return _event("input_audio_buffer.append", audio=base64.b64encode(pcm).decode("ascii"))


def function_call_output(call_id: str, output: str) -> dict[str, Any]:
    return _event("conversation.item.create", item={
        "type": "function_call_output", "call_id": call_id, "output": output})


def item_truncate(item_id: str, content_index: int, audio_end_ms: int) -> dict[str, Any]:
    return _event("conversation.item.truncate", item_id=item_id,
                  content_index=content_index, audio_end_ms=audio_end_ms)


def response_create(**response: Any) -> dict[str, Any]:
    """`response.create`; keyword arguments become its `response` (e.g. output_modalities)."""
    return _event("response.create", **({"response": response} if response else {}))


def announce_session_update(*, model: str, voice: str, instructions: str) -> dict[str, Any]:
    """The session of an announcement: it speaks and never listens.

    No tools and no turn detection (`null` switches the server's default VAD off):
    nothing is ever appended to its input buffer, and nothing may start a response
    but the one `response.create` speakerd sends.
    """
    return _event("session.update", session={
        "type": "realtime",
        "model": model,
        "output_modalities": ["audio"],
        "instructions": instructions,
        "audio": {
            "input": {"turn_detection": None},
            "output": {"format": {"type": "audio/pcm", "rate": SAMPLE_RATE},
                       "voice": voice},
        },
        "tools": [],
        "tool_choice": "none",
    })


def user_text(text: str) -> dict[str, Any]:
    """A user message of plain text, added to the conversation (no response by itself)."""
    return _event("conversation.item.create", item={
        "type": "message", "role": "user",
        "content": [{"type": "input_text", "text": text}]})


PHRASE_METADATA = "speakerd_phrase"  # response.metadata key marking a phrase recording


def phrase_response(text: str, voice: str, situation: str) -> dict[str, Any]:
    """An out-of-band response (outside the conversation, with no context) in which the
    model says `text` verbatim in `voice`: a status phrase, recorded for later."""
    return _event("response.create", response={
        "conversation": "none",
        "input": [],
        "output_modalities": ["audio"],
        "instructions": ("Say exactly the following words, verbatim, calmly and kindly, "
                         "and nothing else: " + json.dumps(text)),
        "audio": {"output": {"format": {"type": "audio/pcm", "rate": SAMPLE_RATE},
                             "voice": voice}},
        "metadata": {PHRASE_METADATA: situation},
    })


def response_cancel(response_id: str | None = None) -> dict[str, Any]:
    return _event("response.cancel", **({"response_id": response_id} if response_id else {}))


# --- server events -----------------------------------------------------------------

class ParseError(ProtocolError):
    """A frame from the server that is not a valid event; names the event type and field."""

    def __init__(self, event_type: str, field: str, reason: str) -> None:
        self.event_type = event_type
        self.field = field
        self.reason = reason
        where = f"{event_type}.{field}" if field else event_type
        super().__init__(f"bad server event {where}: {reason}")


@dataclass(frozen=True, slots=True)
class SessionCreated:
    pass


@dataclass(frozen=True, slots=True)
class SessionUpdated:
    pass


@dataclass(frozen=True, slots=True)
class ServerError:
    type: str
    code: str | None
    message: str
    param: str | None
    event_id: str | None  # the client event that caused it


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    item_id: str


@dataclass(frozen=True, slots=True)
class SpeechStopped:
    item_id: str


@dataclass(frozen=True, slots=True)
class AudioCommitted:
    item_id: str


@dataclass(frozen=True, slots=True)
class ResponseCreated:
    response_id: str
    phrase: str = ""  # an out-of-band phrase recording: its situation (see phrase_response)


@dataclass(frozen=True, slots=True)
class OutputItemAdded:
    response_id: str
    item_id: str
    item_type: str


@dataclass(frozen=True, slots=True)
class AudioDelta:
    response_id: str
    item_id: str
    content_index: int
    pcm: bytes  # 24 kHz s16le mono


@dataclass(frozen=True, slots=True)
class AudioDone:
    response_id: str
    item_id: str


@dataclass(frozen=True, slots=True)
class TranscriptDone:
    response_id: str
    item_id: str
    transcript: str


@dataclass(frozen=True, slots=True)
class InputTranscript:
    """What the user said in item `item_id`, as the server's transcription heard it;
    it may come before or after the response to that turn has begun."""

    item_id: str
    transcript: str


@dataclass(frozen=True, slots=True)
class FunctionCall:
    call_id: str
    name: str
    arguments: str  # a JSON string, as the model wrote it: validated by the tool layer


@dataclass(frozen=True, slots=True)
class ResponseDone:
    response_id: str
    status: str  # completed | cancelled | incomplete | failed | in_progress
    function_calls: tuple[FunctionCall, ...]
    error_type: str | None = None  # for status "failed"
    error_code: str | None = None


@dataclass(frozen=True, slots=True)
class Ignored:
    """A GA event type speakerd has no use for (transcript deltas, rate limits, ...)."""

    type: str


@dataclass(frozen=True, slots=True)
class Unknown:
    """An event type this protocol version does not know; log at debug and go on."""

    type: str


ServerEvent = (SessionCreated | SessionUpdated | ServerError | SpeechStarted | SpeechStopped
               | AudioCommitted | ResponseCreated | OutputItemAdded | AudioDelta | AudioDone
               | TranscriptDone | InputTranscript | ResponseDone | Ignored | Unknown)

# Types in openai.types.realtime.RealtimeServerEvent that speakerd reads no field of.
IGNORED_TYPES = frozenset({
    "conversation.created", "conversation.item.created", "conversation.item.deleted",
    "conversation.item.retrieved", "conversation.item.truncated", "conversation.item.added",
    "conversation.item.done",
    "conversation.item.input_audio_transcription.delta",
    "conversation.item.input_audio_transcription.failed",
    "conversation.item.input_audio_transcription.segment",
    "input_audio_buffer.cleared", "input_audio_buffer.dtmf_event_received",
    "input_audio_buffer.timeout_triggered", "rate_limits.updated",
    "response.output_audio_transcript.delta", "response.content_part.added",
    "response.content_part.done", "response.function_call_arguments.delta",
    "response.function_call_arguments.done", "response.output_item.done",
    "response.output_text.delta", "response.output_text.done",
    "output_audio_buffer.started", "output_audio_buffer.stopped",
    "output_audio_buffer.cleared", "mcp_list_tools.in_progress", "mcp_list_tools.completed",
    "mcp_list_tools.failed", "response.mcp_call_arguments.delta",
    "response.mcp_call_arguments.done", "response.mcp_call.in_progress",
    "response.mcp_call.completed", "response.mcp_call.failed",
})


class _Reader:
    """Field access that turns a missing or mistyped field into a ParseError naming it."""

    def __init__(self, event_type: str, data: Mapping[str, Any]) -> None:
        self.type = event_type
        self.data = data

    def get(self, path: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
        value: Any = self.data
        for part in path.split("."):
            if not isinstance(value, Mapping) or value.get(part) is None:
                if optional:
                    return None
                raise ParseError(self.type, path, "missing")
            value = value[part]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            raise ParseError(self.type, path, f"expected {_kind_name(kind)}, "
                             f"got {type(value).__name__}")
        return value

    def str(self, path: str) -> str:
        return self.get(path, str)

    def opt_str(self, path: str) -> str | None:
        return self.get(path, str, optional=True)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "string", int: "integer", list: "list", dict: "object"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def parse(frame: str | bytes) -> ServerEvent:
    """One websocket text frame -> a typed event. Raises ParseError, nothing else."""
    try:
        data = json.loads(frame)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ParseError("(frame)", "", f"not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ParseError("(frame)", "", f"expected a JSON object, got {type(data).__name__}")
    event_type = data.get("type")
    if not isinstance(event_type, str):
        raise ParseError("(frame)", "type", "missing or not a string")
    handler = _PARSERS.get(event_type)
    if handler is not None:
        return handler(_Reader(event_type, data))
    if event_type in IGNORED_TYPES:
        return Ignored(event_type)
    return Unknown(event_type)


def _audio_delta(r: _Reader) -> AudioDelta:
    b64 = r.str("delta")
    try:
        pcm = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise ParseError(r.type, "delta", "not valid base64") from None
    if len(pcm) % 2:
        raise ParseError(r.type, "delta", f"odd byte count {len(pcm)} for 16-bit audio")
    return AudioDelta(r.str("response_id"), r.str("item_id"), r.get("content_index", int), pcm)


def _response_done(r: _Reader) -> ResponseDone:
    response_id = r.str("response.id")
    status = r.str("response.status")
    output = r.get("response.output", list, optional=True) or []
    calls = []
    for i, item in enumerate(output):
        if not isinstance(item, Mapping):
            raise ParseError(r.type, f"response.output[{i}]", "expected object")
        if item.get("type") != "function_call":
            continue
        ir = _Reader(r.type, item)
        try:
            calls.append(FunctionCall(ir.str("call_id"), ir.str("name"), ir.str("arguments")))
        except ParseError as e:
            raise ParseError(r.type, f"response.output[{i}].{e.field}", e.reason) from None
    return ResponseDone(response_id, status, tuple(calls),
                        r.opt_str("response.status_details.error.type"),
                        r.opt_str("response.status_details.error.code"))


_PARSERS = {
    "session.created": lambda r: SessionCreated(),
    "session.updated": lambda r: SessionUpdated(),
    "error": lambda r: ServerError(r.str("error.type"), r.opt_str("error.code"),
                                   r.get("error.message", str, optional=True) or "",
                                   r.opt_str("error.param"), r.opt_str("error.event_id")),
    "input_audio_buffer.speech_started": lambda r: SpeechStarted(r.str("item_id")),
    "input_audio_buffer.speech_stopped": lambda r: SpeechStopped(r.str("item_id")),
    "input_audio_buffer.committed": lambda r: AudioCommitted(r.str("item_id")),
    "response.created": lambda r: ResponseCreated(
        r.str("response.id"),
        r.get(f"response.metadata.{PHRASE_METADATA}", str, optional=True) or ""),
    "response.output_item.added": lambda r: OutputItemAdded(
        r.str("response_id"), r.str("item.id"), r.str("item.type")),
    "response.output_audio.delta": _audio_delta,
    "response.output_audio.done": lambda r: AudioDone(r.str("response_id"), r.str("item_id")),
    "response.output_audio_transcript.done": lambda r: TranscriptDone(
        r.str("response_id"), r.str("item_id"), r.str("transcript")),
    "response.done": _response_done,
    "conversation.item.input_audio_transcription.completed": lambda r: InputTranscript(
        r.str("item_id"), r.get("transcript", str, optional=True) or ""),
}
HANDLED_TYPES = frozenset(_PARSERS)


# --- error classes -----------------------------------------------------------------

class Severity(enum.Enum):
    SURVIVABLE = "survivable"  # log it; the conversation goes on
    UNRECOVERABLE = "unrecoverable"  # end the session, say what to fix, do not retry
    RETRY = "retry"  # handshake only: back off and try again


# error.code (or error.type) -> what it means for the conversation. Anything not here
# is survivable: request errors (conversation_already_has_active_response and every
# other invalid_request_error) and transient server_error included.
UNRECOVERABLE_ERRORS: dict[str, str] = {
    "invalid_api_key": "the API key was refused: check /etc/speakerd/openai.key",
    "authentication_error": "authentication failed: check the API key",
    "permission_error": "the API key may not use this model or endpoint",
    "permission_denied": "the API key may not use this model or endpoint",
    "model_not_found": "unknown realtime model: check realtime.model",
    "insufficient_quota": "the account is out of quota: check billing",
    "session_expired": "the realtime session reached its maximum length",
    "account_deactivated": "the account is deactivated",
}

# Handshake HTTP status -> severity. 408 and 5xx are worth another try.
HANDSHAKE_STATUS: dict[int, tuple[Severity, str]] = {
    400: (Severity.UNRECOVERABLE, "bad request: check realtime.url and realtime.model"),
    401: (Severity.UNRECOVERABLE, "the API key was refused (HTTP 401): check the key"),
    403: (Severity.UNRECOVERABLE, "access denied (HTTP 403): the key may not use this model"),
    404: (Severity.UNRECOVERABLE, "not found (HTTP 404): check realtime.url and realtime.model"),
    408: (Severity.RETRY, "request timeout (HTTP 408)"),
    # Out of quota or over the rate limit: not worth making the person wait through
    # retries; the next wake word tries again.
    429: (Severity.UNRECOVERABLE, "out of quota or rate-limited (HTTP 429): check billing "
          "and usage limits"),
}


# What went wrong, in the words of the spoken status phrases (speakerd/phrases.py): the
# situation a phrase is said for.
UNREACHABLE = "unreachable"  # no network, no name, refused, TLS failure, too slow
KEY_REFUSED = "key_refused"  # 401/403, invalid_api_key, permission errors
QUOTA = "quota"  # 429, insufficient_quota
FAILED = "failed"  # the service failed (mid-answer, unknown model, ...)
MUTED = "muted"  # the talk button pressed while the microphone is off
SITUATIONS = (UNREACHABLE, KEY_REFUSED, QUOTA, FAILED, MUTED)

_CAUSES = {"invalid_api_key": KEY_REFUSED, "authentication_error": KEY_REFUSED,
           "permission_error": KEY_REFUSED, "permission_denied": KEY_REFUSED,
           "account_deactivated": KEY_REFUSED, "insufficient_quota": QUOTA,
           "rate_limit_exceeded": QUOTA}


def cause_of_error(error_type: str | None, code: str | None) -> str:
    """The situation an unrecoverable error event puts the person in."""
    for key in (code, error_type):
        if key in _CAUSES:
            return _CAUSES[key]
    return FAILED


def cause_of_status(status: int) -> str:
    """The situation a refused handshake puts the person in."""
    return {401: KEY_REFUSED, 403: KEY_REFUSED, 429: QUOTA}.get(status, FAILED)


def classify_error(error_type: str | None, code: str | None) -> tuple[Severity, str]:
    """An `error` event or a failed response.done -> (severity, what to tell the user)."""
    for key in (code, error_type):
        if key and key in UNRECOVERABLE_ERRORS:
            return Severity.UNRECOVERABLE, UNRECOVERABLE_ERRORS[key]
    return Severity.SURVIVABLE, f"{error_type or 'error'}/{code or '-'}"


def classify_status(status: int) -> tuple[Severity, str]:
    """A handshake rejection by HTTP status -> (severity, reason)."""
    if status in HANDSHAKE_STATUS:
        return HANDSHAKE_STATUS[status]
    if 500 <= status <= 599:
        return Severity.RETRY, f"server error (HTTP {status})"
    return Severity.UNRECOVERABLE, f"unexpected HTTP {status} from the server"
