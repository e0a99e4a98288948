"""The tools a config enables: the built-ins by name, then plug-ins."""

from __future__ import annotations

from typing import TYPE_CHECKING

from speakerd.tools import Registry, plugins
from speakerd.tools import timers as timermod
from speakerd.tools import volume as volmod
from speakerd.tools.builtin import BUILTIN

if TYPE_CHECKING:
    from speakerd.config import Config


def build_tools(c: Config, volume: volmod.Volume, timers: timermod.Timers) -> Registry:
    """The enabled tools, acting on this `volume` and these `timers`."""
    available = {**BUILTIN, **{t.name: t for t in volmod.tools(volume)},
                 **{t.name: t for t in timermod.tools(timers)}}
    enabled = set(c.tools.enabled)
    chosen = [t for name, t in available.items() if name in enabled]
    chosen += plugins.load(enabled - set(available))
    return Registry(chosen, timeout=c.tools.timeout_seconds)


def listed(c: Config) -> Registry:
    """The tools a conversation would offer, to describe them (`speakerd config --show`,
    `speakerd check`): acting on nothing."""
    return build_tools(c, volmod.Volume("", "", None), timermod.Timers())
