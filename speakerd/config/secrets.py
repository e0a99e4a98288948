"""The API key and other secret files: where each is read from; a Secret never prints itself."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

from speakerd.config.schema import Config
from speakerd.errors import ConfigError

CREDENTIAL_NAME = "openai-key"  # the unit's LoadCredential=openai-key:...


class Secret:
    """A string that never shows itself in repr, str or f-strings; `.reveal()` it to use it."""

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str) -> None:
        self._value = value
        self.source = source

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret(<{len(self._value)} chars from {self.source}>)"

    __str__ = __repr__


def resolve_api_key(config: Config, environ: Mapping[str, str] | None = None) -> Secret | None:
    """The API key from realtime.api_key_file, the systemd credential or $OPENAI_API_KEY.

    Returns None when none is configured. Raises ConfigError for a named key file
    that is missing, empty, or readable by group or others.
    """
    env = os.environ if environ is None else environ
    if config.realtime.api_key_file:
        return read_secret_file(config.realtime.api_key_file, config.path,
                              "realtime.api_key_file", check_mode=True)
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    cred = os.path.join(cred_dir, CREDENTIAL_NAME) if cred_dir else ""
    # install.sh leaves an empty key file (LoadCredential= fails on a missing one):
    # empty means "not set yet", not an error. systemd made this copy for this
    # service alone, so its mode is not ours to check.
    if cred and os.path.exists(cred) and os.path.getsize(cred) > 0:
        return read_secret_file(cred, config.path, f"credential {CREDENTIAL_NAME}",
                              check_mode=False)
    key = env.get("OPENAI_API_KEY", "").strip()
    return Secret(key, "$OPENAI_API_KEY") if key else None


def read_secret_file(key_path: str, path: str, key: str, *, check_mode: bool) -> Secret:
    """The stripped text of `key_path`, named by config file `path` at `key`.

    Raises ConfigError when the file is missing, unreadable, empty or not UTF-8, and
    with `check_mode`, when group or others may read it (the message gives the chmod).
    """
    try:
        st = os.stat(key_path)
        if check_mode and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(path, key, f"{key_path} is readable by group or others "
                              f"(mode {stat.S_IMODE(st.st_mode):04o}); run: "
                              f"chmod 600 {key_path}")
        text = Path(key_path).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise ConfigError(path, key, f"{key_path}: no such file") from None
    except PermissionError:
        raise ConfigError(path, key, f"{key_path}: not readable by uid {os.getuid()}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, key, f"{key_path}: not UTF-8 text") from None
    except IsADirectoryError:
        raise ConfigError(path, key, f"{key_path}: is a directory") from None
    if not text:
        raise ConfigError(path, key, f"{key_path} is empty")
    return Secret(text, key_path)

