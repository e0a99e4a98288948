"""The error hierarchy speakerd raises, and the exit code each one maps to."""

from __future__ import annotations

# sysexits.h codes systemd understands (RestartPreventExitStatus=78 in the unit).
EX_OK = 0
EX_SOFTWARE = 1
EX_UNAVAILABLE = 69
EX_CONFIG = 78


class SpeakerdError(Exception):
    """Base of every error speakerd raises on purpose."""

    exit_code = EX_SOFTWARE


class ConfigError(SpeakerdError):
    """The config file (or a file it names) is missing, malformed or out of range.

    `str()` is the one line a person needs: `FILE: KEY: REASON`.
    """

    exit_code = EX_CONFIG

    def __init__(self, path: str, key: str, reason: str) -> None:
        self.path = path
        self.key = key
        self.reason = reason
        where = f"{path}: {key}" if key else path
        super().__init__(f"{where}: {reason}")


class UnavailableError(SpeakerdError):
    """A device or service speakerd needs is not there (ALSA PCM, GPIO, ...)."""

    exit_code = EX_UNAVAILABLE


class ProtocolError(SpeakerdError):
    """The realtime peer sent something that breaks the protocol."""


def refusal(code: str, message: str, **more: object) -> dict[str, object]:
    """A control-socket reply saying no: its `code` for scripts, `message` for people."""
    return {"ok": False, "code": code, "error": message, **more}
