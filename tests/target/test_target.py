"""tests/target/run's own helpers: what it inherits from the host, and its exit codes.

The target run itself (minutes, root, a container) is run by .ci/run, not by pytest.
"""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT
from tests.target import target


def test_pip_environment_becomes_the_user_config(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("PIP_CONFIG_FILE", raising=False)
    for name in [n for n in list(os.environ) if n.startswith("PIP_")]:
        monkeypatch.delenv(name)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", f"file://{tmp_path}/nowhere/simple")
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "60")
    files, local = target.pip_config()
    user = files["/root/.config/pip/pip.conf"]
    assert files["/home/pi/.config/pip/pip.conf"] == user
    assert f"find-links = {wheels}\n" in user and "default-timeout = 60\n" in user
    # Local paths that exist are bound into the container; missing ones are left to pip.
    assert wheels in local and not any("nowhere" in str(p) for p in local)


def test_mirror_comes_from_the_host_sources(monkeypatch):
    monkeypatch.setattr(target, "_sources", lambda: [
        ("http://mirror.example/debian-security", ["bookworm-security"]),
        ("http://mirror.example/debian", ["bookworm", "bookworm-updates"])])
    monkeypatch.delenv("SPEAKERD_TARGET_MIRROR", raising=False)
    assert target.mirrors() == ("http://mirror.example/debian",
                                "http://mirror.example/debian-security")


def test_a_machine_that_cannot_build_a_container_exits_77_loudly(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "tests.target.target", "--arch", "amd64"], cwd=ROOT,
        capture_output=True, text=True, timeout=120,
        env={"PATH": "/nonexistent", "SPEAKERD_TARGET_CACHE": str(tmp_path),
             "HOME": str(tmp_path)})
    if r.returncode == 2:  # not root: the usage error comes first
        assert "run as root" in r.stderr
        return
    assert r.returncode == target.CANNOT_BOOT, r.stdout + r.stderr
    assert r.stdout.splitlines()[-1].startswith("!!!!! tests/target: THIS MACHINE CANNOT")
