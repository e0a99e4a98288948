"""The local control socket's server: one JSON request per line in, one JSON reply out.

A unix stream socket, `$RUNTIME_DIRECTORY/control` under the unit (`/run/speakerd/
control`), mode 0660, group `speakerd`. Each connection's peer is checked
(SO_PEERCRED): root, speakerd's own user and members of the socket's group only.
Requests are bounded (`MAX_LINE` bytes), clients are few (`MAX_CLIENTS`) and must
speak within `IDLE_TIMEOUT`; a request that breaks the rules gets an error line and
the connection is closed. Requests and replies are described in the README
("Control socket").
"""

from __future__ import annotations

import array
import asyncio
import errno
import grp
import json
import logging
import os
import pwd
import socket
import struct
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from speakerd.audio import levels
from speakerd.control.client import ENV
from speakerd.errors import UnavailableError, refusal

log = logging.getLogger(__name__)

GROUP = "speakerd"  # members may use the socket
MODE = 0o660
MAX_LINE = 4096  # bytes of one request, newline included
MAX_CLIENTS = 4  # connections served at once; more are refused with an error line
IDLE_TIMEOUT = 5.0  # seconds a client may take to send a whole request
SEND_TIMEOUT = 5.0  # seconds a client may take to read a reply
LEVELS_SECONDS = 3.0  # what a levels request measures unless it says
REQUESTS = ("status", "talk", "mute", "unmute", "volume", "levels", "announce")
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13; not in Python 3.11


class Volume(Protocol):
    def get(self) -> dict[str, Any]: ...
    def set(self, percent: int) -> dict[str, Any]: ...
    def step(self, change: int) -> dict[str, Any]: ...


class Host(Protocol):
    """What the socket serves: the speaker, as the daemon runs it. Each method returns
    the reply's fields, or a refusal (`errors.refusal`) with "ok": false."""

    volume: Volume

    def status(self) -> dict[str, Any]: ...
    async def talk(self) -> dict[str, Any]: ...
    async def mute(self, on: bool) -> dict[str, Any]: ...
    async def levels(self, seconds: float) -> dict[str, Any]: ...  # UnavailableError
    async def announce(self, text: object) -> dict[str, Any]: ...  # after the drain


def server_path(explicit: str | None = None) -> str | None:
    """Where `speakerd run` listens: --control, $SPEAKERD_CONTROL, else the unit's
    RuntimeDirectory; None (no socket) when run by hand without any of them."""
    if explicit:
        return explicit
    if os.environ.get(ENV):
        return os.environ[ENV]
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return os.path.join(runtime, "control") if runtime else None


