"""Runs speakerd on one asyncio loop: signals, config reload, watchdog, and the parts it wires."""

from __future__ import annotations

import asyncio
import logging
import signal

from speakerd import __version__
from speakerd import config as configmod
from speakerd import log as logmod
from speakerd.errors import ConfigError
from speakerd.notify import Notifier

log = logging.getLogger(__name__)


class Daemon:
    """Owns the loop's state. Call `await run()`; it returns the process exit code."""

    def __init__(self, config: configmod.Config, *, notifier: Notifier,
                 redact: logmod.RedactFilter) -> None:
        self.config = config
        self.notifier = notifier
        self.redact = redact
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self.request_stop, "SIGINT")
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        if self.notifier.watchdog_interval:
            self._tasks.append(asyncio.create_task(self._watchdog(), name="watchdog"))
        self._log_startup()
        self.notifier.ready("idle")
        try:
            await self._stop.wait()
        finally:
            self.notifier.stopping()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        log.info("speakerd stopped")
        return 0

    def request_stop(self, why: str = "request") -> None:
        if not self._stop.is_set():
            log.info("stopping on %s", why)
            self._stop.set()

    def reload(self) -> None:
        """SIGHUP: re-read the config file; a bad file is reported and the old one kept."""
        self.notifier.reloading()
        path = self.config.path
        try:
            new = configmod.load(path)
            key = configmod.resolve_api_key(new)
        except ConfigError as e:
            log.error("config reload failed, keeping the running config: %s", e)
            self.notifier.ready("idle (config reload failed, old config kept)")
            return
        if key:
            self.redact.add(key.reveal())
        self.config = new
        logmod.set_level(new.log.level)
        log.info("config reloaded from %s", path)
        self.notifier.ready("idle")

    async def _watchdog(self) -> None:
        # Pinged from the loop itself: if the loop wedges, the pings stop and
        # systemd restarts us, which is the point of WatchdogSec.
        interval = self.notifier.watchdog_interval
        assert interval
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    def _log_startup(self) -> None:
        c = self.config
        log.info("speakerd %s started: config %s, wake word %s, mic %s, speaker %s, "
                 "model %s at %s", __version__, c.path, ",".join(c.wake_word.models),
                 c.audio.capture_device, c.audio.playback_device, c.realtime.model,
                 c.realtime.url, extra=logmod.fields(state="idle", event="start"))
