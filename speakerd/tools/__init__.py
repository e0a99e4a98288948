"""Function tools the model may call: a registry that validates, times out and reports."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from speakerd.tools.schema import ArgumentError, validate

__all__ = ["DEFAULT_TIMEOUT", "NAME_PATTERN", "ArgumentError", "Registry", "Result", "Tool",
           "ToolFailed", "validate"]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Tool:
    """A name, what it does (the model reads this), a JSON schema for its arguments,
    and an async function taking those arguments as keywords."""

    name: str
    description: str
    parameters: Mapping[str, Any]
    func: Callable[..., Awaitable[Any]]
    ends_conversation: bool = False
    timeout: float | None = None  # seconds; None: the registry's

    def schema(self) -> dict[str, Any]:
        """As session.update's `tools` wants it (a RealtimeFunctionTool)."""
        return {"type": "function", "name": self.name, "description": self.description,
                "parameters": dict(self.parameters)}


@dataclass(frozen=True, slots=True)
class Result:
    output: str  # JSON text for function_call_output
    ok: bool
    end_conversation: bool = False


class ToolFailed(Exception):
    """A tool's own report that it failed; its message is what the model is told."""


NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what a Realtime function name may be


class Registry:
    """The tools on offer. Groups of tools (an MCP server's) may be replaced at run time;
    each conversation's session.update takes the list as it is when it starts."""

    def __init__(self, tools: list[Tool] | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.tools: dict[str, Tool] = {}
        self.timeout = timeout
        self.groups: dict[str, list[str]] = {}  # group -> names of its tools
        for tool in tools or []:
            self.add(tool)

    def add(self, tool: Tool) -> None:
        if tool.name in self.tools:
            raise ValueError(f"tool {tool.name} is registered twice")
        self.tools[tool.name] = tool

    def set_group(self, group: str, tools: list[Tool], prefix: str = "") -> list[str]:
        """Replace the tools of `group` (an empty list removes them). A name another
        tool already has is prefixed with `prefix_` (default: the group's name);
        returns the names given."""
        for name in self.groups.pop(group, []):
            self.tools.pop(name, None)
        names: list[str] = []
        for tool in tools:
            name = tool.name
            if name in self.tools or name in names:
                name = f"{prefix or group}_{name}"[:64]
            if name in self.tools or name in names:
                log.warning("tool %s of %s is skipped: its name is taken twice", tool.name,
                            group)
                continue
            self.tools[name] = dataclasses.replace(tool, name=name)
            names.append(name)
        if names:
            self.groups[group] = names
        return names

    def schemas(self) -> list[dict[str, Any]]:
        return [t.schema() for t in self.tools.values()]

    async def run(self, name: str, arguments: str) -> Result:
        """Call a tool as the model asked. Never raises: failures become outputs the
        model can speak ("the tool failed: ..."), logged once here."""
        tool = self.tools.get(name)
        if tool is None:
            return self._failed(name, f"there is no tool named {name!r}")
        try:
            args = json.loads(arguments or "{}")
            if not isinstance(args, dict):
                raise ArgumentError("arguments must be a JSON object")
            validate(args, tool.parameters)
        except (json.JSONDecodeError, ArgumentError) as e:
            return self._failed(name, f"invalid arguments: {e}")
        try:
            timeout = tool.timeout or self.timeout
            value = await asyncio.wait_for(tool.func(**args), timeout)
            output = json.dumps(value)
        except TimeoutError:
            return self._failed(name, f"it did not finish within {timeout:g} s")
        except ToolFailed as e:
            return self._failed(name, str(e))
        except (TypeError, ValueError) as e:
            return self._failed(name, f"{type(e).__name__}: {e}")
        except Exception as e:  # a tool is third-party code: its bug must not end the talk
            log.exception("tool %s raised", name)
            return self._failed(name, f"{type(e).__name__}: {e}", logged=True)
        log.info("tool %s(%s) -> %s", name, arguments, output[:200],
                 extra={"SPEAKERD_EVENT": "tool"})
        return Result(output, True, tool.ends_conversation)

    def _failed(self, name: str, why: str, logged: bool = False) -> Result:
        if not logged:
            log.warning("tool %s failed: %s", name, why, extra={"SPEAKERD_EVENT": "tool"})
        return Result(json.dumps({"error": f"the tool failed: {why}"}), False)
