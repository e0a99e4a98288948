"""MCP servers that others publish, run as real processes the way a user would set them
up: PyPI's mcp-server-git and mcp-server-time (stdio, Python), npm's
@modelcontextprotocol/server-memory (stdio, Node.js) and server-everything (streamable
HTTP, Node.js), next to a server written on the `mcp` SDK's own decorator. Every tool
each lists is offered to the model as the Realtime API takes it, and through `speakerd
run` the model calls one tool of each, checked where the server keeps its effect."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from openai.types import realtime as rt
from pydantic import TypeAdapter

from speakerd import config as configmod
from speakerd.tools import Registry
from speakerd.tools import mcp as mcpmod

from .conftest import need
from .mcp_servers import published_servers, realtime_refuses
from .realtime_server import Call, RealtimeServer, Reply
from .test_mcp import SDK_SERVER, free_port

VENV_BIN = Path(sys.executable).parent
FUNCTION_TOOL = TypeAdapter(rt.RealtimeFunctionTool)


@pytest.fixture(scope="session")
def node_modules() -> Path:
    need(bool(shutil.which("node") and shutil.which("npm")),
         "nodejs and npm (tests/apt-packages.txt)")
    return published_servers()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    need(bool(shutil.which("git")), "git (tests/apt-packages.txt)")
    path = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True)
    subprocess.run(["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@t",
                    "commit", "-q", "--allow-empty", "-m", "first"], check=True)
    return path


@contextlib.asynccontextmanager
async def everything(node_modules: Path) -> AsyncIterator[str]:
    """server-everything over streamable HTTP on a free port; yields its URL."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        "node", str(node_modules / "@modelcontextprotocol/server-everything/dist/index.js"),
        "streamableHttp", env={"PATH": os.environ["PATH"], "PORT": str(port)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(30):
            while b"listening on port" not in (line := await proc.stderr.readline()):
                assert line, "server-everything exited before it listened"
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        proc.terminate()
        await proc.wait()


def stdio_servers(tmp_path: Path, repo: Path, node_modules: Path
                  ) -> dict[str, configmod.McpServerConfig]:
    memory = node_modules / "@modelcontextprotocol/server-memory/dist/index.js"
    commands = {
        "git": (str(VENV_BIN / "mcp-server-git"), "--repository", str(repo)),
        "time": (str(VENV_BIN / "mcp-server-time"), "--local-timezone", "Europe/London"),
        # The SDK hands a stdio server only a few variables (PATH, HOME, ...): env sets it.
        "memory": ("env", f"MEMORY_FILE_PATH={tmp_path / 'memory.jsonl'}", "node",
                   str(memory)),
        "hass": (*SDK_SERVER, str(tmp_path / "hass.jsonl")),
    }
    return {name: configmod.McpServerConfig(name=name, command=command, timeout_seconds=20)
            for name, command in commands.items()}


async def listed(server: configmod.McpServerConfig) -> list[str]:
    """The tools `server` lists, asked with nothing but the mcp SDK's own client."""
    if server.command:
        streams = stdio_client(StdioServerParameters(command=server.command[0],
                                                     args=list(server.command[1:])))
    else:
        streams = streamable_http_client(server.url)
    async with streams as (read, write, *_), ClientSession(read, write) as session:
        await session.initialize()
        return [t.name for t in (await session.list_tools()).tools]


def offered_as_the_api_takes_them(schemas: list[dict]) -> None:
    for schema in schemas:
        assert FUNCTION_TOOL.validate_python(schema).model_dump(exclude_none=True) == schema
        assert realtime_refuses(schema["parameters"]) == [], (schema["name"],
                                                              realtime_refuses(schema))


@pytest.mark.parametrize("name", ["git", "time", "memory", "everything"])
async def test_every_tool_of_a_published_server_is_offered(name, tmp_path, repo,
                                                            node_modules):
    async with everything(node_modules) as url:
        servers = stdio_servers(tmp_path, repo, node_modules)
        servers["everything"] = configmod.McpServerConfig(name="everything", url=url,
                                                          timeout_seconds=20)
        server = servers[name]
        names = await listed(server)
        registry = Registry()
        manager = mcpmod.Manager((server,), registry)
        try:
            state = await manager.wait_connected(name, 30, until_error=True)
            assert state.connected, state.error
            assert state.skipped == {}
            assert state.tools == names and len(names) >= 2
            offered_as_the_api_takes_them(registry.schemas())
        finally:
            await manager.stop()


@pytest.fixture
def prerequisites(pulse):
    from .speech import have_espeak
    need(have_espeak(), "espeak-ng")
    return pulse


async def test_through_speakerd_run_the_model_calls_a_tool_of_each(
        tmp_path, repo, node_modules, prerequisites):
    from .test_e2e import Speaker, request
    calls = {
        "git": Call("git_create_branch", json.dumps({
            "repo_path": str(repo), "branch_name": "kitchen-lights", "base_branch": None}),
            "call_git"),
        "time": Call("convert_time", json.dumps({
            "source_timezone": "Europe/London", "time": "16:30",
            "target_timezone": "Asia/Tokyo"}), "call_time"),
        "memory": Call("create_entities", json.dumps({"entities": [{
            "name": "kitchen lights", "entityType": "light",
            "observations": ["turned off by the speaker"]}]}), "call_memory"),
        "everything": Call("get-sum", '{"a": 2, "b": 3}', "call_everything"),
        "hass": Call("HassTurnOff", '{"name": "kitchen lights", "domain": ["light"]}',
                     "call_hass"),
    }
    async with everything(node_modules) as url:
        servers = stdio_servers(tmp_path, repo, node_modules)
        servers["everything"] = configmod.McpServerConfig(name="everything", url=url,
                                                          timeout_seconds=20)
        lists = {name: await listed(server) for name, server in servers.items()}
        tables = "".join(
            f'[[mcp]]\nname = "{name}"\ntimeout_seconds = 20\n'
            + (f"command = {json.dumps(list(s.command))}\n" if s.command else
               f'url = "{s.url}"\n') for name, s in servers.items())
        model = RealtimeServer(vad=True, replies=[
            Reply(audio_ms=300, function_calls=list(calls.values())),
            Reply(audio_ms=800, transcript="Done.")])
        async with model:
            spk = Speaker(tmp_path, prerequisites, model,
                          "[conversation]\nfollow_up_seconds = 1\n" + tables)
            await spk.start()
            try:
                for name in servers:
                    await spk.wait_log(f"MCP server {name} (", timeout=60)
                spk.say(request("turn off the kitchen lights"), "lights")
                await spk.wait_log("listening -> idle", timeout=90)
            finally:
                assert spk.stop() == 0
    assert model.invalid == []  # every event, session.update's tools included, validated
    offered = model.of_type("session.update")[0].event["session"]["tools"]
    names = {t["name"] for t in offered}
    for name, tools in lists.items():
        want = set(tools) - ({"HassRunScript"} if name == "hass" else set())
        assert want <= names, (name, want - names)
    offered_as_the_api_takes_them(offered)
    outputs = {o.event["item"]["call_id"]: json.loads(o.event["item"]["output"])
               for o in model.of_type("conversation.item.create")}
    assert set(outputs) == {c.call_id for c in calls.values()}
    assert all("result" in out for out in outputs.values()), outputs
    # Where each server keeps what the call did:
    assert subprocess.run(["git", "-C", str(repo), "branch", "--list", "kitchen-lights"],
                          capture_output=True, text=True, check=True).stdout.strip() \
        == "kitchen-lights"
    assert json.loads((tmp_path / "memory.jsonl").read_text()) == {
        "type": "entity", "name": "kitchen lights", "entityType": "light",
        "observations": ["turned off by the speaker"]}
    assert [json.loads(x) for x in (tmp_path / "hass.jsonl").read_text().splitlines()] == [
        {"name": "HassTurnOff", "arguments": {"name": "kitchen lights", "area": "",
                                              "domain": ["light"]}}]
    # Only the server could have worked these out from the arguments it was sent:
    assert outputs["call_everything"] == {"result": "The sum of 2 and 3 is 5."}
    assert '"datetime": "' in outputs["call_time"]["result"] and \
        'T01:30:00+09:00"' in outputs["call_time"]["result"]
    types_ = model.types()
    assert types_.count("response.create") == 1
    assert "Traceback" not in spk.log
