"""Sends speakerd's log to journald with structured fields (or stderr), secrets redacted."""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Any, TextIO

from systemd import journal

JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "speakerd"
# Structured journal fields speakerd sets through `extra=`; journalctl can filter on them.
FIELDS = ("SPEAKERD_STATE", "SPEAKERD_SESSION", "SPEAKERD_EVENT")
# OpenAI-style keys: "sk-" then a long token. Matches project and service keys too.
_KEY_SHAPE = re.compile(r"sk-[A-Za-z0-9_\-]{8,}")
MASK = "****"
# One plain line per record wherever records go as text (stderr, a terminal).
LINE_FORMAT = "speakerd %(levelname)s %(name)s: %(message)s"

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO,
          "warning": logging.WARNING, "error": logging.ERROR}


class RedactFilter(logging.Filter):
    """Rewrites each record so that no secret reaches any handler.

    The message is formatted here (args folded in) and the traceback rendered
    to text, because JournalHandler would otherwise also send the raw args and
    exception objects as fields of their own.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets: list[str] = []
        self.add(*secrets)

    def add(self, *secrets: str) -> None:
        # Short strings would blank out ordinary words; real keys are long.
        self._secrets.extend(s for s in secrets if s and len(s) >= 8)

    def redact(self, text: str) -> str:
        for s in self._secrets:
            text = text.replace(s, MASK)
        return _KEY_SHAPE.sub("sk-" + MASK, text)

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.redact(record.getMessage())
        record.args = None
        if record.exc_info:
            text = record.exc_text or logging.Formatter().formatException(record.exc_info)
            record.exc_text = self.redact(text)
            record.exc_info = None
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        for name, value in list(vars(record).items()):
            if name.isupper() and isinstance(value, str):
                setattr(record, name, self.redact(value))
        return True


class FieldsFormatter(logging.Formatter):
    """Plain-text lines for stderr that still show the structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = " ".join(f"{f}={getattr(record, f)}" for f in FIELDS if hasattr(record, f))
        return f"{line} [{extra}]" if extra else line


class JournalOrStderrHandler(journal.JournalHandler):
    """Sends records to journald natively; while its socket refuses, one stderr line each.

    journald may stop or restart under a running speakerd. stderr is the unit's
    journal stream, which systemd keeps open across journald restarts, so a record
    the native socket refuses is written there once, as a plain line, instead of
    being lost with a logging traceback. Each record tries the native socket
    first: a refused datagram is one failed syscall, cheaper than keeping a retry
    clock, and the first record after journald is back goes natively again. A
    line on stderr says when the journal first refused; a journal entry says when
    it is back and how many records went to stderr meanwhile.
    """

    def __init__(self, stream: TextIO | None = None, **fields: str) -> None:
        super().__init__(sender_function=self._send, **fields)
        self.stderr = logging.StreamHandler(stream)  # None: sys.stderr
        self.stderr.setFormatter(FieldsFormatter(LINE_FORMAT))
        self._refused: OSError | None = None  # what the last native send raised
        self._unsent = 0  # records written to stderr since the journal first refused

    def _send(self, message: str, /, **fields: Any) -> None:
        try:
            journal.send(message, **fields)
        except OSError as error:
            self._refused = error

    def emit(self, record: logging.LogRecord) -> None:
        """Called under the handler's lock, after the filters (redaction) ran."""
        if self._send_native(record):
            if self._unsent and self._send_native(self._own_record(
                    logging.INFO, f"journald is back; {self._unsent} record(s) went to stderr "
                                  "meanwhile")):
                self._unsent = 0
            return
        if not self._unsent:
            self.stderr.emit(self._own_record(
                logging.WARNING, f"journald refused a record ({self._refused}); "
                                 "records go to stderr until it is back"))
        self._unsent += 1
        self.stderr.emit(record)

    def _send_native(self, record: logging.LogRecord) -> bool:
        """False when the journal socket refused the record."""
        self._refused = None
        super().emit(record)  # sends through _send
        return self._refused is None

    def _own_record(self, level: int, message: str) -> logging.LogRecord:
        """A record of the handler's own, filtered like any other."""
        record = logging.LogRecord(__name__, level, __file__, 0, message, None, None)
        self.filter(record)
        return record

    def close(self) -> None:
        self.stderr.close()
        super().close()


def want_journal(environ: Mapping[str, str] | None = None) -> bool:
    """True when records should go to journald natively rather than to stderr.

    $SPEAKERD_LOG_TARGET=journal|stderr decides when set. Otherwise, as sd-journal
    recommends, journald is used when it is there and our stderr is already
    connected to it ($JOURNAL_STREAM names stderr's device:inode): that is how
    the unit runs us, while `speakerd run` typed in a terminal prints there.
    """
    env = os.environ if environ is None else environ
    target = env.get("SPEAKERD_LOG_TARGET", "auto")
    if target in ("journal", "stderr"):
        return target == "journal"
    if not os.path.exists(JOURNAL_SOCKET):
        return False
    try:
        dev, ino = (int(x) for x in env.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup(level: str = "info", secrets: Iterable[str] = (), *,
          use_journal: bool | None = None) -> RedactFilter:
    """Route the root logger to journald or stderr; returns the filter to add secrets to."""
    redact = RedactFilter(secrets)
    if use_journal is None:
        use_journal = want_journal()
    handler: logging.Handler
    if use_journal:
        handler = JournalOrStderrHandler(sys.stderr, SYSLOG_IDENTIFIER=IDENTIFIER)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(FieldsFormatter(LINE_FORMAT))
    handler.addFilter(redact)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    set_level(level)
    return redact


def set_level(level: str) -> None:
    logging.getLogger().setLevel(LEVELS[level])
    # websockets logs every frame at debug; that is noise even at our debug level.
    logging.getLogger("websockets").setLevel(max(LEVELS[level], logging.INFO))


def fields(**values: Any) -> dict[str, Any]:
    """`extra=` for a log call: fields(state="listening") -> {"SPEAKERD_STATE": ...}."""
    return {f"SPEAKERD_{k.upper()}": str(v) for k, v in values.items()}
