"""Speaker volume: the ALSA mixer control when the card has one, else speakerd's own gain."""

from __future__ import annotations

import logging
import re
from typing import Any

import alsaaudio

from speakerd.tools import Tool

log = logging.getLogger(__name__)


def mixer_device_for(playback_device: str, mixer_device: str) -> str:
    """The ALSA ctl device holding the volume control: as configured, else the card of
    the playback PCM ("plughw:CARD=x,DEV=0" -> "hw:CARD=x"), else the PCM's own name."""
    if mixer_device:
        return mixer_device
    m = re.search(r"CARD=([^,]+)", playback_device)
    if m:
        return f"hw:CARD={m.group(1)}"
    m = re.match(r"(?:plug)?hw:(\d+)", playback_device)
    if m:
        return f"hw:{m.group(1)}"
    return playback_device


class Volume:
    """get/set/step in percent. `software` is any object with a `volume` (0-1) attribute:
    the playback path, whose gain stands in when there is no mixer control."""

    def __init__(self, control: str, device: str, software: Any) -> None:
        self.control = control
        self.device = device
        self.software = software

    def _mixer(self) -> alsaaudio.Mixer | None:
        if not self.control:
            return None
        try:
            return alsaaudio.Mixer(self.control, device=self.device)
        except alsaaudio.ALSAAudioError as e:
            log.debug("no mixer control %s on %s (%s): software gain", self.control,
                      self.device, e)
            return None

    def get(self) -> dict[str, Any]:
        mixer = self._mixer()
        if mixer is None:
            return {"percent": round(self.software.volume * 100), "via": "software gain",
                    "note": f"no ALSA mixer control '{self.control}' on {self.device}"}
        try:
            levels = mixer.getvolume()
        finally:
            mixer.close()
        return {"percent": round(sum(levels) / len(levels)), "via": f"ALSA {self.control}"}

    def set(self, percent: int) -> dict[str, Any]:
        percent = max(0, min(100, int(percent)))
        mixer = self._mixer()
        if mixer is None:
            self.software.volume = percent / 100
        else:
            try:
                mixer.setvolume(percent)
            finally:
                mixer.close()
        log.info("volume set to %d%%", percent, extra={"SPEAKERD_EVENT": "volume"})
        return self.get()

    def step(self, delta: int) -> dict[str, Any]:
        return self.set(self.get()["percent"] + delta)


def tools(volume: Volume) -> list[Tool]:
    async def get_volume() -> dict[str, Any]:
        return volume.get()

    async def set_volume(percent: int | None = None, change: int | None = None
                         ) -> dict[str, Any]:
        if (percent is None) == (change is None):
            raise ValueError("give either percent or change, not both or neither")
        return volume.set(percent) if percent is not None else volume.step(change or 0)

    return [
        Tool("get_volume", "The speaker's volume in percent.",
             {"type": "object", "properties": {}, "additionalProperties": False}, get_volume),
        Tool("set_volume", "Set the speaker's volume: `percent` (0-100) for a level, or "
             "`change` (-100 to 100) to turn it up or down by that many points.",
             {"type": "object", "additionalProperties": False, "properties": {
                 "percent": {"type": "integer", "minimum": 0, "maximum": 100},
                 "change": {"type": "integer", "minimum": -100, "maximum": 100}}},
             set_volume),
    ]
