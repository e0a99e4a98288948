"""The echo canceller and the voice detector in a synthetic room, on espeak-ng speech.

The room: what the speaker plays, 40 ms later at the microphone, through a
reverberant tail (RT60 0.3 s), louder than the user. The two threads' clocks are
simulated: the playback side stamps each 20 ms piece with the time it is heard, the
capture side each 80 ms frame with a time a little later than the truth (a read
returns after its samples were captured), exactly as the real threads do.
"""

from __future__ import annotations

import numpy as np
import pytest
import soxr

from speakerd.audio import echo
from speakerd.audio.echo import EchoCanceller, VoiceActivity, dbfs

from .conftest import need
from .speech import have_espeak, silence, speak

R = 16000
DEVICE_RATE = 24000
PIECE = DEVICE_RATE // 50  # the playback thread writes 20 ms periods
T0 = 1000.0  # monotonic seconds at the start of the simulation
ANSWERS = [
    "The weather tomorrow will be sunny with a high of twenty two degrees and a light "
    "breeze from the west.",
    "Your timer for the pasta is set for eleven minutes, I will ring when it is done.",
    "The capital of Australia is Canberra, not Sydney, which many people believe.",
]
USER = "No, I meant the weather on Saturday."


def room_impulse(rng: np.random.Generator, delay_ms: float = 40, rt60: float = 0.3
                 ) -> np.ndarray:
    n = int(R * rt60)
    t = np.arange(n) / R
    h = rng.standard_normal(n) * np.exp(-6.9 * t / rt60) * 0.05
    h[0] = 1.0
    h /= np.sqrt(np.sum(h ** 2))
    return np.concatenate([np.zeros(int(R * delay_ms / 1000)), h])


def level(x: np.ndarray, peak: float) -> np.ndarray:
    return (x / np.abs(x).max() * peak).astype(np.float32)


