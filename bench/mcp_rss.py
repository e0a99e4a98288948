"""What one MCP server costs the `speakerd run` process in resident memory.

    .venv/bin/python bench/mcp_rss.py [REPEATS]     (default 3; about a minute)

The product figure is VmRSS of the `speakerd run` process itself (started as the unit
starts it, on the paced PulseAudio devices of tests/audio_devices.py, against the
fixture realtime server), read from /proc/PID/status after a warm-up, in three
variants measured in the same run, each in a fresh process: no [[mcp]] server; one
stdio server (tests/mcp_servers.py's, a child process not counted); one streamable
HTTP server (tests/mcp_servers.HassServer, in this process). Repeats are interleaved
and medians reported. Goal: at most 80 MB with one server (the whole daemon's budget
is 70 MB).

Then what each import adds, in a fresh interpreter that has imported speakerd.daemon:
the SDK's client modules as speakerd.tools.mcp loads them, and, for comparison, the
SDK's package as `import mcp` loads it (with its server half).
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import audio_devices  # noqa: I001  (sets ALSA_CONFIG_PATH before alsa-lib loads)

from bench.soak import Daemon, status_kb
from tests.conftest import ROOT
from tests.mcp_servers import HassServer
from tests.realtime_server import RealtimeServer

WARM_UP = 3.0  # seconds after the server's tools are listed, before VmRSS is read
GOAL_MB = 80
STDIO = [sys.executable, str(ROOT / "tests" / "mcp_servers.py"), "stdio"]

# Each argument imported in turn, after speakerd.daemon, printing "module MB" per step.
STEPS = """
import importlib, sys
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
import speakerd.daemon
last = rss()
print("speakerd.daemon", last)
for name in sys.argv[1:]:
    importlib.import_module(name)
    now = rss()
    print(name, now - last)
    last = now
"""
# speakerd.tools.mcp_sdk: mcp.types and the client modules, without the package __init__s.
CLIENT = ["pydantic", "anyio", "httpx2", "mcp_types", "speakerd.tools.mcp_sdk",
          "speakerd.tools.mcp"]
PACKAGE = ["pydantic", "anyio", "httpx2", "mcp_types", "mcp", "mcp.client.session"]


async def daemon_rss(pulse: audio_devices.Pulse, server: RealtimeServer, tmp: Path,
                     mcp: str, connected: str) -> float:
    d = Daemon(tmp, pulse, server, mcp)
    await d.start()
    try:
        if connected:
            await d.expect(connected)
        await asyncio.sleep(WARM_UP)  # let start-up's garbage settle, as a listening speaker
        return status_kb(d.pid, "VmRSS") / 1024
    finally:
        assert d.stop() == 0


def import_costs(steps: list[str]) -> list[tuple[str, float]]:
    out = subprocess.run([sys.executable, "-c", STEPS, *steps], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    return [(name, float(mb)) for name, mb in (line.split() for line in out.splitlines())]


async def run(repeats: int) -> None:
    logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)  # HassServer's shutdown
    pulse = audio_devices.Pulse()
    pulse.start()
    rss: dict[str, list[float]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="speakerd-mcp-rss-") as name:
            tmp = Path(name)
            stdio = json.dumps([*STDIO, str(tmp / "calls")])
            async with RealtimeServer() as server, HassServer() as ha:
                variants = {
                    "no MCP server": ("", ""),
                    "one stdio MCP server": (
                        f'[[mcp]]\nname = "weather"\ncommand = {stdio}\n',
                        "MCP server weather (stdio"),
                    "one streamable HTTP MCP server": (
                        f'[[mcp]]\nname = "home"\nurl = "{ha.url}"\n',
                        "MCP server home (streamable http"),
                }
                for r in range(repeats):
                    for label, (table, connected) in variants.items():
                        sub = tmp / f"{r}-{len(rss.get(label, []))}-{hash(label) & 0xffff}"
                        sub.mkdir()
                        rss.setdefault(label, []).append(
                            await daemon_rss(pulse, server, sub, table, connected))
    finally:
        pulse.stop()
    base = statistics.median(rss["no MCP server"])
    print(f"VmRSS of `speakerd run`, {WARM_UP:.0f} s after start-up (and after the server's "
          f"tools were listed); median of {repeats} interleaved runs")
    print(f"{'':34s} {'MB':>6s} {'+MB':>6s} {'ratio':>6s}  goal")
    for label, values in rss.items():
        mb = statistics.median(values)
        goal = "" if label == "no MCP server" else (
            f"<= {GOAL_MB} MB ({'ok' if mb <= GOAL_MB else 'MISSED'})")
        print(f"{label:34s} {mb:6.1f} {mb - base:+6.1f} {mb / base:6.2f}  {goal}")
    for title, steps in (("the SDK's client modules, as speakerd.tools.mcp imports them",
                          CLIENT),
                         ("for comparison, the SDK's package (`import mcp`, server included)",
                          PACKAGE)):
        costs = import_costs(steps)
        print(f"\nimport cost after speakerd.daemon ({costs[0][1]:.1f} MB): {title}")
        for module, mb in costs[1:]:
            print(f"  {module:34s} {mb:+6.1f} MB")
        print(f"  {'all':34s} {sum(mb for _, mb in costs[1:]):+6.1f} MB")


if __name__ == "__main__":
    started = time.monotonic()
    asyncio.run(run(int(sys.argv[1]) if len(sys.argv) > 1 else 3))
    print(f"\n({time.monotonic() - started:.0f} s)")
