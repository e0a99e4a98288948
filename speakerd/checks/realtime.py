"""Checks of the realtime service, step by step as a conversation meets it: DNS, TCP, TLS,
the websocket handshake, session.created and session.updated, each with its latency."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import time
from urllib.parse import urlsplit

import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from speakerd import __version__
from speakerd import config as configmod
from speakerd.checks.report import Report, fail, ok, skip
from speakerd.checks.settings import KEY_FIX
from speakerd.realtime import protocol
from speakerd.realtime.client import realtime_uri

STEP_TIMEOUT = 10.0  # seconds each step may take
NETWORK_FIX = ("check the network, a firewall or proxy, and [realtime] url; is the server "
               "up?")


def _ms(started: float) -> str:
    return f"{(time.monotonic() - started) * 1000:.0f} ms"


def _why(e: BaseException) -> str:
    # asyncio words a refused connect as "Connect call failed (...)"; the errno is plainer.
    errno = getattr(e, "errno", None)
    return os.strerror(errno) if errno else str(e) or "no answer in time"


def _error_fix(code: str | None, error_type: str | None, model: str) -> str:
    key = code or error_type or ""
    if key in ("invalid_api_key", "authentication_error"):
        return KEY_FIX
    if key == "model_not_found":
        return (f"set [realtime] model to a realtime model your key may use, e.g. "
                f"gpt-realtime (now: {model})")
    if key.startswith("permission"):
        return f"use a key whose project may use the model {model}"
    if key == "insufficient_quota":
        return "add credit or raise the limit in the account's billing settings"
    return ("check [realtime] model, voice and instructions against the service's "
            "documentation")


def _status_fix(status: int, model: str) -> str:
    if status == 401:
        return KEY_FIX
    if status == 403:
        return f"use a key whose project may use the model {model}"
    if status in (400, 404):
        return f"check [realtime] url and model (now: {model})"
    return "try again later; if it persists, check the service's status page"


async def _next_event(ws: ClientConnection) -> protocol.ServerEvent:
    """The next event that matters here (others are skipped), within STEP_TIMEOUT."""
    deadline = time.monotonic() + STEP_TIMEOUT
    while True:
        frame = await asyncio.wait_for(ws.recv(), max(0.0, deadline - time.monotonic()))
        try:
            event = protocol.parse(frame)
        except protocol.ParseError:
            continue
        if not isinstance(event, (protocol.Ignored, protocol.Unknown)):
            return event


async def check(report: Report, config: configmod.Config, key: configmod.Secret | None,
                tools: list[dict[str, object]]) -> None:
    c = config.realtime
    why = configmod.check_realtime_url(c.url)
    if why:
        report.add(fail("realtime", why, "correct [realtime] url"))
        return
    parts = urlsplit(c.url)
    host = parts.hostname or ""
    tls = parts.scheme == "wss"
    port = parts.port or (443 if tls else 80)
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM),
                                       STEP_TIMEOUT)
    except (socket.gaierror, TimeoutError) as e:
        report.add(fail("realtime DNS", f"cannot resolve {host}: "
                        f"{getattr(e, 'strerror', None) or 'no answer in time'}",
                        "check the network and the DNS servers (/etc/resolv.conf), or "
                        "[realtime] url"))
        return
    address = infos[0][4][0]
    report.add(ok("realtime DNS", f"{host} is {address} ({_ms(started)})"))

    started = time.monotonic()
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(address, port),
                                           STEP_TIMEOUT)
    except (OSError, TimeoutError) as e:
        report.add(fail("realtime TCP", f"cannot connect to {address} port {port}: "
                        f"{_why(e)}", NETWORK_FIX))
        return
    report.add(ok("realtime TCP", f"connected to {address} port {port} ({_ms(started)})"))
    try:
        if tls:
            started = time.monotonic()
            try:
                await asyncio.wait_for(writer.start_tls(ssl.create_default_context(),
                                                        server_hostname=host), STEP_TIMEOUT)
            except ssl.SSLCertVerificationError as e:
                report.add(fail("realtime TLS", f"{host}'s certificate is not trusted: "
                                f"{e.verify_message}",
                                "check the clock (date) and the CA certificates "
                                "(ca-certificates); a proxy that intercepts TLS needs its CA "
                                "installed"))
                return
            except (OSError, ssl.SSLError, TimeoutError) as e:
                report.add(fail("realtime TLS", f"no TLS session with {host}: "
                                f"{e or 'no answer in time'}", NETWORK_FIX))
                return
            report.add(ok("realtime TLS", f"{host}: certificate verified ({_ms(started)})"))
        else:
            report.add(skip("realtime TLS", f"{parts.scheme}:// to a loopback address"))
    finally:
        writer.close()
    await _session(report, config, key, tools)


async def _session(report: Report, config: configmod.Config, key: configmod.Secret | None,
                   tools: list[dict[str, object]]) -> None:
    c = config.realtime
    uri = realtime_uri(c.url, c.model)
    headers = {"Authorization": f"Bearer {key.reveal()}"} if key else {}
    started = time.monotonic()
    try:
        ws = await connect(uri, additional_headers=headers, open_timeout=STEP_TIMEOUT,
                           user_agent_header=f"speakerd/{__version__} check",
                           max_size=None)
    except InvalidStatus as e:
        status = e.response.status_code
        _, why = protocol.classify_status(status)
        report.add(fail("realtime handshake", why, _status_fix(status, c.model)))
        return
    except (OSError, TimeoutError, websockets.InvalidHandshake) as e:
        report.add(fail("realtime handshake", f"{uri}: {e}", NETWORK_FIX))
        return
    report.add(ok("realtime handshake", f"{uri} ({_ms(started)})"))
    started = time.monotonic()
    try:
        step = "realtime session.created"
        event = await _next_event(ws)
        if not _expect(report, step, event, protocol.SessionCreated, c.model, started):
            return
        step = "realtime session.updated"
        started = time.monotonic()
        await ws.send(json.dumps(protocol.session_update(
            model=c.model, instructions=c.instructions, voice=c.voice,
            turn_detection=c.turn_detection, tools=tools)))
        event = await _next_event(ws)
        if _expect(report, step, event, protocol.SessionUpdated, c.model, started):
            report.add(ok(step, f"model {c.model}, voice {c.voice}, {len(tools)} tools "
                          f"({_ms(started)})"))
    except TimeoutError:
        report.add(fail(step, f"no answer in {STEP_TIMEOUT:g} s",
                        "the service is slow or the connection stalls: try again; "
                        + NETWORK_FIX))
    except ConnectionClosed as e:
        rcvd = e.rcvd
        why = (f"code {rcvd.code}" + (f": {rcvd.reason}" if rcvd.reason else "")
               if rcvd else "no close frame")
        report.add(fail(step, f"the server closed the connection ({why})",
                        "check [realtime] url and model, and the API key"))
    finally:
        await ws.close()


def _expect(report: Report, step: str, event: object, kind: type, model: str,
            started: float) -> bool:
    """True if `event` is the `kind` awaited; else a FAIL line saying what came instead."""
    if isinstance(event, kind):
        if kind is protocol.SessionCreated:
            report.add(ok(step, f"{_ms(started)} after the handshake"))
        return True
    if isinstance(event, protocol.ServerError):
        _, why = protocol.classify_error(event.type, event.code)
        report.add(fail(step, f"{why} ({event.code or event.type}: {event.message})",
                        _error_fix(event.code, event.type, model)))
    else:
        report.add(fail(step, f"expected {step.split()[-1]}, got {type(event).__name__}",
                        "is [realtime] url an OpenAI Realtime API (GA) endpoint?"))
    return False
