"""One websocket per conversation to the realtime model: connect with back-off, send, report."""

from __future__ import annotations

import asyncio
import collections
import errno
import json
import logging
import random
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import CloseCode

from speakerd import __version__
from speakerd.config import Secret, check_realtime_url
from speakerd.realtime import protocol
from speakerd.realtime.protocol import Severity

log = logging.getLogger(__name__)

MAX_FRAME_BYTES = 8 * 1024 * 1024  # a long answer's response.done fits many times over


@dataclass(frozen=True, slots=True)
class Ready:
    """session.updated arrived: the session is configured and the pre-roll has been sent."""


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The socket is gone (or never came up); `unrecoverable` means retrying will not help.

    `cause` names the situation for the person (protocol.UNREACHABLE, KEY_REFUSED, ...)
    when the connection failed definitely; "" otherwise."""

    reason: str
    unrecoverable: bool = False
    cause: str = ""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Connect retries: delay = min(cap, first * 2**n) * (1 +- jitter), `attempts` in all."""

    attempts: int = 5
    first: float = 0.5
    cap: float = 8.0
    jitter: float = 0.2

    def delay(self, n: int, rng: random.Random) -> float:
        base = min(self.cap, self.first * 2**n)
        return base * (1 + rng.uniform(-self.jitter, self.jitter))


class PreRoll:
    """Audio said before the socket is ready, kept in order up to a bound; oldest dropped."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.chunks: collections.deque[bytes] = collections.deque()
        self.size = 0
        self.dropped_bytes = 0

    def add(self, pcm: bytes) -> None:
        self.chunks.append(pcm)
        self.size += len(pcm)
        while self.size > self.max_bytes:
            old = self.chunks.popleft()
            self.size -= len(old)
            self.dropped_bytes += len(old)

    def take(self) -> list[bytes]:
        chunks, self.chunks, self.size = list(self.chunks), collections.deque(), 0
        return chunks


# OSErrors that say the service cannot be reached from here right now: the person is
# told at once, a retry within the same breath would only make them wait.
_DEFINITE_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH,
                              errno.ENETDOWN, errno.EHOSTDOWN})


def definite_network_error(e: BaseException) -> str | None:
    """What makes `e` a definite failure to reach the service, or None (maybe transient)."""
    if isinstance(e, socket.gaierror):
        return "name resolution failed"
    if isinstance(e, ssl.SSLError):  # certificate refused, protocol mismatch: not timing
        return "TLS failed"
    if isinstance(e, OSError) and e.errno in _DEFINITE_ERRNOS:
        return {errno.ECONNREFUSED: "connection refused"}.get(e.errno, "network unreachable")
    return None


def realtime_uri(url: str, model: str) -> str:
    """`url` with `model=` added to its query (replacing one already there)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "model"] + [("model", model)]
    return urlunsplit(parts._replace(query=urlencode(query)))


