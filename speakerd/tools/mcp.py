"""Tools of MCP servers (Home Assistant and others): connect, list, call, reconnect.

Imported only when [[mcp]] is configured: the `mcp` SDK and its HTTP stack are not
loaded on a speaker without MCP servers. Each server has one background task on
the daemon's loop that connects, puts the server's tools into the registry, follows
`notifications/tools/list_changed`, pings, and reconnects with back-off; a server
that is slow or gone costs a conversation nothing but that server's tools.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import fnmatch
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx2

from speakerd import config as configmod
from speakerd.tools import NAME_PATTERN, Registry, Tool, ToolFailed
from speakerd.tools.mcp_sdk import (
    ClientSession,
    StdioServerParameters,
    create_mcp_http_client,
    sse_client,
    stdio_client,
    streamable_http_client,
)
from speakerd.tools.mcp_sdk import types as mcp_types
from speakerd.tools.schema import to_parameters

log = logging.getLogger(__name__)

# One request line per call at INFO is noise in the journal (and names URLs).
logging.getLogger("httpx2").setLevel(logging.WARNING)

MAX_OUTPUT = 4000  # characters of a tool's text the model gets; the rest is cut
MAX_DESCRIPTION = 1024
BACKOFF = (1.0, 60.0)  # first and longest wait between connection attempts, seconds
# After a refused token: Home Assistant counts each 401 as a failed login (and may ban
# the address after `login_attempts_threshold` of them), so retry rarely; SIGHUP
# retries at once, after the token file has been fixed.
AUTH_BACKOFF = 600.0
PING_INTERVAL = 30.0  # seconds between liveness pings of a connected server


@dataclass
class ServerState:
    """What `config --show` and the log say about one server."""

    name: str
    where: str  # the URL or the command line
    connected: bool = False
    tools: list[str] = field(default_factory=list)  # names as the model sees them
    skipped: dict[str, str] = field(default_factory=dict)  # tool -> why it is not offered
    error: str = ""  # why it is not connected
    failures: int = 0  # failed connections (or lost ones) since start-up
    schemas: list[dict[str, Any]] = field(default_factory=list, repr=False)  # as offered

    def as_dict(self) -> dict[str, Any]:
        """As `speakerd status --json` shows it."""
        return {"name": self.name, "where": self.where, "connected": self.connected,
                "tools": list(self.tools), "skipped": dict(self.skipped), "error": self.error}


def describe(server: configmod.McpServerConfig) -> str:
    if server.command:
        return "stdio " + " ".join(server.command)
    return f"{transport_of(server).replace('_', ' ')} {server.url}"


def transport_of(server: configmod.McpServerConfig) -> str:
    if server.command:
        return "stdio"
    if server.transport != "auto":
        return server.transport
    return "sse" if urlsplit(server.url).path.rstrip("/").endswith("/sse") else "streamable_http"


# --- tools --------------------------------------------------------------------------

def tool_name(name: str) -> str:
    """An MCP tool name as a Realtime function name may be spelled."""
    return name if NAME_PATTERN.fullmatch(name) else re.sub(r"[^A-Za-z0-9_-]", "_", name)[:64]


def output_of(result: mcp_types.CallToolResult) -> dict[str, Any]:
    """The text of a call's result for function_call_output; raises ToolFailed on isError."""
    parts: list[str] = []
    for item in result.content:
        if isinstance(item, mcp_types.TextContent):
            parts.append(item.text)
        else:
            parts.append(f"[{item.type} content left out]")
    text = "\n".join(parts)
    if not parts and result.structured_content is not None:
        text = json.dumps(result.structured_content)
    if result.is_error:
        raise ToolFailed(_cut(text, 500) or "the server reported an error")
    if len(text) > MAX_OUTPUT:
        return {"result": text[:MAX_OUTPUT],
                "note": f"cut to the first {MAX_OUTPUT} of {len(text)} characters"}
    return {"result": text}


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n] + "..."


# --- one server ---------------------------------------------------------------------

