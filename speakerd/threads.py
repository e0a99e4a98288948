"""Names speakerd's threads for the OS, so `top -H`, `ps -L` and /proc tell them apart."""

from __future__ import annotations

import ctypes
import threading

PR_SET_NAME = 15  # linux/prctl.h
_libc: ctypes.CDLL | None = None


def name_os_thread(name: str | None = None) -> None:
    """Give the calling thread's OS name (comm, 15 bytes at most) its Python name.

    Python before 3.14 does not, so every thread shows the process's name and a
    thread that spins cannot be told from the one that runs the wake word.
    """
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        _libc.prctl(PR_SET_NAME, (name or threading.current_thread().name).encode()[:15],
                    0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux, or no prctl: the names are a convenience
