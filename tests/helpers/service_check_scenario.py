"""Inside user-manager-sandbox: `speakerd check`'s service line for a unit that is not
installed, one that runs, and one that failed, asked of a real systemd (user) manager.
Prints {case: [lines]} as JSON."""

from __future__ import annotations

import io
import json
import os
import subprocess
import time
from pathlib import Path

from speakerd.checks import service
from speakerd.checks.report import Report

CTL = ("systemctl", "--user")
UNIT = Path(os.environ["XDG_CONFIG_HOME"]) / "systemd/user/speakerd.service"


def lines() -> list[str]:
    out = io.StringIO()
    service.check(Report(out), CTL)
    return out.getvalue().splitlines()


def ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CTL, *args], capture_output=True, text=True, timeout=30)


def until(*args: str) -> None:
    deadline = time.monotonic() + 30
    while ctl(*args).returncode != 0:
        assert time.monotonic() < deadline, f"systemctl {args} never held"
        time.sleep(0.05)


def main() -> None:
    result = {"missing": lines()}
    UNIT.write_text("[Service]\nExecStart=/bin/sleep 600\n[Install]\nWantedBy=default.target\n")
    ctl("daemon-reload")
    ctl("enable", "--now", "speakerd.service")
    until("is-active", "speakerd.service")
    result["running"] = lines()
    UNIT.write_text("[Service]\nExecStart=/bin/sh -c 'exit 3'\n[Install]\n"
                    "WantedBy=default.target\n")
    ctl("daemon-reload")
    ctl("restart", "speakerd.service")
    until("is-failed", "speakerd.service")
    result["failed"] = lines()
    ctl("disable", "speakerd.service")
    result["disabled_failed"] = lines()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
