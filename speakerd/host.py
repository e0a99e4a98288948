"""The speaker as the control socket and announcements see it: its status line and
report, the LEDs, talk, mute, volume, levels, and the stage announcements play on.

It implements control.server.Host and announce.Stage against a small Shell (the
daemon), so neither feature imports the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

from speakerd import __version__
from speakerd import session as s
from speakerd.announce import INSTRUCTIONS, Announcer
from speakerd.announce.runner import Connection, Speaker
from speakerd.config import Config, Secret
from speakerd.control.server import Volume
from speakerd.control.stats import Stats
from speakerd.devices import SPEAKER, Devices
from speakerd.errors import UnavailableError, refusal
from speakerd.leds import Leds
from speakerd.notify import Notifier
from speakerd.realtime import client as clientmod
from speakerd.realtime import protocol

log = logging.getLogger(__name__)

SETTLE_TIMEOUT = 5.0  # seconds the session may take to handle what a request queued


class Shell(Protocol):
    """What the host needs of the daemon."""

    session: s.Session
    config: Config
    api_key: Secret | None
    devices: Devices | None
    volume: Volume
    stats: Stats
    announcer: Announcer
    notifier: Notifier
    leds: Leds
    mcp: Any  # speakerd.tools.mcp.Manager, when [[mcp]] is configured
    reload_failed: bool

    def press(self, button: str) -> None: ...  # as if on the GPIO
    def handle_now(self, inp: object) -> None: ...  # the session takes it at once
    async def settled(self) -> None: ...  # every input queued so far handled


class Host:
    """See the module's docstring. `changed()` after every input the session took."""

    def __init__(self, shell: Shell) -> None:
        self.shell = shell
        self._changed = asyncio.Event()  # the session took an input: maybe it rests now
        self._lock = asyncio.Lock()  # one request at a time changes the session

    # --- what the speaker shows ----------------------------------------------------

    def status_line(self) -> str:
        """The unit's STATUS= line, and the control socket's `status`: a missing device
        first, else the session's (its state, an announcement, " (muted)"); then a
        failed reload, said until a reload succeeds."""
        sh = self.shell
        session = sh.session
        doing = sh.devices.waiting() if sh.devices else ""
        line = s.status_text(session.state, session.muted, doing) if doing else session.status
        if sh.reload_failed:
            line += "; config reload failed, old config kept"
        return line

    def show(self) -> None:
        """The status line and the LEDs as things stand."""
        self.shell.notifier.status(self.status_line())
        self.show_leds()

    def show_leds(self, pattern: str | None = None) -> None:
        """The session's pattern (`pattern`, else its current one), unless a device is
        missing: that the session cannot know, and it shows as an error."""
        sh = self.shell
        missing = bool(sh.devices and sh.devices.missing)
        sh.leds.show("error" if missing else pattern or sh.session.leds)

    def changed(self) -> None:
        self._changed.set()

    # --- control.server.Host --------------------------------------------------------

    @property
    def volume(self) -> Volume:
        return self.shell.volume

    def status(self) -> dict[str, Any]:
        """The control socket's `status` reply (README, "Control socket")."""
        sh = self.shell
        c = sh.config
        detector = sh.devices.detector if sh.devices else None
        return {
            "version": __version__, "pid": os.getpid(), "state": sh.session.state.value,
            "status": self.status_line(), "muted": sh.session.muted, **sh.stats.as_dict(),
            "wake_word": {"models": [{"name": m.name, "threshold": m.threshold}
                                     for m in (detector.classifiers if detector else [])],
                          "threshold": c.wake_word.threshold},
            **(sh.devices.status() if sh.devices else {}),
            "realtime": {"url": c.realtime.url, "model": c.realtime.model},
            "mcp": sh.mcp.status() if sh.mcp else [],  # [[mcp]] servers and their tools
            "announcements": sh.announcer.status(),
        }

    async def _settled(self) -> None:
        await asyncio.wait_for(self.shell.settled(), SETTLE_TIMEOUT)

    async def talk(self) -> dict[str, Any]:
        sh = self.shell
        async with self._lock:
            await self._settled()
            if sh.session.muted:
                return refusal("muted", 'the microphone is muted: send {"request": '
                               '"unmute"} first')
            before = sh.session.state
            sh.press("talk")
            await self._settled()
        log.info("talk requested on the control socket", extra={"SPEAKERD_EVENT": "talk"})
        state = sh.session.state
        return {"ok": True, "state": state.value,
                "started": before is s.State.IDLE and state is not s.State.IDLE}

    async def mute(self, on: bool) -> dict[str, Any]:
        sh = self.shell
        async with self._lock:
            await self._settled()
            changed = sh.session.muted != on
            if changed:
                sh.press("mute")
                await self._settled()
        return {"ok": True, "muted": sh.session.muted, "changed": changed}

    async def levels(self, seconds: float) -> dict[str, Any]:
        devices = self.shell.devices
        if devices is None:
            raise UnavailableError("the microphone is not set up yet: no levels to report")
        return await devices.levels(seconds)

    async def announce(self, text: object) -> dict[str, Any]:
        return await self.shell.announcer.announce(text)

    # --- announce.Stage ----------------------------------------------------------------

    @property
    def settings(self) -> s.Settings:
        return self.shell.session.settings

    @property
    def has_key(self) -> bool:
        return self.shell.api_key is not None

    @property
    def missing_speaker(self) -> str | None:
        devices = self.shell.devices
        return devices.missing.get(SPEAKER) if devices else self.shell.config.audio.playback_device

    @property
    def speaker(self) -> Speaker:
        devices = self.shell.devices
        assert devices is not None
        return devices.playback

    def connect(self, on_event: Callable[[object], None]) -> Connection:
        c = self.shell.config.realtime
        return clientmod.RealtimeClient(
            url=c.url, model=c.model, api_key=self.shell.api_key, on_event=on_event,
            session_update=protocol.announce_session_update(
                model=c.model, voice=c.voice, instructions=INSTRUCTIONS),
            preroll_seconds=0, backoff=clientmod.Backoff(attempts=CONNECT_ATTEMPTS))

    async def until_idle(self, timeout: float) -> bool:
        # A wake word that interrupted an announcement was queued for the session just
        # before: let the session take it (and leave IDLE) before looking.
        await self.shell.settled()
        deadline = time.monotonic() + timeout
        while self.shell.session.state is not s.State.IDLE:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return True

    def speaking(self, on: bool) -> None:
        """An announcement started or stopped making sound: the LEDs and status say so."""
        self.shell.handle_now(s.AnnouncementPlaying(on))


CONNECT_ATTEMPTS = 2  # an announcement's connection: the house waits for the reply
