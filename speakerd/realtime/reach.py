"""After a conversation could not reach the realtime service: try again in the background.

The person has been told already; nobody waits on this. A try is a TCP connect and,
for wss://, a TLS handshake: no websocket, no realtime session, nothing billed. It
goes on with back-off until the service answers, which the journal then says once,
or until the next wake word tries for real (the caller cancels it then).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from urllib.parse import urlsplit

from speakerd import log as logmod
from speakerd.realtime.client import Backoff

log = logging.getLogger(__name__)

RETRY = Backoff(attempts=0, first=2.0, cap=60.0)  # attempts: unbounded here


async def try_once(url: str, timeout: float = 10.0) -> str | None:
    """None if the service's host answers (TCP, and TLS for wss://); else why not."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    tls = parts.scheme == "wss"
    port = parts.port or (443 if tls else 80)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(
            host, port, ssl=ssl.create_default_context() if tls else None,
            server_hostname=host if tls else None), timeout)
    except (OSError, TimeoutError) as e:
        return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    writer.close()
    with contextlib.suppress(OSError):  # the peer went first: it answered all the same
        await writer.wait_closed()
    return None


async def until_reachable(url: str, backoff: Backoff = RETRY,
                          rng: random.Random | None = None) -> int:
    """Try `url` with back-off until it answers; log that once; return the tries it took."""
    rng = rng or random.Random()
    host = urlsplit(url).hostname or "?"
    started = time.monotonic()
    tries = 0
    while True:
        await asyncio.sleep(backoff.delay(tries, rng))
        tries += 1
        why = await try_once(url)
        if why is None:
            log.info("the realtime service at %s answers again (after %d tries in the "
                     "background, %.0f s); the next wake word connects", host, tries,
                     time.monotonic() - started, extra=logmod.fields(event="reachable"))
            return tries
        log.debug("background try %d: still cannot reach %s (%s)", tries, host, why)
