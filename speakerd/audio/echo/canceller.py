"""Software echo cancellation: what the speaker plays in, the microphone without it out.

The playback thread hands over exactly what it gives ALSA (after gain), stamped with
the time its first frame will be heard, read off the device's frame clock; it is
resampled to 16 kHz into a ring indexed by that time. The capture thread, for each
80 ms microphone frame, takes the reference that played over the same moment and
runs WebRTC's AEC3 (pywebrtc-audio) on the pair. Both ends are placed by the clock,
not by a queue's length, so a gap in playback (between answers, an underrun, a
flush) leaves zeros in the reference where nothing played and the pairing is right
again on the next frame. A microphone frame's time is an upper bound (its samples
can only be older than the read that returned them), so the reference paired with it
always leads the echo, which AEC3 needs; it tolerates a lead of a few hundred ms.

One canceller lives for the daemon's life, so it stays adapted to the room across
turns and conversations; it only runs while a conversation is open.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field

import numpy as np

from speakerd.audio import resample, speex_echo
from speakerd.audio.echo.delay import SINC_TAPS, EchoDelay, fractional_delay
from speakerd.audio.echo.reference import (
    ACTIVE_DBFS,
    RATE,
    Reference,
    dbfs,
    loudest_dbfs,
)
from speakerd.audio.echo.talkover import TalkOver

log = logging.getLogger(__name__)

FRAME_SAMPLES = 1280  # 80 ms, the capture frame
# Extra lead on top of what the clocks give (soxr's filter delay is ~1 ms).
LEAD_MS = 10
CAPTURE_SLACK_MS = 30
# The microphone's clock going earlier means the reference handed with each frame
# leads the echo by more than it must: harmless to AEC3 up to a few hundred ms, and
# every realignment costs it a moment of echo. So only past this much.
CAPTURE_LEAD_SLACK_MS = 150
# A read returns its samples late by however long the thread, the driver or a sound
# server kept them (PulseAudio here: bursts up to 100 ms late, more under load). The
# microphone's frame clock is the lower envelope of the readings: it follows an
# earlier reading at once and rises by at most CAPTURE_DRIFT (a clock running slow
# by that much; USB sound cards are within 0.1 ms/s), so late bursts never move it.
CAPTURE_DRIFT = 0.0005  # seconds per second
# Every reading this much above the envelope for CAPTURE_STUCK_FRAMES: samples were
# lost (an overrun), and the envelope starts again from the readings.
CAPTURE_LOST_S = 0.15
CAPTURE_STUCK_FRAMES = 25  # 2 s
# A gap this long between frames: a new stream (a new conversation, an overrun).
CAPTURE_GAP_S = 0.5
# The filter's tail: SPEEX_LEAD (delay.py) plus the room's reverberation.
SPEEX_TAIL = 3200  # 200 ms
# After the speex filter resumes it holds stale history for a tail's length; after a
# shift it re-learns the little that moved: no barge-in meanwhile.
RESUME_FRAMES = 4
SHIFT_FRAMES = 20


# Why voice barge-in waited over a frame of echo, most basic first.
MEASURING = "measuring the echo's delay"
MOVED = "the echo moved"
LEARNING = "learning the room"
TOO_LITTLE = "the filter removed too little"
RELEARNING = "relearning after a misfit"


@dataclass(frozen=True, slots=True)
class EchoStats:
    """What the canceller did since the last take_stats()."""

    seconds: float  # of microphone audio while the speaker played
    mic_dbfs: float  # its power before cancellation
    out_dbfs: float  # and after
    realigned: int  # times either stream was moved back onto its clock
    listening: float = 0.0  # fraction of the frames with echo where a voice could be heard
    linear_db: float = 0.0  # the echo speex's filter removes (what the detector hears)
    # Seconds of echo over which voice barge-in waited, by reason (MEASURING, ...).
    held: tuple[tuple[str, float], ...] = ()
    # How close echo alone came to being taken for a voice: dB that the loudest 100 ms
    # of one detector window lacked (inf when the detector was never armed, negative
    # when it got there and the candidate had to be explained away).
    headroom_db: float = math.inf
    explained: int = 0  # voice-like candidates taken for echo
    echo_s: float = 0.0  # of frames the detector saw with echo in them

    @property
    def reduction_db(self) -> float:
        return self.mic_dbfs - self.out_dbfs

    def summary(self, voice: bool) -> str:
        """The journal's line on it; `voice`: with voice barge-in, what it heard."""
        line = (f"{self.reduction_db:.0f} dB removed from {self.seconds:.1f} s of microphone "
                f"audio while the speaker played ({self.mic_dbfs:.0f} -> "
                f"{self.out_dbfs:.0f} dBFS)")
        if not voice:
            return line
        line += (f"; a voice over it could be heard during {self.listening:.0%} of it (the "
                 f"barge-in filter removes {self.linear_db:.0f} dB)")
        if self.held:
            line += (f"; voice barge-in waited {sum(s for _, s in self.held):.1f} s: "
                     + ", ".join(f"{s:.1f} s {why}" for why, s in self.held))
        if self.explained:
            line += f"; {self.explained} voice-like sound(s) in it were echo"
        if self.headroom_db != math.inf:
            line += f"; echo alone came within {max(self.headroom_db, 0):.0f} dB of a voice"
        return line


