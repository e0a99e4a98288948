"""Twenty conversations back to back through `speakerd run` leave nothing behind: the
driver of bench/soak.py (which runs 200), with the fixture server as the model."""

from __future__ import annotations

from pathlib import Path

from bench.soak import kind_of, soak

from .conftest import SPEAKERD
from .test_e2e import prerequisites  # noqa: F401  (a fixture)

CONVERSATIONS = 20


async def test_twenty_conversations_return_fds_and_threads_to_their_start(
        tmp_path: Path, prerequisites):  # noqa: F811
    d, server, checkpoints = await soak(tmp_path, prerequisites, CONVERSATIONS,
                                        every=CONVERSATIONS, command=SPEAKERD)
    (_, start), (done, end) = checkpoints
    # Both taken idle with the speaker device closed (after "released after").
    assert done == CONVERSATIONS
    assert (end.fds, end.threads) == (start.fds, start.threads), checkpoints
    assert d.proc is not None and d.proc.returncode == 0
    assert "Traceback" not in d.text
    assert server.invalid == []
    # converse() waited for each answer to play out; count them once more from the
    # log: two per conversation, one where the first answer was cut off by a barge-in.
    kinds = [kind_of(n) for n in range(CONVERSATIONS)]
    assert {"plain", "tool", "barge-in"} <= set(kinds)
    answered = sum(1 if k == "barge-in" else 2 for k in kinds)
    assert d.text.count("audio_playing -> listening: response") == answered
    assert d.text.count("-> listening: barge-in by wake word") == kinds.count("barge-in")
    assert d.text.count("idle -> connecting") == CONVERSATIONS
    assert len(server.handshakes) == CONVERSATIONS
