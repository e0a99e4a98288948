"""What the capture thread does to each frame while a conversation is open."""

from __future__ import annotations

import collections
from dataclasses import dataclass

from speakerd.audio import resample
from speakerd.audio.echo.canceller import EchoCanceller
from speakerd.audio.echo.talkover import VoiceActivity


@dataclass(frozen=True, slots=True)
class VoiceOnset:
    """Someone began to talk over the cleaned microphone (handed to the loop)."""


class MicPath:
    """What the capture thread does to each frame while a conversation is open:
    cancel the echo (if a canceller is given), and with voice barge-in (a detector
    is given) listen for a voice over the answer. Called as Capture.clean:
    (frame, end_time) -> (what to stream, onset).

    While the answer plays the server gets silence: its own turn detection would take
    any echo left for the user's next turn and answer it (create_response is on). Only
    when the detector hears a voice does the stream open, with the last HELD_FRAMES
    frames first (kept as `voice`, the voice whole), so the words that barged in reach
    the server too.
    """

    HELD_FRAMES = 5  # 400 ms: the detector is sure of a voice 150-300 ms into it

    def __init__(self, canceller: EchoCanceller | None, vad: VoiceActivity | None) -> None:
        self.canceller = canceller
        self.vad = vad
        # Set from the loop while an answer plays with the mic open (voice barge-in).
        self.over_answer = False
        self._held: collections.deque[bytes] = collections.deque(maxlen=self.HELD_FRAMES)
        self._open = False  # a voice was heard over this answer: stream it

    def __call__(self, frame: bytes, end_time: float) -> tuple[bytes, VoiceOnset | None]:
        if self.canceller is not None:
            frame, _ = self.canceller.process(frame, end_time)
            voice = resample.float_to_s16(self.canceller.voice)
            onset = self.canceller.onset
        elif self.vad is not None:
            voice = frame
            onset = self.vad.update(resample.s16_to_float(frame))
        else:
            return frame, None
        if self.vad is None or not self.over_answer:
            self._held.clear()
            self._open = False
            return frame, None
        self._held.append(voice)
        if not (onset or self._open):
            return bytes(len(frame)), None
        self._open = True
        held = b"".join(self._held)
        self._held.clear()
        return held, VoiceOnset() if onset else None
