"""What the speaker plays that is not an answer: earcons (cues) and the spoken status
phrases, on the answers' playback path under ids the session never hears of."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from speakerd import log as logmod
from speakerd import phrases as phrasesmod
from speakerd.audio import cues as cuesmod
from speakerd.audio.playback import Playback
from speakerd.config import Config
from speakerd.phrase_cache import PhraseCache
from speakerd.realtime import protocol
from speakerd.realtime import reach as reachmod

log = logging.getLogger(__name__)

ASIDE = "cue:"  # playback ids of cues and phrases: not the conversation's


def is_aside(response_id: str) -> bool:
    return response_id.startswith(ASIDE)


class Sounds:
    """`cue(name)` and `say(situation, fallback_cue)`; `configure(config)` at start-up
    and on SIGHUP (new words or a new voice are rendered anew). Once the person has been
    told the service cannot be reached, it is tried quietly in the background until it
    answers (the journal says when); `tried_for_real()` stops that."""

    def __init__(self, playback: Playback, cache: PhraseCache | None, *,
                 spawn: Callable[[Coroutine[Any, Any, Any], str], asyncio.Task[Any]]) -> None:
        self.playback = playback
        self._cache = cache
        self._spawn = spawn
        self._ids = itertools.count(1)
        self._cues = cuesmod.make_cues()
        self.phrases: phrasesmod.Phrases | None = None
        self._url = ""
        self._retrying: asyncio.Task[Any] | None = None

    def configure(self, config: Config) -> None:
        self._url = config.realtime.url
        p = self.phrases
        if p is None or (p.config, p.voice) != (config.phrases, config.realtime.voice):
            self.phrases = phrasesmod.Phrases(config.phrases, self._cache,
                                              config.realtime.voice)
            self.phrases.load_cached()
            # In the background: a few espeak-ng runs, ~0.1 s here.
            self._spawn(self.phrases.render(), "phrases")

    def cue(self, name: str) -> None:
        self._play(self._cues[name], name)

    def say(self, situation: str, fallback_cue: str | None) -> None:
        """The phrase for `situation`, else the earcon, else nothing."""
        self._retry_in_background(situation)
        got = self.phrases.pcm(situation) if self.phrases else None
        if got is None:
            if fallback_cue:
                self.cue(fallback_cue)
            return
        pcm, voice = got
        log.info("saying the %s phrase (%s, %.1f s)", situation, voice,
                 len(pcm) / protocol.BYTES_PER_MS / 1000,
                 extra=logmod.fields(event="phrase"))
        self._play(pcm, f"phrase:{situation}")

    def tried_for_real(self) -> None:
        """A conversation connects for real: no quiet retry meanwhile."""
        if self._retrying is not None:
            self._retrying.cancel()
            self._retrying = None

    def _play(self, pcm: bytes, name: str) -> None:
        rid = f"{ASIDE}{name}:{next(self._ids)}"
        self.playback.enqueue(pcm, rid)
        self.playback.finish(rid)

    def _retry_in_background(self, situation: str) -> None:
        """The person was told the service cannot be reached: keep trying it quietly, so
        the journal says when it is back (retries never happen in front of the person)."""
        if situation != protocol.UNREACHABLE or self._retrying is not None:
            return
        self._retrying = self._spawn(reachmod.until_reachable(self._url), "realtime-retry")
        self._retrying.add_done_callback(self._retry_ended)

    def _retry_ended(self, task: asyncio.Task[Any]) -> None:
        if self._retrying is task:
            self._retrying = None
