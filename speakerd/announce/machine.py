"""One announcement, from connecting to the drain, as a sans-I/O machine.

The runner (runner.py) opens the realtime connection and carries out what `handle`
returns; every input is a fact (an event of the connection, the drain, an interruption,
a wait that ran out) and every output a command. Timing comes from the conversation's
own settings (session.Settings): the same response timeout and drain margin.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from speakerd.errors import refusal
from speakerd.realtime import client as clientmod
from speakerd.realtime import protocol
from speakerd.session import Settings

log = logging.getLogger(__name__)

INSTRUCTIONS = ("You read announcements aloud on a smart speaker. Say the text the user "
                "gives you exactly as written, word for word, in its own language, and "
                "nothing else: no greeting, no comment, no question.")


def prompt(text: str) -> str:
    return f"Read this announcement aloud, word for word, and say nothing else:\n\n{text}"


# --- inputs besides the connection's own events -------------------------------------

@dataclass(frozen=True, slots=True)
class Drained:
    """The speaker played the announcement out."""

    speaker_missing: bool = False  # dropped unheard (the device went), yet drained


@dataclass(frozen=True, slots=True)
class Interrupted:
    """A conversation is starting (the wake word, the talk button)."""

    why: str
    played_ms: int


@dataclass(frozen=True, slots=True)
class TimedOut:
    """The wait the machine asked for ran out."""


# --- actions ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Send:
    event: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Enqueue:
    pcm: bytes


@dataclass(frozen=True, slots=True)
class Finish:
    """No more audio: report the drain."""


@dataclass(frozen=True, slots=True)
class Flush:
    """Silence the speaker now."""


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection."""


@dataclass(frozen=True, slots=True)
class Speaking:
    """The first sound was queued: the LEDs and the status say so until the end."""


@dataclass(frozen=True, slots=True)
class Wait:
    """From now on, report TimedOut after `seconds` without an input (until the next
    Wait); before the first, the settings' response timeout after each input."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Reply:
    """Done: this is the reply; with `played`, add the ms the speaker played."""

    reply: dict[str, Any]
    played: bool = False


@dataclass(frozen=True, slots=True)
class Again:
    """Cut off before a sound was heard: wait for the conversation, then start over."""


@dataclass
class Announcement:
    """The rules of saying one text; `handle(input) -> actions`."""

    number: int
    text: str
    settings: Settings = field(default_factory=Settings)
    speaking: bool = False
    connected: bool = False  # the session came up (Ready)
    response: str | None = None  # the service's id of our response
    audio_ms: float = 0.0
    draining: bool = False  # the last audio is queued: waiting for the drain
    done: bool = False

    def handle(self, event: object) -> list[object]:
        out = self._handle(event)
        self.done = self.done or any(isinstance(a, (Reply, Again)) for a in out)
        return out

    def _heard(self, why: str) -> list[object]:
        """It ends on a failure: silence what is playing (else a cue may be: leave it)."""
        return [*([Flush()] if self.speaking else []),
                Reply(refusal("unavailable", why), played=True)]

    def _handle(self, event: object) -> list[object]:
        if isinstance(event, TimedOut):
            if self.draining:
                log.warning("the speaker did not report the end of announcement %d (%.0f "
                            "ms of audio) in time; flushed it", self.number, self.audio_ms)
                return [Flush(), Reply(refusal("failed", "the speaker did not report the end "
                                               "of the announcement in time"), played=True)]
            return self._heard("service unavailable: no answer for "
                               f"{self.settings.response_timeout:.0f} s")
        if isinstance(event, Interrupted):
            if event.played_ms == 0:
                log.info("announcement %d put back: %s starts a conversation first",
                         self.number, event.why)
                return [Again()]
            return [Reply(refusal("interrupted", f"interrupted by the {event.why} after "
                                  f"{event.played_ms} ms", played_ms=event.played_ms))]
        if isinstance(event, Drained):
            if event.speaker_missing:
                return [Reply(refusal("no_speaker", "the speaker went missing while it "
                                      "played"), played=True)]
            return [Reply({"ok": True}, played=True)]
        if isinstance(event, clientmod.Ready):
            self.connected = True
            return [Send(protocol.user_text(prompt(self.text))),
                    Send(protocol.response_create(output_modalities=["audio"]))]
        if isinstance(event, clientmod.Disconnected):
            if self.draining:
                return []  # closed after response.done: the audio plays on
            if not self.connected:
                return [Reply(refusal("unavailable", f"service unreachable: {event.reason}"))]
            return self._heard(f"service unavailable: connection lost ({event.reason})")
        if isinstance(event, protocol.ServerError):
            return self._heard(f"service error: {event.message or event.code} "
                               f"({event.type}/{event.code or '-'})")
        if isinstance(event, protocol.ResponseCreated):
            self.response = self.response or event.response_id
        elif isinstance(event, protocol.AudioDelta) and event.response_id == self.response:
            self.audio_ms += len(event.pcm) / protocol.BYTES_PER_MS
            first = not self.speaking
            self.speaking = True
            return [*([Speaking()] if first else []), Enqueue(event.pcm)]
        elif isinstance(event, protocol.ResponseDone) and event.response_id == self.response:
            if event.status == "failed":
                _, why = protocol.classify_error(event.error_type, event.error_code)
                return self._heard(f"service error: the response failed: {why}")
            if self.audio_ms == 0:
                return [Reply(refusal("unavailable", f"service error: the response "
                                      f"({event.status}) held no audio"))]
            self.draining = True
            # All it had to say is here; the drain is late past the audio plus a margin.
            return [Finish(), Close(), Wait(self.audio_ms / 1000
                                            + self.settings.audio_margin_seconds)]
        return []
