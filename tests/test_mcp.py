"""Tools of MCP servers: [[mcp]] config, schema conversion, the manager against real MCP
servers (streamable HTTP shaped like Home Assistant's, stdio), and whole conversations
through `speakerd run` in which the model turns off the kitchen lights."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mcp import types
from openai.types import realtime as rt
from pydantic import TypeAdapter

from speakerd import config as configmod
from speakerd.errors import ConfigError
from speakerd.tools import Registry
from speakerd.tools import mcp as mcpmod

from .conftest import ROOT, SPEAKERD, clean_env, need
from .mcp_servers import HassServer, hass_tools, realtime_refuses
from .realtime_server import Call, RealtimeServer, Reply

TOKEN = "ha-llat-eyJhbGciOiJIUzI1NiJ9.kitchen0123456789"
STDIO_SERVER = [sys.executable, str(ROOT / "tests" / "mcp_servers.py"), "stdio"]
SDK_SERVER = [sys.executable, str(ROOT / "tests" / "mcp_servers.py"), "sdk"]
RECURSIVE_STEP = ("arguments.steps.items.then.items refers back to #/$defs/Step, which holds "
                  "it: a recursive schema cannot be written out")


def token_file(tmp_path: Path, text: str = TOKEN, mode: int = 0o600) -> Path:
    path = tmp_path / "home-assistant.token"
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


def server_config(url: str, tmp_path: Path, **kw) -> configmod.McpServerConfig:
    kw.setdefault("token_file", str(token_file(tmp_path)))
    kw.setdefault("timeout_seconds", 3.0)
    return configmod.McpServerConfig(name=kw.pop("name", "home"), url=url, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def until(predicate, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.05)


class TestConfig:
    def test_a_home_assistant_server_and_a_stdio_server_load(self, tmp_path):
        c = configmod.from_dict({"mcp": [
            {"name": "home", "url": "http://homeassistant.local:8123/api/mcp",
             "token_file": str(token_file(tmp_path)), "tools": ["Hass*", "GetLiveContext"],
             "timeout_seconds": 5},
            {"name": "weather", "command": [sys.executable, "-m", "weather"]}]})
        home, weather = c.mcp
        assert (home.name, home.tools, home.timeout_seconds) == (
            "home", ("Hass*", "GetLiveContext"), 5.0)
        assert mcpmod.transport_of(home) == "streamable_http"
        assert weather.command[0] == sys.executable and mcpmod.transport_of(weather) == "stdio"
        assert configmod.from_dict({}).mcp == ()

    def test_an_sse_url_speaks_sse(self):
        s = configmod.McpServerConfig(name="x", url="http://h:8123/mcp_server/sse")
        assert mcpmod.transport_of(s) == "sse"

    @pytest.mark.parametrize(("mcp", "key", "why"), [
        ({"name": "home"}, "mcp", "must be tables written [[mcp]]"),
        ([{"name": "home", "url": "http://h/api/mcp", "tokens": "x"}], "mcp[0].tokens",
         "unknown key (did you mean 'token_file'?)"),
        ([{"name": "home", "url": "ftp://h/api/mcp"}], "mcp[0].url",
         "'ftp://h/api/mcp' must be an http:// or https:// URL with a host"),
        ([{"name": "home"}], "mcp[0]", "set either url"),
        ([{"name": "home", "url": "http://h/", "command": ["/bin/true"]}], "mcp[0]",
         "set either url"),
        ([{"url": "http://h/"}], "mcp[0].name", "is required"),
        ([{"name": "a b", "url": "http://h/"}], "mcp[0].name", "is required"),
        ([{"name": "h", "url": "http://h/"}, {"name": "h", "url": "http://i/"}], "mcp[1].name",
         "'h' names two servers"),
        ([{"name": "w", "command": ["no-such-mcp-server"]}], "mcp[0].command",
         "no-such-mcp-server: no such executable"),
        ([{"name": "w", "command": ["/bin/true"], "token_file": "/x"}], "mcp[0].token_file",
         "is for url servers"),
        ([{"name": "h", "url": "http://h/", "timeout_seconds": 0}], "mcp[0].timeout_seconds",
         "0 is out of range"),
        ([{"name": "h", "url": "http://h/", "transport": "websocket"}], "mcp[0].transport",
         "'websocket' is not allowed"),
        ([{"name": "h", "url": "http://h/", "token_file": "/nonexistent/t"}],
         "mcp[0].token_file", "/nonexistent/t: no such file"),
    ])
    def test_errors_name_the_key(self, mcp, key, why):
        with pytest.raises(ConfigError) as e:
            configmod.from_dict({"mcp": mcp}, "/etc/speakerd/speakerd.toml")
        assert str(e.value).startswith(f"/etc/speakerd/speakerd.toml: {key}: {why}"), str(e.value)

    def test_a_token_file_others_can_read_is_refused_with_the_fix(self, tmp_path):
        path = token_file(tmp_path, mode=0o644)
        with pytest.raises(ConfigError) as e:
            configmod.from_dict({"mcp": [{"name": "h", "url": "http://h/",
                                          "token_file": str(path)}]}, "c.toml")
        assert str(e.value) == (f"c.toml: mcp[0].token_file: {path} is readable by group or "
                                f"others (mode 0644); run: chmod 600 {path}")
        assert TOKEN not in str(e.value)

    def test_config_check_exits_78_naming_the_key(self, write_config):
        from .conftest import run_speakerd
        r = run_speakerd("config", "--check", "--config", str(write_config(
            '[[mcp]]\nname = "home"\nurl = "homeassistant.local:8123/api/mcp"\n')))
        assert r.returncode == 78
        assert r.stderr.strip().endswith(
            "mcp[0].url: 'homeassistant.local:8123/api/mcp' must be an http:// or https:// "
            "URL with a host")

    async def test_config_show_lists_each_server_connected_or_not_and_its_tools(
            self, tmp_path, write_config):
        async with HassServer(token=TOKEN) as ha:
            path = write_config(
                f'[tools]\nenabled = ["get_time"]\n'
                f'[[mcp]]\nname = "home"\nurl = "{ha.url}"\n'
                f'token_file = "{token_file(tmp_path)}"\n'
                f'[[mcp]]\nname = "attic"\nurl = "http://127.0.0.1:{free_port()}/api/mcp"\n'
                'timeout_seconds = 2\n')
            proc = await asyncio.create_subprocess_exec(
                *SPEAKERD, "config", "--show", "--config", str(path), cwd=ROOT,
                env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        lines = [x for x in out.decode().splitlines() if x.startswith("# mcp")]
        assert lines == [
            f"# mcp home (streamable http {ha.url}): connected, 3 tools offered, none skipped",
            "# mcp tool HassTurnOn (from home)", "# mcp tool HassTurnOff (from home)",
            "# mcp tool GetLiveContext (from home)",
            lines[-1]]
        assert lines[-1].startswith("# mcp attic (streamable http http://127.0.0.1:")
        assert ": not connected: cannot connect: " in lines[-1]
        assert '[[mcp]]\nname = "home"' in out.decode()
        assert TOKEN not in out.decode() + err.decode()


class TestSchemas:
    def test_home_assistant_schemas_pass_through(self):
        for tool in hass_tools():
            assert mcpmod.to_parameters(tool.input_schema) == tool.input_schema

    def test_names_are_made_realtime_function_names(self):
        assert mcpmod.tool_name("HassTurnOn") == "HassTurnOn"
        assert mcpmod.tool_name("lights.turn on") == "lights_turn_on"


class Resumes:
    """Awaits `coro`, counting each time the loop resumes it after it waited."""

    def __init__(self, coro) -> None:
        self.coro = coro
        self.count = 0

    def __await__(self):
        send, value = self.coro.send, None
        while True:
            try:
                future = send(value)
            except StopIteration as stop:
                return stop.value
            try:
                value, send = (yield future), self.coro.send
            except BaseException as e:  # cancellation: handed on to the coroutine
                value, send = e, self.coro.throw
            self.count += 1


@pytest.fixture
async def manager():
    made: list[mcpmod.Manager] = []

    def make(*servers: configmod.McpServerConfig, registry: Registry | None = None,
             **kw) -> mcpmod.Manager:
        kw.setdefault("backoff", (0.2, 1.0))
        m = mcpmod.Manager(servers, registry or Registry(), **kw)
        made.append(m)
        return m
    yield make
    for m in made:
        await m.stop()


class TestManager:
    async def test_tools_join_the_registry_and_are_realtime_function_tools(
            self, tmp_path, manager, caplog):
        caplog.set_level(logging.INFO)
        async with HassServer(token=TOKEN) as ha:
            registry = Registry()
            m = manager(server_config(ha.url, tmp_path), registry=registry)
            state = await m.wait_connected("home", 10)
            assert state.connected and state.tools == ["HassTurnOn", "HassTurnOff",
                                                       "GetLiveContext"]
            adapter = TypeAdapter(rt.RealtimeFunctionTool)
            for schema in registry.schemas():
                assert adapter.validate_python(schema).model_dump(exclude_none=True) == schema
        assert f"MCP server home (streamable http {ha.url}) connected: HassTurnOn, " \
            "HassTurnOff, GetLiveContext" in caplog.text
        assert TOKEN not in caplog.text

    async def test_a_call_reaches_the_server_with_the_token_and_its_text_comes_back(
            self, tmp_path, manager):
        async with HassServer(token=TOKEN) as ha:
            registry = Registry()
            m = manager(server_config(ha.url, tmp_path), registry=registry)
            await m.wait_connected("home", 10)
            out = await registry.run("HassTurnOff", '{"name": "kitchen lights"}')
            context = await registry.run("GetLiveContext", "{}")
        assert [(c.name, c.arguments, c.authorization) for c in ha.calls] == [
            ("HassTurnOff", {"name": "kitchen lights"}, f"Bearer {TOKEN}"),
            ("GetLiveContext", {}, f"Bearer {TOKEN}")]
        assert out.ok and json.loads(json.loads(out.output)["result"])["data"]["success"] == [
            {"name": "kitchen lights", "type": "entity"}]
        assert json.loads(context.output) == {
            "result": "Live Context: kitchen lights: on; hallway temperature: 21 °C"}

    async def test_an_error_result_and_a_long_output_become_outputs_the_model_can_speak(
            self, tmp_path, manager):
        async with HassServer(token=TOKEN) as ha:
            ha.results["HassTurnOn"] = types.CallToolResult(is_error=True, content=[
                types.TextContent(type="text", text="no entity named 'attic fan'")])
            ha.results["GetLiveContext"] = types.CallToolResult(content=[
                types.TextContent(type="text", text="x" * 10000)])
            registry = Registry()
            m = manager(server_config(ha.url, tmp_path), registry=registry)
            await m.wait_connected("home", 10)
            failed = await registry.run("HassTurnOn", '{"name": "attic fan"}')
            long = await registry.run("GetLiveContext", "{}")
        assert not failed.ok and json.loads(failed.output) == {
            "error": "the tool failed: no entity named 'attic fan'"}
        assert json.loads(long.output) == {"result": "x" * mcpmod.MAX_OUTPUT, "note": (
            f"cut to the first {mcpmod.MAX_OUTPUT} of 10000 characters")}

    async def test_a_wrong_token_is_reported_with_what_to_fix_and_never_logged(
            self, tmp_path, manager, caplog):
        caplog.set_level(logging.DEBUG)
        right = "the-right-token-0123456789"
        async with HassServer(token=right) as ha:
            config = server_config(ha.url, tmp_path)
            m = manager(config, auth_backoff=0.3)
            state = await m.wait_connected("home", 10, until_error=True)
            await until(lambda: state.failures >= 3)  # a few retries: still one warning
            assert not state.connected
            # The token file fixed, SIGHUP (update) retries at once.
            token_file(tmp_path, right)
            m.update((config,))
            assert (await m.wait_connected("home", 10)).connected
            assert ha.auth_seen[-1] == f"Bearer {right}"
            auth_seen = [a for a in ha.auth_seen if a != f"Bearer {right}"]
        assert right not in caplog.text
        path = tmp_path / "home-assistant.token"
        assert state.error == (f"the server refused the token (HTTP 401): put a valid token "
                               f"in mcp[0].token_file ({path}); for Home Assistant, a "
                               "long-lived access token")
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                    and r.name == "speakerd.tools.mcp"]
        assert warnings == [f"MCP server home (streamable http {ha.url}) is unavailable: "
                            f"{state.error}; its tools are withdrawn and it is retried in "
                            "the background"]
        assert len(auth_seen) >= 3 and all(a == f"Bearer {TOKEN}" for a in auth_seen)
        assert TOKEN not in caplog.text

    async def test_a_wrong_path_says_where_home_assistant_listens(self, tmp_path, manager):
        async with HassServer(token=TOKEN) as ha:
            url = ha.url.replace("/api/mcp", "/api/mcp_server")
            m = manager(server_config(url, tmp_path))
            state = await m.wait_connected("home", 10, until_error=True)
        assert state.error == (f"HTTP 404 from {url}: check mcp[0].url (Home Assistant: "
                               "http://HOST:8123/api/mcp, with the MCP Server integration "
                               "added)")

    async def test_waiting_for_a_connection_wakes_only_when_its_state_changes(
            self, tmp_path, manager):
        port = free_port()
        m = manager(server_config(f"http://127.0.0.1:{port}/api/mcp", tmp_path))
        waiter = Resumes(m.wait_connected("home", 60))
        waited = asyncio.ensure_future(waiter)
        state = m.states["home"]
        await until(lambda: state.failures >= 3)  # 0.2 + 0.4 + 0.8 s of back-off meanwhile
        assert not waited.done()
        async with HassServer(token=TOKEN, port=port):
            got = await asyncio.wait_for(waited, 10)
            assert got is state and state.connected
        # Once per failed attempt and once for the connection; a 50 ms poll would have
        # woken ~28 times over the back-off.
        assert waiter.count <= state.failures + 1, (waiter.count, state.failures)

    async def test_a_server_down_at_start_is_retried_and_its_tools_appear(
            self, tmp_path, manager, caplog):
        caplog.set_level(logging.INFO)
        port = free_port()
        registry = Registry()
        m = manager(server_config(f"http://127.0.0.1:{port}/api/mcp", tmp_path),
                    registry=registry)
        state = await m.wait_connected("home", 10, until_error=True)
        assert not state.connected and state.error.startswith("cannot connect: ")
        assert registry.schemas() == []
        await until(lambda: state.failures >= 3)  # several attempts
        async with HassServer(token=TOKEN, port=port):
            await until(lambda: "HassTurnOff" in registry.tools)
            # Read while it is up: its shutdown at the end of this block is a loss too.
            lines = [r.getMessage() for r in caplog.records if r.name == "speakerd.tools.mcp"]
        assert len([x for x in lines if "is unavailable" in x]) == 1
        assert len([x for x in lines if "is back: 3 tools" in x]) == 1

    async def test_a_lost_server_is_said_once_its_tools_withdrawn_then_back(
            self, tmp_path, manager, caplog):
        caplog.set_level(logging.INFO)
        port = free_port()
        registry = Registry()
        m = manager(server_config(f"http://127.0.0.1:{port}/api/mcp", tmp_path),
                    registry=registry, ping_interval=0.2)
        async with HassServer(token=TOKEN, port=port):
            await m.wait_connected("home", 10)
        await until(lambda: not registry.tools)  # the pings find it gone
        state = m.states["home"]
        lost_at = state.failures
        await until(lambda: state.failures >= lost_at + 2)  # retried while it is away
        async with HassServer(token=TOKEN, port=port):
            await until(lambda: len(registry.tools) == 3)
            # Read while it is up: its shutdown at the end of this block is a loss too.
            lines = [r.getMessage() for r in caplog.records if r.name == "speakerd.tools.mcp"]
        assert len([x for x in lines if "is unavailable" in x]) == 1
        assert len([x for x in lines if "is back" in x]) == 1

    async def test_a_hanging_server_times_out_without_blocking_the_loop(
            self, tmp_path, manager):
        async with HassServer(token=TOKEN) as ha:
            registry = Registry()
            m = manager(server_config(ha.url, tmp_path, timeout_seconds=1.5),
                        registry=registry)
            await m.wait_connected("home", 10)
            ha.hang = True
            lag = 0.0

            async def ticker() -> None:
                nonlocal lag
                while True:
                    t = time.monotonic()
                    await asyncio.sleep(0.01)
                    lag = max(lag, time.monotonic() - t - 0.01)
            tick = asyncio.create_task(ticker())
            started = time.monotonic()
            out = await registry.run("HassTurnOff", '{"name": "kitchen lights"}')
            took = time.monotonic() - started
            tick.cancel()
            ha.hang = False
            after = await registry.run("GetLiveContext", "{}")
        assert json.loads(out.output) == {
            "error": "the tool failed: it did not finish within 1.5 s"}
        assert 1.5 <= took < 2.5
        assert lag < 0.1, lag
        assert after.ok  # the server's other calls still go through

    async def test_tool_list_changes_are_followed(self, tmp_path, manager, caplog):
        caplog.set_level(logging.INFO)
        async with HassServer(token=TOKEN, stateless=False) as ha:
            registry = Registry()
            m = manager(server_config(ha.url, tmp_path), registry=registry)
            await m.wait_connected("home", 10)
            await until(lambda: ha.sessions)
            await ha.set_tools([*hass_tools()[:2], types.Tool(
                name="HassLightSet", description="Sets the brightness of a light",
                input_schema={"type": "object", "properties": {
                    "name": {"type": "string"},
                    "brightness": {"type": "integer", "minimum": 0, "maximum": 100}}})])
            await until(lambda: "HassLightSet" in registry.tools)
            assert "GetLiveContext" not in registry.tools
            out = await registry.run("HassLightSet", '{"name": "desk", "brightness": 150}')
        assert json.loads(out.output)["error"] == (
            "the tool failed: invalid arguments: brightness must be at most 100")
        assert "MCP server home changed its tools: HassTurnOn, HassTurnOff, HassLightSet" \
            in caplog.text

    async def test_a_nullable_argument_is_offered_and_checked_before_the_call(
            self, tmp_path, manager):
        climate = types.Tool(name="HassClimateSetTemperature", description="d", input_schema={
            "type": "object", "properties": {"temperature": {"type": ["number", "null"]}},
            "required": ["temperature"]})
        async with HassServer(token=TOKEN, tools=[*hass_tools(), climate]) as ha:
            registry = Registry()
            m = manager(server_config(ha.url, tmp_path), registry=registry)
            state = await m.wait_connected("home", 10)
            null = await registry.run("HassClimateSetTemperature", '{"temperature": null}')
            warm = await registry.run("HassClimateSetTemperature", '{"temperature": "warm"}')
        assert state.tools[-1] == "HassClimateSetTemperature" and state.skipped == {}
        assert null.ok and json.loads(warm.output) == {
            "error": "the tool failed: invalid arguments: temperature must be number or null"}
        assert [(c.name, c.arguments) for c in ha.calls] == [
            ("HassClimateSetTemperature", {"temperature": None})]  # not the warm one

    async def test_a_tool_that_cannot_be_offered_is_skipped_with_one_line_naming_it(
            self, tmp_path, manager, caplog):
        caplog.set_level(logging.INFO)
        script = types.Tool(name="HassRunScript", description="d", input_schema={
            "type": "object", "properties": {"steps": {"$ref": "#/$defs/Steps"}},
            "$defs": {"Steps": {"type": "array", "items": {"type": "object", "properties": {
                "then": {"$ref": "#/$defs/Steps"}}}}}})
        why = ("arguments.steps.items.then refers back to #/$defs/Steps, which holds it: a "
               "recursive schema cannot be written out")
        async with HassServer(token=TOKEN, tools=[*hass_tools(), script]) as ha:
            registry = Registry()
            config = server_config(ha.url, tmp_path)
            m = manager(config, registry=registry)
            state = await m.wait_connected("home", 10)
            m.update((config,))  # SIGHUP: listed again, the same tool skipped again
            await until(lambda: any("changed its tools" in r.getMessage()
                                    for r in caplog.records))
        assert "HassRunScript" not in registry.tools and len(state.tools) == 3
        assert state.skipped == {"HassRunScript": why}
        assert m.status()[0]["skipped"] == {"HassRunScript": why}
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings == [f"MCP server home: tool HassRunScript is not offered to the "
                            f"model: {why}"]

    async def test_the_allow_list_and_a_name_clash(self, tmp_path, manager):
        from speakerd.tools.builtin import GET_TIME
        clash = types.Tool(name="get_time", description="The time at home",
                           input_schema={"type": "object", "properties": {}})
        async with HassServer(token=TOKEN, tools=[*hass_tools(), clash]) as ha:
            registry = Registry([GET_TIME])
            m = manager(server_config(ha.url, tmp_path, tools=("HassTurn*", "get_time")),
                        registry=registry)
            state = await m.wait_connected("home", 10)
            out = await registry.run("home_get_time", "{}")
        assert state.tools == ["HassTurnOn", "HassTurnOff", "home_get_time"]
        assert list(registry.tools) == ["get_time", *state.tools]
        assert out.ok and ha.calls[0].name == "get_time"

    async def test_a_stdio_server_runs_and_answers(self, tmp_path, manager):
        record = tmp_path / "calls.jsonl"
        registry = Registry()
        m = manager(configmod.McpServerConfig(name="weather",
                                              command=(*STDIO_SERVER, str(record))),
                    registry=registry)
        state = await m.wait_connected("weather", 20)
        assert state.connected and state.tools == ["get_weather"]
        out = await registry.run("get_weather", '{"city": "Leeds"}')
        assert json.loads(out.output) == {"result": "Leeds: 18 °C, light rain"}
        started, *calls = [json.loads(x) for x in record.read_text().splitlines()]
        assert calls == [{"name": "get_weather", "arguments": {"city": "Leeds"}}]
        await m.stop()
        assert not Path(f"/proc/{started['pid']}").exists()  # no server left behind

    async def test_a_server_written_on_the_sdks_decorator_offers_its_optional_arguments(
            self, tmp_path, manager):
        record = tmp_path / "calls.jsonl"
        registry = Registry()
        m = manager(configmod.McpServerConfig(name="home", command=(*SDK_SERVER, str(record))),
                    registry=registry)
        state = await m.wait_connected("home", 20)
        assert state.tools == ["HassTurnOff", "HassLightSet", "GetLiveContext"]
        assert state.skipped == {"HassRunScript": RECURSIVE_STEP}
        assert registry.tools["HassTurnOff"].parameters == {"type": "object", "properties": {
            "name": {"default": "", "title": "Name", "type": "string"},
            "area": {"default": "", "title": "Area", "type": "string"},
            "domain": {"anyOf": [{"items": {"type": "string"}, "type": "array"},
                                 {"type": "null"}], "default": None, "title": "Domain"}}}
        color = registry.tools["HassLightSet"].parameters["properties"]["color"]["anyOf"][0]
        assert color["type"] == "object" and color["required"] == ["red", "green", "blue"]
        adapter = TypeAdapter(rt.RealtimeFunctionTool)
        for schema in registry.schemas():
            assert adapter.validate_python(schema).model_dump(exclude_none=True) == schema
            assert realtime_refuses(schema["parameters"]) == []
        runs = [await registry.run(name, args) for name, args in [
            ("HassTurnOff", '{"name": "kitchen lights", "domain": ["light"]}'),
            ("HassTurnOff", '{"area": "kitchen", "domain": null}'),
            ("HassLightSet", '{"name": "desk", "color": {"red": 255, "green": 180, "blue": 0}}'),
            ("HassTurnOff", '{"domain": "light"}'),
            ("HassLightSet", '{"color": {"red": 300, "green": 0, "blue": 0}}')]]
        assert [r.ok for r in runs] == [True, True, True, False, False]
        assert [json.loads(r.output)["error"] for r in runs[3:]] == [
            "the tool failed: invalid arguments: domain must be array or null",
            "the tool failed: invalid arguments: color.red must be at most 255"]
        assert [json.loads(x) for x in record.read_text().splitlines()] == [  # valid ones only
            {"name": "HassTurnOff", "arguments": {"name": "kitchen lights", "area": "",
                                                  "domain": ["light"]}},
            {"name": "HassTurnOff", "arguments": {"name": "", "area": "kitchen",
                                                  "domain": None}},
            {"name": "HassLightSet", "arguments": {"name": "desk", "brightness": None, "color": {
                "red": 255, "green": 180, "blue": 0}}}]

    async def test_an_sse_server_with_a_token(self, tmp_path, manager):
        async with HassServer(token=TOKEN, sse=True) as ha:
            registry = Registry()
            m = manager(server_config(ha.url, tmp_path), registry=registry)
            state = await m.wait_connected("home", 10, until_error=True)
            assert state.connected, state.error
            assert state.where == f"sse {ha.url}"
            out = await registry.run("HassTurnOn", '{"area": "kitchen", "domain": ["light"]}')
        assert out.ok
        assert ha.calls[0].name == "HassTurnOn" and ha.calls[0].arguments == {
            "area": "kitchen", "domain": ["light"]}
        assert ha.auth_seen and set(ha.auth_seen) == {f"Bearer {TOKEN}"}

    async def test_update_drops_a_removed_server_and_its_tools(self, tmp_path, manager):
        async with HassServer(token=TOKEN) as ha:
            registry = Registry()
            m = manager(server_config(ha.url, tmp_path), registry=registry)
            await m.wait_connected("home", 10)
            m.update(())
            assert registry.tools == {} and m.tasks == {}

    def test_the_sdk_is_imported_without_its_server_half(self):
        code = ("import sys\n"
                "from speakerd.tools import mcp\n"
                "server = sorted(m for m in sys.modules if m.startswith('mcp.server') or "
                "m.split('.')[0] in ('starlette', 'uvicorn', 'sse_starlette', 'cryptography',"
                " 'click', 'python_multipart', 'jsonschema'))\n"
                "assert not server, server\n"
                "assert 'mcp.client.session' in sys.modules\n")
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr

    def test_without_mcp_servers_the_sdk_is_never_imported(self):
        code = ("import sys, asyncio\n"
                "from speakerd import config, daemon, cli\n"
                "assert 'mcp' not in sys.modules and 'httpx2' not in sys.modules, "
                "sorted(m for m in sys.modules if m.startswith(('mcp', 'httpx')))\n")
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr


class TestCheck:
    async def test_a_line_per_server_connected_its_tools_offered_and_those_skipped(
            self, tmp_path):
        from speakerd.checks.mcp import DOWN_FIX, SKIPPED_FIX

        from .test_check import FILE_DEVICES, check, has
        sdk = [*SDK_SERVER, str(tmp_path / "calls.jsonl")]
        attic = f"http://127.0.0.1:{free_port()}/api/mcp"
        async with HassServer(token=TOKEN) as ha, RealtimeServer() as server:
            code, lines, err = await check(
                tmp_path, FILE_DEVICES + f'[realtime]\nurl = "{server.url}"\n'
                + mcp_table(ha.url, token_file(tmp_path))
                + f'[[mcp]]\nname = "sdk"\ncommand = {json.dumps(sdk)}\n'
                'tools = ["HassLight*", "HassRunScript"]\n'
                f'[[mcp]]\nname = "attic"\nurl = "{attic}"\ntimeout_seconds = 2\n',
                "--listen", "0.5")
        has(lines, f"ok    mcp home: streamable http {ha.url}: connected, 3 tools offered "
            "(HassTurnOn, HassTurnOff, GetLiveContext), none skipped")
        has(lines, f"warn  mcp sdk: stdio {' '.join(sdk)}: connected, 1 tool offered "
            f"(HassLightSet), 1 skipped: HassRunScript ({RECURSIVE_STEP})",
            SKIPPED_FIX.format(i=1))
        i = has(lines, f"^warn  mcp attic: streamable http {attic}: not connected: cannot "
                "connect: .+", DOWN_FIX.format(i=2))
        assert lines[i].count("mcp attic") == 1
        # The realtime service is offered the MCP servers' tools, as a conversation would.
        has(lines, r"^ok    realtime session\.updated: model gpt-realtime, voice marin, 11 "
            r"tools \(\d+ ms\)")
        assert server.invalid == []
        tools = {t["name"] for t in server.received[0].event["session"]["tools"]}
        assert {"HassTurnOn", "HassTurnOff", "GetLiveContext", "HassLightSet"} <= tools
        assert code == 0 and TOKEN not in "\n".join(lines) + err
        assert err == "" or "Traceback" not in err, err


# --- whole conversations through `speakerd run` ----------------------------------------

@pytest.fixture
def prerequisites(pulse):
    from .speech import have_espeak
    need(have_espeak(), "espeak-ng")
    return pulse


def mcp_table(url: str, token: Path, timeout: float = 5) -> str:
    return (f'[[mcp]]\nname = "home"\nurl = "{url}"\ntoken_file = "{token}"\n'
            f"timeout_seconds = {timeout}\n")


class TestConversation:
    async def test_sighup_connects_a_server_added_to_the_config_and_status_lists_it(
            self, tmp_path, pulse, monkeypatch):
        from .test_e2e import Speaker
        control = tmp_path / "control"
        monkeypatch.setenv("SPEAKERD_CONTROL", str(control))
        async with HassServer(token=TOKEN) as ha, RealtimeServer(vad=True) as server:
            spk = Speaker(tmp_path, pulse, server)
            base = spk.config.read_text()
            await spk.start()
            try:
                sdk = [*SDK_SERVER, str(tmp_path / "calls.jsonl")]
                spk.config.write_text(base + mcp_table(ha.url, token_file(tmp_path))
                                      + f'[[mcp]]\nname = "sdk"\ncommand = {json.dumps(sdk)}\n'
                                      'tools = ["HassLight*", "HassRunScript"]\n')
                assert spk.proc is not None
                spk.proc.send_signal(signal.SIGHUP)
                await spk.wait_log("MCP server home (streamable http")
                await spk.wait_log("MCP server sdk (stdio", timeout=30)
                proc = await asyncio.create_subprocess_exec(
                    *SPEAKERD, "status", "--json", "--control", str(control), cwd=ROOT,
                    env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                out, err = await asyncio.wait_for(proc.communicate(), 30)
                assert proc.returncode == 0, err.decode()
                assert json.loads(out)["mcp"] == [{
                    "name": "home", "where": f"streamable http {ha.url}", "connected": True,
                    "tools": ["HassTurnOn", "HassTurnOff", "GetLiveContext"], "skipped": {},
                    "error": ""}, {
                    "name": "sdk", "where": f"stdio {' '.join(sdk)}", "connected": True,
                    "tools": ["HassLightSet"],
                    "skipped": {"HassRunScript": RECURSIVE_STEP}, "error": ""}]
                proc = await asyncio.create_subprocess_exec(
                    *SPEAKERD, "status", "--control", str(control), cwd=ROOT,
                    env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                out, err = await asyncio.wait_for(proc.communicate(), 30)
                assert (f"mcp home:      streamable http {ha.url}: connected, 3 tools offered "
                        "(HassTurnOn, HassTurnOff, GetLiveContext), none skipped\n"
                        f"mcp sdk:       stdio {' '.join(sdk)}: connected, 1 tool offered "
                        f"(HassLightSet), 1 skipped: HassRunScript ({RECURSIVE_STEP})\n"
                        ) in out.decode(), out.decode()
                spk.config.write_text(base)
                spk.proc.send_signal(signal.SIGHUP)
                await spk.wait_log("config reloaded", count=2)
            finally:
                assert spk.stop() == 0
        assert "Traceback" not in spk.log and TOKEN not in spk.log

    async def test_the_model_turns_off_the_kitchen_lights(self, tmp_path, prerequisites):
        from .test_e2e import Speaker, request
        async with HassServer(token=TOKEN) as ha:
            server = RealtimeServer(vad=True, replies=[
                Reply(audio_ms=300, function_calls=[
                    Call("HassTurnOff", '{"name": "kitchen lights"}', "call_lights")]),
                Reply(audio_ms=800, transcript="The kitchen lights are off.")])
            async with server:
                spk = Speaker(tmp_path, prerequisites, server,
                              "[conversation]\nfollow_up_seconds = 1\n[log]\nlevel = 'debug'\n"
                              + mcp_table(ha.url, token_file(tmp_path)))
                await spk.start()
                try:
                    await spk.wait_log("MCP server home (streamable http")
                    spk.say(request("turn off the kitchen lights"), "lights")
                    await spk.wait_log("listening -> idle", timeout=90)
                finally:
                    assert spk.stop() == 0
        assert server.invalid == []
        tools = server.of_type("session.update")[0].event["session"]["tools"]
        assert {"HassTurnOn", "HassTurnOff", "GetLiveContext", "get_time"} <= {
            t["name"] for t in tools}
        assert [(c.name, c.arguments, c.authorization) for c in ha.calls] == [
            ("HassTurnOff", {"name": "kitchen lights"}, f"Bearer {TOKEN}")]
        outputs = server.of_type("conversation.item.create")
        assert [o.event["item"]["call_id"] for o in outputs] == ["call_lights"]
        assert '\\"success\\": [{\\"name\\": \\"kitchen lights\\"' in \
            outputs[0].event["item"]["output"]
        types_ = server.types()
        assert types_.count("response.create") == 1
        assert types_.index("response.create") > types_.index("conversation.item.create")
        assert TOKEN not in spk.log  # not even at debug

    async def test_a_hanging_server_times_out_and_the_speaker_goes_on(
            self, tmp_path, prerequisites, monkeypatch):
        from .test_e2e import Speaker, request
        control = tmp_path / "control"
        monkeypatch.setenv("SPEAKERD_CONTROL", str(control))
        async with HassServer(token=TOKEN) as ha:
            ha.hang = True
            server = RealtimeServer(vad=True, replies=[
                Reply(audio_ms=300, function_calls=[
                    Call("HassTurnOn", '{"area": "kitchen"}', "call_hang")]),
                Reply(audio_ms=600), Reply(audio_ms=600)])
            async with server:
                spk = Speaker(tmp_path, prerequisites, server,
                              "[conversation]\nfollow_up_seconds = 1\n"
                              + mcp_table(ha.url, token_file(tmp_path), timeout=4))
                await spk.start()
                try:
                    await spk.wait_log("MCP server home (streamable http")
                    spk.say(request("turn on the kitchen"), "hang")
                    await until(lambda: ha.calls, timeout=60)
                    # Mid-hang the daemon's loop answers at once.
                    asked = time.monotonic()
                    proc = await asyncio.create_subprocess_exec(
                        *SPEAKERD, "status", "--json", "--control", str(control), cwd=ROOT,
                        env=clean_env(), stdout=subprocess.PIPE)
                    out, _ = await asyncio.wait_for(proc.communicate(), 30)
                    assert json.loads(out)["ok"] and not server.of_type(
                        "conversation.item.create"), "the call was over before the status"
                    answered = time.monotonic() - asked
                    await spk.wait_log("listening -> idle", timeout=90)
                    # The server still hangs; the wake word and the LEDs' states go on.
                    spk.say(request("what time is it"), "again")
                    await spk.wait_log("listening -> idle", count=2, timeout=90)
                finally:
                    assert spk.stop() == 0
        outputs = server.of_type("conversation.item.create")
        assert [json.loads(o.event["item"]["output"]) for o in outputs] == [
            {"error": "the tool failed: it did not finish within 4 s"}]
        assert answered < 3  # a python start-up; the loop itself answered in ms
        assert server.types().count("response.create") == 1
        assert len(server.handshakes) == 2  # a second conversation after the hang
        assert spk.transitions().count("idle -> connecting") == 2
        assert TOKEN not in spk.log
