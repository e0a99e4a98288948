"""The realtime client against a real websockets server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from typing import Any

import pytest

from speakerd import log as logmod
from speakerd.config import Secret
from speakerd.realtime import protocol as p
from speakerd.realtime.client import Backoff, Disconnected, Ready, RealtimeClient

from .realtime_server import RealtimeServer, Reply, tone

KEY = "test-key-NOT-sk-shaped-0123456789abcdef"
# Any event the client may carry: it sends what it is given.
COMMIT = {"type": "input_audio_buffer.commit"}


class Injected(Exception):
    """The bug a test plants in the client's caller."""


class Harness:
    """A client wired to a queue of what it reports, run as a task.

    `fail_on=SomeType`: the on_event callback raises `Injected` when handed an event
    of that type (after recording it), as a buggy caller would.
    """

    def __init__(self, url: str, *, fail_on: type | None = None, **kw: Any) -> None:
        self.events: asyncio.Queue[object] = asyncio.Queue()
        self.seen: list[object] = []
        self.fail_on = fail_on
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
        if self.fail_on is not None and isinstance(event, self.fail_on):
            raise Injected(f"on_event failed on {type(event).__name__}")

    async def next(self, kind: type, timeout: float = 20) -> object:
        async def find() -> object:
            while True:
                event = await self.events.get()
                if isinstance(event, kind):
                    return event
        return await asyncio.wait_for(find(), timeout)

    async def finish(self) -> Disconnected:
        self.client.close()
        return await self.ended()

    async def ended(self, timeout: float = 20) -> Disconnected:
        """run() returned (no exception) and its last report, its only Disconnected."""
        await asyncio.wait_for(self.task, timeout)
        return self.last_report()

    def last_report(self) -> Disconnected:
        last = self.seen[-1]
        assert isinstance(last, Disconnected), self.seen[-3:]
        assert sum(isinstance(e, Disconnected) for e in self.seen) == 1, self.seen
        return last

    def audio(self) -> bytes:
        return b"".join(e.pcm for e in self.seen if isinstance(e, p.AudioDelta))


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
        h.client.send(COMMIT)
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
                                    unrecoverable=True, cause=p.KEY_REFUSED)
        assert len(server.handshakes) == 1

    @pytest.mark.parametrize(("status", "cause"), [(429, p.QUOTA), (404, p.FAILED),
                                                   (403, p.KEY_REFUSED)])
    async def test_quota_and_unknown_model_are_one_attempt_and_say_the_cause(
            self, status, cause, caplog):
        async with RealtimeServer(reject_status=status) as server:
            h = Harness(server.url)
            gone = await h.ended(timeout=5)
        assert gone.unrecoverable and gone.cause == cause
        assert f"HTTP {status}" in gone.reason and f"HTTP {status}" in caplog.text
        assert len(server.handshakes) == 1

    async def test_a_name_that_does_not_resolve_is_one_attempt_and_unreachable(self):
        h = Harness("wss://realtime.speakerd.invalid/v1/realtime")
        started = time.monotonic()
        gone = await h.ended(timeout=20)
        print(f"\n.invalid host reported after {time.monotonic() - started:.3f} s")
        assert gone.unrecoverable and gone.cause == p.UNREACHABLE
        assert gone.reason.startswith("cannot reach realtime.speakerd.invalid: name "
                                      "resolution failed: "), gone.reason
        assert not any("retrying" in str(e) for e in h.seen)

    async def test_a_server_that_never_answers_the_handshake_is_retried_until_closed(
            self, caplog):
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()  # the kernel accepts the TCP connection; nobody ever answers
            port = s.getsockname()[1]
            h = Harness(f"ws://127.0.0.1:{port}/v1/realtime", open_timeout=0.3,
                        backoff=Backoff(attempts=100, first=0.05, cap=0.1))
            with caplog.at_level(logging.INFO, logger="speakerd.realtime.client"):
                await asyncio.wait_for(self._logged(caplog, "retrying the realtime "
                                                    "connection"), 10)
                # The session's slow-network deadline: close() cuts the attempt short.
                h.client.close()
                gone = await h.ended(timeout=2)
        assert gone == Disconnected("closed by speakerd before connecting")
        assert "no answer to the handshake within 0.3 s" in caplog.text

    @staticmethod
    async def _logged(caplog, text: str) -> None:
        while text not in caplog.text:
            await asyncio.sleep(0.02)

    async def test_close_cuts_a_hanging_handshake_short(self):
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            port = s.getsockname()[1]
            h = Harness(f"ws://127.0.0.1:{port}/v1/realtime", open_timeout=60)
            h.client.append_audio(b"\x00\x00" * 24 * 700)  # said after the wake word
            await asyncio.sleep(0)  # the attempt is under way
            h.client.close()
            gone = await h.ended(timeout=2)  # not the 60 s open_timeout
        assert gone == Disconnected("closed by speakerd before connecting")

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

    async def test_nothing_listening_is_reported_at_once_and_the_preroll_dropped(
            self, caplog):
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # bound, not listening: connections are refused
            h = Harness(f"ws://127.0.0.1:{port}/v1/realtime",
                        backoff=Backoff(attempts=5, first=0.5))
            h.client.append_audio(b"\x00\x00" * 24 * 400)  # 400 ms said after the wake
            with caplog.at_level(logging.INFO, logger="speakerd.realtime.client"):
                gone = await h.ended(timeout=2)  # no 0.5 s back-off: one attempt
        assert gone.reason.startswith("cannot reach 127.0.0.1: connection refused: ")
        assert gone.unrecoverable and gone.cause == p.UNREACHABLE
        assert ("dropped 400 ms of what was said after the wake word: the session never "
                "came up") in caplog.text

    @pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
    async def test_drop_mid_response_reports_the_reason(self, server, reset):
        server.replies.append(Reply(audio_ms=3000, drop_after_ms=500, reset=reset))
        h = Harness(server.url)
        await h.next(Ready)
        h.client.send(COMMIT)
        gone = await h.ended(timeout=5)
        assert gone == Disconnected("connection lost without a close frame")
        assert h.audio() == tone(3000)[:len(tone(500))]  # all that came before the drop

    async def test_server_close_reports_code_and_reason(self, server):
        h = Harness(server.url)
        await h.next(Ready)
        await server.close(1011, "internal error")
        gone = await h.ended(timeout=5)
        assert gone == Disconnected("server closed the connection (code 1011: internal error)")

    @pytest.mark.parametrize(("code", "why", "reason"), [
        (1000, "", "server closed the connection (code 1000)"),
        (1001, "going away", "server closed the connection (code 1001: going away)"),
        (1011, "internal error", "server closed the connection (code 1011: internal error)"),
    ])
    async def test_server_close_mid_answer_keeps_the_audio_and_reports_why(
            self, server, code, why, reason):
        server.replies.append(Reply(audio_ms=6000, close_after_ms=2000, close_code=code,
                                    close_reason=why))
        h = Harness(server.url)
        await h.next(Ready)
        h.client.send(COMMIT)
        gone = await h.ended(timeout=5)
        assert gone == Disconnected(reason)
        assert h.audio() == tone(6000)[:len(tone(2000))]  # all that came before the close
        assert not any(isinstance(e, p.ResponseDone) for e in h.seen)

    async def test_a_server_that_stops_answering_pings_is_found_out_in_time(self, server):
        interval, timeout, close = 0.3, 0.3, 0.3
        h = Harness(server.url, ping_interval=interval, ping_timeout=timeout,
                    close_timeout=close)
        await h.next(Ready)
        server.stop_answering()
        deaf = time.monotonic()
        # A ping is due within `interval`, its pong within `timeout`; then the close
        # frame speakerd sends goes unanswered for `close` before the socket is cut.
        limit = interval + timeout + close
        gone = await h.ended(timeout=limit + 1.0)
        took = time.monotonic() - deaf
        assert gone == Disconnected("the connection failed: keepalive ping timeout "
                                    "(speakerd sent close code 1011, got none)")
        assert took < limit + 0.5, took

    @pytest.mark.parametrize("fail_on", [Ready, p.AudioDelta, Disconnected])
    async def test_a_bug_in_the_event_handler_is_logged_once_and_ends_the_socket(
            self, server, caplog, fail_on):
        server.replies.append(Reply(audio_ms=1000))
        h = Harness(server.url, fail_on=fail_on)
        if fail_on is not Ready:
            await h.next(Ready)
            h.client.send(COMMIT)
            await h.next(p.AudioDelta)
        if fail_on is Disconnected:
            h.client.close()
        gone = await h.ended(timeout=5)  # run() itself raised nothing
        await server.wait_until(server.closed, timeout=5)
        if fail_on is Disconnected:
            assert gone == Disconnected("closed by speakerd")
        else:
            assert gone == Disconnected("speakerd's realtime client failed: Injected: "
                                        f"on_event failed on {fail_on.__name__}")
            assert [e for e in h.seen if isinstance(e, fail_on)] == [h.seen[-2]]  # no more
        logged = [r for r in caplog.records if r.exc_info]
        assert len(logged) == 1, caplog.text
        assert logged[0].name == "speakerd.realtime.client"
        assert logged[0].exc_info[0] is Injected  # with its traceback
        assert caplog.text.count("Traceback") == 1

    async def test_cancelled_run_reports_one_disconnected_and_closes_the_socket(
            self, server):
        server.replies.append(Reply(audio_ms=4000, speed=1))
        h = Harness(server.url)
        await h.next(Ready)
        h.client.send(COMMIT)
        await h.next(p.AudioDelta)
        h.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(h.task, 5)
        assert h.last_report() == Disconnected("the realtime client was cancelled")
        await server.wait_until(server.closed, timeout=5)

    async def test_cancelled_while_connecting_reports_one_disconnected(self):
        accepted = asyncio.Event()

        async def never_answer(reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter) -> None:
            accepted.set()
            await reader.read()  # the handshake request, then EOF when the client gives up
            writer.close()

        silent = await asyncio.start_server(never_answer, "127.0.0.1", 0)
        async with silent:
            port = silent.sockets[0].getsockname()[1]
            h = Harness(f"ws://127.0.0.1:{port}/v1/realtime")
            await asyncio.wait_for(accepted.wait(), 5)
            h.task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(h.task, 5)
        assert h.last_report() == Disconnected("the realtime client was cancelled")

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
        h.client.send(COMMIT)
        await h.next(p.ResponseDone)
        await h.finish()
    finally:
        logging.getLogger().handlers.clear()
    err = capsys.readouterr().err
    assert "Authorization: Bearer ****" in err  # websockets did log the header, masked
    assert KEY not in err
