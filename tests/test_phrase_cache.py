"""Status phrases in the assistant's own voice: the file cache, the out-of-band recording,
and through `speakerd run` (see test_e2e.py): made once per phrase and voice, played
byte-exact after a restart, made again for a new voice or when the file is damaged."""

from __future__ import annotations

import logging
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
from openai.types import realtime as rt
from pydantic import TypeAdapter

from speakerd import phrases
from speakerd.config import PhrasesConfig
from speakerd.phrase_cache import PhraseCache
from speakerd.realtime import protocol as p

from . import test_e2e
from .conftest import ROOT, SPEAKERD, clean_env
from .realtime_server import RealtimeServer
from .test_e2e import KEY, Speaker, request
from .test_e2e_phrases import find, port

prerequisites = test_e2e.prerequisites  # the fixture, for the tests of this module

CLIENT_EVENT = TypeAdapter(rt.RealtimeClientEvent)
TEXT = "Sorry, I can't reach the internet right now."


def voice_of_the_model(text: str) -> bytes:
    """What the fixture 'model' says for `text`: a sweep whose start depends on the
    text, distinct from every earcon and from espeak-ng, and the same every time."""
    n = 24000 * 3 // 2
    t = np.arange(n) / 24000
    f0 = 300 + 10 * (sum(map(ord, text)) % 40)
    phase = 2 * math.pi * (f0 * t + 200 * t**2)
    return (6000 * np.sin(phase)).astype("<i2").tobytes()


class TestCacheFile:
    def test_a_recording_is_read_back_as_written(self, tmp_path):
        cache = PhraseCache(tmp_path / "phrases")
        pcm = voice_of_the_model(TEXT)
        path = cache.store("marin", TEXT, pcm)
        assert path.stat().st_mode & 0o777 == 0o600
        assert cache.load("marin", TEXT) == pcm

    def test_another_voice_or_wording_is_another_recording(self, tmp_path):
        cache = PhraseCache(tmp_path)
        cache.store("marin", TEXT, b"\x01\x00" * 100)
        assert cache.path("cedar", TEXT) != cache.path("marin", TEXT)
        assert cache.load("cedar", TEXT) is None
        assert cache.load("marin", TEXT + "!") is None

    @pytest.mark.parametrize(("damage", "why"), [
        (lambda b: b[:-100], "truncated: "),
        (lambda b: b[:-101] + bytes([b[-101] ^ 1]) + b[-100:], "corrupt: its checksum"),
        (lambda b: b[:30], "truncated in its header"),
        (lambda b: b"RIFF" + b[4:], "not a phrase recording"),
    ], ids=["truncated", "flipped-bit", "header-cut", "other-file"])
    def test_a_damaged_file_is_ignored_removed_and_logged(self, tmp_path, caplog, damage,
                                                          why):
        cache = PhraseCache(tmp_path)
        path = cache.store("marin", TEXT, voice_of_the_model(TEXT))
        path.write_bytes(damage(path.read_bytes()))
        assert cache.load("marin", TEXT) is None
        assert not path.exists()  # made again next time, not tripped over again
        assert f"ignored the phrase recording {path} ({why}" in caplog.text


def events(rid: str, situation: str, pcm: bytes, said: str, status: str = "completed"):
    return [p.ResponseCreated(rid, situation), p.OutputItemAdded(rid, "it", "message"),
            p.AudioDelta(rid, "it", 0, pcm[:1000]), p.AudioDelta(rid, "it", 0, pcm[1000:]),
            p.AudioDone(rid, "it"), p.TranscriptDone(rid, "it", said),
            p.ResponseDone(rid, status, ())]


class TestRecording:
    def test_one_missing_phrase_is_asked_for_once_out_of_band(self, tmp_path):
        store = phrases.Phrases(PhrasesConfig(key_refused=""), PhraseCache(tmp_path), "marin")
        ask = store.ask()
        assert ask is not None
        model = CLIENT_EVENT.validate_python(ask)  # what the real service accepts
        assert model.response.conversation == "none" and model.response.input == []
        assert ask["response"]["metadata"] == {"speakerd_phrase": p.UNREACHABLE}
        assert ask["response"]["audio"]["output"]["voice"] == "marin"
        assert f'"{TEXT}"' in ask["response"]["instructions"]
        asked = [store.ask() for _ in range(5)]
        # Each other phrase once (not the empty one), then nothing: never twice a run.
        assert [a and a["response"]["metadata"]["speakerd_phrase"] for a in asked] == [
            p.QUOTA, p.FAILED, p.MUTED, None, None]

    def test_the_recording_is_claimed_kept_and_used(self, tmp_path, caplog):
        cache = PhraseCache(tmp_path)
        store = phrases.Phrases(PhrasesConfig(), cache, "marin")
        pcm = voice_of_the_model(TEXT)
        with caplog.at_level(logging.INFO, logger="speakerd.phrases"):
            assert all(store.take(e) for e in events("r9", p.UNREACHABLE, pcm,
                                                       "Sorry, I can't reach the internet "
                                                       "right now."))
        assert store.pcm(p.UNREACHABLE) == (pcm, "model voice")
        assert cache.load("marin", TEXT) == pcm
        assert "recorded the unreachable phrase in the assistant's voice (marin, 1.5 s)" \
            in caplog.text
        # The conversation's own responses are not claimed.
        assert not store.take(p.ResponseCreated("r10"))
        assert not store.take(p.AudioDelta("r10", "x", 0, b"\x00\x00"))

    @pytest.mark.parametrize(("said", "status", "why"), [
        ("Sorry, I cannot connect. Anything else?", "completed", "not say the unreachable "
         "phrase verbatim"),
        (TEXT, "cancelled", "ended cancelled"),
    ], ids=["not-verbatim", "cancelled"])
    def test_a_recording_that_is_not_the_phrase_is_not_kept(self, tmp_path, caplog, said,
                                                            status, why):
        store = phrases.Phrases(PhrasesConfig(), PhraseCache(tmp_path), "marin")
        for e in events("r1", p.UNREACHABLE, voice_of_the_model(TEXT), said, status):
            store.take(e)
        assert store.pcm(p.UNREACHABLE) is None  # espeak-ng was not rendered here
        assert not list(tmp_path.iterdir())
        assert why in caplog.text


