"""Round trip of one 80 ms audio frame through speakerd's client and the fixture server.

    .venv/bin/python bench/realtime_roundtrip.py [FRAMES]

Prints the median and p95 of append -> echoed AudioDelta back on the loop, and the
same for a bare websockets client sending the same JSON (the baseline, same run),
as a ratio.
"""

from __future__ import annotations

import asyncio
import base64
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from websockets.asyncio.client import connect

from speakerd.config import Secret
from speakerd.realtime import protocol as p
from speakerd.realtime.client import Ready, RealtimeClient
from tests.realtime_server import RealtimeServer, tone

FRAME = tone(80)


class EchoServer(RealtimeServer):
    """Answers every input_audio_buffer.append with an audio delta of the same bytes."""

    async def _on_event(self, event):
        if event.get("type") == "input_audio_buffer.append":
            await self._ws.send(json.dumps({
                "type": "response.output_audio.delta", "event_id": "e", "response_id": "r",
                "item_id": "i", "output_index": 0, "content_index": 0,
                "delta": event["audio"]}))
        else:
            await super()._on_event(event)


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


async def speakerd_client(url: str, frames: int) -> list[float]:
    got: asyncio.Queue[object] = asyncio.Queue()
    client = RealtimeClient(url=url, model="m", api_key=Secret("k" * 20, "bench"),
                            session_update=p.session_update(
                                model="m", instructions="", voice="marin",
                                turn_detection="server_vad"),
                            on_event=got.put_nowait)
    task = asyncio.create_task(client.run())
    while not isinstance(await got.get(), Ready):
        pass
    times = []
    for _ in range(frames):
        start = time.perf_counter()
        client.append_audio(FRAME)
        while not isinstance(event := await got.get(), p.AudioDelta):
            pass
        assert event.pcm == FRAME
        times.append(time.perf_counter() - start)
    client.close()
    await task
    return times


async def bare_websockets(url: str, frames: int) -> list[float]:
    async with connect(url) as ws:
        await ws.recv()  # session.created
        times = []
        for _ in range(frames):
            start = time.perf_counter()
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "event_id": "b",
                                      "audio": base64.b64encode(FRAME).decode()}))
            reply = json.loads(await ws.recv())
            base64.b64decode(reply["delta"])
            times.append(time.perf_counter() - start)
    return times


async def main(frames: int) -> None:
    async with EchoServer() as server:
        # Warm both paths up first so neither pays for the other's first-run costs.
        await bare_websockets(server.url, 100)
        await speakerd_client(server.url, 100)
        base = await bare_websockets(server.url, frames)
        ours = await speakerd_client(server.url, frames)
    for name, t in (("bare websockets (baseline)", base), ("speakerd client", ours)):
        print(f"{name:28s} median {statistics.median(t) * 1e3:6.3f} ms   "
              f"p95 {pct(t, 0.95) * 1e3:6.3f} ms   over {len(t)} frames of 80 ms")
    print(f"ratio speakerd/baseline: median {statistics.median(ours) / statistics.median(base):.2f}"
          f"  p95 {pct(ours, 0.95) / pct(base, 0.95):.2f}")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000))
