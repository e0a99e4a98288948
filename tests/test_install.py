"""install.sh into a staging tree with its own user database: twice, then uninstall."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, need

KEY = "sk-proj-INSTALLTESTKEY0123456789abcdef"


def _seed_root(root: Path) -> None:
    etc = root / "etc"
    etc.mkdir(parents=True)
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (etc / "group").write_text("root:x:0:\naudio:x:29:\n")
    (etc / "shadow").write_text("root:*:19000:0:99999:7:::\n")
    (etc / "gshadow").write_text("root:*::\naudio:*::\n")


def _install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(ROOT / "install.sh"), "--root", str(root), "--no-start", "--no-deps",
         "--python", sys.executable, *args],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def _ids(root: Path, db: str, name: str) -> tuple[int, list[str]]:
    for line in (root / "etc" / db).read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2]), fields[3].split(",") if db == "group" else []
    raise AssertionError(f"{name} not in {db}")


def _mode_owner(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return f"{stat.S_IMODE(st.st_mode):04o}", st.st_uid, st.st_gid


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    need(os.getuid() == 0, "root (install.sh chowns files and runs useradd --root)")
    need(shutil.which("useradd") is not None, "useradd")
    root = tmp_path_factory.mktemp("root")
    _seed_root(root)
    key = tmp_path_factory.mktemp("key") / "key"
    key.write_text(KEY + "\n")
    key.chmod(0o600)
    first = _install(root, "--api-key-file", str(key))
    assert first.returncode == 0, first.stderr
    config = root / "etc/speakerd/speakerd.toml"
    config.write_text(config.read_text() + "\n# edited by the user\n")
    second = _install(root)
    assert second.returncode == 0, second.stderr
    return root, first, second


class TestInstall:
    def test_user_and_groups(self, installed):
        root, _, _ = installed
        passwd = (root / "etc/passwd").read_text()
        assert ":/nonexistent:/usr/sbin/nologin" in passwd.split("speakerd:", 1)[1]
        assert "speakerd" in _ids(root, "group", "audio")[1]
        assert "speakerd" in _ids(root, "group", "gpio")[1]
        assert passwd.count("speakerd:") == 1

    def test_modes_and_ownership(self, installed):
        root, _, _ = installed
        gid = _ids(root, "group", "speakerd")[0]
        assert _mode_owner(root / "etc/speakerd") == ("0750", 0, gid)
        assert _mode_owner(root / "etc/speakerd/speakerd.toml") == ("0640", 0, gid)
        assert _mode_owner(root / "etc/speakerd/openai.key") == ("0600", 0, 0)
        assert _mode_owner(root / "etc/systemd/system/speakerd.service") == ("0644", 0, 0)
        assert _mode_owner(root / "opt/speakerd") == ("0755", 0, 0)

    def test_unit_is_the_shipped_one(self, installed):
        root, _, _ = installed
        assert (root / "etc/systemd/system/speakerd.service").read_bytes() == \
            (ROOT / "systemd/speakerd.service").read_bytes()

    def test_second_run_keeps_config_and_key(self, installed):
        root, _, second = installed
        assert (root / "etc/speakerd/speakerd.toml").read_text().endswith(
            "# edited by the user\n")
        assert (root / "etc/speakerd/openai.key").read_text() == KEY + "\n"
        assert "keeping your /etc/speakerd/speakerd.toml" in second.stdout
        assert "keeping the API key" in second.stdout
        assert KEY not in second.stdout + second.stderr

    def test_venv_runs_the_installed_command(self, installed):
        root, _, _ = installed
        exe = root / "opt/speakerd/venv/bin/speakerd"
        # --no-deps promised the dependencies from the environment: the test venv's.
        import sysconfig
        r = subprocess.run([str(exe), "version"], capture_output=True, text=True, timeout=30,
                           env={**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]})
        assert r.stdout == "speakerd 0.1.0\n"
        cfg = (root / "opt/speakerd/venv/pyvenv.cfg").read_text()
        assert "include-system-site-packages = true" in cfg

    def test_speakerd_is_on_the_path(self, installed):
        # The README's `speakerd config --check` must work in a login shell and
        # through sudo (secure_path has /usr/local/bin), not only by full path.
        root, _, _ = installed
        link = root / "usr/local/bin/speakerd"
        assert os.readlink(link) == "/opt/speakerd/venv/bin/speakerd"

    def test_installed_config_passes_check(self, installed):
        root, _, _ = installed
        exe = root / "opt/speakerd/venv/bin/speakerd"
        # --no-deps promised the dependencies from the environment: the test venv's.
        import sysconfig
        deps = sysconfig.get_paths()["purelib"]
        r = subprocess.run([str(exe), "config", "--check", "--config",
                            str(root / "etc/speakerd/speakerd.toml")],
                           capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": deps})
        assert r.returncode == 0, r.stderr

    def test_uninstall_keeps_config_then_purge_removes_everything(self, installed,
                                                                  tmp_path):
        root, _, _ = installed
        copy = tmp_path / "root"
        shutil.copytree(root, copy, symlinks=True)
        r = subprocess.run(["bash", str(ROOT / "install.sh"), "--root", str(copy),
                            "--uninstall"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert not (copy / "opt/speakerd").exists()
        assert not (copy / "etc/systemd/system/speakerd.service").exists()
        assert not (copy / "usr/local/bin/speakerd").is_symlink()
        assert (copy / "etc/speakerd/speakerd.toml").exists()
        r = subprocess.run(["bash", str(ROOT / "install.sh"), "--root", str(copy),
                            "--uninstall", "--purge"], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        assert not (copy / "etc/speakerd").exists()
        assert "speakerd:" not in (copy / "etc/passwd").read_text()


def test_empty_key_file_is_created_when_no_key_is_given(tmp_path):
    need(os.getuid() == 0, "root")
    _seed_root(tmp_path)
    r = _install(tmp_path)
    assert r.returncode == 0, r.stderr
    key = tmp_path / "etc/speakerd/openai.key"
    assert key.read_text() == "" and _mode_owner(key) == ("0600", 0, 0)
    assert "no API key yet: write it to /etc/speakerd/openai.key" in r.stdout


def test_unknown_option_is_refused():
    r = subprocess.run(["bash", str(ROOT / "install.sh"), "--frobnicate"],
                       capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stderr) == (
        2, "install.sh: unknown option --frobnicate (see --help)\n")


def test_shellcheck_clean():
    need(shutil.which("shellcheck") is not None, "shellcheck")
    r = subprocess.run(["shellcheck", "install.sh", "tests/helpers/journald-sandbox",
                        ".ci/run", "run-tests", "tests/target/run"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
