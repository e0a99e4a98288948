"""The local control socket: one JSON request per line in, one JSON reply per line out.

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
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from speakerd import session as s
from speakerd.audio import levels
from speakerd.errors import UnavailableError
from speakerd.realtime import client as clientmod

if TYPE_CHECKING:
    from speakerd.daemon import Daemon

log = logging.getLogger(__name__)

ENV = "SPEAKERD_CONTROL"  # the socket's path, for `speakerd run` and `speakerd status`
DEFAULT_PATH = "/run/speakerd/control"
GROUP = "speakerd"  # members may use the socket
MODE = 0o660
MAX_LINE = 4096  # bytes of one request, newline included
MAX_CLIENTS = 4  # connections served at once; more are refused with an error line
IDLE_TIMEOUT = 5.0  # seconds a client may take to send a whole request
SEND_TIMEOUT = 5.0  # seconds a client may take to read a reply
SETTLE_TIMEOUT = 5.0  # seconds the session may take to handle what a request queued
LEVELS_SECONDS = 3.0  # what a levels request measures unless it says
REQUESTS = ("status", "talk", "mute", "unmute", "volume", "levels", "announce")
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13; not in Python 3.11


def server_path(explicit: str | None = None) -> str | None:
    """Where `speakerd run` listens: --control, $SPEAKERD_CONTROL, else the unit's
    RuntimeDirectory; None (no socket) when run by hand without any of them."""
    if explicit:
        return explicit
    if os.environ.get(ENV):
        return os.environ[ENV]
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return os.path.join(runtime, "control") if runtime else None


def client_path(explicit: str | None = None) -> str:
    """Where `speakerd status` looks: --control, $SPEAKERD_CONTROL, else DEFAULT_PATH."""
    return explicit or os.environ.get(ENV) or DEFAULT_PATH


# --- what status reports besides the daemon's own fields -------------------------------

@dataclass
class Conversation:
    number: int
    trigger: str  # "wake word hey_jarvis", "talk button"
    started: float  # wall clock, seconds since the epoch
    ended: float | None = None
    turns: int = 0  # times the user's speech was committed
    reason: str | None = None  # why it ended


class Stats:
    """Counters the status request reports, fed by the daemon from its work loop."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.conversations = 0
        self.current: Conversation | None = None
        self.last: Conversation | None = None
        self.connects = 0  # realtime sessions that came up (session.updated)
        self.failures = 0  # connections that never came up, or ended unrecoverably
        self.last_failure: str | None = None
        self.last_error: dict[str, Any] | None = None
        self._errors: _LastError | None = None

    def watch_errors(self, redact: Callable[[str], str]) -> None:
        """Keep the last ERROR speakerd logs from now on; `unwatch_errors()` to stop."""
        self.unwatch_errors()
        self._errors = _LastError(self, redact)
        logging.getLogger("speakerd").addHandler(self._errors)

    def unwatch_errors(self) -> None:
        if self._errors:
            logging.getLogger("speakerd").removeHandler(self._errors)
            self._errors = None

    def step(self, before: s.State, conv: Any, inp: object, after: s.State) -> None:
        """The session went from `before` (holding `conv`) to `after` on `inp`."""
        resting = (s.State.IDLE, s.State.ERROR)
        if before in resting and after not in resting:
            self.conversations += 1
            self.current = Conversation(self.conversations, _trigger(inp), time.time())
            self.last = self.current
        elif self.current is not None:
            if before is s.State.LISTENING and after is s.State.THINKING:
                self.current.turns += 1
            if after in resting:
                self.current.ended = time.time()
                self.current.reason = _end_reason(conv, inp)
                self.current = None

    def realtime(self, event: object, ready: bool) -> None:
        """An event of the conversation's realtime client; `ready`: it had come up."""
        if isinstance(event, clientmod.Ready):
            self.connects += 1
        elif isinstance(event, clientmod.Disconnected) and (event.unrecoverable or not ready):
            self.failures += 1
            self.last_failure = event.reason

    def as_dict(self) -> dict[str, Any]:
        return {
            "uptime_seconds": round(time.monotonic() - self.started, 1),
            "conversations": self.conversations,
            "last_conversation": asdict(self.last) if self.last else None,
            "realtime_connects": self.connects,
            "realtime_failures": self.failures,
            "realtime_last_failure": self.last_failure,
            "last_error": self.last_error,
        }


def _trigger(inp: object) -> str:
    if isinstance(inp, s.WakeWordDetected):
        return f"wake word {inp.model}"
    if isinstance(inp, s.ButtonPressed):
        return f"{inp.button} button"
    return type(inp).__name__


def _end_reason(conv: Any, inp: object) -> str:
    if conv is not None and (conv.error or conv.end):
        return str(conv.error or conv.end)
    if isinstance(inp, s.TimerFired):
        return {"follow_up": "no follow-up", "session": "maximum session length"}.get(
            inp.name, f"timer {inp.name}")
    if isinstance(inp, s.ButtonPressed):
        return {"talk_long": "talk button held", "mute": "muted"}.get(
            inp.button, f"{inp.button} button")
    if isinstance(inp, s.EndRequested):
        return inp.reason
    if isinstance(inp, s.ToolDone) and inp.end_conversation:
        return "end_conversation tool"
    return type(inp).__name__


