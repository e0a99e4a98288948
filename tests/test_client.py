"""The realtime client against a real websockets server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random

import pytest

from speakerd import log as logmod
from speakerd.config import Secret
from speakerd.realtime import protocol as p
from speakerd.realtime.client import Backoff, Disconnected, Ready, RealtimeClient

from .realtime_server import RealtimeServer, Reply, tone

KEY = "test-key-NOT-sk-shaped-0123456789abcdef"


class Harness:
    """A client wired to a queue of what it reports, run as a task."""

    def __init__(self, url: str, **kw) -> None:
        self.events: asyncio.Queue[object] = asyncio.Queue()
        self.seen: list[object] = []
        kw.setdefault("backoff", Backoff(attempts=3, first=0.05, cap=1.0))
        self.update = p.session_update(model="gpt-realtime", instructions="Be brief.",
                                       voice="marin", turn_detection="server_vad")
        self.client = RealtimeClient(url=url, model="gpt-realtime",
                                     api_key=Secret(KEY, "test"),
                                     session_update=self.update, on_event=self._put,
                                     rng=random.Random(1), **kw)
        self.task = asyncio.create_task(self.client.run())

    def _put(self, event: object) -> None:
        self.seen.append(event)
        self.events.put_nowait(event)

    async def next(self, kind: type, timeout: float = 20) -> object:
        async def find() -> object:
            while True:
                event = await self.events.get()
                if isinstance(event, kind):
                    return event
        return await asyncio.wait_for(find(), timeout)

    async def finish(self) -> Disconnected:
        self.client.close()
        await asyncio.wait_for(self.task, 20)
        last = self.seen[-1]
        assert isinstance(last, Disconnected)
        assert sum(isinstance(e, Disconnected) for e in self.seen) == 1
        return last


@pytest.fixture
async def server():
    s = RealtimeServer()
    async with s:
        yield s
    assert s.invalid == [], s.invalid


class TestSession:
    async def test_handshake_carries_bearer_key_and_model(self, server):
        h = Harness(server.url)
        await h.next(Ready)
        (_, headers), = server.handshakes
        assert headers["Authorization"] == f"Bearer {KEY}"
        assert headers["User-Agent"].startswith("speakerd/")
        assert h.client.uri == server.url + "?model=gpt-realtime"
        await h.finish()

    async def test_session_update_sent_once_after_created_and_matches_config(self, server):
        h = Harness(server.url)
        await h.next(Ready)
        updates = server.of_type("session.update")
        assert len(updates) == 1
        assert updates[0].event == h.update
        assert server.types()[0] == "session.update"
        assert await h.finish() == Disconnected("closed by speakerd")

    async def test_audio_round_trip(self, server):
        answer = tone(1200, 330)
        server.replies.append(Reply(pcm=answer))
        h = Harness(server.url)
        await h.next(Ready)
        said = tone(400, 220)
        for i in range(0, len(said), 3840):
            h.client.append_audio(said[i:i + 3840])
        h.client.send(p.input_audio_commit())
        done = await h.next(p.ResponseDone)
        got = b"".join(e.pcm for e in h.seen if isinstance(e, p.AudioDelta))
        assert got == answer
        assert done.status == "completed" and done.function_calls == ()
        import base64
        sent = b"".join(base64.b64decode(r.event["audio"])
                        for r in server.of_type("input_audio_buffer.append"))
        assert sent == said
        await h.finish()

    async def test_pre_roll_is_flushed_in_order_byte_exact(self, server):
        import base64
        h = Harness(server.url)
        said = tone(1500, 200)  # said while the socket is still being set up
        chunks = [said[i:i + 1920] for i in range(0, len(said), 1920)]
        for c in chunks:
            h.client.append_audio(c)
        await h.next(Ready)
        after = tone(300, 500)
        h.client.append_audio(after)
        await server.wait_for("input_audio_buffer.append", len(chunks) + 1)
        appends = server.of_type("input_audio_buffer.append")
        assert b"".join(base64.b64decode(r.event["audio"]) for r in appends) == said + after
        types = server.types()
        assert types.index("session.update") < types.index("input_audio_buffer.append")
        await h.finish()

    async def test_pre_roll_is_bounded_and_drops_the_oldest(self, server, caplog):
        import base64
        h = Harness(server.url, preroll_seconds=0.5)
        said = tone(1000, 200)
        for i in range(0, len(said), 2400):  # 50 ms chunks
            h.client.append_audio(said[i:i + 2400])
        await h.next(Ready)
        appends = await server.wait_for("input_audio_buffer.append", 10)
        assert b"".join(base64.b64decode(r.event["audio"]) for r in appends) == said[-24000:]
        assert "pre-roll overflowed: dropped the oldest 500 ms of speech" in caplog.text
        await h.finish()


class TestFailures:
    async def test_401_is_one_attempt_and_unrecoverable(self):
        async with RealtimeServer(reject_status=401) as server:
            h = Harness(server.url)
            gone = await h.next(Disconnected)
            await asyncio.wait_for(h.task, 5)
        assert gone == Disconnected("the API key was refused (HTTP 401): check the key",
                                    unrecoverable=True)
        assert len(server.handshakes) == 1

    async def test_503_retries_with_growing_delays_then_connects(self):
        async with RealtimeServer(reject_status=[503, 503, 503]) as server:
            h = Harness(server.url, backoff=Backoff(attempts=5, first=0.1, jitter=0.1))
            await h.next(Ready)
            times = [t for t, _ in server.handshakes]
            await h.finish()
        assert len(times) == 4
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert gaps[0] >= 0.09 and gaps[1] > gaps[0] and gaps[2] > gaps[1], gaps

    async def test_retries_give_up_with_the_last_reason(self):
        async with RealtimeServer(reject_status=[503] * 10) as server:
            h = Harness(server.url, backoff=Backoff(attempts=3, first=0.01))
            gone = await h.next(Disconnected)
        assert gone == Disconnected("no connection after 3 attempts; last: server error "
                                    "(HTTP 503)")
        assert len(server.handshakes) == 3

    async def test_nothing_listening_is_retried_then_reported(self):
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # bound, not listening: connections are refused
            h = Harness(f"ws://127.0.0.1:{port}/v1/realtime",
                        backoff=Backoff(attempts=2, first=0.01))
            gone = await h.next(Disconnected)
        assert gone.reason.startswith("no connection after 2 attempts; last: cannot reach "
                                      "127.0.0.1: ")
        assert not gone.unrecoverable

    async def test_drop_mid_response_reports_the_reason(self, server):
        server.replies.append(Reply(audio_ms=3000, drop_after_ms=500))
        h = Harness(server.url)
        await h.next(Ready)
        h.client.send(p.input_audio_commit())
        gone = await h.next(Disconnected)
        assert gone == Disconnected("connection lost without a close frame")
        assert any(isinstance(e, p.AudioDelta) for e in h.seen)
        await asyncio.wait_for(h.task, 5)

    async def test_server_close_reports_code_and_reason(self, server):
        h = Harness(server.url)
        await h.next(Ready)
        await server.connections[-1].close(1011, "internal error")
        gone = await h.next(Disconnected)
        assert gone == Disconnected("server closed the connection (code 1011: internal error)")

    async def test_oversize_frame_closes_cleanly_with_a_logged_reason(self, server, caplog):
        h = Harness(server.url, max_frame_bytes=1 << 20)
        await h.next(Ready)
        await server.send_raw('{"type": "x", "pad": "' + "x" * (20 << 20) + '"}')
        gone = await h.next(Disconnected)
        reason = ("the server sent a frame over 1048576 bytes; speakerd closed the "
                  "connection")
        assert gone == Disconnected(reason)
        assert reason in caplog.text

    async def test_plain_ws_to_a_remote_host_is_refused_without_connecting(self):
        h = Harness("ws://example.com/v1/realtime")
        gone = await h.next(Disconnected)
        assert gone.unrecoverable
        assert gone.reason.startswith("plain ws:// to example.com would send the API key "
                                      "unencrypted")

    async def test_garbage_is_logged_and_survived(self, server, caplog):
        import base64
        h = Harness(server.url)
        await h.next(Ready)
        await server.send_raw("{not json")
        await server.send_raw('{"type": "response.teleport", "event_id": "x"}')
        await server.send_raw('{"type": "response.output_audio.delta", "response_id": "r",'
                              ' "item_id": "i", "content_index": 0, "delta": "%%%"}')
        await server.send_raw(b"\x00\x01binary")
        good = base64.b64encode(b"\x01\x00").decode()
        await server.send_raw('{"type": "response.output_audio.delta", "response_id": "r",'
                              f' "item_id": "i", "content_index": 0, "delta": "{good}"}}')
        delta = await h.next(p.AudioDelta)
        assert delta.pcm == b"\x01\x00"
        assert "bad server event (frame): not valid JSON" in caplog.text
        assert ("bad server event response.output_audio.delta.delta: not valid base64; "
                "ignored it") in caplog.text
        assert "ignored a binary frame of 8 bytes" in caplog.text
        assert not any(isinstance(e, (p.Unknown, Disconnected)) for e in h.seen)
        await h.finish()

    async def test_active_response_error_arrives_as_a_survivable_event(self, server):
        server.replies.append(Reply(audio_ms=2000, speed=5))
        h = Harness(server.url)
        await h.next(Ready)
        h.client.send(p.response_create())
        await h.next(p.ResponseCreated)
        second = p.response_create()
        h.client.send(second)
        err = await h.next(p.ServerError)
        assert err.code == "conversation_already_has_active_response"
        assert err.event_id == second["event_id"]
        assert p.classify_error(err.type, err.code)[0] is p.Severity.SURVIVABLE
        await h.next(p.ResponseDone)
        await h.finish()


async def test_key_never_reaches_the_log_even_at_debug(server, capsys):
    logmod.setup("debug", [KEY], use_journal=False)
    logging.getLogger("websockets").setLevel(logging.DEBUG)  # it logs request headers
    try:
        h = Harness(server.url)
        await h.next(Ready)
        h.client.send(p.input_audio_commit())
        await h.next(p.ResponseDone)
        await h.finish()
    finally:
        logging.getLogger().handlers.clear()
    err = capsys.readouterr().err
    assert "Authorization: Bearer ****" in err  # websockets did log the header, masked
    assert KEY not in err
