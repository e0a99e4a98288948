"""The status phrases in the assistant's own voice, kept in the state directory.

One file per voice and wording (the name is a hash of both, so a change of either
makes a new recording): a header line, a JSON line naming voice, text, length and
SHA-256 of the PCM, then the 24 kHz s16 mono PCM. A file that is truncated, corrupt
or not for this voice and text is ignored, removed and made again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

MAGIC = b"speakerd phrase 1\n"
RATE = 24000


class PhraseCache:
    """Model-voice recordings of the phrases under `directory` (created when needed)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, voice: str, text: str) -> Path:
        key = hashlib.sha256(f"{voice}\n{text}".encode()).hexdigest()[:32]
        return self.directory / f"{key}.pcm"

    def load(self, voice: str, text: str) -> bytes | None:
        """The recording of `text` in `voice`, or None (none yet, or a bad file: removed)."""
        path = self.path(voice, text)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("cannot read the phrase recording %s: %s; it will be made again",
                        path, e)
            return None
        why = _why_bad(data, voice, text)
        if why is None:
            return data[data.index(b"\n", len(MAGIC)) + 1:]
        log.warning("ignored the phrase recording %s (%s); it will be made again", path, why)
        with contextlib.suppress(OSError):
            path.unlink()
        return None

    def store(self, voice: str, text: str, pcm: bytes) -> Path:
        """Write the recording atomically (a crash leaves the old file or none); OSError."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.path(voice, text)
        header = json.dumps({"voice": voice, "text": text, "rate": RATE, "bytes": len(pcm),
                             "sha256": hashlib.sha256(pcm).hexdigest()}).encode()
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + header + b"\n" + pcm)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path


def _why_bad(data: bytes, voice: str, text: str) -> str | None:
    if not data.startswith(MAGIC):
        return "not a phrase recording"
    end = data.find(b"\n", len(MAGIC))
    if end < 0:
        return "truncated in its header"
    try:
        header = json.loads(data[len(MAGIC):end])
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except ValueError as e:
        return f"bad header: {e}"
    if header.get("voice") != voice or header.get("text") != text:
        return "made for another voice or wording"
    pcm = data[end + 1:]
    if len(pcm) != header.get("bytes") or len(pcm) % 2:
        return f"truncated: {len(pcm)} of {header.get('bytes')} bytes"
    if hashlib.sha256(pcm).hexdigest() != header.get("sha256"):
        return "corrupt: its checksum does not match"
    return None