class _LastError(logging.Handler):
    """Keeps the last ERROR (or worse) that speakerd logged, redacted, for status."""

    def __init__(self, stats: Stats, redact: Callable[[str], str]) -> None:
        super().__init__(logging.ERROR)
        self._stats = stats
        self._redact = redact

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self._redact(record.getMessage())
        except Exception:  # a handler must never raise into the code that logged
            message = str(record.msg)
        self._stats.last_error = {"at": record.created, "message": message}


# --- the server -----------------------------------------------------------------------

class BadRequest(Exception):
    """The peer broke the protocol: the reply says how, then the connection closes."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def error(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "code": code, "error": message}


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
    """The socket on the daemon's loop. `await start()`, later `close()`.

    `spawn(coro, name)` runs each connection as a task the daemon watches (and
    cancels on stop).
    """

    def __init__(self, daemon: Daemon, path: str, *,
                 spawn: Callable[[Coroutine[Any, Any, None], str], object],
                 max_clients: int = MAX_CLIENTS, idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.daemon = daemon
        self.path = path
        self.max_clients = max_clients
        self.idle_timeout = idle_timeout
        self._spawn = spawn
        self._server: asyncio.AbstractServer | None = None
        self._inode = 0
        self._gid = os.getegid()
        self._clients = 0
        self._refused = 0  # busy refusals since the last client was served
        self._lock = asyncio.Lock()  # one request at a time changes the session

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
            await self._send_and_close(writer, error(
                "busy", f"too many control clients (at most {self.max_clients}); try again"))
            return
        self._clients += 1
        if self._refused:
            log.warning("refused %d control client(s) while busy", self._refused)
            self._refused = 0
        try:
            refusal = self._check_peer(writer)
            if refusal:
                log.warning("refused a control client: %s", refusal)
                await self._send(writer, error("denied", refusal))
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
                    await self._send(writer, error(
                        "timeout", f"no request within {self.idle_timeout:.0f} s"))
                return
            except asyncio.LimitOverrunError:
                log.warning("closed a control connection whose request was longer than "
                            "%d bytes", MAX_LINE)
                await self._send(writer, error("too_long",
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
                await self._send(writer, error(e.code, str(e)))
                return
            await self._send(writer, await self._answer(request))
            answered = True
            if last:
                return

    async def _answer(self, request: dict[str, Any]) -> dict[str, Any]:
        name = request["request"]
        try:
            if name == "status":
                return {"ok": True, **self.daemon.status()}
            if name == "talk":
                return await self._talk()
            if name in ("mute", "unmute"):
                return await self._mute(name == "mute")
            if name == "volume":
                return self._volume(request)
            if name == "levels":
                return await self._levels(request)
            if name == "announce":  # answered after the drain (speakerd/announce.py)
                return await self.daemon.announcer.announce(request.get("text"))
        except Exception as e:
            # The supervisor of one request: log it, answer, and keep serving.
            log.exception("control request %s failed", name)
            return error("failed", f"{name} failed: {type(e).__name__}: {e}")
        return error("unknown_request",
                     f"unknown request {name[:40]!r}; one of: {', '.join(REQUESTS)}")

    async def _settled(self) -> None:
        await asyncio.wait_for(self.daemon.settled(), SETTLE_TIMEOUT)

    async def _talk(self) -> dict[str, Any]:
        d = self.daemon
        async with self._lock:
            await self._settled()
            if d.session.muted:
                return error("muted", 'the microphone is muted: send {"request": "unmute"} '
                             "first")
            before = d.session.state
            d.press("talk")
            await self._settled()
        log.info("talk requested on the control socket", extra={"SPEAKERD_EVENT": "talk"})
        state = d.session.state
        return {"ok": True, "state": state.value,
                "started": before is s.State.IDLE and state is not s.State.IDLE}

    async def _mute(self, want: bool) -> dict[str, Any]:
        d = self.daemon
        async with self._lock:
            await self._settled()
            changed = d.session.muted != want
            if changed:
                d.press("mute")
                await self._settled()
        return {"ok": True, "muted": d.session.muted, "changed": changed}

    def _volume(self, request: dict[str, Any]) -> dict[str, Any]:
        percent, change = request.get("percent"), request.get("change")
        if percent is not None and change is not None:
            return error("bad_argument", 'give "percent" or "change", not both')
        volume = self.daemon.volume
        if percent is not None:
            if not _int_in(percent, 0, 100):
                return error("bad_argument", '"percent" is an integer from 0 to 100')
            return {"ok": True, **volume.set(percent)}
        if change is not None:
            if not _int_in(change, -100, 100):
                return error("bad_argument", '"change" is an integer from -100 to 100')
            return {"ok": True, **volume.step(change)}
        return {"ok": True, **volume.get()}

    async def _levels(self, request: dict[str, Any]) -> dict[str, Any]:
        seconds = request.get("seconds", LEVELS_SECONDS)
        low, high = levels.MIN_SECONDS, levels.MAX_SECONDS
        if (not isinstance(seconds, (int, float)) or isinstance(seconds, bool)
                or not low <= seconds <= high):
            return error("bad_argument", f'"seconds" is a number from {low:g} to {high:g}')
        try:
            return {"ok": True, **await self.daemon.levels(float(seconds))}
        except UnavailableError as e:
            return error("unavailable", str(e))


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


# --- the client (`speakerd status`) ------------------------------------------------------

class Unreachable(Exception):
    """No daemon answers on the socket; `str()` is the line to show."""


class Denied(Unreachable):
    """The socket (or the daemon) refused us: a permissions matter."""


HINT = "run it with sudo, or join the speakerd group (sudo adduser $USER speakerd)"


def ask(path: str, request: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Send one request, return its reply; Unreachable/Denied with the line to show."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise Unreachable(f"speakerd is not running (no {path})") from None
        except PermissionError:
            raise Denied(f"permission denied on {path}: {HINT}") from None
        except ConnectionRefusedError:
            raise Unreachable(f"speakerd is not running (nothing answers on {path})"
                              ) from None
        except OSError as e:
            raise Unreachable(f"cannot connect to {path}: {e.strerror or e}") from None
        try:
            try:
                sock.sendall(json.dumps(request).encode() + b"\n")
                sock.shutdown(socket.SHUT_WR)  # one request: the daemon closes after its reply
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused before we spoke: its reason is waiting to be read below
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            raise Unreachable(f"speakerd does not answer on {path} (no reply within "
                              f"{timeout:.0f} s)") from None
        except OSError as e:
            raise Unreachable(f"speakerd closed {path}: {e.strerror or e}") from None
    try:
        reply = json.loads(data)
    except ValueError:
        raise Unreachable(f"speakerd does not answer on {path} (no reply)") from None
    if not isinstance(reply, dict):
        raise Unreachable(f"unexpected reply on {path}: {data[:80]!r}")
    if reply.get("code") == "denied":
        raise Denied(f"{reply.get('error')}: {HINT}")
    return reply


def describe(st: dict[str, Any]) -> str:
    """A status reply as lines for a person."""
    def when(t: float | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"

    def device(d: dict[str, Any]) -> str:
        f = d.get("format")
        got = (f"{f['rate']} Hz, {f['channels']} channel{'s' * (f['channels'] != 1)}, "
               f"{f['format']}") if f else "not open"
        return f"{d['device']} ({'missing, waiting for it' if d.get('missing') else got})"

    def turns(n: int) -> str:
        return f"{n} turn{'s' * (n != 1)}"

    rows = [("state", st.get("status", st.get("state")))]
    conv = f"{st.get('conversations', 0)}"
    last = st.get("last_conversation")
    if last:
        conv += f"; the last (#{last['number']}, by {last['trigger']}) began " \
                f"{when(last['started'])}, {turns(last['turns'])}"
        conv += (f", ended after {_duration(last['ended'] - last['started'])}: "
                 f"{last['reason']}") if last.get("ended") else " so far"
    rows.append(("conversations", conv))
    rows.append(("wake word", ", ".join(f"{m['name']} (threshold {m['threshold']})"
                                        for m in st.get("wake_word", {}).get("models", []))))
    for what, d in st.get("devices", {}).items():
        rows.append((what, device(d)))
    rows.append(("audio", f"{st.get('underruns', 0)} underruns, {st.get('overruns', 0)} "
                          "overruns"))
    rt = st.get("realtime", {})
    failure = st.get("realtime_last_failure")
    rows.append(("realtime", f"{rt.get('model', '?')} at {rt.get('url', '?')}: "
                             f"{st.get('realtime_connects', 0)} connects, "
                             f"{st.get('realtime_failures', 0)} failures"
                             + (f" (last: {failure})" if failure else "")))
    for server in st.get("mcp", []):
        rows.append((f"mcp {server['name']}", f"{server['where']}: {mcp_summary(server)}"))
    err = st.get("last_error")
    rows.append(("last error", f"{when(err['at'])} {err['message']}" if err else "none"))
    head = (f"speakerd {st.get('version', '?')} (pid {st.get('pid', '?')}), "
            f"up {_duration(st.get('uptime_seconds', 0))}")
    return "\n".join([head, *(f"{label + ':':15s}{text}" for label, text in rows)])


def mcp_summary(server: dict[str, Any], names: bool = True) -> str:
    """One [[mcp]] server as `status`, `check` and `config --show` say it: connected,
    the tools offered (with their `names`), and each tool skipped with why."""
    if not server.get("connected"):
        return f"not connected: {server.get('error') or 'trying'}"
    tools, skipped = server.get("tools", []), server.get("skipped", {})
    text = f"connected, {len(tools)} tool{'s' if len(tools) != 1 else ''} offered"
    if names and tools:
        text += f" ({', '.join(tools)})"
    if not skipped:
        return text + ", none skipped"
    return text + f", {len(skipped)} skipped: " + "; ".join(
        f"{name} ({why})" for name, why in skipped.items())


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"
