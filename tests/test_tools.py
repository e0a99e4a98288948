"""Tools: the registry, built-ins, volume on a real ALSA mixer, timers, plug-ins."""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
import textwrap

import pytest
from openai.types import realtime as rt
from pydantic import TypeAdapter

from speakerd import config as configmod
from speakerd.audio import playback as pb
from speakerd.audio.cues import make_cues
from speakerd.tools import Registry, Tool
from speakerd.tools import timers as timermod
from speakerd.tools import volume as volmod
from speakerd.tools.catalog import build_tools

from .conftest import ROOT, SPEAKERD, clean_env, run_speakerd

NO_ARGS = {"type": "object", "properties": {}, "additionalProperties": False}


class Gain:
    volume = 0.8


def registry(**kw) -> Registry:
    return build_tools(configmod.Config(), volmod.Volume("", "", Gain()), timermod.Timers(),
                       **kw)


class TestRegistry:
    def test_every_builtin_schema_is_a_realtime_function_tool(self):
        adapter = TypeAdapter(rt.RealtimeFunctionTool)
        schemas = registry().schemas()
        assert {s["name"] for s in schemas} == set(configmod.BUILTIN_TOOLS)
        for schema in schemas:
            assert adapter.validate_python(schema).model_dump(exclude_none=True) == schema

    async def test_a_good_call_returns_json(self):
        out = await registry().run("get_time", "{}")
        assert out.ok and set(json.loads(out.output)) == {"date", "time", "timezone"}

    @pytest.mark.parametrize(("name", "args", "why"), [
        ("get_time", "{not json", "invalid arguments: Expecting property name"),
        ("get_time", "[1]", "invalid arguments: arguments must be a JSON object"),
        ("get_time", '{"zone": "UTC"}', "invalid arguments: unknown argument 'zone'"),
        ("set_volume", '{"percent": "loud"}', "invalid arguments: percent must be integer"),
        ("set_volume", '{"percent": 150}', "invalid arguments: percent must be at most 100"),
        ("set_volume", "{}", "ValueError: give either percent or change"),
        ("weather", "{}", "there is no tool named 'weather'"),
    ])
    async def test_bad_calls_become_outputs_the_model_can_speak(self, caplog, name, args,
                                                               why):
        out = await registry().run(name, args)
        assert not out.ok
        assert json.loads(out.output)["error"].startswith(f"the tool failed: {why}")
        assert len([r for r in caplog.records if f"tool {name} failed" in r.getMessage()]) == 1

    async def test_a_raising_tool_is_an_output_with_its_traceback_logged_once(self, caplog):
        async def broken() -> None:
            raise RuntimeError("sensor unplugged")
        r = Registry([Tool("broken", "d", NO_ARGS, broken)])
        out = await r.run("broken", "{}")
        assert json.loads(out.output) == {"error": "the tool failed: RuntimeError: sensor "
                                                   "unplugged"}
        assert [rec.getMessage() for rec in caplog.records] == ["tool broken raised"]

    async def test_a_hanging_tool_times_out(self):
        async def hang() -> None:
            await asyncio.Event().wait()
        r = Registry([Tool("hang", "d", NO_ARGS, hang)], timeout=0.2)
        out = await r.run("hang", "{}")
        assert json.loads(out.output) == {"error": "the tool failed: it did not finish "
                                                   "within 0.2 s"}

    async def test_end_conversation_says_so(self):
        out = await registry().run("end_conversation", "{}")
        assert out.ok and out.end_conversation

    def test_only_enabled_tools_are_offered(self):
        c = configmod.from_dict({"tools": {"enabled": ["get_time"]}})
        r = build_tools(c, volmod.Volume("", "", Gain()), timermod.Timers())
        assert list(r.tools) == ["get_time"]

    def test_config_show_lists_the_enabled_tools(self, write_config):
        r = run_speakerd("config", "--show", "--config",
                         str(write_config("[tools]\nenabled = ['get_time', 'set_timer']\n")))
        tools = [line for line in r.stdout.splitlines() if line.startswith("# tool ")]
        assert [t.split(":")[0] for t in tools] == ["# tool get_time", "# tool set_timer"]


