"""Echo cancellation and voice barge-in as a conversation uses them: the canceller made
once for the daemon's life, put between the two audio threads while a conversation is
open, and its figures logged per answer."""

from __future__ import annotations

import logging
from typing import Protocol

from speakerd import log as logmod
from speakerd.audio.capture import Capture
from speakerd.audio.echo.canceller import EchoCanceller
from speakerd.audio.echo.micpath import MicPath
from speakerd.audio.echo.talkover import VoiceActivity
from speakerd.audio.playback import Playback

log = logging.getLogger(__name__)


class _Settings(Protocol):
    echo_cancellation: str  # "software", "device" or "off"
    barge_in: str  # "voice" or "wake_word"


class EchoWiring:
    """`configure(...)` at start-up and on SIGHUP; after each input `follow(open,
    answering)` (or `conversation(open)`, `answer_playing(on)`); `log(what)` at each
    answer's end."""

    def __init__(self, capture: Capture, playback: Playback) -> None:
        self.capture = capture
        self.playback = playback
        # One canceller for the daemon's life, so it stays adapted to the room.
        self.canceller: EchoCanceller | None = None
        self._software = False
        self._voice = False
        self._path: MicPath | None = None  # the capture thread's, while it runs

    def configure(self, echo_cancellation: str, barge_in: str) -> None:
        """Takes effect from the next conversation."""
        self._software = echo_cancellation == "software"
        self._voice = barge_in == "voice"
        if self._software and self.canceller is None:
            self.canceller = EchoCanceller()

    def follow(self, open_: bool, answering: bool) -> None:
        """After each input: is a conversation open, and an answer playing?"""
        self.conversation(open_)
        self.answer_playing(answering)

    def conversation(self, open_: bool) -> None:
        """While a conversation is open, the capture thread cancels the echo and (with
        voice barge-in) listens for the user; idle listening pays for neither."""
        canceller = self.canceller if self._software else None
        if open_ and self._path is None and (canceller or self._voice):
            self._path = MicPath(canceller, VoiceActivity() if self._voice else None)
            self.playback.echo = canceller
            self.capture.clean = self._path
        elif not open_ and self._path is not None:
            self.capture.clean = None
            self.playback.echo = None
            self._path = None
            self.log("the conversation")

    def answer_playing(self, on: bool) -> None:
        """While an answer plays, the server hears silence unless a voice is heard."""
        if self._path is not None:
            self._path.over_answer = on

    def log(self, what: str) -> None:
        if self.canceller is None:
            return
        stats = self.canceller.take_stats()
        if stats is not None and stats.seconds >= 0.5:
            log.info("echo cancellation over %s: %s", what, stats.summary(self._voice),
                     extra=logmod.fields(event="echo"))
