"""What the speaker remembers across restarts, in its state directory (systemd's
StateDirectory=, /var/lib/speakerd): mute, and the phrases recorded in the assistant's
voice. Run by hand without one, it remembers nothing."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from speakerd.phrase_cache import PhraseCache

log = logging.getLogger(__name__)


class StateDir:
    """`path` (else $STATE_DIRECTORY's first entry, else none)."""

    def __init__(self, path: str | None = None) -> None:
        where = path or os.environ.get("STATE_DIRECTORY", "").split(":")[0]
        self.path = Path(where) if where else None
        self.phrases = PhraseCache(self.path / "phrases") if self.path else None

    @property
    def muted(self) -> bool:
        return bool(self.path and (self.path / "muted").exists())

    def remember_mute(self, muted: bool) -> None:
        if self.path is None:
            return
        file = self.path / "muted"
        try:
            if muted:
                file.touch()
            else:
                file.unlink(missing_ok=True)
        except OSError as e:
            log.warning("could not remember the mute state in %s: %s", file, e)
