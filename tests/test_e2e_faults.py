"""The realtime server going away mid-answer, through `speakerd run` (see test_e2e.py):
what arrived is played, the conversation ends, and the next wake word starts afresh."""

from __future__ import annotations

import pytest

from . import test_e2e
from .realtime_server import RealtimeServer, Reply
from .test_e2e import Speaker, request, tone_blocks

prerequisites = test_e2e.prerequisites  # the fixture, for the tests of this module

END_CUE_HZ = 587.0  # the end cue's second, falling tone (speakerd/audio/cues.py)


@pytest.mark.parametrize(("fault", "reason"), [
    (Reply(audio_ms=6000, close_after_ms=2000),
     "server closed the connection (code 1000)"),
    (Reply(audio_ms=6000, drop_after_ms=2000, reset=True),
     "connection lost without a close frame"),
], ids=["close-frame", "tcp-reset"])
async def test_server_gone_mid_answer_plays_what_came_and_the_next_wake_word_is_answered(
        tmp_path, prerequisites, fault: Reply, reason: str) -> None:
    server = RealtimeServer(vad=True, replies=[fault, Reply(audio_ms=1000)])
    async with server:
        # No spoken "something went wrong" after the cut answer: it is speech, and
        # would count as tone here (tests/test_e2e_phrases.py checks it is said).
        spk = Speaker(tmp_path, prerequisites, server,
                      "[conversation]\nfollow_up_seconds = 2\n[phrases]\nenabled = false\n")
        await spk.start()
        try:
            spk.say(request("what is the weather today"), "ask")
            await spk.wait_log("responding -> audio_playing: connection closed, finishing "
                               "the answer", timeout=60)
            # Well inside the session's 20 s response timeout: the Disconnected, not
            # that timeout, is what ends the conversation.
            await spk.wait_log(f"audio_playing -> idle: conversation over: connection lost "
                               f"({reason})", timeout=15)
            spk.say(request("what time is it"), "again")
            await spk.wait_log("idle -> connecting", count=2)
            first = spk.heard()  # the first answer and its end cue have played by now
            await spk.wait_log("audio_playing -> listening", timeout=60)
            await spk.wait_log("listening -> idle: conversation over: no follow-up")
        finally:
            assert spk.stop() == 0
    assert server.invalid == []
    assert len(server.handshakes) == 2  # a new connection for the new conversation
    heard_first = tone_blocks(first)
    assert 18 <= heard_first <= 21, heard_first  # the 2 s that arrived, not more
    assert tone_blocks(first, END_CUE_HZ, block=1200) >= 1  # the conversation's end cue
    assert tone_blocks(spk.heard()) - heard_first >= 9  # the second answer (1 s) too
    transitions = spk.transitions()
    first_end = transitions.index("audio_playing -> idle") + 1
    assert transitions[:2] == ["idle -> connecting", "connecting -> listening"]
    assert transitions[first_end - 2:first_end + 2] == [
        "responding -> audio_playing", "audio_playing -> idle",
        "idle -> connecting", "connecting -> listening"]
    assert "Traceback" not in spk.log
    assert "Task exception was never retrieved" not in spk.log