class BadRequest(Exception):
    """The peer broke the protocol: the reply says how, then the connection closes."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def parse(line: bytes) -> dict[str, Any]:
    """One request line -> its object; BadRequest when it is not a request at all."""
    try:
        request = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError too
        raise BadRequest("bad_request", 'not a JSON line; send e.g. {"request": "status"}'
                         ) from None
    if not isinstance(request, dict) or not isinstance(request.get("request"), str):
        raise BadRequest("bad_request", 'a request is a JSON object with a "request" '
                         'string, e.g. {"request": "status"}')
    return request


class ControlServer:
    """The socket on the daemon's loop, serving `host`. `await start()`, later `close()`.

    `spawn(coro, name)` runs each connection as a task the daemon watches (and
    cancels on stop).
    """

    def __init__(self, host: Host, path: str, *,
                 spawn: Callable[[Coroutine[Any, Any, None], str], object],
                 max_clients: int = MAX_CLIENTS, idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.host = host
        self.path = path
        self.max_clients = max_clients
        self.idle_timeout = idle_timeout
        self._spawn = spawn
        self._server: asyncio.AbstractServer | None = None
        self._inode = 0
        self._gid = os.getegid()
        self._clients = 0
        self._refused = 0  # busy refusals since the last client was served

    async def start(self) -> None:
        """Listen (a stale socket file is replaced); OSError if the path is unusable."""
        self._server = await asyncio.start_unix_server(self._accept, self.path,
                                                       limit=MAX_LINE)
        # Under the unit's UMask=0077 the socket is born 0700: set the mode after bind.
        os.chmod(self.path, MODE)
        try:
            gid = grp.getgrnam(GROUP).gr_gid
        except KeyError:
            gid = None  # no such group (by hand, in tests): the socket keeps ours
        if gid is not None and gid != os.getegid():
            try:
                os.chown(self.path, -1, gid)
            except OSError as e:
                log.warning("could not give the control socket %s to group %s: %s",
                            self.path, GROUP, e)
        st = os.stat(self.path)
        self._inode, self._gid = st.st_ino, st.st_gid
        log.info("control socket listening on %s (mode 0%o, group %s)", self.path, MODE,
                 _group_name(self._gid))

    def close(self) -> None:
        """Stop listening and remove the socket file (if it is still ours)."""
        if self._server is None:
            return
        self._server.close()
        self._server = None
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except OSError:
            pass

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._spawn(self._client(reader, writer), "control client")

    async def _client(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        """One connection, from accept to close; every way out closes it."""
        if self._clients >= self.max_clients:
            # One line per burst, not per connection: a script hammering the socket
            # must not flood the journal.
            if not self._refused:
                log.warning("refusing control clients: %d are connected already (at most "
                            "%d)", self._clients, self.max_clients)
            self._refused += 1
            await self._send_and_close(writer, refusal(
                "busy", f"too many control clients (at most {self.max_clients}); try again"))
            return
        self._clients += 1
        if self._refused:
            log.warning("refused %d control client(s) while busy", self._refused)
            self._refused = 0
        try:
            denied = self._check_peer(writer)
            if denied:
                log.warning("refused a control client: %s", denied)
                await self._send(writer, refusal("denied", denied))
                return
            await self._serve(reader, writer)
        except (ConnectionError, TimeoutError) as e:
            log.debug("control client went away: %s", e)
        finally:
            self._clients -= 1
            writer.close()

    async def _send_and_close(self, writer: asyncio.StreamWriter, reply: dict[str, Any]
                              ) -> None:
        try:
            await self._send(writer, reply)
        except (ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()

    async def _send(self, writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
        writer.write(json.dumps(reply).encode() + b"\n")
        await asyncio.wait_for(writer.drain(), SEND_TIMEOUT)

    def _check_peer(self, writer: asyncio.StreamWriter) -> str | None:
        """None if the peer may use the socket, else why not."""
        sock = writer.get_extra_info("socket")
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", creds)
        if uid in (0, os.geteuid()) or gid == self._gid:
            return None
        if self._gid in _peer_groups(sock, uid, self._gid):
            return None
        return (f"permission denied: uid {uid} (pid {pid}) is not root, speakerd's user "
                f"or a member of group {_group_name(self._gid)}")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                     ) -> None:
        answered = False
        while True:
            last = False
            try:
                line = await asyncio.wait_for(reader.readuntil(b"\n"), self.idle_timeout)
            except TimeoutError:
                if not answered:
                    log.info("closed a control connection that sent no request in %.0f s",
                             self.idle_timeout)
                    await self._send(writer, refusal(
                        "timeout", f"no request within {self.idle_timeout:.0f} s"))
                return
            except asyncio.LimitOverrunError:
                log.warning("closed a control connection whose request was longer than "
                            "%d bytes", MAX_LINE)
                await self._send(writer, refusal("too_long",
                                               f"a request is at most {MAX_LINE} bytes"))
                return
            except asyncio.IncompleteReadError as e:
                if not e.partial.strip():
                    return  # the client is done
                line, last = e.partial, True  # a last request without its newline
            try:
                request = parse(line)
            except BadRequest as e:
                log.warning("closed a control connection after a malformed request: %s", e)
                await self._send(writer, refusal(e.code, str(e)))
                return
            await self._send(writer, await self._answer(request))
            answered = True
            if last:
                return

    async def _answer(self, request: dict[str, Any]) -> dict[str, Any]:
        name = request["request"]
        host = self.host
        try:
            if name == "status":
                return {"ok": True, **host.status()}
            if name == "talk":
                return await host.talk()
            if name in ("mute", "unmute"):
                return await host.mute(name == "mute")
            if name == "volume":
                return self._volume(request)
            if name == "levels":
                return await self._levels(request)
            if name == "announce":  # answered after the drain (speakerd/announce/)
                return await host.announce(request.get("text"))
        except Exception as e:
            # The supervisor of one request: log it, answer, and keep serving.
            log.exception("control request %s failed", name)
            return refusal("failed", f"{name} failed: {type(e).__name__}: {e}")
        return refusal("unknown_request",
                       f"unknown request {name[:40]!r}; one of: {', '.join(REQUESTS)}")

    def _volume(self, request: dict[str, Any]) -> dict[str, Any]:
        percent, change = request.get("percent"), request.get("change")
        if percent is not None and change is not None:
            return refusal("bad_argument", 'give "percent" or "change", not both')
        volume = self.host.volume
        if percent is not None:
            if not _int_in(percent, 0, 100):
                return refusal("bad_argument", '"percent" is an integer from 0 to 100')
            return {"ok": True, **volume.set(percent)}
        if change is not None:
            if not _int_in(change, -100, 100):
                return refusal("bad_argument", '"change" is an integer from -100 to 100')
            return {"ok": True, **volume.step(change)}
        return {"ok": True, **volume.get()}

    async def _levels(self, request: dict[str, Any]) -> dict[str, Any]:
        seconds = request.get("seconds", LEVELS_SECONDS)
        low, high = levels.MIN_SECONDS, levels.MAX_SECONDS
        if (not isinstance(seconds, (int, float)) or isinstance(seconds, bool)
                or not low <= seconds <= high):
            return refusal("bad_argument", f'"seconds" is a number from {low:g} to {high:g}')
        try:
            return {"ok": True, **await self.host.levels(float(seconds))}
        except UnavailableError as e:
            return refusal("unavailable", str(e))


def _int_in(x: object, low: int, high: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and low <= x <= high


def _peer_groups(sock: Any, uid: int, gid: int) -> set[int]:
    """The peer's supplementary groups: SO_PEERGROUPS, else /etc/group by user name."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
        return set(array.array("I", raw[:len(raw) // 4 * 4]))
    except OSError as e:
        if e.errno not in (errno.ERANGE, errno.ENOPROTOOPT):
            raise
    try:
        name = pwd.getpwuid(uid).pw_name
        return {gid} if name in grp.getgrgid(gid).gr_mem else set()
    except KeyError:
        return set()


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


async def serve(host: Host, path: str | None,
                spawn: Callable[[Coroutine[Any, Any, None], str], object]
                ) -> ControlServer | None:
    """Listen on `path`, if there is to be a socket; a speaker that cannot be controlled
    still speaks, so a path it cannot use is an error, not the end."""
    if not path:
        log.info("no control socket: run under the unit ($RUNTIME_DIRECTORY), or give "
                 "--control PATH or $%s", ENV)
        return None
    control = ControlServer(host, path, spawn=spawn)
    try:
        await control.start()
    except OSError as e:
        log.error("no control socket: cannot listen on %s: %s", path, e)
        return None
    return control
