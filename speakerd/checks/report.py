"""The checklist's lines: `ok` / `warn` / `FAIL` / `skip`, each warn or FAIL with what to do."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TextIO

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"


@dataclass(frozen=True, slots=True)
class Line:
    status: str
    what: str  # the check, e.g. "microphone level"
    text: str  # what it found
    fix: str = ""  # what to do (every warn and FAIL has one)


def ok(what: str, text: str) -> Line:
    return Line(OK, what, text)


def warn(what: str, text: str, fix: str) -> Line:
    return Line(WARN, what, text, fix)


def fail(what: str, text: str, fix: str) -> Line:
    return Line(FAIL, what, text, fix)


def skip(what: str, text: str) -> Line:
    return Line(SKIP, what, text)


class Report:
    """Prints each line as it comes (a person watches a slow check run), keeps them."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.lines: list[Line] = []

    def add(self, line: Line) -> Line:
        self.lines.append(line)
        print(f"{line.status:<5} {line.what}: {line.text}", file=self.out)
        if line.fix:
            print(f"      fix: {line.fix}", file=self.out)
        self.out.flush()
        return line

    @property
    def failed(self) -> bool:
        return any(line.status == FAIL for line in self.lines)
