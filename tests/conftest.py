"""Fixtures shared by the suite: config files on disk and the real `speakerd` command."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Before anything loads alsa-lib: the hermetic test asoundrc (see tests/audio_devices.py).
from . import audio_devices

ROOT = Path(__file__).resolve().parent.parent
SPEAKERD = [sys.executable, "-m", "speakerd"]


def in_ci() -> bool:
    return os.environ.get("CI") == "true"


def need(condition: bool, why: str) -> None:
    """Skip on a developer machine that lacks something; in CI a missing piece fails."""
    if not condition:
        if in_ci():
            pytest.fail(f"CI must provide this: {why}")
        pytest.skip(why)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a speakerd subprocess: no key, no systemd sockets, stderr logs."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENAI_API_KEY", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
                        "CREDENTIALS_DIRECTORY", "JOURNAL_STREAM", "SPEAKERD_CONFIG")}
    env["SPEAKERD_LOG_TARGET"] = "stderr"
    env.update(extra)
    return env


def run_speakerd(*args: str, env: dict[str, str] | None = None,
                 timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SPEAKERD, *args], capture_output=True, text=True,
                          env=env or clean_env(), timeout=timeout, cwd=ROOT)


@pytest.fixture
def write_config(tmp_path: Path):
    """write_config(text) -> path of a real TOML file holding text."""
    def write(text: str, name: str = "speakerd.toml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path
    return write


@pytest.fixture(scope="session")
def pulse():
    """The paced PulseAudio devices `spk` and `mic` (see tests/audio_devices.py)."""
    need(audio_devices.pulse_available(), "pulseaudio and pulseaudio-utils")
    daemon = audio_devices.Pulse()
    daemon.start()
    yield daemon
    daemon.stop()


@contextlib.contextmanager
def leds_shown() -> Iterator[list[str]]:
    """What the LEDs were told to show, in order, read off speakerd's own debug lines
    ("LEDs show listening") while the block runs."""
    shown: list[str] = []

    class Shown(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if message.startswith("LEDs show "):
                shown.append(message.removeprefix("LEDs show "))

    logger = logging.getLogger("speakerd.leds")
    handler, level = Shown(logging.DEBUG), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield shown
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
