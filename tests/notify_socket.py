"""A real NOTIFY_SOCKET for tests: a unix datagram socket that timestamps what it receives."""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)


@dataclass(frozen=True)
class Message:
    at: float  # the kernel's receive time, CLOCK_REALTIME seconds
    fields: dict[str, str]


class NotifySocket:
    """Bind at `path`; `wait_for("READY")` returns the first message carrying that field."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.bind(self.path)
        os.chmod(self.path, 0o777)
        self.messages: list[Message] = []

    def _recv(self, timeout: float) -> Message | None:
        ready, _, _ = select.select([self.sock], [], [], max(timeout, 0))
        if not ready:
            return None
        data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(16))
        at = time.time()
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                sec, nsec = struct.unpack("qq", payload[:16])
                at = sec + nsec / 1e9
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        msg = Message(at, fields)
        self.messages.append(msg)
        return msg

    def wait_for(self, field: str, value: str | None = None, timeout: float = 20) -> Message:
        deadline = time.monotonic() + timeout
        for msg in self.messages:
            if msg.fields.get(field) is not None and value in (None, msg.fields[field]):
                return msg
        while True:
            msg = self._recv(deadline - time.monotonic())
            if msg is None:
                seen = [m.fields for m in self.messages]
                raise TimeoutError(f"no {field}={value or '*'} within {timeout}s; got {seen}")
            if field in msg.fields and value in (None, msg.fields[field]):
                return msg

    def wait_until(self, field: str, accept: Callable[[str], bool], since: int = 0,
                   timeout: float = 20) -> Message:
        """The first message from index `since` on whose `field` `accept`s; meanwhile the
        ones that do not are kept in `messages` for the test to look at."""
        deadline = time.monotonic() + timeout
        seen = since
        while True:
            for msg in self.messages[seen:]:
                if field in msg.fields and accept(msg.fields[field]):
                    return msg
            seen = len(self.messages)
            if self._recv(deadline - time.monotonic()) is None:
                got = [m.fields.get(field) for m in self.messages[since:]]
                raise TimeoutError(f"no {field}= as wanted within {timeout}s; got {got}")

    def collect(self, field: str, count: int, timeout: float = 20) -> list[Message]:
        """Wait until `count` messages carrying `field` have arrived; return them all."""
        deadline = time.monotonic() + timeout
        while sum(field in m.fields for m in self.messages) < count:
            if self._recv(deadline - time.monotonic()) is None:
                raise TimeoutError(f"fewer than {count} {field} messages within {timeout}s")
        return [m for m in self.messages if field in m.fields]

    def listen(self, seconds: float) -> list[Message]:
        """Receive for `seconds`; every message so far."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._recv(left)
        return self.messages

    def close(self) -> None:
        self.sock.close()
