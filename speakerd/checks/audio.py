"""Checks of the microphone and speaker: the devices open, the mic's level and the
wake-word scores over a few seconds, a tone and its drain callback."""

from __future__ import annotations

import asyncio
import math
import sys
import time
from typing import Any

import alsaaudio

from speakerd import config as configmod
from speakerd.audio import capture as capmod
from speakerd.audio import playback as pbmod
from speakerd.audio.cues import make_cues
from speakerd.audio.device import DeviceLost, known_pcms, negotiate
from speakerd.audio.levels import FLOOR_DBFS, measure
from speakerd.checks.report import Report, fail, ok, skip, warn
from speakerd.control import client as control
from speakerd.errors import UnavailableError
from speakerd.wakeword import Detector

CAPTURE, PLAYBACK = alsaaudio.PCM_CAPTURE, alsaaudio.PCM_PLAYBACK
# kind -> (the check's name, the config key, the command that lists the names)
DEVICES = {CAPTURE: ("microphone", "capture_device", "arecord -L"),
           PLAYBACK: ("speaker", "playback_device", "aplay -L")}
QUIET_PEAK_DBFS = -40.0  # a wake word said at the speaker peaks well above this
DC_WARN = 0.02  # fraction of full scale
LATE_DRAIN_MS = 1000.0
LATE_EARLY_MS = 100.0  # a drain this much before the tone could have played: not paced


def fmt(f: Any) -> str:
    """A negotiated format (DeviceFormat or the status reply's dict) for a person."""
    rate, channels, name = ((f["rate"], f["channels"], f["format"]) if isinstance(f, dict)
                            else (f.rate, f.channels, f.format))
    return f"{rate} Hz, {channels} channel{'s' * (channels != 1)}, {name}"


def candidates(kind: int) -> str:
    return ", ".join(known_pcms(kind)) or "none"


def name_fix(kind: int) -> str:
    _, key, lister = DEVICES[kind]
    return f"set [audio] {key} to one of the names `{lister}` lists: {candidates(kind)}"


def check_device(report: Report, kind: int, name: str) -> bool:
    """Open the device as speakerd would and say what it negotiated."""
    what = DEVICES[kind][0]
    want, period = ((capmod.PREFERRED, capmod.PERIOD_MS) if kind == CAPTURE
                    else (pbmod.PREFERRED, pbmod.PERIOD_MS))
    try:
        pcm, got = negotiate(kind, name, want, period)
    except alsaaudio.ALSAAudioError as e:
        word = "capture" if kind == CAPTURE else "playback"
        busy = "busy" in str(e).lower()
        report.add(fail(what, f"cannot open ALSA {word} device '{name}': {e}",
                        "another program holds it (speakerd itself? sudo systemctl stop "
                        "speakerd), then check again" if busy else name_fix(kind)))
        return False
    pcm.close()
    report.add(ok(what, f"{name} opens: {fmt(got)}"))
    return True


# --- listening -------------------------------------------------------------------------

def prompt(config: configmod.Config, seconds: float) -> None:
    """Ask the person to speak; on stderr, so that stdout stays the checklist."""
    words = " or ".join(f'"{_spoken(m)}"' for m in config.wake_word.models)
    print(f"speakerd check: listening for {seconds:g} s: say {words} now", file=sys.stderr,
          flush=True)


def _spoken(model: str) -> str:
    from speakerd.wakeword import model_id
    return model_id(model).replace("_", " ")


async def listen(config: configmod.Config, seconds: float) -> dict[str, Any]:
    """`seconds` of the microphone through the real capture thread and detector."""
    loop = asyncio.get_running_loop()
    detector = Detector.from_config(config.wake_word, config.path)
    try:
        detector.warm_up()
        mic = capmod.Capture(config.audio.capture_device, loop=loop,
                             on_frame=lambda frame: None, in_thread=detector.process)
        mic.open()
        prompt(config, seconds)
        try:
            return await measure(detector, seconds, seconds + 10, start=mic.start)
        except TimeoutError:
            raise UnavailableError(f"the microphone delivered too little audio in "
                                   f"{seconds + 10:g} s") from None
        finally:
            mic.stop()
    finally:
        detector.close()


def judge(report: Report, config: configmod.Config, levels: dict[str, Any]) -> None:
    """The mic's level and each wake word's scores, from a levels report."""
    secs = levels["seconds"]
    peak, rms, clipped = levels["peak_dbfs"], levels["rms_dbfs"], levels["clipped"]
    dc = levels["dc_offset"]
    figures = (f"RMS {rms:.1f} dBFS, peak {peak:.1f} dBFS, {clipped} clipped, DC offset "
               f"{dc * 100:.1f}% over {secs:g} s")
    what = "microphone level"
    if peak <= FLOOR_DBFS:
        report.add(warn(what, f"digital silence: every sample was 0 for {secs:g} s",
                        "the wrong device or channel, or a muted capture control: unmute "
                        "it and raise Capture in alsamixer (F4); speakerd reads channel 0, "
                        "so on a multi-channel card name a plughw: device with the mic on "
                        "its first channel"))
    elif clipped:
        report.add(warn(what, f"too loud: {figures}",
                        "lower the capture gain in alsamixer (F4, Capture) until the peak "
                        "stays below -3 dBFS while you speak: clipped audio scores lower"))
    elif peak < QUIET_PEAK_DBFS:
        report.add(warn(what, f"too quiet: {figures}",
                        "raise the capture gain in alsamixer (F4, Capture), speak within "
                        "2 m, and check it is the right mic (a plughw: device, channel 0)"))
    elif abs(dc) > DC_WARN:
        report.add(warn(what, f"DC offset: {figures}",
                        "the mic or its converter is biased: try the card's other input or "
                        "a plughw: device; a constant offset eats the headroom"))
    else:
        report.add(ok(what, figures))
    ww = levels["wake_word"]
    level = ww["trigger_level"]
    for m in ww["models"]:
        name, best, at, highest = m["name"], m["best"], m["at_seconds"], m["highest_threshold"]
        heard = f"best score {best:.2f} " + (f"(at {at:.1f} s of {secs:g} s)"
                                              if at is not None else f"in {secs:g} s")
        rule = f"threshold {m['threshold']:g}, trigger level {level}"
        if m["would_trigger"]:
            report.add(ok(f"wake word {name}", f"{heard}: would trigger ({rule}); the "
                          f"highest threshold that still would: {highest:.2f}"))
            continue
        spoken = name.replace("_", " ")
        if highest >= 0.1:
            fix = (f'if you said "{spoken}", set [wake_word] threshold (or model_thresholds'
                   f".{name}) to {math.floor(highest * 100) / 100:.2f} or lower, or raise "
                   "the capture gain")
        else:
            fix = (f'say "{spoken}" while check listens (--listen SECONDS); if you did, '
                   "raise the capture gain in alsamixer or move closer")
        report.add(warn(f"wake word {name}", f"{heard}: would not trigger ({rule})", fix))


