"""Drives speakerd.service under a private `systemd --user` manager; prints JSON results.

usage: unit_scenario.py UNIT_TEXT_FILE GOOD_CONFIG BAD_CONFIG
Run inside user-manager-sandbox. Each step waits on the manager's own state, with
a deadline, never on a fixed sleep.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

unit_text, good, bad = Path(sys.argv[1]).read_text(), sys.argv[2], sys.argv[3]
units = Path(os.environ["XDG_CONFIG_HOME"]) / "systemd" / "user"


def systemctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemctl", "--user", *args], capture_output=True, text=True,
                          timeout=60, check=check)


def show(unit: str) -> dict[str, str]:
    out = systemctl("show", unit, "-p", "ActiveState,SubState,MainPID,NRestarts,Result,"
                    "ExecMainStatus,StatusText").stdout
    return dict(line.split("=", 1) for line in out.splitlines())


def wait(unit: str, pred, timeout: float = 60) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        state = show(unit)
        if pred(state) or time.monotonic() > deadline:
            return state
        time.sleep(0.1)  # polling the manager's state, bounded by the deadline


(units / "speakerd.service").write_text(unit_text.replace("@CONFIG@", good))
(units / "speakerd-bad.service").write_text(unit_text.replace("@CONFIG@", bad))
systemctl("daemon-reload")
result: dict[str, object] = {}

# Type=notify: `start` returns only once READY=1 has arrived.
start = systemctl("start", "speakerd.service", check=False)
result["start_rc"] = start.returncode
result["after_start"] = show("speakerd.service")

# A wedged process stops pinging; the manager must kill and restart it.
pid = int(result["after_start"]["MainPID"])  # type: ignore[index]
if pid <= 0:  # never signal a process group by accident
    print(json.dumps(result))
    sys.exit(0)
os.kill(pid, signal.SIGSTOP)
result["after_watchdog"] = wait(
    "speakerd.service", lambda s: s["NRestarts"] == "1" and s["ActiveState"] == "active"
    and s["MainPID"] not in ("0", str(pid)))
systemctl("stop", "speakerd.service", check=False)

# Exit 78 (bad config) must not be restarted: the unit ends "failed", not "auto-restart".
systemctl("start", "speakerd-bad.service", check=False)
result["bad"] = wait("speakerd-bad.service",
                     lambda s: s["ActiveState"] in ("failed", "inactive")
                     or s["SubState"] == "auto-restart")
print(json.dumps(result))
