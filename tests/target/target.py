"""speakerd installed the way a Pi owner installs it, on a booted Debian trixie.

`tests/target/run [--arch amd64|arm64] [--keep]` (as root) builds (once, cached by
packages.txt) a minimal trixie root filesystem, boots it with systemd-nspawn, runs
`sudo ./install.sh --api-key-file KEY` as a user `pi` with passwordless sudo (as
Raspberry Pi OS sets it up), and checks from outside only what a user can see:
systemctl, journalctl, systemd-analyze, the fixture model server's record and what
the speaker played. A summary table ends the run.

Sound without hardware: a PulseAudio daemon inside the container (the unit
target-sound.service, from the cached root filesystem) with two null sinks, `mic`
and `spk`; /etc/asound.conf points the default ALSA device at them through
alsa-lib's pulse plugin over an AF_UNIX socket in /run. Null sinks are paced in real
time, so an idle service reads 16 kHz of silence as a real microphone delivers it (a
file-backed capture PCM would deliver zeros as fast as the CPU allows and spoil the
idle CPU guard). The request is played into `mic` with paplay; what the service
plays into `spk` is recorded by parec to /var/lib/speakerd-target/speaker.raw.

The model is tests/realtime_server.py, run on the host on 127.0.0.1: the container
shares the host's network, so the service reaches it on loopback, set in
/etc/speakerd/speakerd.toml as a user would edit it.

Exit codes: 0 all passed, 1 a check failed (the product is broken), 77 this machine
cannot build or boot a container at all (one loud line says why), 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import configparser
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from tests.realtime_server import Call, RealtimeServer, Reply
from tests.speech import silence, speak, write_wav

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parent.parent
SUITE = "trixie"
CANNOT_BOOT = 77
KEY = "sk-target-DUMMY0123456789abcdefghijklmnop"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PULSE = "/run/target-sound/native"
SPEAKER_FILE = "/var/lib/speakerd-target/speaker.raw"
READY = "/run/target-sound/ready"
MAX_EXPOSURE = 1.5
MAX_IDLE_CPU = 0.10


# A user's edits of /etc/speakerd/speakerd.toml, each in its own section.
TYPO = ("sudo sed -i '/^\\[wake_word\\]/,/^\\[/ s/^threshold = /treshold = /' "
        "/etc/speakerd/speakerd.toml")


def set_url(url: str) -> str:
    return (f"sudo sed -i '/^\\[realtime\\]/,/^\\[/ s|^url = .*|url = \"{url}\"|' "
            "/etc/speakerd/speakerd.toml")


class CannotBoot(Exception):
    """This machine cannot build or boot a container: not a product failure."""


class Failed(AssertionError):
    pass


def check(cond: object, message: str) -> None:
    if not cond:
        raise Failed(message)


def log(msg: str) -> None:
    print(f"[target {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- the host's package configuration, inherited generically ---------------------------

def _sources() -> list[tuple[str, list[str]]]:
    """(URI, suites) of the host's `deb` sources, deb822 and one-line style."""
    out: list[tuple[str, list[str]]] = []
    d = Path("/etc/apt/sources.list.d")
    for f in sorted(d.glob("*.sources")) if d.is_dir() else []:
        for stanza in re.split(r"\n\s*\n", f.read_text()):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[0].isspace():
                    continue
                k, v = line.split(":", 1)
                fields[k.strip().lower()] = v.strip()
            if "deb" in fields.get("types", "").split() and \
                    fields.get("enabled", "yes").lower() != "no":
                for uri in fields.get("uris", "").split():
                    out.append((uri, fields.get("suites", "").split()))
    lists = [Path("/etc/apt/sources.list"), *sorted(d.glob("*.list"))] if d.is_dir() else []
    for f in lists:
        if not f.is_file():
            continue
        for line in f.read_text().splitlines():
            words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb":
                out.append((words[1], [words[2]]))
    return out


def mirrors() -> tuple[str, str | None]:
    """The host's Debian archive and security archive (the container uses the same)."""
    archive = os.environ.get("SPEAKERD_TARGET_MIRROR")
    security = None
    for uri, suites in _sources():
        if any(s.endswith("-security") for s in suites):
            security = security or uri
        elif archive is None and any("-" not in s for s in suites):
            archive = uri
    return archive or "http://deb.debian.org/debian", security


def _local_paths(value: str) -> list[Path]:
    paths = []
    for word in value.split():
        if word.startswith("file://"):
            word = word[len("file://"):]
        if word.startswith("/"):
            paths.append(Path(word))
    return paths


def pip_config() -> tuple[dict[str, str], list[Path]]:
    """The host's pip configuration: {container path: text}, and local paths it names.

    Global files are copied as they are; the invoking user's file with the PIP_*
    environment on top becomes root's and pi's user config (sudo drops the
    environment, so that is where install.sh's pip finds it). Local directories and
    files the config names (find-links, file:// indexes, constraints) that exist are
    returned, to be bound read-only at the same path; ones that do not are left to
    pip, which ignores a missing find-links directory and index.
    """
    files: dict[str, str] = {}
    values: list[str] = []
    for path in ["/etc/pip.conf", "/etc/xdg/pip/pip.conf"]:
        if os.path.isfile(path):
            files[path] = Path(path).read_text()
    user = configparser.ConfigParser(interpolation=None)
    home = Path(os.environ.get("HOME", "/root"))
    xdg = Path(os.environ.get("XDG_CONFIG_HOME", home / ".config"))
    for path in [home / ".pip/pip.conf", xdg / "pip/pip.conf"]:
        if path.is_file():
            user.read(path)
    if os.environ.get("PIP_CONFIG_FILE") and os.path.isfile(os.environ["PIP_CONFIG_FILE"]):
        user.read(os.environ["PIP_CONFIG_FILE"])
    for name, value in os.environ.items():
        if name.startswith("PIP_") and name != "PIP_CONFIG_FILE":
            if not user.has_section("global"):
                user.add_section("global")
            user.set("global", name[4:].lower().replace("_", "-"), value)
    if user.sections():
        from io import StringIO
        buf = StringIO()
        user.write(buf)
        files["/root/.config/pip/pip.conf"] = files["/home/pi/.config/pip/pip.conf"] = \
            buf.getvalue()
    indexes: list[str] = []
    for text in files.values():
        parser = configparser.ConfigParser(interpolation=None)
        with contextlib.suppress(configparser.Error):
            parser.read_string(text)
            for section in parser.sections():
                values += parser[section].values()
                indexes += [v for k, v in parser[section].items() if k.endswith("index-url")]
    local = {p for v in values for p in _local_paths(v) if p.exists()}
    # A local index's pages link to their files relatively (../../files/x.whl), next to
    # the index: bind its parent too, unless that is / or a top-level directory.
    local |= {p.parent for v in indexes for p in _local_paths(v)
              if p.exists() and len(p.parent.parts) > 2}
    return files, sorted(p for p in local if not any(a in local for a in p.parents))


