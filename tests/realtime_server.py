"""A local stand-in for the realtime model: a real `websockets` server on 127.0.0.1.

Usage::

    server = RealtimeServer(replies=[Reply(audio_ms=800)])
    async with server:                  # listening on server.url (ws://127.0.0.1:PORT/v1/realtime)
        ...                             # point speakerd at server.url, then wait on
        await server.wait_for("response.create")   # what the client sent
    server.received                     # every client event, in order, with arrival times
    assert server.invalid == []         # events that failed openai.types.realtime validation

What it does on each connection, as the real service does:

- handshake: records `handshakes` (time, headers); `reject_status=401` (or a list of
  statuses, one per attempt) refuses it with that HTTP status;
- `models=("gpt-realtime",)`: a connection asking for another model (the URL's
  `model=`) gets an `error` event `model_not_found` and is closed;
- sends `session.created`; answers each `session.update` with `session.updated`;
- `input_audio_buffer.commit` -> `input_audio_buffer.committed`, then the next
  reply (server VAD with create_response); `vad=True` instead detects speech by the
  energy of appended audio and does speech_started/stopped/committed itself;
- `response.create` while a response is active -> error
  `conversation_already_has_active_response`; otherwise plays the next `Reply`;
  an out-of-band one (`conversation: "none"`) is recorded in `out_of_band` and, with
  `phrase_audio`, answered alongside: it says the text quoted in its instructions
  (`phrase_audio(text)` as its audio, the text as its transcript), its metadata
  echoed in response.created;
- `response.cancel` -> the active reply stops, `response.done` status cancelled;
- `conversation.item.create` (a function call's output or a user message) ->
  `conversation.item.added`;
- when the session.update asked for input transcription, each committed turn gets
  `conversation.item.input_audio_transcription.completed` with the next text of
  `heard` (right after the commit; with `late_transcripts=True` held until the first
  audio of the last scripted reply, so that a turn's words arrive while a later turn
  is answered, as the real service's separate ASR model may).

A `Reply` streams `audio_ms` of 24 kHz audio (or the given `pcm`) as deltas of
`chunk_ms` at `speed` times real time, its transcript, then `response.done` whose
output holds the assistant message and any `function_calls`. Replies are taken
from `replies` in order; when none is left, a 200 ms reply is made up.

Misbehaviour on demand: `send(event)`, `send_raw(text)` (invalid JSON, unknown
types, bad base64, a 20 MB frame), `error(code)`, `drop()` (TCP closed with no
close frame; `drop(reset=True)` sends a TCP RST), `close(code, reason)` (a clean
websocket close), `stop_answering()` (half-open: the server reads nothing more, so
pings go unanswered), or mid-response: `Reply(drop_after_ms=..., reset=...)`,
`Reply(close_after_ms=..., close_code=..., close_reason=...)`.

Every event the server sends is built from the `openai.types.realtime` models, and
every event it receives is validated against `RealtimeClientEvent`, so the two
sides cannot drift apart silently.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import math
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import numpy as np
from openai.types import realtime as rt
from pydantic import TypeAdapter, ValidationError
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

CLIENT_EVENT = TypeAdapter(rt.RealtimeClientEvent)
RATE = 24000


@dataclass(frozen=True)
class Received:
    at: float  # time.monotonic() on arrival
    event: dict[str, Any]

    @property
    def type(self) -> str:
        return self.event.get("type", "")


@dataclass
class Call:
    name: str
    arguments: str = "{}"
    call_id: str = ""


@dataclass
class Reply:
    audio_ms: int = 500
    pcm: bytes | None = None
    transcript: str = "Okay."
    function_calls: list[Call] = field(default_factory=list)
    chunk_ms: int = 100
    speed: float = 20.0  # times real time; the real service also runs ahead of playback
    drop_after_ms: int | None = None  # abort the TCP connection after this much audio
    reset: bool = False  # with drop_after_ms: abort with a TCP RST, not a FIN
    close_after_ms: int | None = None  # close the websocket after this much audio
    close_code: int = 1000  # with close_after_ms: the close frame's code and reason
    close_reason: str = ""
    status: str = "completed"
    error: tuple[str, str] | None = None  # (type, code) for a failed response.done
    stall_at_ms: int | None = None  # stop sending for stall_seconds after this much audio
    stall_seconds: float = 0.0


def tone(ms: int, freq: float = 440.0, amplitude: int = 8000) -> bytes:
    """`ms` of a sine at 24 kHz s16le mono: distinct, checkable content."""
    n = RATE * ms // 1000
    t = np.arange(n) / RATE
    return (amplitude * np.sin(2 * math.pi * freq * t)).astype("<i2").tobytes()


class RealtimeServer:
    def __init__(self, *, replies: list[Reply] | None = None,
                 reject_status: int | list[int] | None = None, vad: bool = False,
                 vad_threshold: float = 500.0, vad_silence_ms: int = 500,
                 models: tuple[str, ...] | None = None,
                 heard: list[str] | None = None, late_transcripts: bool = False,
                 phrase_audio: Any = None) -> None:
        self.models = models
        self.replies = list(replies or [])
        self.phrase_audio = phrase_audio  # text -> 24 kHz PCM, for out-of-band responses
        self.out_of_band: list[dict[str, Any]] = []  # their `response` params, in order
        self._oob_tasks: set[asyncio.Task[None]] = set()
        self.heard = list(heard or [])
        self.late_transcripts = late_transcripts
        self.transcribing = False  # the session.update asked for input transcription
        self._late: list[tuple[str, str]] = []  # (item id, text) due after the next audio
        self.reject_status = reject_status
        self.vad = vad
        self.vad_threshold = vad_threshold
        self.vad_silence_ms = vad_silence_ms
        self.received: list[Received] = []
        self.invalid: list[tuple[dict[str, Any], str]] = []
        self.handshakes: list[tuple[float, dict[str, str]]] = []
        self.sent: list[dict[str, Any]] = []
        self.errors_sent: list[str] = []
        self.connections: list[ServerConnection] = []
        self.deaf: list[ServerConnection] = []  # connections told to stop_answering()
        self.active_response: str | None = None
        self._ids = itertools.count(1)
        self._server: Server | None = None
        self._changed = asyncio.Condition()
        self._reply_task: asyncio.Task[None] | None = None
        self._cancel = asyncio.Event()
        self._speech_ms = 0
        self._silence_ms = 0
        self._in_speech = False
        self.port = 0

    # --- lifecycle ------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/realtime"

    async def __aenter__(self) -> RealtimeServer:
        self._server = await serve(self._handler, "127.0.0.1", 0, max_size=None,
                                   process_request=self._process_request)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        if self._reply_task:
            self._reply_task.cancel()
        for task in self._oob_tasks:
            task.cancel()
        for ws in self.deaf:  # let them see the close handshake or the reset
            ws.transport.resume_reading()
        self._server.close()
        await self._server.wait_closed()

    # --- what a test asks ------------------------------------------------------------

    def types(self) -> list[str]:
        return [r.type for r in self.received]

    def of_type(self, type_: str) -> list[Received]:
        return [r for r in self.received if r.type == type_]

    async def wait_for(self, type_: str, count: int = 1, timeout: float = 20) -> list[Received]:
        """Wait until `count` events of `type_` have arrived; return them."""
        async def enough() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: len(self.of_type(type_)) >= count)
        try:
            await asyncio.wait_for(enough(), timeout)
        except TimeoutError:
            raise AssertionError(f"{count} x {type_} not received in {timeout}s; "
                                 f"got {self.types()}") from None
        return self.of_type(type_)[:count]

    async def wait_until(self, predicate, timeout: float = 20) -> None:
        async def check() -> None:
            async with self._changed:
                await self._changed.wait_for(predicate)
        await asyncio.wait_for(check(), timeout)

    # --- what a test makes it do --------------------------------------------------------

    async def send(self, event: dict[str, Any] | Any) -> None:
        if not isinstance(event, dict):
            event = event.model_dump(mode="json", exclude_none=True)
        self.sent.append(event)
        await self._ws.send(json.dumps(event))

    async def send_raw(self, text: str | bytes) -> None:
        await self._ws.send(text)

    async def error(self, code: str, *, type_: str = "invalid_request_error",
                    message: str = "", event_id: str | None = None) -> None:
        self.errors_sent.append(code)
        await self.send(rt.RealtimeErrorEvent(
            type="error", event_id=self._eid(), error=rt.RealtimeError(
                type=type_, code=code, message=message or code, event_id=event_id)))

    def drop(self, *, reset: bool = False) -> None:
        """Close the TCP connection without a websocket close frame (`reset`: with a RST)."""
        if reset:  # linger on, timeout 0: close() discards the socket with a RST
            sock = self._ws.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._ws.transport.abort()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the websocket cleanly: a close frame with `code` and `reason`."""
        await self._ws.close(code, reason)

    def stop_answering(self) -> None:
        """Half-open: read nothing more on this connection, so no ping gets its pong."""
        self.deaf.append(self._ws)
        self._ws.transport.pause_reading()

    def closed(self) -> bool:
        """The latest connection is closed (use with wait_until)."""
        return bool(self.connections) and self._ws.state is State.CLOSED

    async def end_turn(self) -> None:
        """The user's turn is over now, whatever the audio: committed, then the next reply
        (as server VAD does; for fast turns that need no speech, e.g. bench/soak.py)."""
        await self._commit()

    @property
    def _ws(self) -> ServerConnection:
        return self.connections[-1]

    def _eid(self) -> str:
        return f"srv_{next(self._ids)}"

    # --- the protocol ------------------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request
                         ) -> Response | None:
        self.handshakes.append((time.monotonic(), dict(request.headers.raw_items())))
        status = self.reject_status
        if isinstance(status, list):
            status = status.pop(0) if status else None
        if status:
            return connection.respond(status, f"rejected with {status}\n")
        return None

    async def _handler(self, ws: ServerConnection) -> None:
        self.connections.append(ws)
        self.active_response = None
        model = dict(parse_qsl(urlsplit(ws.request.path).query)).get("model", "")
        if self.models is not None and model not in self.models:
            await self.error("model_not_found", message=f"The model '{model}' does not "
                             "exist or you do not have access to it.")
            await ws.close()
            return
        await self.send(rt.SessionCreatedEvent(
            type="session.created", event_id=self._eid(),
            session=rt.RealtimeSessionCreateRequest(type="realtime", model="gpt-realtime")))
        try:
            async for frame in ws:
                event = json.loads(frame)
                try:
                    CLIENT_EVENT.validate_python(event)
                except ValidationError as e:
                    self.invalid.append((event, str(e)))
                async with self._changed:
                    self.received.append(Received(time.monotonic(), event))
                    self._changed.notify_all()
                await self._on_event(event)
        except ConnectionClosed:
            pass
        finally:
            if self._reply_task:
                self._reply_task.cancel()
            async with self._changed:
                self._changed.notify_all()

    async def _on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "session.update":
            self.transcribing = bool(event.get("session", {}).get("audio", {})
                                     .get("input", {}).get("transcription"))
            await self.send(rt.SessionUpdatedEvent(
                type="session.updated", event_id=self._eid(),
                session=rt.RealtimeSessionCreateRequest(type="realtime",
                                                        model="gpt-realtime")))
        elif kind == "input_audio_buffer.append" and self.vad:
            await self._vad(base64.b64decode(event["audio"]))
        elif kind == "input_audio_buffer.commit":
            await self._commit()
        elif kind == "response.create" and (event.get("response") or {}).get(
                "conversation") == "none":
            params = event["response"]
            self.out_of_band.append(params)
            if self.phrase_audio is not None:
                quoted = params["instructions"]
                text = json.loads(quoted[quoted.index(': "') + 2:])
                rid = f"resp_{next(self._ids)}"
                self._oob_tasks.add(asyncio.create_task(self._play_oob(
                    Reply(pcm=self.phrase_audio(text), transcript=text), rid,
                    params.get("metadata") or {})))
        elif kind == "response.create":
            if self.active_response:
                await self.error("conversation_already_has_active_response",
                                 message="Conversation already has an active response in "
                                 f"progress: {self.active_response}.",
                                 event_id=event.get("event_id"))
            else:
                self._start_reply()
        elif kind == "response.cancel":
            if self.active_response:
                self._cancel.set()
            else:
                await self.error("response_cancel_not_active",
                                 event_id=event.get("event_id"))
        elif kind == "conversation.item.create":
            item = event["item"]
            added: Any
            if item.get("type") == "message":  # a user's text (an announcement's)
                added = rt.RealtimeConversationItemUserMessage.model_validate(
                    {**item, "id": f"item_{next(self._ids)}"})
            else:
                added = rt.RealtimeConversationItemFunctionCallOutput(
                    type="function_call_output", call_id=item["call_id"],
                    output=item["output"], id=f"item_{next(self._ids)}")
            await self.send(rt.ConversationItemAdded(
                type="conversation.item.added", event_id=self._eid(), item=added))

    async def _vad(self, pcm: bytes) -> None:
        samples = np.frombuffer(pcm, "<i2").astype(np.float64)
        loud = samples.size and math.sqrt(float(np.mean(samples**2))) > self.vad_threshold
        ms = len(pcm) // 48
        if loud:
            self._silence_ms = 0
            if not self._in_speech:
                self._in_speech = True
                await self.send(rt.InputAudioBufferSpeechStartedEvent(
                    type="input_audio_buffer.speech_started", event_id=self._eid(),
                    item_id="item_user", audio_start_ms=0))
        elif self._in_speech:
            self._silence_ms += ms
            if self._silence_ms >= self.vad_silence_ms:
                self._in_speech = False
                await self.send(rt.InputAudioBufferSpeechStoppedEvent(
                    type="input_audio_buffer.speech_stopped", event_id=self._eid(),
                    item_id="item_user", audio_end_ms=0))
                await self._commit()

    async def _commit(self) -> None:
        item_id = f"item_{next(self._ids)}"
        await self.send(rt.InputAudioBufferCommittedEvent(
            type="input_audio_buffer.committed", event_id=self._eid(), item_id=item_id))
        if self.transcribing and self.heard:
            text = self.heard.pop(0)
            if self.late_transcripts:
                self._late.append((item_id, text))
            else:
                await self._transcribed(item_id, text)
        if not self.active_response:
            self._start_reply()

    async def _transcribed(self, item_id: str, text: str) -> None:
        await self.send(rt.ConversationItemInputAudioTranscriptionCompletedEvent(
            type="conversation.item.input_audio_transcription.completed",
            event_id=self._eid(), item_id=item_id, content_index=0, transcript=text,
            usage=rt.conversation_item_input_audio_transcription_completed_event
            .UsageTranscriptTextUsageDuration(type="duration", seconds=1.0)))

    def _start_reply(self) -> None:
        reply = self.replies.pop(0) if self.replies else Reply(audio_ms=200)
        self.active_response = f"resp_{next(self._ids)}"
        self._cancel.clear()
        self._reply_task = asyncio.create_task(self._play(reply, self.active_response))

    async def _play(self, reply: Reply, rid: str) -> None:
        try:
            await self._play_reply(reply, rid)
        except ConnectionClosed:
            pass
        finally:
            if self.active_response == rid:
                self.active_response = None

    async def _play_oob(self, reply: Reply, rid: str, metadata: dict[str, Any]) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self._play_reply(reply, rid, metadata)

    async def _play_reply(self, reply: Reply, rid: str,
                          metadata: dict[str, Any] | None = None) -> None:
        """One response; with `metadata`, an out-of-band one, beside the conversation's."""
        oob = metadata is not None
        item_id = f"item_{next(self._ids)}"
        await self.send(rt.ResponseCreatedEvent(
            type="response.created", event_id=self._eid(),
            response=rt.RealtimeResponse(id=rid, status="in_progress", output=[],
                                         metadata=metadata)))
        message = rt.RealtimeConversationItemAssistantMessage(
            type="message", role="assistant", id=item_id, content=[])
        await self.send(rt.ResponseOutputItemAddedEvent(
            type="response.output_item.added", event_id=self._eid(), response_id=rid,
            output_index=0, item=message))
        pcm = reply.pcm if reply.pcm is not None else tone(reply.audio_ms)
        step = RATE * 2 * reply.chunk_ms // 1000
        sent_ms = 0
        status = reply.status
        for start in range(0, len(pcm), step):
            if self._cancel.is_set() and not oob:
                status = "cancelled"
                break
            chunk = pcm[start:start + step]
            await self.send(rt.ResponseAudioDeltaEvent(
                type="response.output_audio.delta", event_id=self._eid(), response_id=rid,
                item_id=item_id, output_index=0, content_index=0,
                delta=base64.b64encode(chunk).decode()))
            sent_ms += len(chunk) // 48
            while self._late and not self.replies and not oob:  # late: after later answers
                await self._transcribed(*self._late.pop(0))
            if reply.drop_after_ms is not None and sent_ms >= reply.drop_after_ms:
                self.drop(reset=reply.reset)
                return
            if reply.close_after_ms is not None and sent_ms >= reply.close_after_ms:
                await self.close(reply.close_code, reply.close_reason)
                return
            stall = reply.stall_at_ms
            if stall is not None and sent_ms - len(chunk) // 48 < stall <= sent_ms:
                # The model goes quiet mid-answer: the speaker runs dry (an underrun).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._cancel.wait(), reply.stall_seconds)
            # Paced, but ahead of real time; the cancel event cuts the wait short.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.Event().wait() if oob else self._cancel.wait(),
                                       len(chunk) / 48 / 1000 / reply.speed)
        if status != "cancelled":
            await self.send(rt.ResponseAudioDoneEvent(
                type="response.output_audio.done", event_id=self._eid(), response_id=rid,
                item_id=item_id, output_index=0, content_index=0))
            await self.send(rt.ResponseAudioTranscriptDoneEvent(
                type="response.output_audio_transcript.done", event_id=self._eid(),
                response_id=rid, item_id=item_id, output_index=0, content_index=0,
                transcript=reply.transcript))
        output: list[Any] = [message]
        for i, call in enumerate(reply.function_calls if status != "cancelled" else []):
            call_id = call.call_id or f"call_{next(self._ids)}"
            item = rt.RealtimeConversationItemFunctionCall(
                type="function_call", id=f"item_{next(self._ids)}", call_id=call_id,
                name=call.name, arguments=call.arguments, status="completed")
            await self.send(rt.ResponseOutputItemAddedEvent(
                type="response.output_item.added", event_id=self._eid(), response_id=rid,
                output_index=i + 1, item=item))
            await self.send(rt.ResponseFunctionCallArgumentsDoneEvent(
                type="response.function_call_arguments.done", event_id=self._eid(),
                response_id=rid, item_id=item.id or "", output_index=i + 1,
                call_id=call_id, name=call.name, arguments=call.arguments))
            output.append(item)
        details = None
        if reply.error:
            details = rt.RealtimeResponseStatus(
                type="failed", error=rt.realtime_response_status.Error(
                    type=reply.error[0], code=reply.error[1]))
        if not oob:
            self.active_response = None
        await self.send(rt.ResponseDoneEvent(
            type="response.done", event_id=self._eid(), response=rt.RealtimeResponse(
                id=rid, status=status, output=output, status_details=details,
                metadata=metadata)))
