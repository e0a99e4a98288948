"""`speakerd check`: the doctor's checklist, one line per check, in the order a speaker
needs things: config and key, the service, audio, MCP servers, the realtime service, GPIO."""

from __future__ import annotations

import asyncio
from typing import Any, TextIO

from speakerd.checks import audio, echo, gpio, mcp, realtime, service, settings
from speakerd.checks.report import Report, ok, skip, warn
from speakerd.control import client as control
from speakerd.errors import EX_OK, EX_SOFTWARE

DEFAULT_LISTEN = 5.0


def run(config_path: str, *, listen: float = DEFAULT_LISTEN, offline: bool = False,
        control_path: str | None = None, pin_factory: Any = None,
        out: TextIO | None = None) -> int:
    """Run every check, printing as it goes; 0 when nothing FAILed, else 1."""
    from speakerd.audio.device import quiet_alsa_lib
    quiet_alsa_lib()  # the check lines say what alsa-lib would mumble
    report = Report(out)
    config = settings.check_config(report, config_path)
    if config is None:
        return EX_SOFTWARE
    key = settings.check_key(report, config)
    service.check(report)
    path = control.client_path(control_path)
    status = _running(report, path)
    if status is not None:
        audio.from_daemon(report, config, status, listen, path)
        if config.audio.echo_cancellation == "software":
            report.add(skip("echo", "the running speakerd holds the speaker; to measure the "
                            "echo: sudo systemctl stop speakerd, check, then start it"))
    elif audio.check(report, config, listen):
        echo.check(report, config)
    elif config.audio.echo_cancellation == "software":
        report.add(skip("echo", "needs both the microphone and the speaker"))
    mcp_tools = mcp.check(report, config, status)
    if offline:
        report.add(skip("realtime", "--offline"))
    else:
        asyncio.run(realtime.check(report, config, key, _tool_schemas(config) + mcp_tools))
    gpio.check(report, config, running=status is not None, pin_factory=pin_factory)
    return EX_SOFTWARE if report.failed else EX_OK


def _running(report: Report, path: str) -> dict[str, Any] | None:
    """The running speakerd's status, or None when none answers on `path`."""
    try:
        status = control.ask(path, {"request": "status"})
    except control.Denied as e:
        report.add(warn("speakerd", f"runs, but will not answer: {e}".rstrip(),
                        f"{control.HINT}; meanwhile check opens the devices itself"))
        return None
    except control.Unreachable as e:
        why = str(e).removeprefix("speakerd ")
        if why.startswith("is not running"):
            report.add(ok("speakerd", f"{why}: check opens the devices itself"))
        else:  # there, but stuck: its devices are likely busy too
            report.add(warn("speakerd", why, "journalctl -u speakerd -n 20 says why; "
                            "sudo systemctl restart speakerd"))
        return None
    if not status.get("ok"):
        report.add(warn("speakerd", f"runs, but refused status: {status.get('error')}",
                        "journalctl -u speakerd -n 20 says why"))
        return None
    report.add(ok("speakerd", f"running (pid {status.get('pid')}, {status.get('status')}): "
                  "it holds the devices, so the audio figures come from it"))
    return status


def _tool_schemas(config: Any) -> list[dict[str, object]]:
    """The tools a conversation would offer, as `speakerd config --show` lists them."""
    from speakerd.tools import catalog
    return list(catalog.listed(config).schemas())
