"""ALSA devices for both audio threads: open and negotiate, name what exists, quiet alsa-lib."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
from dataclasses import dataclass

import alsaaudio

from speakerd.audio import resample
from speakerd.audio.resample import DeviceFormat
from speakerd.errors import UnavailableError

log = logging.getLogger(__name__)

# alsa-lib opens a PCM under its own global config lock and, on an error, calls the
# error handler (_alsa_said, Python) from inside it; pyalsaaudio keeps the GIL for the
# whole open. Two threads opening at once could deadlock: one inside alsa-lib's lock
# waiting for the GIL in the handler, the other holding the GIL waiting for that lock,
# which wedged the whole daemon (seen: both threads retrying a missing 'default').
# Every call into alsa-lib's configuration goes through this lock first, the ctypes
# probe in _wait_until_openable too: it lets go of the GIL, not of alsa-lib's lock.
_OPEN = threading.RLock()


@dataclass(frozen=True, slots=True)
class DeviceOpened:
    """A thread's first open of its device (`start_opening()`) succeeded."""

    device: str
    got: DeviceFormat


@dataclass(frozen=True, slots=True)
class DeviceLost:
    """A device failed or is not there; its thread tries it again with back-off."""

    device: str
    error: str


@dataclass(frozen=True, slots=True)
class DeviceBack:
    """A device that was lost (or missing at start-up) has opened again."""

    device: str


@dataclass(frozen=True, slots=True)
class ThreadFailed:
    """An audio thread ended on an error it could not handle; it no longer runs."""

    thread: str
    error: str


def open_pcm(kind: int, device: str, fmt: DeviceFormat, period_ms: int,
             periods: int = 4) -> alsaaudio.PCM:
    """Open `device` with `fmt`; raises alsaaudio.ALSAAudioError as alsa-lib reports it."""
    with _OPEN:
        return alsaaudio.PCM(kind, alsaaudio.PCM_NORMAL, device=device, rate=fmt.rate,
                             channels=fmt.channels, format=resample.FORMATS[fmt.format][0],
                             periodsize=fmt.rate * period_ms // 1000, periods=periods)


def negotiate(kind: int, device: str, want: DeviceFormat, period_ms: int
              ) -> tuple[alsaaudio.PCM, DeviceFormat]:
    """Open with `want`, else with what the device offers; return the PCM and what it got.

    alsa-lib may settle on a nearby rate or channel count; info() says what it did.
    Blocks for as long as the device's open does, without holding the GIL meanwhile.
    """
    with _OPEN:
        _wait_until_openable(kind, device)
        return _negotiate(kind, device, want, period_ms)


def _wait_until_openable(kind: int, device: str) -> None:
    """Open and close `device` through ctypes, which releases the GIL in the call.

    pyalsaaudio holds the GIL through snd_pcm_open, so an open that blocks (a sound
    server slow to answer, a busy hw device, a FIFO with no writer yet) would stop
    every thread of the process, the event loop and its watchdog pings included.
    Once this returns the device has answered and pyalsaaudio's open is quick; if it
    failed, pyalsaaudio's open fails too and says why in its own words.
    """
    lib = _libasound()
    if lib is None:
        return
    handle = ctypes.c_void_p()
    stream = _CAPTURE if kind == alsaaudio.PCM_CAPTURE else _PLAYBACK
    if lib.snd_pcm_open(ctypes.byref(handle), device.encode(), stream, 0) == 0:
        lib.snd_pcm_close(handle)


def _negotiate(kind: int, device: str, want: DeviceFormat, period_ms: int
               ) -> tuple[alsaaudio.PCM, DeviceFormat]:
    try:
        pcm = open_pcm(kind, device, want, period_ms)
    except alsaaudio.ALSAAudioError as first:
        if any(s in str(first) for s in ("No such file or directory", "No such device")):
            raise  # not there at all: no other format will help
        pcm = _open_native(kind, device, want, period_ms, first)
    info = pcm.info()
    got = DeviceFormat(int(info["rate"]), int(info["channels"]),
                       resample.ALSA_TO_NAME.get(info["format"], "?"))
    if got.format == "?":
        pcm.close()
        raise alsaaudio.ALSAAudioError(f"{device} uses format {info['format_name']}, "
                                       "which speakerd cannot convert")
    return pcm, got


def _open_native(kind: int, device: str, want: DeviceFormat, period_ms: int,
                 first: Exception) -> alsaaudio.PCM:
    probe = alsaaudio.PCM(kind, alsaaudio.PCM_NORMAL, device=device)
    try:
        formats = [f for f in ("S16_LE", "S32_LE", "FLOAT_LE") if f in probe.getformats()]
        lo, hi = probe.getratebounds()
        channels = probe.getchannels()
    finally:
        probe.close()
    if not formats:
        raise first
    rate = min(max(want.rate, lo), hi)
    count = want.channels if want.channels in channels else min(channels)
    return open_pcm(kind, device, DeviceFormat(rate, count, formats[0]), period_ms)


def describe_missing(device: str, error: Exception, kind: int) -> UnavailableError:
    """A one-line error for a device that cannot be opened, listing the PCMs alsa-lib knows."""
    known = ", ".join(known_pcms(kind)) or "none"
    what = "capture" if kind == alsaaudio.PCM_CAPTURE else "playback"
    return UnavailableError(f"cannot open ALSA {what} device '{device}': {error} "
                            f"(PCMs alsa-lib knows: {known})")


def known_pcms(kind: int) -> list[str]:
    """The PCM names alsa-lib's configuration defines for `kind` (empty if it cannot say)."""
    try:
        with _OPEN:
            return list(alsaaudio.pcms(kind))
    except alsaaudio.ALSAAudioError:
        return []


# snd_lib_error_handler_t is variadic; the fixed arguments are all we read, and on the
# ABIs a Pi or a PC uses the caller cleans up, so a fixed-argument callback is safe.
_HANDLER_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                                 ctypes.c_int, ctypes.c_char_p)


