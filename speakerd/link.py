"""The conversation's connection to the realtime service: opened and closed as the
session says, its events turned into the session's inputs, the microphone's frames
sent up it while the session streams them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from speakerd import session as s
from speakerd.audio import capture as capmod
from speakerd.audio import resample
from speakerd.config import Config, Secret
from speakerd.control.stats import Stats
from speakerd.realtime import client as clientmod
from speakerd.realtime import protocol
from speakerd.sounds import Sounds

log = logging.getLogger(__name__)


class Link:
    """`connect(...)` for a conversation (Connect), `close()`, `send(event)`,
    `stream(on, ...)`; every event of the current connection reaches `on_input` as the
    session's input. An earlier conversation's socket, still closing, is not heard."""

    def __init__(self, *, on_input: Callable[[object], None], stats: Stats,
                 spawn: Callable[[Coroutine[Any, Any, Any], str], asyncio.Task[Any]]) -> None:
        self._on_input = on_input
        self._stats = stats
        self._spawn = spawn
        self.client: clientmod.RealtimeClient | None = None
        self.sounds: Sounds | None = None  # its phrases are recorded on the connection
        self._resampler: resample.Resampler | None = None
        self._turn: dict[str, float] = {}  # timings of the current turn, for the debug log

    def connect(self, config: Config, tools: list[dict[str, Any]],
                api_key: Secret | None) -> None:
        c = config.realtime
        update = protocol.session_update(model=c.model, instructions=c.instructions,
                                         voice=c.voice, turn_detection=c.turn_detection,
                                         tools=tools,
                                         transcription_model=config.log.transcription_model
                                         if config.log.transcripts else "")
        client = clientmod.RealtimeClient(
            url=c.url, model=c.model, api_key=api_key, session_update=update,
            on_event=lambda event: self._event(client, event))
        self.client = client
        if self.sounds:
            self.sounds.tried_for_real()  # this conversation tries for real
            if self.sounds.phrases:
                self.sounds.phrases.forget_recordings()

        async def run() -> None:
            try:
                await client.run()
            finally:
                if self.client is client:  # it ended without saying so: say it for it
                    self._event(client, clientmod.Disconnected(
                        "the connection ended without a word (a bug in speakerd)"))
        self._spawn(run(), "realtime")

    def close(self) -> None:
        if self.client:
            self.client.close()

    def forget(self) -> None:
        """Start over: close the connection and hear nothing more of it."""
        self.close()
        self.client = None
        self._resampler = None

    def send(self, event: dict[str, Any]) -> None:
        if self.client:
            self.client.send(event)

    def stream(self, on: bool, capture: capmod.Capture, after_frame: int = -1) -> None:
        """Start (with the pre-roll after `after_frame`) or stop sending the mic."""
        if on:
            self._resampler = resample.Resampler(capmod.RATE, protocol.SAMPLE_RATE)
        preroll = capture.stream(on, after_frame)
        if not on:
            self._resampler = None
        for frame in preroll:
            self.mic_frame(frame)

    def mic_frame(self, frame: bytes) -> None:
        if self.client is None or self._resampler is None:
            return
        x = self._resampler(resample.s16_to_float(frame))
        self.client.append_audio(resample.float_to_s16(x))

    def _event(self, client: clientmod.RealtimeClient, event: object) -> None:
        if client is not self.client:
            return  # a socket of an earlier conversation, still closing
        phrases = self.sounds.phrases if self.sounds else None
        if phrases and phrases.take(event):
            return  # a phrase being recorded, outside the conversation
        self._stats.realtime(event, client.ready)
        self._trace(event)
        if isinstance(event, clientmod.Ready):
            self._on_input(s.SessionReady())
            # Idle and cheap now, before the user's turn: record one missing phrase.
            ask = phrases.ask() if phrases else None
            if ask is not None:
                client.send(ask)
        elif isinstance(event, clientmod.Disconnected):
            self.client = None
            self._on_input(s.Disconnected(event.reason, event.unrecoverable, event.cause))
        else:
            self._on_input(event)

    def _trace(self, event: object) -> None:
        """The per-turn timing a person needs to see why a turn felt slow (debug)."""
        now = time.monotonic()
        t = self._turn
        if isinstance(event, protocol.SpeechStarted):
            t.clear()
            t["speech"] = now
        elif isinstance(event, protocol.SpeechStopped):
            t["spoken_ms"] = (now - t.get("speech", now)) * 1000
            t["stopped"] = now
        elif (isinstance(event, protocol.AudioDelta) and "first_audio" not in t
              and "stopped" in t):
            t["first_audio"] = now
            log.debug("turn: user spoke %.0f ms; first audio of response %s came %.0f ms "
                      "after the end of speech", t.get("spoken_ms", 0), event.response_id,
                      (now - t["stopped"]) * 1000)