class Stateful(Speaker):
    """`speakerd run` with a state directory, as the unit gives it (StateDirectory=)."""

    def __init__(self, tmp_path: Path, pulse, server: RealtimeServer, state: Path,
                 extra: str = "", url: str = "") -> None:
        super().__init__(tmp_path, pulse, server, extra)
        if url:
            self.config.write_text(self.config.read_text().replace(server.url, url))
        self.state = state

    async def start(self) -> None:
        self.speaker_start = len(self.pulse.speaker_bytes())
        self.log_path.write_bytes(b"")
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [*SPEAKERD, "run", "--config", str(self.config)], cwd=ROOT, stderr=log,
                env=clean_env(OPENAI_API_KEY=KEY, STATE_DIRECTORY=str(self.state)))
        await self.wait_log("started: config")


# Two phrases only, so that which one a conversation records is known.
PHRASES = ('[phrases]\nquota = ""\nfailed = ""\nmuted = ""\n'
           "[conversation]\nfollow_up_seconds = 1\n")


async def conversation(tmp: Path, pulse, state: Path, voice: str = "marin"
                       ) -> tuple[RealtimeServer, str]:
    """One conversation through the fixture server: (the server, speakerd's log)."""
    server = RealtimeServer(vad=True, phrase_audio=voice_of_the_model)
    async with server:
        spk = Stateful(tmp, pulse, server, state, PHRASES)
        spk.config.write_text(spk.config.read_text().replace(
            f'url = "{server.url}"', f'url = "{server.url}"\nvoice = "{voice}"'))
        await spk.start()
        try:
            spk.say(request("what is the weather today"), "ask")
            await spk.wait_log("conversation over: no follow-up", timeout=60)
        finally:
            assert spk.stop() == 0
    assert server.invalid == []
    return server, spk.log


def asked(server: RealtimeServer) -> list[str]:
    return [o["metadata"]["speakerd_phrase"] for o in server.out_of_band]


async def test_made_once_per_phrase_and_voice_kept_across_restarts_and_remade_when_damaged(
        tmp_path, prerequisites):
    pulse = prerequisites
    state = tmp_path / "state"
    state.mkdir()
    cache = PhraseCache(state / "phrases")

    # 1. The first conversation records the first phrase, right after session.updated.
    server, log = await conversation(tmp_path, pulse, state)
    assert asked(server) == [p.UNREACHABLE]
    types = server.types()
    # Right after the session came up (and the pre-roll went out), before any turn.
    assert set(types[:types.index("response.create")]) == {"session.update",
                                                           "input_audio_buffer.append"}
    assert "recorded the unreachable phrase in the assistant's voice (marin, 1.5 s)" in log
    assert cache.load("marin", TEXT) == voice_of_the_model(TEXT)

    # 2. After a restart, offline: the recording is what the person hears, byte for byte.
    with port(listen=False) as sock:
        async with RealtimeServer() as unused:
            spk = Stateful(tmp_path, pulse, unused, state, PHRASES,
                           url=f"ws://127.0.0.1:{sock.getsockname()[1]}/v1/realtime")
            await spk.start()
            try:
                start = len(pulse.speaker_bytes()) // 2
                spk.say(request("what time is it"), "offline")
                await spk.wait_log("saying the unreachable phrase (model voice, 1.5 s)")
                await spk.wait_log("error -> idle: error shown")
            finally:
                assert spk.stop() == 0
    want = np.frombuffer(voice_of_the_model(TEXT), "<i2")
    x = np.frombuffer(pulse.speaker_bytes()[start * 2:], "<i2")
    at, score = find(x.astype(np.float64), want[:12000].astype(np.float64))
    assert score > 0.99
    assert np.array_equal(x[at:at + want.size], want)  # the cached PCM, byte-exact

    # 3. The next conversation records the next phrase, not that one again.
    server, log = await conversation(tmp_path, pulse, state)
    assert asked(server) == [p.KEY_REFUSED]

    # 4. A new voice: new recordings.
    server, log = await conversation(tmp_path, pulse, state, voice="cedar")
    assert asked(server) == [p.UNREACHABLE]
    assert server.out_of_band[0]["audio"]["output"]["voice"] == "cedar"
    assert cache.load("marin", TEXT) is not None  # the old voice's stay

    # 5. A truncated file is ignored at start-up and made again.
    path = cache.path("cedar", TEXT)
    path.write_bytes(path.read_bytes()[:-500])
    server, log = await conversation(tmp_path, pulse, state, voice="cedar")
    assert f"ignored the phrase recording {path} (truncated: " in log
    assert asked(server) == [p.UNREACHABLE]
    assert cache.load("cedar", TEXT) == voice_of_the_model(TEXT)
    assert KEY not in log
