"""Third-party tools: packages that register in the `speakerd.tools` entry-point group.

An entry point names a Tool, or a callable returning a Tool or a list of them. A
plug-in that fails to import or register is logged with its name and skipped.
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points

from speakerd.config import PLUGIN_GROUP
from speakerd.tools import Tool

log = logging.getLogger(__name__)


def load(names: set[str]) -> list[Tool]:
    """The tools of the enabled plug-ins among those installed."""
    tools: list[Tool] = []
    for ep in entry_points(group=PLUGIN_GROUP):
        if ep.name not in names:
            continue
        try:
            obj = ep.load()
            made = obj if isinstance(obj, Tool) else obj()
            found = [made] if isinstance(made, Tool) else list(made)
            if not found or not all(isinstance(t, Tool) for t in found):
                raise TypeError("it did not provide speakerd.tools.Tool objects")
        except Exception as e:  # third-party code: whatever it raises, speakerd starts
            log.error("tool plug-in %s (%s) could not be loaded and is skipped: %s: %s",
                      ep.name, ep.value, type(e).__name__, e)
            continue
        log.info("tool plug-in %s loaded: %s", ep.name, ", ".join(t.name for t in found))
        tools.extend(found)
    return tools
