"""Logging: structured fields read back from a real journald, stderr fallback, redaction."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from speakerd import log

from .conftest import ROOT, clean_env, need

HELPERS = ROOT / "tests" / "helpers"
KEY = "sk-proj-PROBEKEY0123456789abcdefghij"


# Logs around a journald stop and start inside journald-sandbox (see its header for the
# signals); run with `python -c` so that it needs no file of its own.
RESTART_PROBE = """
import logging, os, signal, sys
from speakerd import log

def journald(request):
    signal.pthread_sigmask(signal.SIG_BLOCK, {request})
    os.kill(os.getppid(), request)
    if signal.sigtimedwait({request}, 20) is None:
        sys.exit(f"journald-sandbox did not answer {request!r}")

key = os.environ["PROBE_KEY"]
log.setup("info", [key], use_journal=True)
logger = logging.getLogger("speakerd.probe")
logger.info("before the stop")
journald(signal.SIGUSR1)
for n in range(4):
    logger.info("while stopped %d", n, extra=log.fields(state="responding"))
logger.warning("key while stopped: %s", key)
journald(signal.SIGUSR2)
logger.info("after the start", extra=log.fields(state="listening"))
logger.info("second after the start")
"""


def _in_journald_sandbox(tmp_path: Path, *command: str) -> tuple[str, list[dict[str, str]]]:
    """Runs command next to a private journald: its stderr, and what reached the journal."""
    need(os.getuid() == 0 and shutil.which("unshare") is not None,
         "root and unshare(1) to run a private journald")
    need(os.path.exists("/lib/systemd/systemd-journald"), "systemd-journald")
    env = clean_env(PROBE_KEY=KEY)
    run = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", str(HELPERS / "journald-sandbox"),
         str(tmp_path), *command],
        env=env, timeout=60, capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    out = subprocess.run(["journalctl", "-D", str(tmp_path / "log" / "journal"), "-o", "json",
                          "SYSLOG_IDENTIFIER=speakerd"],
                         check=True, capture_output=True, text=True, timeout=30).stdout
    return run.stderr, [json.loads(line) for line in out.splitlines()]


@pytest.fixture(scope="module")
def entries(tmp_path_factory):
    _, entries = _in_journald_sandbox(tmp_path_factory.mktemp("journal"), sys.executable,
                                      str(HELPERS / "log_probe.py"), "journal")
    return entries


@pytest.fixture(scope="module")
def restart(tmp_path_factory):
    """(stderr, journal entries) of RESTART_PROBE."""
    return _in_journald_sandbox(tmp_path_factory.mktemp("restart"),
                                sys.executable, "-c", RESTART_PROBE)


class TestJournal:
    def test_structured_fields_are_queryable(self, entries):
        by_msg = {e["MESSAGE"]: e for e in entries}
        state = by_msg["state is now listening"]
        assert state["SPEAKERD_STATE"] == "listening"
        assert state["SPEAKERD_SESSION"] == "s1"
        assert state["PRIORITY"] == "6"
        assert state["LOGGER"] == "speakerd.probe"
        assert by_msg["wake word heard"]["SPEAKERD_EVENT"] == "wake"
        assert "SPEAKERD_STATE" not in by_msg["wake word heard"]

    def test_level_is_honoured(self, entries):
        assert "debug line at debug level" in {e["MESSAGE"] for e in entries}

    def test_key_is_nowhere_in_the_journal(self, entries):
        assert len(entries) == 6
        for entry in entries:
            for name, value in entry.items():
                if name != "_CMDLINE":
                    assert KEY not in str(value), name
                    assert "sk-abcdefghijklmnopqrstuv" not in str(value), name
        by_msg = {e["MESSAGE"].splitlines()[0]: e for e in entries}
        assert by_msg["key in a message: **** and inline sk-****"]
        exc = next(e for e in entries if e["MESSAGE"].startswith("exception carrying"))
        assert "RuntimeError: handshake failed with header Bearer ****" in exc["MESSAGE"]
        assert "EXCEPTION_INFO" not in exc and "CODE_ARGS" not in exc


class TestJournaldRestart:
    """journald stops in the middle and starts again (the socket refuses meanwhile)."""

    def test_each_record_goes_once_to_stderr_while_the_journal_refuses(self, restart):
        stderr, _ = restart
        assert "Logging error" not in stderr and "Traceback" not in stderr
        assert stderr.splitlines() == [
            "speakerd WARNING speakerd.log: journald refused a record ([Errno 111] "
            "Connection refused); records go to stderr until it is back",
            *(f"speakerd INFO speakerd.probe: while stopped {n} [SPEAKERD_STATE=responding]"
              for n in range(4)),
            "speakerd WARNING speakerd.probe: key while stopped: ****",
        ]

    def test_native_logging_resumes_when_journald_is_back(self, restart):
        _, entries = restart
        assert [e["MESSAGE"] for e in entries] == [
            "before the stop",
            "after the start",
            "journald is back; 5 record(s) went to stderr meanwhile",
            "second after the start",
        ]
        assert entries[1]["SPEAKERD_STATE"] == "listening"
        assert entries[2]["LOGGER"] == "speakerd.log"
        assert entries[2]["PRIORITY"] == "6"


class TestStderr:
    def test_fallback_prints_lines_with_fields_and_no_key(self):
        r = subprocess.run([sys.executable, str(HELPERS / "log_probe.py"), "stderr"],
                           capture_output=True, text=True, env=clean_env(PROBE_KEY=KEY),
                           timeout=30, check=True)
        lines = r.stderr.splitlines()
        assert lines[0] == ("speakerd INFO speakerd.probe: state is now listening "
                            "[SPEAKERD_STATE=listening SPEAKERD_SESSION=s1]")
        assert lines[1] == "speakerd INFO speakerd.probe: wake word heard [SPEAKERD_EVENT=wake]"
        assert KEY not in r.stderr
        assert "sk-abcdefghijklmnopqrstuv" not in r.stderr
        assert "Bearer ****" in r.stderr

    def test_auto_target_uses_journal_only_when_stderr_is_the_journal(self, tmp_path):
        st = os.fstat(2)
        here = f"{st.st_dev}:{st.st_ino}"
        assert log.want_journal({"SPEAKERD_LOG_TARGET": "journal"}) is True
        assert log.want_journal({"SPEAKERD_LOG_TARGET": "stderr", "JOURNAL_STREAM": here}) \
            is False
        # No journald socket on the host: auto never picks the journal.
        if not os.path.exists(log.JOURNAL_SOCKET):
            assert log.want_journal({"JOURNAL_STREAM": here}) is False


class TestRedactFilter:
    def test_short_strings_are_not_treated_as_secrets(self):
        f = log.RedactFilter(["", "abc"])
        assert f.redact("abc is fine") == "abc is fine"

    def test_added_secret_is_masked_everywhere(self):
        f = log.RedactFilter()
        f.add("hunter2hunter2")
        assert f.redact("pw=hunter2hunter2;") == "pw=****;"