class TestVolume:
    def test_mixer_device_follows_the_playback_card(self):
        assert volmod.mixer_device_for("plughw:CARD=seeed2micvoicec,DEV=0", "") == \
            "hw:CARD=seeed2micvoicec"
        assert volmod.mixer_device_for("hw:1,0", "") == "hw:1"
        assert volmod.mixer_device_for("default", "") == "default"
        assert volmod.mixer_device_for("default", "hw:2") == "hw:2"

    async def test_get_set_and_step_on_a_real_alsa_mixer(self, pulse):
        v = volmod.Volume("Master", "spk", Gain())
        r = registry()
        r.tools["set_volume"] = volmod.tools(v)[1]
        r.tools["get_volume"] = volmod.tools(v)[0]
        assert json.loads((await r.run("set_volume", '{"percent": 40}')).output) == {
            "percent": 40, "via": "ALSA Master"}
        assert json.loads((await r.run("set_volume", '{"change": -15}')).output)["percent"] \
            == 25
        assert json.loads((await r.run("get_volume", "{}")).output)["percent"] == 25
        assert v.set(130)["percent"] == 100  # clamped
        import alsaaudio
        assert alsaaudio.Mixer("Master", device="spk").getvolume() == [100]

    def test_no_such_control_falls_back_to_software_gain_and_says_so(self, pulse):
        gain = Gain()
        v = volmod.Volume("PCM", "spk", gain)
        assert v.set(30) == {"percent": 30, "via": "software gain",
                             "note": "no ALSA mixer control 'PCM' on spk"}
        assert gain.volume == 0.3


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TestTimers:
    def test_fires_once_at_the_right_time(self):
        clock = Clock()
        t = timermod.Timers(clock)
        t.add(60, "eggs")
        clock.now += 59.9
        assert t.pop_due() == []
        clock.now += 0.1
        assert [x.label for x in t.pop_due()] == ["eggs"]
        clock.now += 100
        assert t.pop_due() == []

    def test_a_cancelled_timer_never_fires(self):
        clock = Clock()
        t = timermod.Timers(clock)
        t.add(10, "tea")
        t.add(20, "pasta")
        assert [x.label for x in t.cancel("tea")] == ["tea"]
        clock.now += 30
        assert [x.label for x in t.pop_due()] == ["pasta"]

    async def test_tools_set_list_and_cancel(self, caplog):
        caplog.set_level("INFO", logger="speakerd.tools.timers")
        clock = Clock()
        t = timermod.Timers(clock)
        r = Registry(timermod.tools(t))
        out = json.loads((await r.run("set_timer", '{"minutes": 10, "label": "pizza"}')
                          ).output)
        assert out == {"set": "pizza", "rings_in": "10 min"}
        clock.now += 125
        assert json.loads((await r.run("list_timers", "{}")).output) == {
            "timers": [{"label": "pizza", "remaining": "7 min 55 s"}]}
        assert json.loads((await r.run("cancel_timer", '{"label": "pizza"}')).output) == {
            "cancelled": ["pizza"]}
        assert "timer 1 'pizza' set for 10 min" in caplog.text  # listed in the journal
        assert not (await r.run("set_timer", "{}")).ok

    async def test_a_due_timer_rings_its_cue_through_playback(self, tmp_path):
        out = tmp_path / "out.raw"
        drained = asyncio.Event()
        loop = asyncio.get_running_loop()
        p = pb.Playback(f"fileout:FILE={out}", loop=loop,
                        on_drained=lambda rid: drained.set())
        p.start()
        cue = make_cues()["timer"]

        def play() -> None:
            p.enqueue(cue, "cue:timer")
            p.finish("cue:timer")
        clock = Clock()
        timers = timermod.Timers(clock)
        timers.add(5, "eggs")
        ringer = timermod.Ringer(play, times=1)
        clock.now += 5
        for due in timers.pop_due():
            ringer.ring(due)
        await asyncio.wait_for(drained.wait(), 10)
        p.stop()
        assert out.read_bytes() == cue
        assert not ringer.stop()  # it rang its one time and is done


PLUGIN = '''
from speakerd.tools import Tool

async def hello(name: str = "world") -> dict:
    return {"greeting": f"hello {name}"}

def tools():
    return [Tool("hello", "Say hello.", {"type": "object", "properties":
                 {"name": {"type": "string"}}}, hello)]
'''


@pytest.fixture
def site(tmp_path):
    """A real installed distribution with entry points, as pip would leave it."""
    root = tmp_path / "site"
    (root / "speakerd_hello").mkdir(parents=True)
    (root / "speakerd_hello" / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    info = root / "speakerd_hello-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: speakerd-hello\n"
                                   "Version: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[speakerd.tools]\nhello = speakerd_hello:tools\n"
        "broken = speakerd_nothing_here:tools\n")
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    yield root
    sys.path.remove(str(root))
    sys.modules.pop("speakerd_hello", None)
    importlib.invalidate_caches()


class TestPlugins:
    async def test_installed_plugin_is_discovered_enabled_and_called(self, site, caplog):
        assert "hello" in configmod.plugin_names()
        c = configmod.from_dict({"tools": {"enabled": ["get_time", "hello", "broken"]}})
        r = build_tools(c, volmod.Volume("", "", Gain()), timermod.Timers())
        assert list(r.tools) == ["get_time", "hello"]
        out = await r.run("hello", '{"name": "kitchen"}')
        assert json.loads(out.output) == {"greeting": "hello kitchen"}
        assert ("tool plug-in broken (speakerd_nothing_here:tools) could not be loaded and "
                "is skipped: ModuleNotFoundError: No module named 'speakerd_nothing_here'"
                ) in caplog.text

    def test_daemon_sees_plugins_installed_in_its_environment(self, site, write_config):
        import subprocess
        r = subprocess.run(
            [*SPEAKERD, "config", "--show", "--config",
             str(write_config("[tools]\nenabled = ['hello']\n"))],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
            env=clean_env(PYTHONPATH=str(site)))
        assert r.returncode == 0, r.stderr
        assert "# tool hello: Say hello." in r.stdout