def _reason(e: BaseException, server: configmod.McpServerConfig, index: int) -> str:
    """Why a connection failed, with what to fix when that is known."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    status = getattr(e, "status", None) or getattr(getattr(e, "response", None),
                                                   "status_code", None)
    text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    if status in (401, 403):
        what = (f"mcp[{index}].token_file ({server.token_file})" if server.token_file else
                f"mcp[{index}].token_file (none is set)")
        return (f"the server refused the token (HTTP {status}): put a valid "
                f"token in {what}; for Home Assistant, a long-lived access token")
    if status == 404:
        return (f"HTTP 404 from {server.url}: check mcp[{index}].url (Home Assistant: "
                "http://HOST:8123/api/mcp, with the MCP Server integration added)")
    if isinstance(e, TimeoutError):
        return f"no answer within {server.timeout_seconds:g} s"
    if isinstance(e, (httpx2.ConnectError, ConnectionError, OSError)):
        return f"cannot connect: {text}"
    return text


class HttpStatus(Exception):
    """The server answered an MCP request with this HTTP error status."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


class Connection:
    """One server's session, alive while its task is inside `Manager._serve`."""

    def __init__(self, server: configmod.McpServerConfig, session: ClientSession) -> None:
        self.server = server
        self.session = session
        self.events: asyncio.Queue[object] = asyncio.Queue()

    async def call(self, mcp_name: str, args: dict[str, Any]) -> dict[str, Any]:
        try:
            result = await self.session.call_tool(mcp_name, args)
        except ToolFailed:
            raise
        except Exception as e:
            self.events.put_nowait("check")  # is the server still there?
            err = getattr(e, "error", None)
            raise ToolFailed(getattr(err, "message", None) or f"{type(e).__name__}: {e}"
                             ) from e
        if not isinstance(result, mcp_types.CallToolResult):
            raise ToolFailed(f"unexpected result {type(result).__name__}")
        return output_of(result)


@contextlib.asynccontextmanager
async def _streams(server: configmod.McpServerConfig, token: str, statuses: list[int]
                   ) -> AsyncIterator[tuple[Any, Any]]:
    """The transport's stream pair; HTTP error statuses are appended to `statuses` (the
    SDK turns them into a bare "error response": a 401 must say which file to fix)."""
    kind = transport_of(server)
    if kind == "stdio":
        params = StdioServerParameters(command=server.command[0], args=list(server.command[1:]))
        async with stdio_client(params) as streams:
            yield streams
        return
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if kind == "sse":
        async with sse_client(server.url, headers=headers,
                              timeout=server.timeout_seconds) as streams:
            yield streams
        return
    async def seen(response: httpx2.Response) -> None:
        if response.status_code >= 400:
            statuses.append(response.status_code)

    timeout = httpx2.Timeout(server.timeout_seconds, read=300.0)
    client = create_mcp_http_client(headers=headers, timeout=timeout)
    client.event_hooks["response"].append(seen)
    async with client, streamable_http_client(server.url, http_client=client) as streams:
        yield streams


