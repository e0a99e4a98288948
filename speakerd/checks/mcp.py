"""Checks of the [[mcp]] servers: each connected or not, its tools offered, and those
skipped with why (their argument schemas cannot be offered to the model)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from speakerd import config as configmod
from speakerd.checks.report import Report, ok, warn
from speakerd.control import client as control

SKIPPED_FIX = ("the server describes those tools' arguments in a way the model cannot be "
               "offered; ask its author, or leave them out with mcp[{i}].tools")
DOWN_FIX = ("check mcp[{i}] (url, token_file or command); speakerd run retries it in the "
            "background and offers its tools once it answers")


def check(report: Report, config: configmod.Config, status: dict[str, Any] | None
          ) -> list[dict[str, Any]]:
    """A line per server, from the running speakerd's `status` when there is one, else
    from connecting to each once. Returns the tools those connections offered, for the
    realtime check to offer the service as a conversation would."""
    if not config.mcp:
        return []
    if status is not None:
        servers, schemas = status.get("mcp", []), []
    else:
        states = _probe(config)
        servers = [s.as_dict() for s in states]
        schemas = [schema for s in states for schema in s.schemas]
    index = {server.name: i for i, server in enumerate(config.mcp)}
    for server in servers:
        what, i = f"mcp {server['name']}", index.get(server["name"], 0)
        text = f"{server['where']}: {control.mcp_summary(server)}"
        if not server["connected"]:
            report.add(warn(what, text, DOWN_FIX.format(i=i)))
        elif server["skipped"]:
            report.add(warn(what, text, SKIPPED_FIX.format(i=i)))
        else:
            report.add(ok(what, text))
    return schemas


def _probe(config: configmod.Config) -> list[Any]:
    from speakerd.tools import mcp

    logger = logging.getLogger(mcp.__name__)
    level = logger.level
    logger.setLevel(logging.ERROR)  # the lines above say it, once
    try:
        return asyncio.run(mcp.probe(config.mcp, config.path))
    finally:
        logger.setLevel(level)
