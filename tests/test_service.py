"""speakerd.service under a real systemd user manager: readiness, watchdog, exit 78.

A user manager cannot apply options that only the system manager has (it runs no
user switching, no device cgroup, no credentials it did not receive), so the test
copy of the unit drops those lines; everything else is the shipped unit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from . import audio_devices
from .conftest import ROOT, need

HELPERS = ROOT / "tests" / "helpers"
# Options a user manager cannot carry out, and why each is dropped from the copy.
DROPPED = (
    "User=", "Group=", "SupplementaryGroups=",  # no user switching in a user manager
    "DevicePolicy=", "DeviceAllow=",  # needs the system manager's device cgroup
    "LoadCredential=",  # the key file is not installed here; credentials tested apart
    "ProtectHome=",  # would hide the test interpreter, which lives under /root here
    # Read-only remounts of /proc/sys and /dev/kmsg: refused (exit 226/NAMESPACE) in
    # this workplace's sandboxed machines, fine under a real system manager.
    "ProtectKernelTunables=", "ProtectKernelLogs=",
    "ExecStart=", "WatchdogSec=", "TimeoutStopSec=", "RestartSec=",  # replaced below
)


def _test_unit(scratch: Path) -> str:
    lines = [line for line in (ROOT / "systemd/speakerd.service").read_text().splitlines()
             if not line.startswith(DROPPED) and not line.startswith("WantedBy=")]
    at = lines.index("[Service]") + 1
    lines[at:at] = [
        f"ExecStart={sys.executable} -m speakerd run --config @CONFIG@",
        f"WorkingDirectory={ROOT}",
        # PrivateTmp= hides /tmp, where pytest keeps the configs (and CI may keep the
        # clone and its venv).
        f"BindReadOnlyPaths={scratch} {ROOT} {sys.prefix} {audio_devices.DIR}",
        f"Environment=ALSA_CONFIG_PATH={audio_devices.ASOUNDRC}",
        "Environment=SPEAKERD_LOG_TARGET=stderr",
        f"StandardError=append:{scratch}/speakerd.log",
        # Short enough for a test; the shipped 30 s is checked in test_unit.py.
        "WatchdogSec=2", "TimeoutStopSec=3", "RestartSec=0.2",
    ]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def scenario(tmp_path_factory, pulse):
    need(os.getuid() == 0 and shutil.which("unshare") is not None,
         "root and unshare(1) for a private user manager")
    need(os.path.exists("/lib/systemd/systemd"), "systemd")
    d = tmp_path_factory.mktemp("manager")
    (d / "good.toml").write_text('[audio]\ncapture_device = "mic"\nplayback_device = "spk"\n')
    (d / "bad.toml").write_text("[wake_word]\ntreshold = 0.3\n")
    (d / "unit").write_text(_test_unit(d))
    r = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", str(HELPERS / "user-manager-sandbox"),
         str(d), sys.executable, str(HELPERS / "unit_scenario.py"), str(d / "unit"),
         str(d / "good.toml"), str(d / "bad.toml")],
        capture_output=True, text=True, timeout=300)
    log = (d / "speakerd.log").read_text() if (d / "speakerd.log").exists() else ""
    assert r.returncode == 0, r.stderr + (d / "manager.log").read_text()[-3000:] + log
    return json.loads(r.stdout)


def test_type_notify_start_waits_for_ready(scenario):
    assert scenario["start_rc"] == 0
    s = scenario["after_start"]
    assert (s["ActiveState"], s["SubState"], s["StatusText"]) == (
        "active", "running", "idle: listening for the wake word")


def test_missed_watchdog_restarts_the_service(scenario):
    s = scenario["after_watchdog"]
    assert (s["ActiveState"], s["NRestarts"]) == ("active", "1")
    assert s["MainPID"] != scenario["after_start"]["MainPID"]


def test_exit_78_is_not_restarted(scenario):
    s = scenario["bad"]
    assert (s["ActiveState"], s["Result"], s["ExecMainStatus"], s["NRestarts"]) == (
        "failed", "exit-code", "78", "0")
