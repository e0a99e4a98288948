"""Tells systemd how speakerd is doing (sd_notify): ready, status, watchdog, reload, stop."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping

from systemd import daemon

log = logging.getLogger(__name__)


class Notifier:
    """sd_notify for the service manager; every method is a no-op without $NOTIFY_SOCKET."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.enabled = bool(env.get("NOTIFY_SOCKET"))
        self.watchdog_interval = _watchdog_interval(env)

    def _send(self, state: str) -> None:
        if self.enabled and not daemon.notify(state):
            # Losing a STATUS is harmless; losing pings gets us killed, so say so.
            log.warning("sd_notify(%s) failed: is $NOTIFY_SOCKET still there?",
                        state.split("=", 1)[0])

    def ready(self, status: str) -> None:
        self._send(f"READY=1\nSTATUS={status}")

    def status(self, text: str) -> None:
        self._send(f"STATUS={text}")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading config")

    def stopping(self) -> None:
        self._send("STOPPING=1\nSTATUS=stopping")


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when not asked for.

    systemd-python 235 has no watchdog_enabled(), so this reads what sd_watchdog_enabled
    reads: WATCHDOG_USEC, and WATCHDOG_PID when set must be this process.
    """
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
        pid = int(env.get("WATCHDOG_PID", "0") or "0")
    except ValueError:
        return None
    if usec <= 0 or (pid and pid != os.getpid()):
        return None
    return usec / 2 / 1e6
