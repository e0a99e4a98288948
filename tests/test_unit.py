"""systemd/speakerd.service: systemd-analyze verify and the security exposure score."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import ROOT, need

UNIT = ROOT / "systemd" / "speakerd.service"
MAX_EXPOSURE = 1.5


def _verify(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    """verify against a stub root, so ExecStart= and /bin/sh resolve without an install."""
    need(shutil.which("systemd-analyze") is not None, "systemd-analyze")
    exe = tmp_path / "opt/speakerd/venv/bin/speakerd"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    (tmp_path / "bin").mkdir()
    shutil.copy("/bin/sh", tmp_path / "bin/sh")
    unit = tmp_path / "etc/systemd/system/speakerd.service"
    unit.parent.mkdir(parents=True)
    unit.write_text(text)
    return subprocess.run(
        ["systemd-analyze", "verify", f"--root={tmp_path}", "--recursive-errors=no",
         "--man=no", "--generators=no", str(unit)], capture_output=True, text=True, timeout=60)


def test_verify_passes(tmp_path):
    r = _verify(tmp_path, UNIT.read_text())
    assert r.returncode == 0 and r.stderr == "", r.stderr


@pytest.mark.parametrize(("good", "bad"), [("WatchdogSec=30", "WatchdgSec=30"),
                                           ("Type=notify", "Type=notfy")])
def test_verify_rejects_a_broken_copy(tmp_path, good, bad):
    text = UNIT.read_text()
    assert good in text
    r = _verify(tmp_path, text.replace(good, bad))
    assert r.returncode != 0
    assert bad.split("=")[0] in r.stderr or bad.split("=")[1] in r.stderr


def test_security_exposure_at_most_1_5():
    need(shutil.which("systemd-analyze") is not None, "systemd-analyze")
    r = subprocess.run(["systemd-analyze", "security", "--offline=true",
                        f"--threshold={int(MAX_EXPOSURE * 10)}", str(UNIT)],
                       capture_output=True, text=True, timeout=60)
    score = float(re.search(r"Overall exposure level for speakerd.service: ([\d.]+)",
                            r.stdout).group(1))
    assert r.returncode == 0, r.stdout[-2000:]
    assert score <= MAX_EXPOSURE


def test_unit_says_what_the_contract_needs():
    text = UNIT.read_text()
    for line in ["Type=notify", "NotifyAccess=main", "User=speakerd",
                 "SupplementaryGroups=audio gpio spi", "WatchdogSec=30", "Restart=on-failure",
                 "RestartPreventExitStatus=78",
                 "LoadCredential=openai-key:/etc/speakerd/openai.key",
                 "ExecStart=/opt/speakerd/venv/bin/speakerd run --config "
                 "/etc/speakerd/speakerd.toml",
                 "DevicePolicy=closed", "DeviceAllow=char-alsa rw",
                 "DeviceAllow=char-gpiochip rw", "DeviceAllow=char-spi rw",
                 "RuntimeDirectory=speakerd", "RuntimeDirectoryMode=0750",
                 "CapabilityBoundingSet="]:
        assert f"\n{line}\n" in text, line


def test_reload_needs_only_the_shell():
    # /bin/kill is procps, absent from minimal images (systemctl reload: 203/EXEC);
    # /bin/sh is essential on every Debian. tests/target/run reloads for real.
    reload = [line for line in UNIT.read_text().splitlines() if line.startswith("ExecReload=")]
    assert reload == ["ExecReload=/bin/sh -c 'kill -HUP \"$$MAINPID\"'"]