class RealtimeClient:
    """The socket of one conversation.

    `await run()` connects, sends `session_update` after
    session.created, and calls `on_event` on the loop with `Ready`, then every parsed
    server event, and last exactly one `Disconnected`: on every way out of run(),
    cancellation and its own failures included. A definite failure (no name, refused,
    unreachable, TLS, a 401/403/404/429 handshake) is reported at once; a maybe-transient
    one (a timeout, a 5xx, a reset) is retried per `backoff`. close() cuts a connection
    attempt or a back-off wait short. `send()` and `append_audio()` may be
    called at any time from the loop; one writer task sends in call order.

    Keepalive: a ping every `ping_interval` s; no pong within `ping_timeout` s (a
    half-open connection) fails the connection, which then waits at most
    `close_timeout` s for the server's side of the closing handshake.
    """

    def __init__(self, *, url: str, model: str, api_key: Secret | None,
                 session_update: dict[str, Any], on_event: Callable[[object], None],
                 preroll_seconds: float = 2.0, max_frame_bytes: int = MAX_FRAME_BYTES,
                 open_timeout: float = 10.0, ping_interval: float = 20.0,
                 ping_timeout: float = 20.0, close_timeout: float = 2.0,
                 backoff: Backoff | None = None, rng: random.Random | None = None) -> None:
        self.uri = realtime_uri(url, model)
        self.host = urlsplit(url).hostname or "?"
        self._api_key = api_key
        self._session_update = session_update
        self._on_event = on_event
        self.preroll = PreRoll(int(preroll_seconds * protocol.BYTES_PER_MS * 1000))
        self._max_frame_bytes = max_frame_bytes
        self._open_timeout = open_timeout
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._close_timeout = close_timeout
        self._backoff = backoff or Backoff()
        self._rng = rng or random.Random()
        self._outbox: asyncio.Queue[str | None] = asyncio.Queue()
        self._ready = False
        self._closing = False
        self._closed = asyncio.Event()

    # --- for the caller ------------------------------------------------------------

    def send(self, event: dict[str, Any]) -> None:
        """Queue a client event; it goes out after every event queued before it."""
        self._outbox.put_nowait(json.dumps(event))

    def append_audio(self, pcm: bytes) -> None:
        """Stream 24 kHz s16 mic audio; before the session is ready it waits in the pre-roll."""
        if self._ready:
            self.send(protocol.input_audio_append(pcm))
        else:
            self.preroll.add(pcm)

    def close(self) -> None:
        """End the conversation's socket; run() then reports Disconnected and returns."""
        self._closing = True
        self._closed.set()
        self._outbox.put_nowait(None)

    @property
    def ready(self) -> bool:
        return self._ready

    async def run(self) -> None:
        """Hold the conversation's socket until it ends; report why with `Disconnected`."""
        gone = Disconnected("the realtime client was cancelled")  # if nothing else says
        try:
            gone = await self._run()
        except Exception as e:
            # The supervisor of this socket: a bug here or in a callback ends the
            # conversation cleanly instead of leaving the session waiting on a dead task.
            log.exception("the realtime client failed; closing the connection")
            gone = Disconnected(f"speakerd's realtime client failed: {type(e).__name__}: {e}")
        finally:
            said = self.preroll.size + self.preroll.dropped_bytes
            if not self._ready and said:
                log.info("dropped %d ms of what was said after the wake word: the "
                         "session never came up", said // protocol.BYTES_PER_MS)
            try:
                self._on_event(gone)
            except Exception:
                log.exception("reporting %r failed", gone)

    # --- inside --------------------------------------------------------------------

    async def _run(self) -> Disconnected:
        why = check_realtime_url(self.uri)
        if why:
            return Disconnected(why, unrecoverable=True)
        ws = await self._connect()
        if isinstance(ws, Disconnected):
            return ws
        reader = asyncio.create_task(self._read(ws), name="realtime-reader")
        writer = asyncio.create_task(self._write(ws), name="realtime-writer")
        try:
            # The reader ends when the socket does and says why. The writer ends by
            # itself only after close() (the reader then sees the close) or by failing.
            await asyncio.wait((reader, writer), return_when=asyncio.FIRST_COMPLETED)
            if writer.done():
                writer.result()  # raise here what made the writer fail, if anything did
            return await reader
        finally:
            for task in (reader, writer):
                task.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)
            await ws.close()

    async def _connect(self) -> ClientConnection | Disconnected:
        headers = {"Authorization": f"Bearer {self._api_key.reveal()}"} if self._api_key else {}
        last = ""
        for attempt in range(self._backoff.attempts):
            if attempt:
                delay = self._backoff.delay(attempt - 1, self._rng)
                log.info("retrying the realtime connection in %.1f s (attempt %d of %d)",
                         delay, attempt + 1, self._backoff.attempts)
                await self._unless_closed(asyncio.sleep(delay))
            if self._closing:
                return Disconnected("closed by speakerd before connecting")
            started = time.monotonic()
            try:
                ws = await self._unless_closed(connect(
                    self.uri, additional_headers=headers,
                    user_agent_header=f"speakerd/{__version__}",
                    max_size=self._max_frame_bytes, open_timeout=self._open_timeout,
                    ping_interval=self._ping_interval, ping_timeout=self._ping_timeout,
                    close_timeout=self._close_timeout))
            except InvalidStatus as e:
                status = e.response.status_code
                severity, last = protocol.classify_status(status)
                if severity is Severity.UNRECOVERABLE:
                    log.error("realtime server %s refused the connection: %s", self.host, last)
                    return Disconnected(last, unrecoverable=True,
                                        cause=protocol.cause_of_status(status))
                log.warning("realtime server %s: %s", self.host, last)
            except (OSError, TimeoutError, websockets.InvalidHandshake) as e:
                definite = definite_network_error(e)
                last = f"cannot reach {self.host}: {definite + ': ' if definite else ''}{e}"
                if isinstance(e, TimeoutError):
                    last = (f"cannot reach {self.host}: no answer to the handshake within "
                            f"{self._open_timeout:g} s")
                if definite:
                    log.error("%s", last)
                    return Disconnected(last, unrecoverable=True, cause=protocol.UNREACHABLE)
                log.warning("%s", last)
            else:
                if ws is None:
                    return Disconnected("closed by speakerd before connecting")
                log.info("connected to %s in %.0f ms", self.host,
                         (time.monotonic() - started) * 1000)
                return ws
        return Disconnected(f"no connection after {self._backoff.attempts} "
                            f"attempts; last: {last}")

    async def _unless_closed(self, aw: Any) -> Any:
        """`await aw`, unless close() comes first: then cancel it and return None."""
        task = asyncio.ensure_future(aw)
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait((task, closed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            if not task.done():
                task.cancel()
        if not task.done() or task.cancelled():
            return None
        return task.result()

    async def _write(self, ws: ClientConnection) -> None:
        try:
            while True:
                frame = await self._outbox.get()
                if frame is None:
                    await ws.close()
                    return
                await ws.send(frame)
        except ConnectionClosed:
            return  # the reader reports why

    async def _read(self, ws: ClientConnection) -> Disconnected:
        while True:
            try:
                frame = await ws.recv()
            except ConnectionClosed as e:  # every end of the socket, clean or not
                return Disconnected(self._close_reason(e))
            if isinstance(frame, bytes):
                log.warning("ignored a binary frame of %d bytes from %s", len(frame),
                            self.host)
                continue
            try:
                event = protocol.parse(frame)
            except protocol.ParseError as e:
                log.warning("%s; ignored it", e)
                continue
            self._handle(event)

    def _handle(self, event: protocol.ServerEvent) -> None:
        if isinstance(event, protocol.SessionCreated):
            self.send(self._session_update)
            return
        if isinstance(event, protocol.SessionUpdated) and not self._ready:
            self._ready = True
            chunks = self.preroll.take()
            for pcm in chunks:
                self.send(protocol.input_audio_append(pcm))
            if self.preroll.dropped_bytes:
                log.warning("pre-roll overflowed: dropped the oldest %d ms of speech",
                            self.preroll.dropped_bytes // protocol.BYTES_PER_MS)
            self._on_event(Ready())
            return
        if isinstance(event, (protocol.Unknown, protocol.Ignored)):
            if isinstance(event, protocol.Unknown):
                log.debug("ignored unknown server event %s", event.type)
            return
        self._on_event(event)

    def _close_reason(self, e: ConnectionClosed) -> str:
        """Why the socket ended, from the close frames it received (`rcvd`) and sent."""
        if self._closing:
            return "closed by speakerd"
        rcvd, sent = e.rcvd, e.sent
        if sent is not None and sent.code == CloseCode.MESSAGE_TOO_BIG:
            reason = (f"the server sent a frame over {self._max_frame_bytes} bytes; "
                      "speakerd closed the connection")
            log.error("%s", reason)
            return reason
        if rcvd is not None:
            why = f": {rcvd.reason}" if rcvd.reason else ""
            return f"server closed the connection (code {rcvd.code}{why})"
        if sent is not None:
            # speakerd failed the connection (e.g. no pong in time); no answer came.
            return (f"the connection failed: {sent.reason or 'no reason given'} "
                    f"(speakerd sent close code {sent.code}, got none)")
        return "connection lost without a close frame"
