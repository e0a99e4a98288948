"""Real MCP servers for the tests, built on the `mcp` package's server side.

`HassServer`: streamable HTTP on 127.0.0.1 at /api/mcp, shaped like Home Assistant's
"Model Context Protocol Server" integration: a Bearer token is required (401
otherwise), Assist-API tools `HassTurnOn` / `HassTurnOff` (`name`, `area`, `domain`)
and `GetLiveContext`. Every call is recorded with the Authorization header it came
with. `stateless=True` (the default) answers like Home Assistant does (stateless,
JSON responses); `stateless=False` keeps sessions, so it can send
`notifications/tools/list_changed` (see `set_tools`). `sse=True` serves the older SSE
transport instead, at Home Assistant's /mcp_server/sse and /mcp_server/messages/.
`hang = True` makes calls hang.

    async with HassServer(token="...") as ha:   # ha.url, ha.calls, ha.auth_seen
        ...

Run as a script (`python tests/mcp_servers.py stdio RECORD`), it is a stdio server
with one tool, `get_weather`; it appends its pid, then each call, as JSON lines to RECORD.
`python tests/mcp_servers.py sdk RECORD` is a stdio server written as the `mcp` SDK's
own documentation writes one (`MCPServer` and its `@tool()` decorator on typed Python
functions), with Home-Assistant-like tools whose schemas the SDK derives: optional
arguments (`anyOf` with null), a nested model (`$defs`/`$ref`), a recursive one.

`realtime_refuses(parameters)` says what the Realtime API would refuse in function
parameters; `published_servers()` installs the npm packages of MCP servers others
publish (once, into .venv/mcp-npm, from the npm registry) for tests to run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from mcp import types
from mcp.server import Server
from mcp.server.context import ServerRequestContext
from pydantic import BaseModel, Field

OFF_ON = "Turns {} a device or entity"
HASS_ARGS = {"type": "object", "properties": {
    "name": {"type": "string"}, "area": {"type": "string"},
    "domain": {"type": "array", "items": {"type": "string"}}}}


def hass_tools() -> list[types.Tool]:
    return [
        types.Tool(name="HassTurnOn", description=OFF_ON.format("on"), input_schema=HASS_ARGS),
        types.Tool(name="HassTurnOff", description=OFF_ON.format("off"),
                   input_schema=HASS_ARGS),
        types.Tool(name="GetLiveContext", description="Provides real-time information about "
                   "the CURRENT state, value, or mode of devices, sensors, entities, or areas.",
                   input_schema={"type": "object", "properties": {}}),
    ]


@dataclass(frozen=True)
class Recorded:
    name: str
    arguments: dict[str, Any]
    authorization: str


class HassServer:
    def __init__(self, *, token: str = "", stateless: bool = True, sse: bool = False,
                 tools: list[types.Tool] | None = None, port: int = 0) -> None:
        self.token = token
        self.tools = tools if tools is not None else hass_tools()
        self.calls: list[Recorded] = []
        self.auth_seen: list[str] = []
        self.hang = False
        self.results: dict[str, types.CallToolResult] = {}  # canned results by tool name
        self.sessions: list[Any] = []
        self.port = port
        self.stateless = stateless
        self.sse = sse
        self._uvicorn: Any = None
        self._task: asyncio.Task[None] | None = None
        self.server = Server("home-assistant-fixture", on_list_tools=self._list,
                             on_call_tool=self._call)

    @property
    def url(self) -> str:
        if self.sse:
            return f"http://127.0.0.1:{self.port}/mcp_server/sse"
        return f"http://127.0.0.1:{self.port}/api/mcp"

    async def _list(self, ctx: ServerRequestContext, params: Any) -> types.ListToolsResult:
        if ctx.session not in self.sessions:
            self.sessions.append(ctx.session)
        return types.ListToolsResult(tools=self.tools)

    async def _call(self, ctx: ServerRequestContext, params: types.CallToolRequestParams
                    ) -> types.CallToolResult:
        auth = ctx.request.headers.get("authorization", "") if ctx.request else ""
        self.calls.append(Recorded(params.name, dict(params.arguments or {}), auth))
        if self.hang:
            await asyncio.Event().wait()
        if params.name in self.results:
            return self.results[params.name]
        if params.name == "GetLiveContext":
            text = "Live Context: kitchen lights: on; hallway temperature: 21 °C"
        else:
            text = json.dumps({"speech": {}, "response_type": "action_done", "data": {
                "success": [{"name": (params.arguments or {}).get("name", ""),
                             "type": "entity"}], "failed": []}})
        return types.CallToolResult(content=[types.TextContent(type="text", text=text)])

    async def set_tools(self, tools: list[types.Tool]) -> None:
        """Change the tool list and tell every connected client (stateful servers)."""
        self.tools = tools
        for session in self.sessions:
            with contextlib.suppress(Exception):
                await session.send_tool_list_changed()

    def _app(self) -> Any:
        app = self._sse_app() if self.sse else self.server.streamable_http_app(
            streamable_http_path="/api/mcp", stateless_http=self.stateless,
            json_response=self.stateless)

        async def guarded(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                headers = dict(scope["headers"])
                auth = headers.get(b"authorization", b"").decode()
                self.auth_seen.append(auth)
                if self.token and auth != f"Bearer {self.token}":
                    await send({"type": "http.response.start", "status": 401,
                                "headers": [(b"content-type", b"text/plain")]})
                    await send({"type": "http.response.body", "body": b"401: Unauthorized"})
                    return
            await app(scope, receive, send)
        return guarded

    def _sse_app(self) -> Any:
        from mcp.server.sse import SseServerTransport
        sse = SseServerTransport("/mcp_server/messages/")

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] == "lifespan":
                while (await receive())["type"] != "lifespan.shutdown":
                    await send({"type": "lifespan.startup.complete"})
                await send({"type": "lifespan.shutdown.complete"})
            elif scope["path"] == "/mcp_server/sse":
                async with sse.connect_sse(scope, receive, send) as (read, write):
                    await self.server.run(read, write,
                                          self.server.create_initialization_options())
            else:
                await sse.handle_post_message(scope, receive, send)
        return app

    async def start(self) -> None:
        import uvicorn
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self._app(), log_level="warning", lifespan="on")
        self._uvicorn = uvicorn.Server(config)
        self._task = asyncio.create_task(self._uvicorn.serve(sockets=[sock]))
        while not self._uvicorn.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self._uvicorn is not None and self._task is not None:
            self._uvicorn.should_exit = True
            self._uvicorn.force_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 10)
        self.sessions.clear()

    async def __aenter__(self) -> HassServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def stdio_main(record: str) -> None:
    import anyio
    from mcp.server.stdio import stdio_server

    async def list_tools(ctx: ServerRequestContext, params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=[types.Tool(
            name="get_weather", description="The weather forecast for a city.",
            input_schema={"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]})])

    async def call_tool(ctx: ServerRequestContext, params: types.CallToolRequestParams
                        ) -> types.CallToolResult:
        with open(record, "a") as f:
            f.write(json.dumps({"name": params.name, "arguments": params.arguments}) + "\n")
        city = (params.arguments or {}).get("city", "")
        return types.CallToolResult(content=[types.TextContent(
            type="text", text=f"{city}: 18 °C, light rain")])

    server = Server("weather-fixture", on_list_tools=list_tools, on_call_tool=call_tool)

    async def main() -> None:
        with open(record, "a") as f:
            f.write(json.dumps({"pid": os.getpid()}) + "\n")
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())
    anyio.run(main)


class Color(BaseModel):
    """A colour as red, green and blue."""

    red: Annotated[int, Field(ge=0, le=255)]
    green: Annotated[int, Field(ge=0, le=255)]
    blue: Annotated[int, Field(ge=0, le=255)]


class Step(BaseModel):
    action: str
    then: list[Step] = []


def sdk_main(record: str) -> None:
    from mcp.server.mcpserver import MCPServer

    server = MCPServer("hass-sdk-fixture")

    def recorded(tool: str, **arguments: Any) -> str:
        with open(record, "a") as f:
            f.write(json.dumps({"name": tool, "arguments": arguments}) + "\n")
        return json.dumps({"response_type": "action_done", "data": {
            "success": [{"name": arguments.get("name", ""), "type": "entity"}]}})

    @server.tool()
    def HassTurnOff(name: str = "", area: str = "", domain: list[str] | None = None) -> str:
        """Turns off a device or entity"""
        return recorded("HassTurnOff", name=name, area=area, domain=domain)

    @server.tool()
    def HassLightSet(name: str = "", brightness: Annotated[int, Field(ge=0, le=100)]
                     | None = None, color: Color | None = None) -> str:
        """Sets the brightness or colour of a light"""
        return recorded("HassLightSet", name=name, brightness=brightness,
                        color=color.model_dump() if color else None)

    @server.tool()
    def HassRunScript(steps: list[Step]) -> str:
        """Runs steps, each of which may have steps of its own"""
        return recorded("HassRunScript", steps=[s.model_dump() for s in steps])

    @server.tool()
    def GetLiveContext() -> str:
        """Provides real-time information about the CURRENT state of devices."""
        return "Live Context: kitchen lights: on"

    server.run("stdio")


# --- what the Realtime API takes ------------------------------------------------------

_SUBSCHEMA = ("items", "additionalProperties", "not", "if", "then", "else", "contains")


def realtime_refuses(parameters: Any, where: str = "") -> list[str]:
    """What the Realtime API refuses in a function tool's `parameters`, answering
    `invalid_function_parameters` for the whole session.update, as its own messages
    word it: "schema must have type 'object' and not have 'oneOf'/'anyOf'/'allOf'/
    'enum'/'not' at the top level", "array schema missing items", "object schema
    missing properties"; and what speakerd promises on top: no `$ref` left (it writes
    them out), only JSON-schema type names."""
    out: list[str] = []
    if not isinstance(parameters, dict):
        return out
    kinds = parameters.get("type", [])
    kinds = [kinds] if isinstance(kinds, str) else kinds
    if not where:
        if parameters.get("type") != "object":
            out.append("the top level is not type object")
        out += [f"{k} at the top level" for k in ("oneOf", "anyOf", "allOf", "enum", "not",
                                                   "const") if k in parameters]
    here = where or "parameters"
    if "array" in kinds and "items" not in parameters:
        out.append(f"{here}: array schema missing items")
    if "object" in kinds and "properties" not in parameters:
        out.append(f"{here}: object schema missing properties")
    out += [f"{here}: {k}" for k in ("$ref", "$defs", "definitions") if k in parameters]
    out += [f"{here}: type {k!r}" for k in kinds if k not in (
        "string", "number", "integer", "boolean", "object", "array", "null")]
    for key, value in parameters.items():
        if key in ("properties", "patternProperties") and isinstance(value, dict):
            for name, sub in value.items():
                out += realtime_refuses(sub, f"{here}.{name}")
        elif key in ("anyOf", "oneOf", "allOf", "prefixItems") and isinstance(value, list):
            for i, sub in enumerate(value):
                out += realtime_refuses(sub, f"{here}.{key}[{i}]")
        elif key in _SUBSCHEMA:
            out += realtime_refuses(value, f"{here}.{key}")
    return out


# --- servers others publish -------------------------------------------------------------

# From the npm registry, at these versions (MIT, as their READMEs say); PyPI's
# mcp-server-git and mcp-server-time come with the test extras of pyproject.toml.
NPM_PACKAGES = {"@modelcontextprotocol/server-everything": "2026.8.31",
                "@modelcontextprotocol/server-memory": "2026.8.31"}
NPM_DIR = Path(__file__).resolve().parent.parent / ".venv" / "mcp-npm"


def published_servers() -> Path:
    """node_modules holding NPM_PACKAGES, installed on first use (npm install, ~15 s)."""
    modules = NPM_DIR / "node_modules"

    def installed(package: str) -> str:
        path = modules / package / "package.json"
        return json.loads(path.read_text()).get("version", "") if path.exists() else ""

    wanted = [f"{p}@{v}" for p, v in NPM_PACKAGES.items() if installed(p) != v]
    if wanted:
        npm = shutil.which("npm")
        if npm is None:
            raise FileNotFoundError("npm (Debian: nodejs and npm)")
        NPM_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run([npm, "install", "--prefix", str(NPM_DIR), "--no-audit", "--no-fund",
                        "--no-update-notifier", *wanted], check=True, capture_output=True,
                       timeout=600)
    return modules


if __name__ == "__main__":
    if sys.argv[1:2] == ["stdio"]:
        stdio_main(sys.argv[2])
    elif sys.argv[1:2] == ["sdk"]:
        sdk_main(sys.argv[2])