def _alsa_said(file: bytes | None, line: int, function: bytes | None, err: int,
               fmt: bytes | None) -> None:
    # The format's arguments cannot be read portably; the template and the function
    # are enough to tell one alsa-lib complaint from another at debug.
    log.debug("alsa-lib %s: %s (err %d)", (function or b"?").decode(errors="replace"),
              (fmt or b"").decode(errors="replace"), err)


_handler = _HANDLER_TYPE(_alsa_said)  # kept alive for as long as alsa-lib may call it


_CAPTURE, _PLAYBACK = 1, 0  # snd_pcm_stream_t
_lib: ctypes.CDLL | None = None
_lib_tried = False


def _libasound() -> ctypes.CDLL | None:
    """alsa-lib itself, the copy pyalsaaudio uses (None if ctypes cannot load it)."""
    global _lib, _lib_tried
    if not _lib_tried:
        _lib_tried = True
        name = ctypes.util.find_library("asound") or "libasound.so.2"
        try:
            lib = ctypes.CDLL(name)
            lib.snd_lib_error_set_handler.argtypes = [_HANDLER_TYPE]
            lib.snd_pcm_open.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p,
                                         ctypes.c_int, ctypes.c_int]
            lib.snd_pcm_close.argtypes = [ctypes.c_void_p]
            _lib = lib
        except (OSError, AttributeError) as e:
            log.warning("cannot load alsa-lib through ctypes (%s): alsa-lib's own "
                        "messages stay on stderr, and a device slow to open stalls "
                        "speakerd while it opens", e)
    return _lib


def quiet_alsa_lib() -> bool:
    """Send alsa-lib's own error messages to the debug log instead of stderr.

    Every failed open makes alsa-lib print several `ALSA lib pcm.c:...` lines of
    its own before speakerd's one-line error says the same thing in words; a
    device that is retried would fill the journal with them. True if installed.
    """
    lib = _libasound()
    return lib is not None and lib.snd_lib_error_set_handler(_handler) == 0