# --- the speaker -------------------------------------------------------------------------

async def tone(report: Report, config: configmod.Config) -> None:
    """Play a short tone as an answer is played; the drain callback must come."""
    loop = asyncio.get_running_loop()
    drained: asyncio.Future[float] = loop.create_future()
    lost: list[str] = []

    def on_drained(rid: str) -> None:
        if not drained.done():
            drained.set_result(time.monotonic())

    def on_status(event: object) -> None:
        if isinstance(event, DeviceLost):
            lost.append(event.error)
    name = config.audio.playback_device
    speaker = pbmod.Playback(name, loop=loop, on_drained=on_drained, on_status=on_status,
                             volume=config.audio.playback_volume)
    pcm = make_cues()["check"]
    seconds = len(pcm) / 2 / pbmod.RATE
    speaker.start()
    try:
        queued = time.monotonic()
        speaker.enqueue(pcm, "check")
        speaker.finish("check")
        try:
            came = await asyncio.wait_for(drained, seconds + 5)
        except TimeoutError:
            report.add(fail("speaker tone", f"no drain callback within {seconds + 5:g} s of "
                            f"queueing a {seconds:g} s tone on {name}",
                            "the device takes audio but never plays it out: name a plughw: "
                            "or hw: device in [audio] playback_device"))
            return
    finally:
        speaker.stop()
    if lost:
        report.add(fail("speaker tone", f"{name} failed while playing: {lost[0]}",
                        name_fix(PLAYBACK)))
        return
    late = (came - queued - seconds) * 1000
    text = (f"played a {seconds:g} s tone on {name}; the drain callback came {late:.0f} ms "
            "after its nominal end")
    if late < -LATE_EARLY_MS:
        report.add(warn("speaker tone", f"played a {seconds:g} s tone on {name}, but the "
                        f"drain callback came {-late:.0f} ms before its nominal end: the "
                        "device does not play in real time (a file or null device?)",
                        name_fix(PLAYBACK)))
    elif late > LATE_DRAIN_MS:
        report.add(warn("speaker tone", text, "a sound server or a large buffer delays every "
                        "answer's end: name the card directly (plughw:CARD=...)"))
    else:
        report.add(ok("speaker tone", text))


# --- the whole of it ---------------------------------------------------------------------

def check(report: Report, config: configmod.Config, seconds: float) -> bool:
    """The devices are free: open them here. -> both opened."""
    a = config.audio
    mic = check_device(report, CAPTURE, a.capture_device)
    speaker = check_device(report, PLAYBACK, a.playback_device)
    if mic:
        try:
            judge(report, config, asyncio.run(listen(config, seconds)))
        except UnavailableError as e:
            report.add(fail("microphone level", str(e), name_fix(CAPTURE)))
    else:
        report.add(skip("microphone level", "no microphone"))
    if speaker:
        asyncio.run(tone(report, config))
    else:
        report.add(skip("speaker tone", "no speaker"))
    return mic and speaker


def from_daemon(report: Report, config: configmod.Config, status: dict[str, Any],
                seconds: float, path: str) -> None:
    """speakerd runs and holds the devices: take what it reports instead."""
    devices = status.get("devices", {})
    for kind in (CAPTURE, PLAYBACK):
        what = DEVICES[kind][0]
        d = devices.get(what, {})
        if d.get("missing") or not d.get("format"):
            report.add(fail(what, f"the running speakerd cannot open '{d.get('device')}': "
                            "it is waiting for it", name_fix(kind)))
        else:
            report.add(ok(what, f"{d['device']} is open in the running speakerd: "
                          f"{fmt(d['format'])}"))
    if devices.get("microphone", {}).get("missing"):
        report.add(skip("microphone level", "no microphone"))
    else:
        prompt(config, seconds)
        try:
            reply = control.ask(path, {"request": "levels", "seconds": seconds},
                                timeout=seconds + 15)
        except control.Unreachable as e:
            reply = {"ok": False, "error": str(e)}
        if reply.get("ok"):
            judge(report, config, reply)
        else:
            report.add(fail("microphone level", f"the running speakerd did not report "
                            f"levels: {reply.get('error')}",
                            "journalctl -u speakerd -n 20 says why"))
    report.add(skip("speaker tone", "the running speakerd holds the speaker; to test the "
                    "tone and its drain: sudo systemctl stop speakerd, check, then start it"))
