"""Checks of the config file and the API key, as the service user will meet them."""

from __future__ import annotations

import grp
import os
import pwd
import stat
from pathlib import Path

from speakerd import config as configmod
from speakerd.checks.report import Report, fail, ok, warn
from speakerd.errors import ConfigError

SERVICE_USER = "speakerd"  # the unit's User=
KEY_FILE = "/etc/speakerd/openai.key"  # the unit's LoadCredential=openai-key:...
KEY_FIX = (f"put a valid key in {KEY_FILE} (chmod 600), then sudo systemctl restart "
           "speakerd")


def readable_by(path: str, user: str) -> str | None:
    """None if `user` can read `path` (every directory above it searchable), else why not.

    Decided from the modes, owners and `user`'s groups, the way the kernel would
    for that user, so root can answer for the service user without becoming it.
    """
    entry = pwd.getpwnam(user)
    if entry.pw_uid == 0:
        return None
    groups = {entry.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    target = Path(os.path.abspath(path))
    for step in [*reversed(target.parents), target]:
        need, what = ((stat.S_IROTH, "read") if step == target
                      else (stat.S_IXOTH, "search"))
        st = os.stat(step)
        if st.st_uid == entry.pw_uid:
            bits = need << 6
        elif st.st_gid in groups:
            bits = need << 3
        else:
            bits = need
        if not st.st_mode & bits:
            return (f"the service user {user} cannot {what} {step} (mode "
                    f"{stat.S_IMODE(st.st_mode):04o}, {_owner(st)})")
    return None


def _owner(st: os.stat_result) -> str:
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{user}:{group}"


def service_user() -> str | None:
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        return None  # not installed here: nobody else's view to check
    return SERVICE_USER


def check_config(report: Report, path: str) -> configmod.Config | None:
    """The file parses and validates, and its wake-word models load (`config --check`)."""
    try:
        config = configmod.load(path)
        from speakerd import wakeword
        wakeword.Detector.from_config(config.wake_word, path).close()
    except ConfigError as e:
        report.add(fail("config", str(e), _config_fix(e, path)))
        return None
    user = service_user()
    why = readable_by(path, user) if user else None
    if why:
        report.add(fail("config", f"{path}: {why}",
                        f"sudo chown root:{SERVICE_USER} {path} && sudo chmod 0640 {path}"))
        return config
    report.add(ok("config", f"{path}: valid, wake word models load"))
    return config


def _config_fix(e: ConfigError, path: str) -> str:
    if e.reason.startswith("no such file"):
        return ("copy the packaged config/speakerd.toml there (install.sh does), or pass "
                "--config PATH")
    if e.reason.startswith("not readable by uid"):
        return "run speakerd check with sudo"
    where = f"{e.key} in {path}" if e.key else path
    return f"correct {where}; `speakerd config --check` checks the file alone"


def check_key(report: Report, config: configmod.Config) -> configmod.Secret | None:
    """Which key the service will use, and that it can read it; returns that key."""
    try:
        key = configmod.resolve_api_key(config)
    except ConfigError as e:
        report.add(fail("API key", str(e), f"correct realtime.api_key_file in {config.path}, "
                        f"or leave it empty and {KEY_FIX}"))
        return None
    user = service_user()
    if key is not None and config.realtime.api_key_file:
        why = readable_by(key.source, user) if user else None
        if why:
            report.add(fail("API key", f"{key.source}: {why}",
                            f"sudo chown {SERVICE_USER} {key.source} (keep it chmod 600), or "
                            f"leave realtime.api_key_file empty and {KEY_FIX}"))
            return key
        report.add(ok("API key", f"from {key.source} (realtime.api_key_file)"))
        return key
    if key is not None and key.source != "$OPENAI_API_KEY":
        report.add(ok("API key", f"from {key.source}"))
        return key
    # The service's own key: systemd (root) hands it over from KEY_FILE, so only
    # root needs to read it, and only a non-empty file counts.
    try:
        text = Path(KEY_FILE).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        text = ""
    except PermissionError:
        report.add(warn("API key", f"cannot read {KEY_FILE} as uid {os.getuid()} to check it",
                        "run speakerd check with sudo"))
        return key
    except (OSError, UnicodeDecodeError) as e:
        report.add(fail("API key", f"{KEY_FILE}: {e}", KEY_FIX))
        return key
    if text:
        report.add(ok("API key", f"from {KEY_FILE} (the service's credential "
                      f"{configmod.CREDENTIAL_NAME})"))
        return configmod.Secret(text, KEY_FILE)
    if key is not None:
        if user:
            report.add(warn("API key", f"only in $OPENAI_API_KEY, which the service does "
                            f"not see; {KEY_FILE} is empty or missing", KEY_FIX))
        else:
            report.add(ok("API key", "from $OPENAI_API_KEY"))
        return key
    report.add(fail("API key", "none configured (realtime.api_key_file, the credential "
                    f"{configmod.CREDENTIAL_NAME} or $OPENAI_API_KEY)", KEY_FIX))
    return None