@dataclass(slots=True)
class _Tally:
    """What EchoStats reports, as the capture thread adds it up (under the lock)."""

    mic_energy: float = 0.0
    out_energy: float = 0.0
    active_samples: int = 0
    echo_frames: int = 0
    heard_frames: int = 0
    held: dict[str, int] = field(default_factory=dict)
    closest: float = -math.inf
    explained: int = 0
    linear_db: float = 0.0


class EchoCanceller:
    """The microphone side: `process(frame, end_time)` in the capture thread.

    Carry on with the frame it returns (the wake-word detector, the socket). Stats
    for the journal: `take_stats()` from any thread.
    """

    def __init__(self, *, lead_ms: float = LEAD_MS, noise_suppression: bool = True) -> None:
        from pywebrtc_audio import AudioProcessor  # only when "software" is configured

        self.reference = Reference()
        self._aec = AudioProcessor(sample_rate=RATE, echo_cancellation=True,
                                   noise_suppression=noise_suppression)
        self._lead = lead_ms / 1000
        self._cursor: int | None = None  # 16 kHz index of the next frame's reference
        # The microphone's frame clock: frames since the stream began, and the
        # recent readings of the time its first sample was captured.
        self._mic_samples = 0
        self._start: float | None = None  # the envelope: when sample 0 was captured
        self._above = 0  # readings in a row far above it
        self._last_end = -math.inf
        # What take_stats() reports: added up by the capture thread, taken by the loop.
        self._lock = threading.Lock()
        self._tally = _Tally()
        self.realigned = 0
        self.frames = 0
        # Voice over the echo: speex's linear filter on the reference shifted by the
        # measured delay, and a detector on what it leaves.
        self.delay = EchoDelay()
        self.onset = False  # set by process(): a voice began over the echo in this frame
        # The frame as best kept for a voice over the echo: speex's output (the voice
        # whole, a little echo left) when it ran, else AEC3's.
        self.voice = np.zeros(FRAME_SAMPLES, np.float32)
        self._speex: speex_echo.LinearEcho | None = None
        try:
            self._speex = speex_echo.LinearEcho(rate=RATE, tail=SPEEX_TAIL)
        except speex_echo.SpeexUnavailable as e:
            # AEC3's output is no substitute: its suppressor takes a voice over the
            # echo down with it and lets it through only in the answer's pauses.
            log.warning("voice barge-in is off: %s; the wake word and the talk button "
                        "still interrupt an answer (sudo apt install libspeexdsp1)", e)
        self.talk = TalkOver(passthrough=self._speex.passthrough() if self._speex else None)
        self._hold = 0  # frames before the detector may fire again
        self._moved = 0  # samples the microphone's clock moved the reference since
        self._seen_runs = 0
        self._explained = 0  # talk.explained when last added to the tally

    def played(self, samples: np.ndarray, rate: int, heard_at: float,
               written_at: float | None = None) -> None:
        """Playback thread: see Reference.played."""
        self.reference.played(samples, rate, heard_at, written_at)

    def flushed(self) -> None:
        """Playback thread: the device dropped what it held."""
        self.reference.clear()

    def ran_dry(self) -> None:
        """Playback thread: the device ran out of audio (an underrun)."""
        self.reference.ran_dry()

    def process(self, frame: bytes, end_time: float) -> tuple[bytes, np.ndarray]:
        """One 80 ms s16le frame whose last sample was captured no later than
        `end_time` (monotonic) -> (the cleaned frame, as s16le and as float)."""
        mic = resample.s16_to_float(frame)
        n = mic.size
        if end_time - self._last_end > CAPTURE_GAP_S:
            self._mic_samples = 0
            self._start = None
        dt = max(0.0, end_time - self._last_end)
        self._last_end = end_time
        self._mic_samples += n
        # A reading is never earlier than the truth, only later.
        reading = end_time - self._mic_samples / RATE
        if self._start is None or reading < self._start:
            self._start, self._above = reading, 0
        else:
            self._start += min(reading - self._start, CAPTURE_DRIFT * dt)
            self._above = self._above + 1 if reading - self._start > CAPTURE_LOST_S else 0
            if self._above >= CAPTURE_STUCK_FRAMES:
                log.debug("microphone samples were lost: its clock starts again")
                self._start, self._above = reading, 0
        start = self._start
        want = round((start + self._mic_samples / RATE + self._lead) * RATE) - n
        if self._cursor is None or want - self._cursor > CAPTURE_SLACK_MS * RATE / 1000 \
                or self._cursor - want > CAPTURE_LEAD_SLACK_MS * RATE / 1000:
            if self._cursor is not None:
                self.realigned += 1
                self._moved += want - self._cursor
                log.debug("microphone clock realigned by %+.0f ms",
                          (want - self._cursor) * 1000 / RATE)
            self._cursor = want
        ref = self.reference.take(self._cursor, n)
        self._cursor += n
        out = self._aec.process(mic, ref)
        self.frames += 1
        self.voice = out  # replaced by speex's output when it ran
        self.onset = self._talk_over(mic, out, self._cursor)
        if dbfs(ref) > ACTIVE_DBFS:
            mic_e = float(np.sum(np.square(mic, dtype=np.float64)))
            out_e = float(np.sum(np.square(out, dtype=np.float64)))
            with self._lock:
                self._tally.mic_energy += mic_e
                self._tally.out_energy += out_e
                self._tally.active_samples += n
        return resample.float_to_s16(out), out

    def _count(self, held: str | None) -> None:
        """A frame of echo: whether a voice could have been heard over it, or why not."""
        talk = self.talk
        closest = talk.take_closest()
        explained, self._explained = talk.explained - self._explained, talk.explained
        with self._lock:
            t = self._tally
            t.echo_frames += 1
            if held is None:
                t.heard_frames += 1
            else:
                t.held[held] = t.held.get(held, 0) + 1
            t.closest = max(t.closest, closest)
            t.explained += explained
            t.linear_db = -talk.ratio

    def _talk_over(self, mic: np.ndarray, out: np.ndarray, cursor: int) -> bool:
        """Does a voice begin over the echo in this frame? `cursor`: the reference
        index just after the frame (before any measured shift)."""
        n = mic.size
        if self._speex is None:
            return False
        if self.reference.runs != self._seen_runs:
            # The speaker started, ran dry or was flushed: the delay is unconfirmed
            # until measured again.
            self._seen_runs = self.reference.runs
            self.delay.unconfirm()
            self.talk.resumed()
        if self._moved:
            # The microphone's clock was corrected: the same echo now pairs with a
            # reference that much later, exactly. Follow it at once, before speex
            # learns the wrong path; the next measures confirm.
            self.delay.moved(self._moved)
            self._moved = 0
            self._hold = max(self._hold, RESUME_FRAMES)
        if self.delay.feed(mic, self.reference, cursor):
            self._hold = max(self._hold, SHIFT_FRAMES)
        whole = math.floor(self.delay.offset)
        start = cursor - n - whole
        # Anything played from half a second before this frame's echo (the room's
        # reverberation) up to now, wherever the echo turns out to be; the frame's own
        # echo (speex's reference, with SINC_TAPS either side) is in it, at RATE // 2.
        head = RATE // 2
        recent = self.reference.take(start - head,
                                     max(cursor, start + n + SINC_TAPS) - start + head)
        echo_now = loudest_dbfs(recent) > ACTIVE_DBFS
        if not self.delay.confirmed:
            # Speex would learn the wrong echo path: it stays as it was, and only a
            # microphone with no echo in it can be listened to.
            self._hold = max(self._hold, RESUME_FRAMES)
            if echo_now:
                self.talk.reset()
                self._count(MEASURING)
                return False
            return self.talk.update(mic, mic, echo=False)
        if not echo_now:
            # Nothing to cancel; and speex, fed silence as the reference and a voice
            # as the microphone, would drift from the room it learned.
            self._hold = max(self._hold, RESUME_FRAMES)
            return self.talk.update(mic, mic, echo=False)
        ref = fractional_delay(recent[head - SINC_TAPS:head + n + SINC_TAPS],
                               self.delay.offset - whole)
        linear = self.voice = self._speex.process(mic, ref)
        if self._hold:
            self._hold -= 1
            self.talk.reset()
            self._count(MOVED)
            return False
        talk = self.talk
        held = (TOO_LITTLE if talk.ratio >= talk.adapted else LEARNING if not talk.armed
                else RELEARNING if talk.relearning else None)
        onset = talk.update(mic, linear, echo=True, playing=dbfs(ref) > ACTIVE_DBFS)
        self._count(held)
        if onset:
            t = self.talk
            log.debug("a voice over the echo: the filter leaves %.0f dB of the microphone "
                      "(%.0f dB on echo alone), correlation with its prediction %.2f, echo "
                      "%.0f ms behind", t.onset_db, t.ratio, t.correlation,
                      self.delay.lag_ms or 0.0)
        return onset

    def take_stats(self) -> EchoStats | None:
        """What the canceller did since the last call; None if the speaker played
        nothing and no frame of echo was seen."""
        with self._lock:
            t = self._tally
            if not (t.active_samples or t.echo_frames):
                return None
            self._tally = _Tally(linear_db=t.linear_db)
        n = max(t.active_samples, 1)
        frame_s = FRAME_SAMPLES / RATE
        return EchoStats(t.active_samples / RATE,
                         10 * math.log10(max(t.mic_energy / n, 1e-20)),
                         10 * math.log10(max(t.out_energy / n, 1e-20)),
                         self.realigned + self.reference.realigned,
                         t.heard_frames / t.echo_frames if t.echo_frames else 0.0,
                         t.linear_db,
                         tuple((why, frames * frame_s) for why, frames in t.held.items()),
                         self.talk.margin - t.closest, t.explained, t.echo_frames * frame_s)
