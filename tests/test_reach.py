"""The background retry after a failed connection: real sockets on 127.0.0.1, real DNS."""

from __future__ import annotations

import asyncio
import logging
import random
import socket

from speakerd.realtime import reach
from speakerd.realtime.client import Backoff


def refused_port() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    return s


async def test_one_try_says_why_or_none():
    with refused_port() as s:
        url = f"ws://127.0.0.1:{s.getsockname()[1]}/v1/realtime"
        assert "ConnectionRefusedError" in await reach.try_once(url)
        s.listen()
        assert await reach.try_once(url) is None
    assert "gaierror" in await reach.try_once("wss://realtime.speakerd.invalid/v1")


async def test_retries_with_back_off_until_the_service_answers_and_says_so_once(caplog):
    with refused_port() as s:
        url = f"ws://127.0.0.1:{s.getsockname()[1]}/v1/realtime"
        with caplog.at_level(logging.DEBUG, logger="speakerd.realtime.reach"):
            task = asyncio.create_task(reach.until_reachable(
                url, Backoff(attempts=0, first=0.01, cap=0.05), random.Random(1)))

            async def tried(n: int) -> None:
                while caplog.text.count("still cannot reach 127.0.0.1") < n:
                    await asyncio.sleep(0.01)
            await asyncio.wait_for(tried(3), 10)
            s.listen()  # the network is back
            tries = await asyncio.wait_for(task, 10)
    assert tries >= 4
    assert caplog.text.count("answers again") == 1
    assert f"answers again (after {tries} tries in the background" in caplog.text