class Manager:
    """The MCP servers of the config, each kept connected by a task of its own; their
    tools live in `registry` under the group `mcp:NAME`."""

    def __init__(self, servers: tuple[configmod.McpServerConfig, ...], registry: Registry, *,
                 config_path: str = "", on_secret: Callable[[str], None] = lambda s: None,
                 spawn: Callable[[Any, str], asyncio.Task[Any]] | None = None,
                 backoff: tuple[float, float] = BACKOFF, auth_backoff: float = AUTH_BACKOFF,
                 ping_interval: float = PING_INTERVAL) -> None:
        self.registry = registry
        self.config_path = config_path
        self.on_secret = on_secret
        self.spawn = spawn or (lambda coro, name: asyncio.get_running_loop().create_task(
            coro, name=name))
        self.backoff = backoff
        self.auth_backoff = auth_backoff
        self.ping_interval = ping_interval
        self.servers: dict[str, configmod.McpServerConfig] = {}
        self.states: dict[str, ServerState] = {}
        self.tasks: dict[str, asyncio.Task[Any]] = {}
        self.connections: dict[str, Connection] = {}
        self._index: dict[str, int] = {}
        # Set (and dropped) whenever a server's state changes: what wait_connected awaits.
        self._news: dict[str, asyncio.Event] = {}
        self.update(servers)

    def update(self, servers: tuple[configmod.McpServerConfig, ...]) -> None:
        """Start, stop or restart server tasks to match `servers` (start-up and SIGHUP);
        servers whose config is unchanged keep their connection and re-list their tools."""
        wanted = {s.name: s for s in servers}
        self._index = {s.name: i for i, s in enumerate(servers)}
        for name in list(self.tasks):
            if wanted.get(name) != self.servers.get(name):
                log.info("MCP server %s %s: its tools are withdrawn", name,
                         "changed in the config" if name in wanted else
                         "is no longer in the config", extra={"SPEAKERD_EVENT": "mcp"})
                self.tasks.pop(name).cancel()
                self.servers.pop(name, None)
                self.registry.set_group(f"mcp:{name}", [])
                self.states.pop(name, None)
        for name, server in wanted.items():
            if name in self.tasks:
                conn = self.connections.get(name)
                if conn:  # connected: list its tools again
                    conn.events.put_nowait("changed")
                    continue
                self.tasks.pop(name).cancel()  # waiting to retry: retry now
                self.registry.set_group(f"mcp:{name}", [])
            self.servers[name] = server
            self.states[name] = ServerState(name, describe(server))
            self._tell(name)
            self.tasks[name] = self.spawn(self._keep(server), f"mcp {name}")

    def status(self) -> list[dict[str, Any]]:
        """Each server, connected or not, and its tools (`speakerd status`)."""
        return [st.as_dict() for st in self.states.values()]

    async def stop(self) -> None:
        tasks = list(self.tasks.values())
        self.tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def wait_connected(self, name: str, timeout: float, *,
                             until_error: bool = False) -> ServerState:
        """For `config --show`, `check` and tests: the state once connected (or, with
        `until_error`, once an attempt has failed), or as it is after `timeout` seconds."""
        state = self.states[name]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not (state.connected or (until_error and state.error)):
                    await self._news.setdefault(name, asyncio.Event()).wait()
                    state = self.states.get(name, state)  # update() may have replaced it
        return state

    def _tell(self, name: str) -> None:
        """Wake whoever waits on `name`'s state; later waiters get a fresh event."""
        event = self._news.pop(name, None)
        if event is not None:
            event.set()

    # --- the task of one server ---------------------------------------------------

    async def _keep(self, server: configmod.McpServerConfig) -> None:
        """Connect, serve, and on any failure retry with back-off, until cancelled.
        Logs once when the server is lost and once when it is back."""
        state = self.states[server.name]
        delay, lost = self.backoff[0], False
        try:
            while True:
                try:
                    await self._serve(server, state, lost)
                    why = "the connection closed"
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    why = _reason(e, server, self._index.get(server.name, 0))
                    log.debug("MCP server %s failed", server.name, exc_info=True)
                    if getattr(e, "status", None) in (401, 403):
                        delay = max(delay, self.auth_backoff)
                was_connected = state.connected
                if was_connected:
                    delay = self.backoff[0]
                state.connected = False
                state.error = why
                state.failures += 1
                self._tell(server.name)
                self.connections.pop(server.name, None)
                self.registry.set_group(f"mcp:{server.name}", [])
                if was_connected or not lost:
                    log.warning("MCP server %s (%s) is unavailable: %s; its tools are "
                                "withdrawn and it is retried in the background",
                                server.name, state.where, why,
                                extra={"SPEAKERD_EVENT": "mcp"})
                lost = True
                state.tools, state.schemas = [], []
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff[1])
        finally:
            state.connected = False
            self._tell(server.name)
            if self.tasks.get(server.name) in (None, asyncio.current_task()):
                self.registry.set_group(f"mcp:{server.name}", [])
                self.connections.pop(server.name, None)
            log.debug("MCP server %s: task ended", server.name)

    async def _serve(self, server: configmod.McpServerConfig, state: ServerState,
                     lost: bool) -> None:
        token = ""
        if server.token_file:
            token = configmod.read_secret_file(
                server.token_file, self.config_path,
                f"mcp[{self._index.get(server.name, 0)}].token_file", check_mode=True).reveal()
            self.on_secret(token)
        conn: Connection | None = None

        async def on_message(message: object) -> None:
            if conn is None:
                return
            if isinstance(message, mcp_types.ToolListChangedNotification):
                conn.events.put_nowait("changed")
            elif isinstance(message, Exception):
                conn.events.put_nowait(message)

        statuses: list[int] = []
        async with _streams(server, token, statuses) as (read, write), \
                ClientSession(read, write, message_handler=on_message) as session:
            conn = Connection(server, session)
            try:
                with anyio.fail_after(server.timeout_seconds):
                    await session.initialize()
                    await self._list(conn, state)
            except Exception as e:
                if statuses:
                    raise HttpStatus(statuses[-1]) from e
                raise
            state.connected, state.error = True, ""
            self._tell(server.name)
            self.connections[server.name] = conn
            if lost:
                log.info("MCP server %s is back: %d tools", server.name, len(state.tools),
                         extra={"SPEAKERD_EVENT": "mcp"})
            else:
                log.info("MCP server %s (%s) connected: %s", server.name, state.where,
                         ", ".join(state.tools) or "no tools", extra={"SPEAKERD_EVENT": "mcp"})
            while True:
                try:
                    event = await asyncio.wait_for(conn.events.get(), self.ping_interval)
                except TimeoutError:
                    event = "check"
                if event == "changed":
                    with anyio.fail_after(server.timeout_seconds):
                        await self._list(conn, state)
                    log.info("MCP server %s changed its tools: %s", server.name,
                             ", ".join(state.tools) or "none", extra={"SPEAKERD_EVENT": "mcp"})
                elif event == "check":
                    with anyio.fail_after(server.timeout_seconds):
                        await session.send_ping()
                elif isinstance(event, Exception):
                    raise event

    async def _list(self, conn: Connection, state: ServerState) -> None:
        server = conn.server
        listed: list[mcp_types.Tool] = []
        cursor: str | None = None
        while True:
            params = mcp_types.PaginatedRequestParams(cursor=cursor) if cursor else None
            page = await conn.session.list_tools(params=params)
            listed += page.tools
            cursor = page.next_cursor
            if not cursor:
                break
        tools: list[Tool] = []
        skipped: dict[str, str] = {}
        for t in listed:
            if not any(fnmatch.fnmatchcase(t.name, p) for p in server.tools):
                continue
            params_or_why = to_parameters(t.input_schema)
            if isinstance(params_or_why, str):
                skipped[t.name] = params_or_why
                if state.skipped.get(t.name) != params_or_why:  # once, not at each re-list
                    log.warning("MCP server %s: tool %s is not offered to the model: %s",
                                server.name, t.name, params_or_why,
                                extra={"SPEAKERD_EVENT": "mcp"})
                continue
            tools.append(Tool(tool_name(t.name), _cut(t.description or t.title or t.name,
                                                     MAX_DESCRIPTION),
                              params_or_why, _caller(conn, t.name),
                              timeout=server.timeout_seconds))
        state.skipped = skipped
        state.tools = self.registry.set_group(f"mcp:{server.name}", tools, server.name)
        state.schemas = [self.registry.tools[name].schema() for name in state.tools]


def _caller(conn: Connection, mcp_name: str) -> Callable[..., Any]:
    async def call(**args: Any) -> dict[str, Any]:
        return await conn.call(mcp_name, args)
    return call


async def probe(servers: tuple[configmod.McpServerConfig, ...], config_path: str
                ) -> list[ServerState]:
    """Connect to each server once, list its tools, disconnect (`config --show`)."""
    registry = Registry()
    manager = Manager(servers, registry, config_path=config_path, backoff=(3600, 3600))
    try:
        for server in servers:
            await manager.wait_connected(server.name, server.timeout_seconds + 1,
                                         until_error=True)
        return [copy.copy(manager.states[s.name]) for s in servers]
    finally:
        await manager.stop()
