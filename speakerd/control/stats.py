"""What the control socket's `status` reports besides the daemon's own fields: the
conversations, the realtime service's connects and failures, the last error logged."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from speakerd.realtime import client as clientmod
from speakerd.session import State, Step


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

    def began(self, trigger: str) -> None:
        """A conversation began (the session's ConversationStarted)."""
        self.conversations += 1
        self.current = Conversation(self.conversations, trigger, time.time())
        self.last = self.current

    def follow(self, step: Step) -> None:
        """After each input: a turn is the user's speech committed."""
        if self.current is not None and (step.before, step.after) == (State.LISTENING,
                                                                      State.THINKING):
            self.current.turns += 1

    def ended(self, reason: str) -> None:
        """The conversation is over (the session's ConversationEnded)."""
        if self.current is not None:
            self.current.ended = time.time()
            self.current.reason = reason
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
