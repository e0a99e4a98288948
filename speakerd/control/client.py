"""`speakerd status` and `speakerd announce`: one request to the control socket, its reply
for a person."""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

ENV = "SPEAKERD_CONTROL"  # the socket's path, for `speakerd run` and `speakerd status`
DEFAULT_PATH = "/run/speakerd/control"


def client_path(explicit: str | None = None) -> str:
    """Where `speakerd status` looks: --control, $SPEAKERD_CONTROL, else DEFAULT_PATH."""
    return explicit or os.environ.get(ENV) or DEFAULT_PATH


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
