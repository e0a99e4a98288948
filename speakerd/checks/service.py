"""Checks of the systemd service: installed, enabled, active, its last exit and restarts."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence

from speakerd.checks.report import Report, fail, ok, skip, warn

UNIT = "speakerd.service"
PROPERTIES = ("LoadState", "UnitFileState", "ActiveState", "SubState", "Result",
              "ExecMainCode", "ExecMainStatus", "NRestarts")
JOURNAL_FIX = "journalctl -u speakerd -n 20 says why"


def check(report: Report, systemctl: Sequence[str] = ("systemctl",)) -> None:
    # sd_booted(): what systemd itself tests to know it runs the machine.
    if not os.path.isdir("/run/systemd/system") or not shutil.which(systemctl[0]):
        report.add(skip("service", "this machine does not run systemd"))
        return
    try:
        done = subprocess.run([*systemctl, "show", UNIT, *(f"--property={p}"
                                                           for p in PROPERTIES)],
                              capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as e:
        report.add(warn("service", f"systemctl show {UNIT} failed: {e}",
                        f"systemctl status {UNIT} may say more"))
        return
    if done.returncode:
        report.add(warn("service", f"systemctl show {UNIT} failed: "
                        f"{done.stderr.strip() or done.returncode}",
                        f"systemctl status {UNIT} may say more"))
        return
    p = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    if p.get("LoadState") != "loaded":
        report.add(warn("service", f"{UNIT} is not installed ({p.get('LoadState', '?')})",
                        "sudo ./install.sh installs, enables and starts it"))
        return
    active, sub = p.get("ActiveState"), p.get("SubState")
    state = active if sub == active else f"{active} ({sub})"
    # ExecMainCode 1 is CLD_EXITED: the status is an exit code; else a signal number.
    code = p.get("ExecMainStatus", "0")
    last = (f"last exit status {code}" if p.get("ExecMainCode") in ("1", "0", None)
            else f"last killed by signal {code}")
    text = (f"{UNIT} installed, {p.get('UnitFileState')}, {state}, restarted "
            f"{p.get('NRestarts', '0')} times, {last}")
    if active == "failed":
        report.add(fail("service", f"{text}, result {p.get('Result')}",
                        f"{JOURNAL_FIX}; after fixing it: sudo systemctl restart speakerd"))
    elif sub == "auto-restart":
        report.add(warn("service", f"{text}: it keeps restarting", JOURNAL_FIX))
    elif active != "active":
        report.add(warn("service", text, "sudo systemctl start speakerd"))
    elif p.get("UnitFileState") != "enabled":
        report.add(warn("service", f"{text}: it will not start at boot",
                        "sudo systemctl enable speakerd"))
    else:
        report.add(ok("service", text))