class Room:
    """Runs a canceller over a timeline: what plays (at 16 kHz on the timeline, sent
    to the canceller at 24 kHz in 20 ms pieces), echo and user at the microphone."""

    def __init__(self, played: np.ndarray, user: np.ndarray | None = None, *,
                 echo_gain_db: float = -6.0, seed: int = 5,
                 capture_late_ms: tuple[float, float] = (2, 25)) -> None:
        rng = np.random.default_rng(seed)
        self.played = played
        echo_path = np.convolve(played, room_impulse(rng))[:played.size]
        self.echo = (echo_path * 10 ** (echo_gain_db / 20)).astype(np.float32)
        self.user = user if user is not None else np.zeros_like(played)
        self.mic = (self.echo + self.user + rng.standard_normal(played.size).astype(
            np.float32) * 3e-4)
        self.rng = rng
        self.late = capture_late_ms

    def run(self, canceller: EchoCanceller, *, vad: VoiceActivity | None = None,
            sent: np.ndarray | None = None, jump: tuple[int, float] = (0, 0.0)
            ) -> tuple[np.ndarray, list[int]]:
        """-> (the cleaned microphone, frame indexes where the detector fired).

        `sent`: what the playback thread hands over, if not the timeline itself;
        `jump` (16 kHz index of `sent`, seconds): from there on, each piece is heard
        that much later than its frame count says, as after an underrun."""
        sent = self.played if sent is None else sent
        device = soxr.resample(sent, R, DEVICE_RATE).astype(np.float32)
        pieces = [(i, device[i:i + PIECE]) for i in range(0, device.size, PIECE)]
        out, onsets, p = [], [], 0
        for f in range(self.mic.size // 1280):
            end = T0 + (f + 1) * 1280 / R
            # The playback thread is ahead of the microphone by its buffer (120 ms).
            while p < len(pieces):
                i, piece = pieces[p]
                heard = T0 + i / DEVICE_RATE + (jump[1] if i * R // DEVICE_RATE >= jump[0]
                                                and jump[1] else 0)
                if heard >= end + 0.12:
                    break
                # avail() is read a little after the write.
                canceller.played(piece, DEVICE_RATE, heard + self.rng.uniform(0, 0.004))
                p += 1
            late = self.rng.uniform(*self.late) / 1000
            frame = self.mic[f * 1280:(f + 1) * 1280]
            _, clean = canceller.process(echo_pcm(frame), end + late)
            out.append(clean)
            if vad and vad.update(clean) and canceller.trusted:
                onsets.append(f)
        return np.concatenate(out), onsets


def echo_pcm(x: np.ndarray) -> bytes:
    return np.clip(np.rint(x * 32768), -32768, 32767).astype("<i2").tobytes()


def answers(gap_seconds: float = 1.0) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The model's answers with silence between; -> (timeline, [(start, end)])."""
    parts, spans, pos = [], [], 0
    for text in ANSWERS:
        x = level(speak(text, voice="en-us+f3"), 0.5)
        parts += [x, silence(gap_seconds)]
        spans.append((pos, pos + x.size))
        pos += x.size + int(gap_seconds * R)
    return np.concatenate(parts), spans


def reduction(room: Room, clean: np.ndarray, span: tuple[int, int]) -> float:
    a, b = span
    return dbfs(room.mic[a:b]) - dbfs(clean[a:b])


@pytest.fixture(autouse=True)
def _espeak() -> None:
    need(have_espeak(), "espeak-ng")


class TestEchoReduction:
    def test_echo_is_removed_from_the_first_answer_and_more_once_adapted(self) -> None:
        played, spans = answers()
        room = Room(played)
        clean, _ = room.run(EchoCanceller())
        figures = [reduction(room, clean, s) for s in spans]
        print("echo reduction per answer (dB):", ", ".join(f"{r:.1f}" for r in figures))
        # A fresh AEC3 converges within the first second or so of the first answer.
        assert figures[0] >= 10
        assert min(figures[1:]) >= 30

    def test_stats_report_the_reduction_while_the_speaker_played(self) -> None:
        played, spans = answers()
        room = Room(played)
        canceller = EchoCanceller()
        room.run(canceller)
        stats = canceller.take_stats()
        assert stats is not None
        print(f"stats: {stats.seconds:.1f} s of playback, {stats.reduction_db:.1f} dB")
        speech_seconds = sum(b - a for a, b in spans) / R
        # Counted while the reference is loud: the answers, not the pauses.
        assert speech_seconds * 0.6 < stats.seconds < speech_seconds + 3 * 0.3
        assert stats.reduction_db >= 15
        assert canceller.take_stats() is None  # taken: nothing new since

    def test_the_canceller_stays_adapted_across_a_long_quiet_spell(self) -> None:
        # One instance for the daemon's life: an answer minutes later starts adapted.
        played, spans = answers(gap_seconds=20.0)
        room = Room(played)
        clean, _ = room.run(EchoCanceller())
        later = reduction(room, clean, spans[2])
        print(f"third answer after 40 s of quiet: {later:.1f} dB")
        assert later >= 30

    def test_an_underrun_mid_answer_is_realigned(self) -> None:
        # The device ran dry for 250 ms in the middle of answer 2: what the playback
        # thread wrote after it was heard that much later than the frame count says.
        played, spans = answers()
        a, b = spans[1]
        mid, gap = (a + b) // 2, int(0.25 * R)
        mid -= mid % (PIECE * R // DEVICE_RATE)  # a device runs dry between two writes
        heard = np.concatenate([played[:mid], silence(0.25), played[mid:]])
        spans = [spans[0], (a, b + gap), *[(x + gap, y + gap) for x, y in spans[2:]]]
        room = Room(heard)
        canceller = EchoCanceller()
        vad = VoiceActivity()
        clean, onsets = room.run(canceller, vad=vad, sent=played, jump=(mid, 0.25))
        figures = [reduction(room, clean, s) for s in spans]
        print("with an underrun in answer 2 (dB):", ", ".join(f"{r:.1f}" for r in figures))
        assert canceller.reference.realigned == 1
        assert onsets == []
        assert figures[1] >= 15
        assert figures[2] >= 30


class TestReference:
    def test_nothing_played_reads_as_silence(self) -> None:
        ref = echo.Reference()
        assert not ref.take(round(T0 * R), 1280).any()

    def test_a_flush_forgets_what_was_queued(self) -> None:
        ref = echo.Reference()
        tone = np.sin(np.arange(4800) / 5).astype(np.float32) * 0.5
        ref.played(tone, DEVICE_RATE, T0)
        start = round(T0 * R)
        assert dbfs(ref.take(start + 640, 1280)) > -20
        ref.clear()
        assert not ref.take(start + 640, 1280).any()

    def test_samples_are_placed_by_the_time_they_are_heard(self) -> None:
        ref = echo.Reference()
        tone = np.ones(2400, np.float32) * 0.5  # 100 ms at 24 kHz
        ref.played(tone, DEVICE_RATE, T0 + 1.0)
        start = round((T0 + 1.0) * R)
        assert not ref.take(start - 1280, 1280).any()
        assert abs(float(np.mean(ref.take(start + 320, 640))) - 0.5) < 0.01

    def test_old_audio_in_the_ring_is_never_read_for_a_later_time(self) -> None:
        ref = echo.Reference()
        ref.played(np.ones(2400, np.float32) * 0.5, DEVICE_RATE, T0)
        start = round(T0 * R)
        # The same slot, one ring length later: not the old samples.
        assert not ref.take(start + echo.RING_SAMPLES + 320, 640).any()


class TestVoiceActivity:
    def test_echo_alone_is_no_speech_after_cancellation(self) -> None:
        played, _ = answers()
        vad = VoiceActivity()
        _, onsets = Room(played).run(EchoCanceller(), vad=vad)
        assert onsets == []

    def test_the_user_over_the_answer_is_heard_through_the_echo(self) -> None:
        played, spans = answers()
        user = np.zeros_like(played)
        start = spans[1][0] + R  # a second into the second answer
        voice = level(speak(USER), 0.5) * 10 ** (-12 / 20)  # 12 dB below the played level
        user[start:start + voice.size] = voice
        vad = VoiceActivity()
        room = Room(played, user, echo_gain_db=0.0)
        _, onsets = room.run(EchoCanceller(), vad=vad)
        onset_s = [(f + 1) * 1280 / R for f in onsets]
        first_voiced = start + int(np.argmax(np.abs(voice) > 0.01))
        print("detector fired at", [f"{t:.2f}" for t in onset_s], "s; the user began at",
              f"{first_voiced / R:.2f} s")
        assert len(onsets) == 1
        latency = onset_s[0] - first_voiced / R
        print(f"onset latency {latency * 1000:.0f} ms")
        assert 0.15 < latency < 1.5

    def test_a_short_knock_is_not_speech(self) -> None:
        vad = VoiceActivity()
        quiet = np.random.default_rng(1).standard_normal(R).astype(np.float32) * 1e-4
        knock = quiet.copy()
        knock[8000:8000 + 1280] += np.random.default_rng(2).standard_normal(1280).astype(
            np.float32) * 0.2  # 80 ms
        assert not any(vad.update(knock[i:i + 1280]) for i in range(0, R, 1280))
        speech = quiet.copy()
        speech[4000:12000] += np.random.default_rng(3).standard_normal(8000).astype(
            np.float32) * 0.05  # 500 ms
        assert any(vad.update(speech[i:i + 1280]) for i in range(0, R, 1280))


class TestLateStart:
    def test_a_device_that_starts_late_takes_the_reference_with_it(self) -> None:
        # A sound server accepts the first 80 ms at once, then holds the next write
        # for 0.8 s before it starts playing: the 80 ms were heard 0.8 s later than
        # the frame clock said, and they move there.
        ref = echo.Reference()
        tone = np.ones(480, np.float32) * 0.5  # 20 ms at 24 kHz
        for k in range(4):
            ref.played(tone, DEVICE_RATE, T0 + k * 0.02, written_at=T0)
        ref.played(tone, DEVICE_RATE, T0 + 0.88, written_at=T0 + 0.001)
        start = round((T0 + 0.8) * R)
        assert ref.realigned == 1
        assert not ref.take(round(T0 * R) + 160, 960).any()  # moved away from here
        assert abs(float(np.mean(ref.take(start + 160, 1280))) - 0.5) < 0.02  # to here

    def test_a_device_that_ran_dry_starts_a_new_run_instead(self) -> None:
        ref = echo.Reference()
        tone = np.ones(2400, np.float32) * 0.5  # 100 ms
        ref.played(tone, DEVICE_RATE, T0, written_at=T0)
        # The next write began after the first piece had played: a gap, not a delay.
        ref.played(tone, DEVICE_RATE, T0 + 0.5, written_at=T0 + 0.5)
        assert ref.realigned == 1
        assert abs(float(np.mean(ref.take(round(T0 * R) + 320, 640))) - 0.5) < 0.02


class TestMicPath:
    def test_over_the_answer_a_fresh_canceller_sends_silence_and_hears_no_voice(self) -> None:
        played, spans = answers()
        room = Room(played)
        canceller = EchoCanceller()
        path = echo.MicPath(canceller, VoiceActivity())
        path.over_answer = True
        device = soxr.resample(played, R, DEVICE_RATE).astype(np.float32)
        first = []
        for f in range(-2, spans[0][1] // 1280):
            # The speaker is written 160 ms ahead of what the microphone hears.
            i = (f + 2) * 1920
            canceller.played(device[i:i + 1920], DEVICE_RATE, T0 + i / DEVICE_RATE)
            if f < 0:
                continue
            end = T0 + (f + 1) * 1280 / R
            frame, onset = path(echo_pcm(room.mic[f * 1280:(f + 1) * 1280]), end + 0.01)
            assert onset is None
            first.append(frame)
        assert first[0] == bytes(2560)  # not adapted yet: silence
        assert canceller.adapted and any(f != bytes(2560) for f in first)

    def test_without_a_canceller_the_voice_detector_hears_the_raw_mic(self) -> None:
        path = echo.MicPath(None, VoiceActivity())
        speech = level(speak(USER), 0.3)
        onsets = [path(echo_pcm(speech[i:i + 1280]), 0.0)[1]
                  for i in range(0, speech.size - 1279, 1280)]
        assert sum(o is not None for o in onsets) >= 1