# --- the root filesystem ----------------------------------------------------------------

def packages() -> list[str]:
    return [line.strip() for line in (HERE / "packages.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def cache_dir() -> Path:
    return Path(os.environ.get("SPEAKERD_TARGET_CACHE", "/var/cache/speakerd-target"))


def binfmt_aarch64() -> None:
    """qemu-aarch64 registered with flags OCPF (C: setuid sudo works; F: no copy needed)."""
    misc = Path("/proc/sys/fs/binfmt_misc")
    if not (misc / "register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(misc)],
                       check=False, capture_output=True)
    if not (misc / "register").exists():
        raise CannotBoot("binfmt_misc cannot be mounted: no arm64 emulation here")
    qemu = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
    if qemu is None:
        raise CannotBoot("qemu-user-static is not installed (tests/apt-packages.txt has it)")
    entry = misc / "qemu-aarch64"
    if entry.exists():
        flags = re.search(r"^flags: (\S*)", entry.read_text(), re.M)
        if flags and "C" in flags.group(1) and "F" in flags.group(1):
            return
        entry.write_text("-1")
    magic = (r"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00")
    mask = (r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff"
            r"\xff\xff")
    (misc / "register").write_text(f":qemu-aarch64:M::{magic}:{mask}:{qemu}:OCPF")


def rootfs(arch: str) -> tuple[Path, bool]:
    """The cached root filesystem for `arch`, built atomically when missing."""
    pkgs = packages()
    key = hashlib.sha256(f"{SUITE} {arch}\n{chr(10).join(pkgs)}\n".encode()).hexdigest()[:12]
    cache = cache_dir()
    dest = cache / f"{arch}-{SUITE}-{key}"
    if (dest / "etc/os-release").exists():
        return dest, True
    if shutil.which("debootstrap") is None:
        raise CannotBoot("debootstrap is not installed (tests/apt-packages.txt has it)")
    cache.mkdir(parents=True, exist_ok=True)
    for old in cache.glob(f".build-{arch}-*"):  # a build killed half-way
        shutil.rmtree(old, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{arch}-", dir=cache))
    archive, _ = mirrors()
    log(f"building the {SUITE} {arch} root filesystem from {archive} (cached afterwards in "
        f"{dest})")
    build_log = cache / f"build-{arch}.log"
    with build_log.open("w") as out:
        r = subprocess.run(["debootstrap", "--variant=minbase", f"--arch={arch}",
                            "--include=" + ",".join(pkgs), SUITE, str(tmp), archive],
                           stdout=out, stderr=subprocess.STDOUT, timeout=3600,
                           stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        tail = build_log.read_text()[-1500:]
        shutil.rmtree(tmp, ignore_errors=True)
        if "Couldn't find these debs" in tail:  # packages.txt is wrong: ours to fix
            raise Failed(f"debootstrap: a package in packages.txt does not exist:\n{tail}")
        raise CannotBoot(f"debootstrap {SUITE} {arch} failed (see {build_log}):\n{tail}")
    for deb in (tmp / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    tmp.chmod(0o755)
    os.rename(tmp, dest)
    return dest, False


# --- the container ----------------------------------------------------------------------

TARGET_SOUND = f"""#!/bin/sh
# The test's sound hardware: PulseAudio null sinks `mic` (16 kHz) and `spk` (24 kHz).
set -e
cat >/run/target-sound/default.pa <<EOF
load-module module-native-protocol-unix socket={PULSE} auth-anonymous=1
load-module module-null-sink sink_name=spk rate=24000 channels=1
load-module module-null-sink sink_name=mic rate=16000 channels=1
EOF
pulseaudio -n -F /run/target-sound/default.pa --daemonize=no --system=no \\
    --exit-idle-time=-1 --use-pid-file=no --disable-shm=yes --realtime=no \\
    --high-priority=no --log-target=stderr \\
    --log-level=error &
# Slow under emulation (minutes): give it ten.
for _ in $(seq 600); do pactl info >/dev/null 2>&1 && break; sleep 1; done
pactl info >/dev/null
chmod 0666 {PULSE}
# A reader on each monitor keeps the null sinks from sleeping; spk's is the recording.
parec -d spk.monitor --raw --format=s16le --rate=24000 --channels=1 \\
    --latency-msec=10 >>{SPEAKER_FILE} &
parec -d mic.monitor --raw --format=s16le --rate=16000 --channels=1 >/dev/null &
# Recording: the steps wait for this before they play anything.
sleep 1
kill -0 $!
touch /run/target-sound/ready
wait
"""

TARGET_SOUND_UNIT = f"""[Unit]
Description=tests/target: a sound card without hardware (PulseAudio null sinks)

[Service]
User=pi
RuntimeDirectory=target-sound
RuntimeDirectoryMode=0755
StateDirectory=speakerd-target
Environment=HOME=/run/target-sound XDG_RUNTIME_DIR=/run/target-sound
Environment=PULSE_SERVER=unix:{PULSE}
UMask=0000
ExecStart=/bin/sh /usr/local/lib/speakerd-target/sound.sh
"""

ASOUND_CONF = f"""# tests/target: the default ALSA device is the container's PulseAudio null sinks.
pcm.!default {{ type asym; playback.pcm "spk"; capture.pcm "mic" }}
ctl.!default {{ type pulse; server "unix:{PULSE}" }}
pcm.spk {{ type pulse; server "unix:{PULSE}"; device "spk" }}
pcm.mic {{ type pulse; server "unix:{PULSE}"; device "mic.monitor" }}
"""


class Machine:
    """A copy of the cached root filesystem, booted with systemd-nspawn (or chrooted)."""

    def __init__(self, image: Path, arch: str, keep: bool) -> None:
        self.arch = arch
        self.keep = keep
        self.dir = Path(tempfile.mkdtemp(prefix=f"speakerd-target-{arch}-", dir="/var/tmp"))
        self.root = self.dir / "root"
        self.image = image
        self.name = f"speakerd-target-{os.getpid()}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0
        self.binds: list[Path] = []
        self.mounts: list[Path] = []
        self.mode = "nspawn"

    # preparing the tree, before boot
    def prepare(self) -> None:
        r = subprocess.run(["cp", "-a", "--reflink=auto", str(self.image), str(self.root)],
                           capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise CannotBoot(f"cannot copy the root filesystem: {r.stderr.strip()}")
        root = self.root
        (root / "etc/hostname").write_text("speakerd-target\n")
        (root / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 speakerd-target\n"
                                        "::1 localhost ip6-localhost ip6-loopback\n")
        # apt: the host's archive for trixie, and its security archive if it has one.
        archive, security = mirrors()
        (root / "etc/apt/sources.list").unlink(missing_ok=True)
        sources = (f"Types: deb\nURIs: {archive}\nSuites: {SUITE} {SUITE}-updates\n"
                   "Components: main\n"
                   "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
        if security:
            sources += (f"\nTypes: deb\nURIs: {security}\nSuites: {SUITE}-security\n"
                        "Components: main\n"
                        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
        (root / "etc/apt/sources.list.d/debian.sources").write_text(sources)
        # apt's proxy settings, if the host has any.
        acquire = subprocess.run(["apt-config", "dump", "Acquire"], capture_output=True,
                                 text=True).stdout
        proxy = "".join(line + "\n" for line in acquire.splitlines() if "Proxy" in line)
        if proxy:
            (root / "etc/apt/apt.conf.d/90host-proxy").write_text(proxy)
        # Locally added CA certificates (a proxy's, a company's).
        local_ca = Path("/usr/local/share/ca-certificates")
        if local_ca.is_dir() and any(local_ca.iterdir()):
            shutil.copytree(local_ca, root / "usr/local/share/ca-certificates",
                            dirs_exist_ok=True)
        # The user a Raspberry Pi OS image has: pi, passwordless sudo.
        self.chroot(["useradd", "--create-home", "--shell", "/bin/bash",
                     "--groups", "sudo,audio,video", "pi"])
        sudoers = root / "etc/sudoers.d/010_pi-nopasswd"
        sudoers.write_text("pi ALL=(ALL) NOPASSWD: ALL\n")
        sudoers.chmod(0o440)
        if local_ca.is_dir():
            self.chroot(["update-ca-certificates"])
        files, local = pip_config()
        for path, text in files.items():
            p = root / path.lstrip("/")
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
        subprocess.run(["chown", "-R", "1000:1000", str(root / "home/pi")], check=True)
        # Only what the container lacks: its own CA bundle (with the host's local CAs,
        # from update-ca-certificates above) stays its own.
        local = [p for p in local if not (root / str(p).lstrip("/")).exists()]
        self.binds = local
        if local:
            log("pip config names local paths; bound read-only into the container: "
                + " ".join(map(str, local)))
        # The checkout, as `git clone` would give it to pi (tracked and new files).
        files_ = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"],
                                cwd=CHECKOUT, capture_output=True, check=True).stdout
        dest = root / "home/pi/speakerd"
        for rel in files_.decode().split("\0"):
            src = CHECKOUT / rel
            if rel and src.is_file() and not rel.startswith("tests/target/cache"):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / rel)
        (root / "home/pi/openai.key").write_text(KEY + "\n")
        (root / "home/pi/openai.key").chmod(0o600)
        subprocess.run(["chown", "-R", "1000:1000", str(dest), str(root / "home/pi/openai.key")],
                       check=True)
        # The test's sound hardware, started later by the "sound" step.
        lib = root / "usr/local/lib/speakerd-target"
        lib.mkdir(parents=True, exist_ok=True)
        (lib / "sound.sh").write_text(TARGET_SOUND)
        (lib / "asound.conf").write_text(ASOUND_CONF)
        (root / "etc/systemd/system/target-sound.service").write_text(TARGET_SOUND_UNIT)

    def chroot(self, argv: list[str]) -> None:
        r = subprocess.run(["chroot", str(self.root), *argv], capture_output=True, text=True,
                           timeout=600, env={"PATH": PATH, "LANG": "C.UTF-8"})
        if r.returncode != 0:
            raise CannotBoot(f"chroot {' '.join(argv)}: {r.stderr.strip()}")

    # booting
    def boot(self, timeout: float = 180) -> str:
        if shutil.which("systemd-nspawn") is None:
            raise CannotBoot("systemd-nspawn is not installed (package systemd-container)")
        env = {**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
        binds = [f"--bind-ro={p}" for p in self.binds]
        self.console = self.dir / "console.log"
        with self.console.open("wb") as out:
            self.proc = subprocess.Popen(
                ["systemd-nspawn", "-D", str(self.root), "--boot", "--register=no",
                 "--keep-unit", f"--machine={self.name}", "--console=read-only", *binds],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.leader:
            if self.proc.poll() is not None:
                raise CannotBoot("systemd-nspawn exited before the container's systemd "
                                 "started:\n" + self.console.read_text()[-2000:])
            if time.monotonic() > deadline:
                raise CannotBoot("the container's systemd did not start within "
                                 f"{timeout:.0f} s:\n" + self.console.read_text()[-2000:])
            self.leader = self._find_leader()
            time.sleep(0.2)
        # systemctl needs the manager's socket, late under emulation.
        while self.run("test -S /run/systemd/private", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise CannotBoot("the container's systemd never opened its socket:\n"
                                 + self.console.read_text()[-2000:])
            time.sleep(0.5)
        left = max(10.0, deadline - time.monotonic())
        r = self.run("systemctl is-system-running --wait", timeout=left, check=False)
        state = r.stdout.strip()
        if state not in ("running", "degraded"):
            raise CannotBoot(f"the container did not finish booting ({state or r.stderr}):\n"
                             + self.console.read_text()[-2000:])
        if state == "degraded":
            failed = self.run("systemctl --failed --no-legend --plain", check=False).stdout
            log(f"booted degraded; failed units: {failed.strip()}")
        return state

    def _find_leader(self) -> int:
        assert self.proc is not None
        for task in Path(f"/proc/{self.proc.pid}/task").glob("*"):
            with contextlib.suppress(OSError):
                for child in (task / "children").read_text().split():
                    comm = Path(f"/proc/{child}/comm").read_text().strip()
                    if comm == "systemd":
                        return int(child)
        return 0

    def run(self, cmd: str, *, user: str | None = None, timeout: float = 60,
            check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """`cmd` (bash) inside the machine, as root or as `user` through a login shell."""
        inner = ["su", "-l", user, "-c", cmd] if user else ["bash", "-c", cmd]
        env = ["env", "-i", f"PATH={PATH}", "LANG=C.UTF-8", "HOME=/root", "TERM=dumb"]
        if self.mode == "nspawn":
            argv = ["nsenter", f"--target={self.leader}", "--mount", "--uts", "--ipc", "--net",
                    "--pid", "--cgroup", "--root", "--wd", *env, *inner]
        else:
            argv = ["chroot", str(self.root), *env, *inner]
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                               input=input, stdin=None if input is not None else
                               subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise Failed(f"timed out after {timeout:.0f} s: {cmd}") from e
        if check and r.returncode != 0:
            raise Failed(f"{cmd}: exit {r.returncode}\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
        return r

    def service_log(self) -> str:
        """What speakerd logged: its journal, or its stderr when started by hand."""
        if self.mode == "nspawn":
            return self.journal("-o", "cat")
        return (self.root / "var/log/speakerd-target.log").read_text(errors="replace")

    def enter_chroot(self) -> None:
        """The fallback when systemd cannot run services (qemu-user): a chroot."""
        self.mode = "chroot"
        shutil.copy("/etc/resolv.conf", self.root / "etc/resolv.conf")
        for fs, target, opts in [("proc", "proc", []), ("sysfs", "sys", ["-o", "ro"]),
                                 ("/dev", "dev", ["--rbind"]), ("tmpfs", "run", []),
                                 ("tmpfs", "tmp", [])]:
            where = self.root / target
            if fs.startswith("/"):
                argv = ["mount", *opts, fs, str(where)]
            else:
                argv = ["mount", "-t", fs, *opts, fs, str(where)]
            subprocess.run(argv, check=True)
            self.mounts.append(where)
        subprocess.run(["mount", "--make-rslave", str(self.root / "dev")], check=True)
        for path in self.binds:
            where = self.root / str(path).lstrip("/")
            if path.is_dir():
                where.mkdir(parents=True, exist_ok=True)
            else:
                where.parent.mkdir(parents=True, exist_ok=True)
                where.touch()
            subprocess.run(["mount", "--bind", "-o", "ro", str(path), str(where)], check=True)
            self.mounts.append(where)

    def start_by_hand(self) -> int:
        """speakerd as the unit would run it, without a manager: setpriv with the unit's
        User=, Group=, SupplementaryGroups=, NoNewPrivileges=, CapabilityBoundingSet=,
        UMask=, LoadCredential= and StateDirectory=; the rest of the sandbox needs
        systemd and is not applied."""
        unit: dict[str, list[str]] = {}
        for line in (self.root / "etc/systemd/system/speakerd.service").read_text(
                ).splitlines():
            if "=" in line and not line.startswith("#"):
                k, v = line.split("=", 1)
                unit.setdefault(k, []).append(v)
        user, group = unit["User"][0], unit["Group"][0]
        groups = ",".join(unit["SupplementaryGroups"][0].split())
        cred_name, cred_file = unit["LoadCredential"][0].split(":", 1)
        creds = "/run/credentials/speakerd.service"
        state = "/var/lib/" + unit["StateDirectory"][0]
        runtime = "/run/" + unit["RuntimeDirectory"][0]
        self.run(f"install -d -m {unit['RuntimeDirectoryMode'][0]} -o {user} -g {group} "
                 f"{runtime} && "
                 f"install -d -m 0700 -o {user} -g {group} {creds} {state} && "
                 f"install -m 0400 -o {user} -g {group} {cred_file} {creds}/{cred_name}")
        nnp = "--no-new-privs" if unit.get("NoNewPrivileges") == ["yes"] else ""
        caps = "--inh-caps=-all --bounding-set=-all" if unit.get(
            "CapabilityBoundingSet") == [""] else ""
        r = self.run(
            f"umask {unit['UMask'][0]}; cd /; setsid env -i PATH={PATH} LANG=C.UTF-8 "
            f"HOME=/nonexistent CREDENTIALS_DIRECTORY={creds} STATE_DIRECTORY={state} "
            f"RUNTIME_DIRECTORY={runtime} "
            "SPEAKERD_LOG_TARGET=stderr "
            f"setpriv --reuid={user} --regid={group} --groups={groups} {nnp} {caps} "
            f"{unit['ExecStart'][0]} >>/var/log/speakerd-target.log 2>&1 </dev/null & "
            "echo $!")
        return int(r.stdout.split()[-1])

    def cpu_seconds(self, pid: int) -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def show(self, *props: str) -> dict[str, str]:
        out = self.run("systemctl show speakerd " + " ".join(f"-p {p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *args: str) -> str:
        return self.run("journalctl --no-pager -u speakerd " + " ".join(args), check=False,
                        timeout=60).stdout

    def wait(self, what: str, predicate: Callable[[], object], timeout: float,
             every: float = 0.5) -> object:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise Failed(f"{what}: not within {timeout:.0f} s")
            time.sleep(every)

    def stop(self, grace: float = 60, cleanup: bool = True) -> None:
        if self.mode == "chroot":
            # Whatever the run started inside: processes whose root is this tree.
            for proc in Path("/proc").glob("[0-9]*"):
                with contextlib.suppress(OSError):
                    if os.readlink(proc / "root") == str(self.root):
                        os.kill(int(proc.name), signal.SIGKILL)
        if self.proc is not None and self.proc.poll() is None:
            # nspawn turns SIGTERM into an orderly poweroff of the container.
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        if self.leader and self._find_leader_alive():
            # Killing a PID namespace's init kills all of it: no container outlives us.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.leader, signal.SIGKILL)
        self.leader = 0
        for m in reversed(self.mounts):
            subprocess.run(["umount", "-R", "-l", str(m)], check=False, capture_output=True)
        self.mounts = []
        if cleanup and not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _find_leader_alive(self) -> bool:
        try:
            return Path(f"/proc/{self.leader}/comm").read_text().strip() == "systemd"
        except OSError:
            return False


# --- the fixture model, on the host -----------------------------------------------------

class Model:
    """tests/realtime_server.py on 127.0.0.1 in a thread of its own."""

    def __init__(self) -> None:
        self.server = RealtimeServer(vad=True, replies=[
            Reply(audio_ms=800, transcript="Let me look.",
                  function_calls=[Call("get_time", "{}", "call_time")]),
            Reply(audio_ms=2500, transcript="It is time for tea.")])
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> Model:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.__aenter__(), self.loop).result(30)
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.server.__aexit__(None, None, None),
                                             self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def types(self) -> list[str]:
        return [r.type for r in list(self.server.received)]


def tone_blocks(data: bytes, freq: float = 440.0, block: int = 2400) -> int:
    """How many 100 ms blocks of 24 kHz s16le are dominated by the fixture's reply tone."""
    x = np.frombuffer(data[:len(data) // 2 * 2], "<i2").astype(np.float64)
    n = 0
    for i in range(0, x.size - block, block):
        b = x[i:i + block]
        if np.sqrt(np.mean(b**2)) < 500:
            continue
        peak = np.argmax(np.abs(np.fft.rfft(b))) * 24000 / block
        n += abs(peak - freq) < 20
    return n


# --- the run ----------------------------------------------------------------------------

class Run:
    def __init__(self, arch: str, keep: bool) -> None:
        self.arch = arch
        self.keep = keep
        self.rows: list[tuple[str, str, float, str]] = []
        self.failed = False
        self.m: Machine | None = None
        self.slow = 1 if arch == "amd64" else 5
        self.not_run = False

    @contextlib.contextmanager
    def step(self, name: str, *, critical: bool = False) -> Iterator[list[str]]:
        """Times a step; a failed check is recorded (and ends the run when critical)."""
        note: list[str] = []
        log(f"--- {name}")
        t = time.monotonic()
        try:
            yield note
        except Failed as e:
            dt = time.monotonic() - t
            self.rows.append((name, "FAIL", dt, str(e).splitlines()[0][:80]))
            self.failed = True
            log(f"FAIL {name}: {e}")
            self.diagnose()
            if critical:
                raise
        except CannotBoot:
            self.rows.append((name, "CANNOT BOOT", time.monotonic() - t, ""))
            self.not_run = True
            raise
        else:
            dt = time.monotonic() - t
            self.rows.append((name, "ok", dt, "; ".join(note)[:80]))
            log(f"ok   {name} ({dt:.1f} s){': ' + '; '.join(note) if note else ''}")

    def diagnose(self) -> None:
        """What a user would look at next: the service's status and its last lines."""
        m = self.m
        if m is None or not m.leader:
            return
        with contextlib.suppress(Exception):
            r = m.run("systemctl status --no-pager -n 0 speakerd target-sound; "
                      "journalctl --no-pager -n 25 -o short-monotonic "
                      "-u speakerd -u target-sound", check=False, timeout=30)
            log("diagnosis:\n  " + "\n  ".join(r.stdout.splitlines()))

    def table(self) -> str:
        w = max(len(r[0]) for r in self.rows) if self.rows else 4
        lines = [f"{'step':<{w}}  {'result':<11}  {'seconds':>7}  detail",
                 f"{'-' * w}  {'-' * 11}  {'-' * 7}  {'-' * 6}"]
        lines += [f"{n:<{w}}  {r:<11}  {s:7.1f}  {d}" for n, r, s, d in self.rows]
        total = sum(r[2] for r in self.rows)
        verdict = "FAILED" if self.failed else "NOT RUN" if self.not_run else "passed"
        lines.append(f"{'total':<{w}}  {verdict:<11}  "
                     f"{total:7.1f}")
        return "\n".join(lines)

    def main(self) -> int:
        cannot: CannotBoot | None = None
        try:
            self.steps()
        except CannotBoot as e:
            cannot = e
        except Failed:
            pass
        except (KeyboardInterrupt, SystemExit):
            self.rows.append(("(interrupted)", "ERROR", 0.0, ""))
            self.failed = True
        except Exception:
            traceback.print_exc()
            self.rows.append(("(the test itself)", "ERROR", 0.0, "see the traceback"))
            self.failed = True
        finally:
            if self.m is not None:
                with self.step("shut the container down"):
                    self.m.stop()
                if self.keep:
                    log(f"kept {self.m.dir}")
        print(f"\ntests/target {self.arch} ({self.m.mode if self.m else '-'}):\n"
              f"{self.table()}", flush=True)
        if cannot is not None:
            if len(str(cannot).splitlines()) > 1:
                print(str(cannot), file=sys.stderr, flush=True)
            print(f"!!!!! tests/target: THIS MACHINE CANNOT BUILD OR BOOT A {SUITE} "
                  f"{self.arch} CONTAINER, target test NOT RUN: "
                  f"{str(cannot).splitlines()[0]} !!!!!", flush=True)
            return CANNOT_BOOT
        return 1 if self.failed else 0

    def steps(self) -> None:
        with self.step("root filesystem", critical=True) as note:
            if self.arch == "arm64":
                binfmt_aarch64()
            image, cached = rootfs(self.arch)
            note.append(f"{'cached' if cached else 'built'}: {image}")
        self.m = m = Machine(image, self.arch, self.keep)
        with self.step("prepare the container", critical=True):
            m.prepare()
        try:
            with self.step("boot (systemd-nspawn)", critical=True) as note:
                note.append(m.boot(180 if self.arch == "amd64" else 900))
                if self.arch != "amd64":
                    failed = m.run("systemctl is-failed systemd-journald.service",
                                   check=False).stdout.strip()
                    if failed == "failed":
                        raise CannotBoot("systemd boots under qemu-user but cannot run "
                                         "services (systemd-journald failed)")
        except CannotBoot as e:
            if self.arch == "amd64":
                raise
            log(f"{e}: falling back to a chroot, the service started by hand")
            self.not_run = False
            self.rows[-1] = (self.rows[-1][0], "n/a", self.rows[-1][2],
                             str(e).splitlines()[0][:80])
            with self.step("chroot instead (no systemd)", critical=True):
                m.stop(grace=5, cleanup=False)
                m.proc = None
                m.enter_chroot()
        with Model() as model:
            if m.mode == "nspawn":
                self.conversation_steps(m, model)
            else:
                self.chroot_steps(m, model)

    def install(self, m: Machine, timeout: float, *args: str
                ) -> subprocess.CompletedProcess[str]:
        # As the README says, from the checkout, as a user with sudo rights.
        return m.run("cd ~/speakerd && sudo ./install.sh " + " ".join(args), user="pi",
                     timeout=timeout, check=False)

    def conversation_steps(self, m: Machine, model: Model) -> None:
        slow = self.slow
        with self.step("install.sh, no sound device yet", critical=True) as note:
            r = self.install(m, 1500 * slow, "--api-key-file", "~/openai.key")
            out = r.stdout + r.stderr
            said = [line for line in out.splitlines() if line.startswith("install.sh")]
            log("install.sh said:\n  " + "\n  ".join(said))
            check(r.returncode == 0, f"sudo ./install.sh: exit {r.returncode}: "
                  + (out.strip().splitlines() or [""])[-1])
            check("waiting for microphone" in out,
                  "install.sh does not say that the service waits for the microphone")
            note.append((said or [""])[-1][:70])
        with self.step("service active, waiting for the microphone") as note:
            time.sleep(7)  # longer than RestartSec: a restart loop would show
            s = m.show("ActiveState", "SubState", "StatusText", "NRestarts", "MainPID")
            note.append(f"{s['ActiveState']}: {s['StatusText']}")
            check(s["ActiveState"] == "active", f"not active: {s}")
            check(s["StatusText"].startswith("waiting for microphone"),
                  f"status line: {s['StatusText']!r}")
            check(s["NRestarts"] == "0", f"restarted {s['NRestarts']} times")
            waiting_pid = s["MainPID"]
            j = m.journal()
            check("ALSA lib" not in j, "alsa-lib's own error lines reach the journal:\n"
                  + "\n".join(line for line in j.splitlines() if "ALSA lib" in line)[:500])
        with self.step("speakerd config --check as pi") as note:
            r = m.run("speakerd config --check", user="pi", check=False)
            check(r.returncode != 127, f"speakerd is on no PATH: {r.stderr.strip()}")
            check("sudo" in r.stderr, f"the refusal does not say to use sudo: {r.stderr!r}")
            note.append(r.stderr.strip()[:70])
            r = m.run("sudo speakerd config --check", user="pi", check=False)
            check(r.returncode == 0 and "OK" in r.stdout, f"sudo speakerd config --check: "
                  f"exit {r.returncode}: {r.stdout}{r.stderr}")
        with self.step("edit the config: the model's URL; reload") as note:
            # A minimal image has no /bin/kill (procps): the unit must not need it.
            note.append("no /bin/kill here" if m.run("test -e /bin/kill", check=False
                                                     ).returncode else "/bin/kill exists")
            url = model.server.url
            m.run(set_url(url) + " && sudo systemctl reload speakerd", user="pi")
            m.wait("the journal says the config was reloaded",
                   lambda: "config reloaded from" in m.journal(), 30)
        with self.step("/etc/asound.conf names the card: one restart, still waiting") as note:
            # alsa-lib reads /etc/asound.conf once per process: a new device name takes a
            # restart, as with any ALSA program. The card itself is not there yet.
            m.run("sudo cp /usr/local/lib/speakerd-target/asound.conf /etc/asound.conf && "
                  "sudo systemctl restart speakerd", user="pi")
            m.wait("the restarted service says what it waits for", lambda: m.show(
                "StatusText")["StatusText"].startswith("waiting for"), 60)
            s = m.show("ActiveState", "StatusText", "MainPID")
            note.append(f"{s['ActiveState']}: {s['StatusText']}")
            check(s["ActiveState"] == "active" and s["StatusText"].startswith("waiting for"),
                  f"not waiting for the device: {s}")
            waiting_pid = s["MainPID"]
        with self.step("the sound card appears: picked up without a restart") as note:
            m.run("systemctl start target-sound.service && "
                  f"for i in $(seq 300); do [ -e {READY} ] && break; sleep 0.1; done; "
                  f"[ -e {READY} ]", timeout=60)
            m.wait("status idle", lambda: m.show("StatusText")["StatusText"].startswith(
                "idle"), 60)
            s = m.show("ActiveState", "StatusText", "NRestarts", "MainPID")
            note.append(s["StatusText"])
            check(s["MainPID"] == waiting_pid and s["NRestarts"] == "0",
                  f"the service was restarted: {s}")
            j = m.journal("-o", "cat")
            back = re.findall(r"^.*microphone \S+ (?:is back|is there now).*$", j, re.M)
            check(back, "no journal line says the microphone appeared")
            note.append(back[-1][:60])
        with self.step("journal: the start line, SPEAKERD_STATE=idle") as note:
            lines = [json.loads(line) for line in
                     m.journal("-o", "json", "SPEAKERD_EVENT=start").splitlines() if line]
            check(lines, "no SPEAKERD_EVENT=start line in journalctl -u speakerd")
            check(lines[-1].get("SPEAKERD_STATE") == "idle",
                  f"start line without SPEAKERD_STATE=idle: {lines[-1].get('MESSAGE')}")
            note.append(str(lines[-1].get("MESSAGE"))[:70])
        with self.step("systemctl is-active / status line") as note:
            r = m.run("systemctl is-active speakerd", check=False)
            check(r.stdout.strip() == "active", f"is-active: {r.stdout.strip()}")
            st = m.run("systemctl status speakerd --no-pager", check=False).stdout
            status = re.search(r"^\s*Status: \"(.*)\"", st, re.M)
            check(status and status.group(1).startswith("idle"), f"status: {st[:400]}")
            note.append(status.group(1) if status else "")
        with self.step("sudo speakerd status: the control socket") as note:
            r = m.run("sudo speakerd status --json", user="pi", check=False)
            check(r.returncode == 0, f"exit {r.returncode}: {r.stdout}{r.stderr}")
            reply = json.loads(r.stdout)
            check(reply.get("ok") is True and reply.get("state") == "idle",
                  f"status reply: {r.stdout[:300]}")
            mode = m.run("stat -c '%a %G' /run/speakerd/control", check=False).stdout.strip()
            check(mode == "660 speakerd", f"/run/speakerd/control is {mode!r}")
            note.append(f"state {reply['state']}, socket {mode}")
        self.conversation(m, model)
        with self.step("sudo speakerd check while the service runs") as note:
            # After the conversation: check's own session.update must not count as one.
            r = m.run("sudo speakerd check --listen 1", user="pi", check=False, timeout=180)
            out = r.stdout
            check(r.returncode == 0 and "\nFAIL" not in "\n" + out,
                  f"exit {r.returncode}: {out[-1500:]}{r.stderr[-500:]}")
            for want in ("ok    speakerd: running", "ok    service: speakerd.service",
                         "ok    realtime session.updated", "ok    config"):
                check(want in out, f"no {want!r} line in:\n{out[-1500:]}")
            words = [line.split()[0] for line in out.splitlines()
                     if line[:4] in ("ok  ", "warn", "skip")]
            note.append(", ".join(f"{words.count(w)} {w}" for w in ("ok", "warn", "skip")))
        with self.step("systemd-analyze security speakerd") as note:
            r = m.run("systemd-analyze security speakerd --no-pager", check=False, timeout=120)
            score = re.search(r"Overall exposure level for speakerd.service: ([\d.]+)",
                              r.stdout)
            check(score, f"no score: {r.stdout[-300:]}{r.stderr[-300:]}")
            note.append(f"exposure {score.group(1)}")
            check(float(score.group(1)) <= MAX_EXPOSURE,
                  f"exposure {score.group(1)} > {MAX_EXPOSURE}")
        with self.step("reload with a typo'd key: keeps running, says why") as note:
            before = len(self.journal_lines(m))
            m.run("sudo cp /etc/speakerd/speakerd.toml ~/speakerd.toml.good && "
                  f"{TYPO} && "
                  "sudo systemctl reload speakerd", user="pi")
            line = m.wait("the journal names the typo", lambda: next(
                (x for x in self.journal_lines(m)[before:] if "treshold" in x), ""), 30)
            note.append(str(line)[-70:])
            check("did you mean 'threshold'" in str(line), f"journal: {line}")
            check(m.run("systemctl is-active speakerd", check=False).stdout.strip() ==
                  "active", "the service stopped")
            m.run("sudo cp ~/speakerd.toml.good /etc/speakerd/speakerd.toml && "
                  "sudo systemctl reload speakerd", user="pi")
            m.wait("the good config reloaded", lambda: "config reloaded from" in
                   "".join(self.journal_lines(m)[before:]), 30)
        with self.step("kill -9: restarted, READY again") as note:
            pid = m.show("MainPID")["MainPID"]
            m.run(f"kill -9 {pid}")
            m.wait("a new main process, active and idle", lambda: (
                s := m.show("ActiveState", "MainPID", "StatusText", "NRestarts"))[
                "MainPID"] not in ("0", pid) and s["ActiveState"] == "active"
                and s["StatusText"].startswith("idle"), 60)
            s = m.show("NRestarts", "StatusText")
            note.append(f"NRestarts={s['NRestarts']}, {s['StatusText']}")
        with self.step("idle CPU over 30 s (CPUUsageNSec)") as note:
            time.sleep(3)
            a = int(m.show("CPUUsageNSec")["CPUUsageNSec"])
            t = time.monotonic()
            time.sleep(30)
            b = int(m.show("CPUUsageNSec")["CPUUsageNSec"])
            share = (b - a) / 1e9 / (time.monotonic() - t)
            note.append(f"{share * 100:.1f} % of a core")
            log(f"idle CPU: {share * 100:.1f} % of one core")
            check(share <= MAX_IDLE_CPU, f"idle CPU {share * 100:.1f} % > "
                  f"{MAX_IDLE_CPU * 100:.0f} %")
        with self.step("install.sh over a broken config: says which line") as note:
            m.run(TYPO, user="pi")
            r = self.install(m, 900 * slow)
            m.run("sudo cp ~/speakerd.toml.good /etc/speakerd/speakerd.toml && "
                  "sudo systemctl restart speakerd", user="pi", check=False, timeout=120)
            check(r.returncode == 1, f"exit {r.returncode}")
            check("speakerd did not start (exit status 78)" in r.stderr and
                  "wake_word.treshold: unknown key" in r.stderr and
                  "sudo speakerd config --check" in r.stderr, f"stderr: {r.stderr[-800:]}")
            check("Job for speakerd.service failed" not in r.stderr,
                  "systemd's generic line is still there")
            line = next(x for x in r.stderr.splitlines() if "treshold" in x)
            note.append(f"exit 1: {line[-50:]}")
        with self.step("install.sh again: changes nothing") as note:
            sums = "sudo sh -c \"sha256sum /etc/speakerd/speakerd.toml " \
                   "/etc/speakerd/openai.key /etc/systemd/system/speakerd.service; " \
                   "stat -c '%n %a %U %G' /etc/speakerd /etc/speakerd/*\""
            before_sums = m.run(sums, user="pi").stdout
            r = self.install(m, 900 * slow)
            out = r.stdout + r.stderr
            check(r.returncode == 0, f"exit {r.returncode}: {out[-500:]}")
            check(m.run(sums, user="pi").stdout == before_sums, "config, key or unit changed")
            check("keeping your /etc/speakerd/speakerd.toml" in out and
                  "keeping the API key" in out, "does not say it keeps config and key")
            check(KEY not in out, "the key was printed")
            m.wait("active and idle", lambda: m.show("StatusText")["StatusText"].startswith(
                "idle"), 60)
            note.append([x for x in out.splitlines() if x.startswith("install.sh")][-1][:70])
        with self.step("install.sh --uninstall --purge: nothing left") as note:
            r = m.run("cd ~/speakerd && sudo ./install.sh --uninstall --purge", user="pi",
                      check=False, timeout=120)
            check(r.returncode == 0, f"exit {r.returncode}: {r.stdout}{r.stderr}")
            left = m.run("ls -d /etc/systemd/system/speakerd.service /opt/speakerd "
                         "/etc/speakerd /usr/local/bin/speakerd 2>/dev/null; "
                         "getent passwd speakerd; getent group speakerd; "
                         "systemctl list-unit-files speakerd.service --no-legend",
                         check=False).stdout.strip()
            check(left == "", f"left behind: {left}")
            note.append(r.stdout.strip().splitlines()[-1][:70])

    def chroot_steps(self, m: Machine, model: Model) -> None:
        """Under emulation without a working manager: what can be checked by hand."""
        with self.step("install.sh --no-start (chroot)", critical=True) as note:
            r = self.install(m, 3600, "--no-start", "--api-key-file", "~/openai.key")
            out = r.stdout + r.stderr
            said = [line for line in out.splitlines() if line.startswith("install.sh")]
            log("install.sh said:\n  " + "\n  ".join(said))
            check(r.returncode == 0, f"sudo ./install.sh: exit {r.returncode}: "
                  + "\n".join(out.strip().splitlines()[-15:]))
            note.append((said or [""])[-1][:70])
        with self.step("speakerd config --check as pi") as note:
            r = m.run("speakerd config --check", user="pi", check=False, timeout=300)
            check(r.returncode != 127, f"speakerd is on no PATH: {r.stderr.strip()}")
            check("sudo" in r.stderr, f"the refusal does not say to use sudo: {r.stderr!r}")
            r = m.run("sudo speakerd config --check", user="pi", check=False, timeout=300)
            check(r.returncode == 0 and "OK" in r.stdout, f"sudo speakerd config --check: "
                  f"exit {r.returncode}: {r.stdout}{r.stderr}")
            note.append(r.stdout.strip()[:70])
        with self.step("edit the config; start by hand, no sound card yet") as note:
            m.run(set_url(model.server.url) + " && sudo cp "
                  "/usr/local/lib/speakerd-target/asound.conf /etc/asound.conf", user="pi")
            pid = m.start_by_hand()
            m.wait("started", lambda: "started: config" in m.service_log(), 300)
            time.sleep(5)
            check(Path(f"/proc/{pid}").exists(), "speakerd exited:\n" + m.service_log()[-1500:])
            check("keeps trying the microphone" in m.service_log(),
                  "no line says it keeps trying the microphone")
            note.append(f"running as pid {pid}, waiting for the microphone")
        with self.step("the sound card appears: picked up without a restart") as note:
            m.run("install -d -m 0755 -o pi /run/target-sound /var/lib/speakerd-target && "
                  "su pi -c 'HOME=/run/target-sound XDG_RUNTIME_DIR=/run/target-sound "
                  f"PULSE_SERVER=unix:{PULSE} "
                  "nohup sh /usr/local/lib/speakerd-target/sound.sh "
                  ">/run/target-sound/log 2>&1 </dev/null &'; "
                  f"for i in $(seq 600); do [ -e {READY} ] && break; sleep 1; done; "
                  f"[ -e {READY} ] || {{ cat /run/target-sound/log; exit 1; }}", timeout=660)
            back = m.wait("the microphone is picked up", lambda: re.findall(
                r"^.*microphone \S+ (?:is back|is there now).*$", m.service_log(), re.M),
                120)
            check(Path(f"/proc/{pid}").exists(), "speakerd exited")
            note.append(str(back[-1])[-60:])
        self.conversation(m, model)
        with self.step("idle CPU over 30 s (/proc, emulated)") as note:
            time.sleep(3)
            a, t = m.cpu_seconds(pid), time.monotonic()
            time.sleep(30)
            share = (m.cpu_seconds(pid) - a) / (time.monotonic() - t)
            note.append(f"{share * 100:.1f} % of a host core under qemu (not checked)")
            log(f"idle CPU under emulation: {share * 100:.1f} % of one host core")
        with self.step("install.sh --no-start again: changes nothing") as note:
            sums = "sudo sh -c \"sha256sum /etc/speakerd/speakerd.toml " \
                   "/etc/speakerd/openai.key /etc/systemd/system/speakerd.service; " \
                   "stat -c '%n %a %U %G' /etc/speakerd /etc/speakerd/*\""
            before_sums = m.run(sums, user="pi").stdout
            r = self.install(m, 1800, "--no-start")
            out = r.stdout + r.stderr
            check(r.returncode == 0, f"exit {r.returncode}: {out[-500:]}")
            check(m.run(sums, user="pi").stdout == before_sums, "config, key or unit changed")
            check("keeping your /etc/speakerd/speakerd.toml" in out and
                  "keeping the API key" in out, "does not say it keeps config and key")
            note.append([x for x in out.splitlines() if x.startswith("install.sh")][-1][:70])
        with self.step("install.sh --uninstall --purge: nothing left") as note:
            os.kill(pid, signal.SIGTERM)
            m.wait("speakerd stopped", lambda: not Path(f"/proc/{pid}").exists(), 60)
            r = m.run("cd ~/speakerd && sudo ./install.sh --uninstall --purge", user="pi",
                      check=False, timeout=300)
            check(r.returncode == 0, f"exit {r.returncode}: {r.stdout}{r.stderr}")
            left = m.run("ls -d /etc/systemd/system/speakerd.service /opt/speakerd "
                         "/etc/speakerd /usr/local/bin/speakerd 2>/dev/null; "
                         "getent passwd speakerd; getent group speakerd",
                         check=False).stdout.strip()
            check(left == "", f"left behind: {left}")
            note.append(r.stdout.strip().splitlines()[-1][:70])

    @staticmethod
    def journal_lines(m: Machine) -> list[str]:
        return m.journal("-o", "cat").splitlines()

    def conversation(self, m: Machine, model: Model) -> None:
        with self.step("a conversation: wake word, request, tool round, answer",
                       critical=m.mode == "chroot") as note:
            # Under qemu-user the emulated wake-word models run several times slower
            # than the audio arrives, so there the conversation is started as the
            # talk button does, through the control socket, and the clip is the request.
            talk = m.mode == "chroot"
            wake = [] if talk else [speak("hey jarvis", "en-gb"), silence(0.3)]
            clip = np.concatenate([silence(0.5), *wake, speak("what time is it"),
                                   silence(2.5)])
            write_wav(m.root / "home/pi/request.wav", clip)
            speaker = m.root / SPEAKER_FILE.lstrip("/")  # on the container's disk
            start = speaker.stat().st_size
            if talk:
                m.run("python3 -c 'import socket; s = socket.socket(socket.AF_UNIX); "
                      "s.connect(\"/run/speakerd/control\"); "
                      "s.sendall(b\"{\\\"request\\\": \\\"talk\\\"}\\n\"); "
                      "print(s.recv(4096).decode())'", timeout=60)
                m.wait("listening after the talk request",
                       lambda: "connecting -> listening" in m.service_log(), 60 * self.slow)
                note.append("talk request (emulated):")
            m.run(f"PULSE_SERVER=unix:{PULSE} paplay -d mic ~/request.wav", user="pi",
                  timeout=60)

            def heard() -> int:
                return tone_blocks(speaker.read_bytes()[start:])

            # 0.8 s before the tool round, 2.5 s after it; at least 2.5 s must be heard.
            with contextlib.suppress(Failed):
                m.wait("the answer after the tool round", lambda: heard() >= 30,
                       90 * self.slow, every=1)
            blocks = heard()
            types = model.types()
            appended = types.count("input_audio_buffer.append")
            outputs = [r.event for r in model.server.of_type("conversation.item.create")
                       if r.event.get("item", {}).get("type") == "function_call_output"]
            note.append(f"{appended} audio chunks in, tool round, {blocks / 10:.1f} s of "
                        "answer played")
            check(appended > 0, "the server received no audio (no wake word heard?)")
            check(len(outputs) == 1 and outputs[0]["item"].get("call_id") == "call_time",
                  f"tool output: {outputs}")
            # In-band only: the first conversation also records a status phrase out of
            # band (conversation "none"), as the unit has a state directory.
            creates = [r.event for r in model.server.of_type("response.create")
                       if (r.event.get("response") or {}).get("conversation") != "none"]
            check(len(creates) == 1,
                  f"{len(creates)} response.create after the tool round")
            check(model.server.invalid == [], f"invalid events: {model.server.invalid[:2]}")
            check(blocks >= 25, f"only {blocks} x 100 ms of the answer reached the speaker")
            m.wait("back to idle", lambda: "listening -> idle" in m.service_log(),
                   30 * self.slow)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tests/target/run", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=["amd64", "arm64"], default="amd64")
    p.add_argument("--keep", action="store_true",
                   help="keep the container's directory (under /var/tmp) afterwards")
    args = p.parse_args(argv)
    if os.getuid() != 0:
        print("tests/target/run: run as root (debootstrap and systemd-nspawn need it)",
              file=sys.stderr)
        return 2
    run = Run(args.arch, args.keep)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    return run.main()


if __name__ == "__main__":
    sys.exit(main())
