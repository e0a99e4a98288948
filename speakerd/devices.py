"""The speaker's audio devices as the daemon holds them: the microphone's capture thread
with the wake-word detector in it, the speaker's playback thread, which of them are
missing, and the levels a control client asks for."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from speakerd import log as logmod
from speakerd.audio import capture as capmod
from speakerd.audio import device as devmod
from speakerd.audio import levels as levelsmod
from speakerd.audio import playback as pbmod
from speakerd.config import Config
from speakerd.errors import UnavailableError
from speakerd.session import Step
from speakerd.wakeword import Detector

log = logging.getLogger(__name__)

# Seconds the start waits for each device's first open before going on without it.
# Opens take tens of ms; one that takes longer (a sound server slow to answer, a
# busy device) is waited for in its thread while speakerd runs.
OPEN_WAIT = 1.0
MICROPHONE, SPEAKER = "microphone", "speaker"


class Devices:
    """Builds the threads (`Devices(...)`, which loads the wake-word models: ConfigError),
    opens them (`await open()`), and reports each change of what is there to
    `on_change()`; a thread that died goes to `on_failed(what, error)`."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop, *,
                 on_frame: Callable[[bytes], None], on_result: Callable[[object], None],
                 on_drained: Callable[[str], None],
                 on_flushed: Callable[[dict[str, int]], None],
                 on_change: Callable[[], None],
                 on_failed: Callable[[str, str], None], listening: bool) -> None:
        c = config
        self.detector = Detector.from_config(c.wake_word, c.path)
        self.detector.warm_up()  # 8 s of feature warm-up now, not on the first word
        self.detector.enabled = listening
        self.playback = pbmod.Playback(
            c.audio.playback_device, loop=loop, on_drained=on_drained,
            on_flushed=on_flushed, on_status=lambda e: self._device(SPEAKER, e),
            volume=c.audio.playback_volume)
        self.capture = capmod.Capture(
            c.audio.capture_device, loop=loop, on_frame=on_frame,
            on_status=lambda e: self._device(MICROPHONE, e),
            in_thread=self.detector.process, on_result=on_result)
        self._on_change = on_change
        self._on_failed = on_failed
        # Devices that are not there (yet): MICROPHONE/SPEAKER -> ALSA name.
        self.missing: dict[str, str] = {}
        # Devices whose thread has not yet said how its first open went.
        self._opening: dict[str, asyncio.Future[None]] = {}
        self._open_began = 0.0
        self._started = False  # the start's wait for the devices is over
        self._levels_lock = asyncio.Lock()

    async def open(self) -> None:
        """Open both devices, each in its own thread, waiting at most OPEN_WAIT.

        A device that is not there yet (a USB mic not plugged in, a HAT driver not
        loaded) or slow to open does not stop the start: it is named in the log and
        the status, and its thread keeps at it until it opens. The loop never opens
        a device itself: pyalsaaudio holds the GIL through the open.
        """
        loop = asyncio.get_running_loop()
        self._opening = {what: loop.create_future() for what in (SPEAKER, MICROPHONE)}
        self._open_began = time.monotonic()
        self.playback.start_opening()
        self.capture.start_opening()
        await asyncio.wait(list(self._opening.values()), timeout=OPEN_WAIT)
        self._started = True
        for what in self._opening:
            name = self._thread(what).device
            self.missing[what] = name
            log.warning("%s %s has not opened in %.0f s; speakerd starts anyway and uses "
                        "it once it opens", what, name, OPEN_WAIT,
                        extra=logmod.fields(event=f"{what}_slow"))

    def stop(self) -> None:
        self.capture.stop()
        self.playback.stop()

    def follow(self, step: Step) -> None:
        """After each input: the models rest while the session would ignore the wake
        word (session.rules says when, and why it pays on a slow Pi)."""
        self.detector.needed = step.wake_word_needed

    def _thread(self, what: str) -> capmod.Capture | pbmod.Playback:
        return self.capture if what == MICROPHONE else self.playback

    def _device(self, what: str, event: object) -> None:
        opening = self._opening.pop(what, None)  # this is the first word of its thread
        if opening is not None:
            opening.set_result(None)
        if isinstance(event, devmod.DeviceOpened):
            if what in self.missing:  # the start went on without it
                log.info("%s %s is there now: its open took %.1f s", what, event.device,
                         time.monotonic() - self._open_began)
            self.missing.pop(what, None)
        elif isinstance(event, devmod.DeviceLost):
            self.missing[what] = event.device
            if opening is not None:
                log.error("%s; speakerd starts anyway and keeps trying the %s every "
                          "0.5-10 s", event.error, what,
                          extra=logmod.fields(event=f"{what}_missing"))
        elif isinstance(event, devmod.DeviceBack):
            self.missing.pop(what, None)
        elif isinstance(event, devmod.ThreadFailed):
            self._on_failed(what, event.error)
            return
        # Before that, READY=1 says it: the device that answered first must not show
        # "idle" while the other one has not said yet whether it is there.
        if self._started:
            self._on_change()

    def waiting(self) -> str:
        """What the speaker waits for, if anything: "waiting for microphone 'X'"."""
        return next((f"waiting for {what} '{self.missing[what]}'"
                     for what in (MICROPHONE, SPEAKER) if what in self.missing), "")

    def status(self) -> dict[str, Any]:
        """The devices part of the control socket's `status` reply."""
        devices = {}
        for what in (MICROPHONE, SPEAKER):
            dev = self._thread(what)
            got = dev.got
            devices[what] = {"device": dev.device,
                             "format": got and {"rate": got.rate, "channels": got.channels,
                                                "format": got.format},
                             "missing": what in self.missing}
        return {"devices": devices, "waiting_for": dict(self.missing),
                "underruns": self.playback.underruns, "overruns": self.capture.overruns}

    async def levels(self, seconds: float) -> dict[str, Any]:
        """`seconds` of microphone levels and wake-word scores from the capture thread
        (the control socket's `levels` reply); UnavailableError without a microphone."""
        mic = self.capture.device
        if MICROPHONE in self.missing:
            raise UnavailableError(f"the microphone '{mic}' is missing: no levels to report")
        async with self._levels_lock:  # one meter at a time rides on the detector
            try:
                # Frames come every 80 ms while the device delivers; a device that
                # stalls (unplugged mid-way) must not hold the client for ever.
                report = await levelsmod.measure(self.detector, seconds, seconds + 5)
            except TimeoutError:
                raise UnavailableError(f"the microphone '{mic}' delivered too little audio "
                                       f"in {seconds + 5:.0f} s") from None
        return {"device": mic, **report}


class PlaybackGain:
    """The software gain of the playback path, as the volume control's fallback: the
    configured one until the devices are made."""

    def __init__(self, devices: Callable[[], Devices | None], default: float) -> None:
        self._devices = devices
        self._default = default

    @property
    def volume(self) -> float:
        devices = self._devices()
        return devices.playback.volume if devices else self._default

    @volume.setter
    def volume(self, value: float) -> None:
        devices = self._devices()
        if devices:
            devices.playback.volume = value
