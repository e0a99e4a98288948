"""The echo canceller and the voice detector in a synthetic room, on espeak-ng speech.

The room: what the speaker plays, 40 ms later at the microphone, through a
reverberant tail (RT60 0.3 s), louder than the user. The two threads' clocks are
simulated: the playback side stamps each 20 ms piece with the time it is heard, the
capture side each 80 ms frame with a time a little later than the truth (a read
returns after its samples were captured), exactly as the real threads do.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import soxr

from speakerd.audio import echo, speex_echo
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
                 echo_gain_db: float = -6.0, seed: int = 5, delay_ms: float = 40,
                 capture_late_ms: tuple[float, float] = (2, 25)) -> None:
        rng = np.random.default_rng(seed)
        self.played = played
        echo_path = np.convolve(played, room_impulse(rng, delay_ms))[:played.size]
        self.echo = (echo_path * 10 ** (echo_gain_db / 20)).astype(np.float32)
        self.user = user if user is not None else np.zeros_like(played)
        self.mic = (self.echo + self.user + rng.standard_normal(played.size).astype(
            np.float32) * 3e-4)
        self.rng = rng
        self.late = capture_late_ms

    def run(self, canceller: EchoCanceller, *,
            sent: np.ndarray | None = None, jump: tuple[int, float] = (0, 0.0),
            path: echo.MicPath | None = None, dry: bool = False,
            watch: Callable[[EchoCanceller], object] | None = None
            ) -> tuple[np.ndarray, list[int]]:
        """-> (the cleaned microphone, frame indexes where the detector fired).

        `sent`: what the playback thread hands over, if not the timeline itself;
        `jump` (16 kHz index of `sent`, seconds): from there on, each piece is heard
        that much later than its frame count says, as after an underrun. With `path`
        (a MicPath over `canceller`) each frame goes through it instead: -> (what it
        streamed, frames where it reported an onset). `dry`: between answers the
        device runs dry (nothing is written), so each answer is a new run, placed to
        the 16 kHz sample nearest its 24 kHz start, a different fraction each time.
        `watch` is called with the canceller after each frame."""
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
                if not (dry and not piece.any()):
                    canceller.played(piece, DEVICE_RATE, heard + self.rng.uniform(0, 0.004))
                p += 1
            late = self.rng.uniform(*self.late) / 1000
            frame = self.mic[f * 1280:(f + 1) * 1280]
            if path is not None:
                sent_pcm, onset = path(echo_pcm(frame), end + late)
                out.append(np.frombuffer(sent_pcm, "<i2").astype(np.float32) / 32768)
                if onset is not None:
                    onsets.append(f)
                continue
            _, clean = canceller.process(echo_pcm(frame), end + late)
            out.append(clean)
            if watch is not None:
                watch(canceller)
            if canceller.onset:
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

    def test_stats_taken_from_another_thread_lose_nothing(self) -> None:
        # The capture thread adds up while the loop takes the tallies: every frame of
        # echo is in exactly one EchoStats, however the two threads interleave.
        import sys
        import threading
        need_speex()
        played, _ = answers()

        def run(take_meanwhile: bool) -> float:
            canceller = EchoCanceller()
            seen: list[echo.EchoStats] = []
            done = threading.Event()

            def taker() -> None:
                while not done.is_set():
                    if (got := canceller.take_stats()) is not None:
                        seen.append(got)

            thread = threading.Thread(target=taker)
            if take_meanwhile:
                thread.start()
            try:
                Room(played).run(canceller)
            finally:
                done.set()
                if take_meanwhile:
                    thread.join()
            if (got := canceller.take_stats()) is not None:
                seen.append(got)
            return sum(st.echo_s for st in seen)

        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)  # hand the GIL over between almost every bytecode
        try:
            alone, together = run(False), run(True)
        finally:
            sys.setswitchinterval(interval)
        print(f"seconds of echo counted: {alone:.2f} taken once, {together:.2f} taken "
              "all along")
        assert alone > 5 and together == pytest.approx(alone)

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
        clean, onsets = room.run(canceller, sent=played, jump=(mid, 0.25))
        figures = [reduction(room, clean, s) for s in spans]
        print("with an underrun in answer 2 (dB):", ", ".join(f"{r:.1f}" for r in figures))
        assert canceller.reference.realigned == 1
        assert onsets == []
        assert figures[1] >= 15
        assert figures[2] >= 30


    def test_after_an_underrun_the_delay_is_measured_on_the_new_run_only(self) -> None:
        # The speaker resumes placed a few samples off its old placement (a fresh
        # reading of the device's delay, and here the echo 1.5 samples later too). The
        # first measure after the gap must not confirm the old placement from the echo
        # still in its window: the filter would then meet an echo samples off what it
        # learned, and no later measure moves it (less than DELAY_TOLERANCE).
        need_speex()
        played, spans = answers()
        a, b = spans[1]
        mid = (a + b) // 2
        mid -= mid % (PIECE * R // DEVICE_RATE)
        off = 1.5
        heard = np.concatenate([played[:mid], silence(0.25), delayed(played[mid:], off)])
        canceller = EchoCanceller()
        # (offset applied, the echo's lag as last measured) after each frame
        seen: list[tuple[float, float]] = []
        Room(heard).run(canceller, sent=played, jump=(mid, 0.25),
                        watch=lambda c: seen.append((c.delay.offset,
                                                     (c.delay.lag_ms or 0) * R / 1000)))
        applied, lag = seen[(b + int(0.25 * R) - R) // 1280]  # late in answer 2
        print(f"after the underrun: the echo measured {lag:.2f} samples behind, the filter "
              f"given it {applied + echo.SPEEX_LEAD:.2f} samples behind")
        assert abs(applied + echo.SPEEX_LEAD - lag) < 0.3

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
    """Voice barge-in with a device that cancels the echo itself: the raw microphone."""

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


    def test_a_gap_shorter_than_the_slack_after_an_underrun_is_a_new_run(self) -> None:
        # 20 ms of silence on the device after an underrun is within the jitter the
        # frame clock otherwise ignores; placed on as one run, the echo came 20 ms
        # after where the reference said, and the linear filter left all of it.
        ref = echo.Reference()
        tone = np.ones(2400, np.float32) * 0.5  # 100 ms at 24 kHz
        ref.played(tone, DEVICE_RATE, T0, written_at=T0)
        ref.ran_dry()
        ref.played(tone, DEVICE_RATE, T0 + 0.12, written_at=T0 + 0.12)
        assert ref.runs == 2
        start = round((T0 + 0.12) * R)
        assert not ref.take(round((T0 + 0.1) * R) + 16, 288).any()  # the gap: silence
        assert abs(float(np.mean(ref.take(start + 160, 1280))) - 0.5) < 0.02


class TestMicPath:
    def test_over_the_answer_the_server_gets_silence_and_after_it_the_cleaned_mic(self
                                                                                ) -> None:
        played, spans = answers()
        canceller = EchoCanceller()
        path = echo.MicPath(canceller, VoiceActivity())
        path.over_answer = True
        sent, onsets = Room(played).run(canceller, path=path)
        assert onsets == [] and not sent.any()
        path.over_answer = False
        sent, _ = Room(played).run(canceller, path=path)
        assert sent.size == played.size // 1280 * 1280 and sent.any()
        assert dbfs(sent[spans[1][0]:spans[1][1]]) < dbfs(played) - 30

    def test_a_voice_over_the_answer_opens_the_stream_with_the_words_before_it(self) -> None:
        need_speex()
        played, spans = answers()
        canceller = EchoCanceller()
        Room(played).run(canceller)  # adapted
        path = echo.MicPath(canceller, VoiceActivity())
        path.over_answer = True
        user, first = user_over(played, spans[1][0] + R)
        room = Room(played, user)
        sent, onsets = room.run(canceller, path=path)
        assert len(onsets) == 1
        # Until the onset the server got silence; then the frames held back, which
        # go back to before the first words; so the stream is longer by them.
        n = echo.MicPath.HELD_FRAMES
        assert sent.size == (played.size // 1280 + n - 1) * 1280
        at = onsets[0] * 1280
        assert not sent[:at].any()
        began = (onsets[0] + 1 - n) * 1280  # when the held frames were captured
        assert began <= first
        # They are speex's output: the voice whole beside a little echo.
        held, voice = sent[at:at + n * 1280], user[began:began + n * 1280]
        print(f"held: {dbfs(held):.1f} dBFS, the user's voice {dbfs(voice):.1f} dBFS")
        assert abs(dbfs(held) - dbfs(voice)) < 2

    def test_without_a_canceller_the_voice_detector_hears_the_raw_mic(self) -> None:
        path = echo.MicPath(None, VoiceActivity())
        path.over_answer = True
        speech = np.concatenate([silence(1.0), level(speak(USER), 0.3)])
        results = [path(echo_pcm(speech[i:i + 1280]), 0.0)
                   for i in range(0, speech.size - 1279, 1280)]
        onsets = [i for i, (_, o) in enumerate(results) if o is not None]
        assert len(onsets) == 1
        assert all(sent == bytes(2560) for sent, _ in results[:onsets[0]])
        assert len(results[onsets[0]][0]) == echo.MicPath.HELD_FRAMES * 2560


def user_over(played: np.ndarray, at: int, below_db: float = 12.0) -> tuple[np.ndarray, int]:
    """The user's sentence from 16 kHz index `at`, `below_db` under the answer's level;
    -> (the user's track, the index of its first voiced sample)."""
    user = np.zeros_like(played)
    voice = level(speak(USER), 0.5) * 10 ** (-below_db / 20)
    user[at:at + voice.size] = voice[:played.size - at]
    return user, at + int(np.argmax(np.abs(voice) > 0.01))


def delayed(x: np.ndarray, f: float) -> np.ndarray:
    """`x` delayed by `f` samples (exact, through the FFT)."""
    n = x.size
    spectrum = np.fft.rfft(x, 2 * n) * np.exp(-2j * np.pi * np.fft.rfftfreq(2 * n) * f)
    return np.fft.irfft(spectrum, 2 * n)[:n].astype(np.float32)


def need_speex() -> None:
    need(speex_echo.available(), "libspeexdsp1")


def moved_echo(played: np.ndarray, at: int, by: float, user: np.ndarray | None = None
               ) -> Room:
    """The room of Room(played), but from 16 kHz index `at` on the echo arrives `by`
    samples later (negative: earlier), as when a clock or a sound server slips a few
    samples in the middle of an answer."""
    room = Room(played, user)
    h = room_impulse(np.random.default_rng(5), 40)
    before = np.convolve(played, h)[:played.size]
    after = np.convolve(delayed(played, by), h)[:played.size]
    room.echo = (np.concatenate([before[:at], after[at:]]) * 10 ** (-6 / 20)).astype(
        np.float32)
    room.mic = room.echo + room.user + room.rng.standard_normal(played.size).astype(
        np.float32) * 3e-4
    return room


class TestTalkOver:
    """A voice over the answer, heard in what speex's linear filter leaves: the
    barge-in detector behind `barge_in = "voice"`."""

    def test_a_voice_12_db_under_the_echo_is_heard_within_half_a_second(self) -> None:
        need_speex()
        played, spans = answers()
        canceller = EchoCanceller()
        _, before = Room(played).run(canceller)  # the room, learned
        assert before == []
        user, first = user_over(played, spans[1][0] + R)
        _, onsets = Room(played, user).run(canceller)
        heard = [(f + 1) * 1280 / R - first / R for f in onsets]
        print("onsets after the user began (s):", [f"{t:.2f}" for t in heard])
        assert len(onsets) == 1
        # Simulated time, not the wall clock: 80 ms frames, 100 ms of voice needed.
        assert 0.08 < heard[0] < 0.5

    def test_echo_alone_is_never_a_voice_when_the_room_or_the_volume_changes(self) -> None:
        need_speex()
        played, _ = answers()
        canceller = EchoCanceller()
        # Not a wholly different room (another seed's reverberation): speex leaves a
        # few dB of it for a second or two, uncorrelated with its prediction, and the
        # detector takes that for a voice. Moving the speaker mid-conversation is rare.
        for kwargs in ({}, {"delay_ms": 120}, {"echo_gain_db": 0.0}, {"delay_ms": 40}):
            _, onsets = Room(played, **kwargs).run(canceller)
            assert onsets == [], kwargs

    def test_the_voice_is_heard_again_once_a_moved_echo_is_measured(self) -> None:
        need_speex()
        played, spans = answers()
        canceller = EchoCanceller()
        Room(played).run(canceller)
        lag = canceller.delay.lag_ms
        user, first = user_over(played, spans[2][0] + 2 * R)
        room = Room(played, user, delay_ms=140)
        _, onsets = room.run(canceller)
        assert lag is not None and canceller.delay.lag_ms is not None
        assert abs(canceller.delay.lag_ms - lag - 100) < 3
        assert [(f + 1) * 1280 > first for f in onsets] == [True]

    def test_answers_placed_a_fraction_of_a_sample_apart_keep_the_filter_deep(self) -> None:
        # Each answer is a new run on the device, landing a different fraction of a
        # 16 kHz sample from where the last one did. Without the fraction measured and
        # applied, the filter relearned from ~-18 dB at the start of every answer,
        # just when a voice over it is most likely, and a voice 12 dB under the echo
        # was heard only in part of it.
        need_speex()
        played, spans = answers()
        played = np.concatenate([played, played])
        spans = spans + [(a + played.size // 2, b + played.size // 2) for a, b in spans]
        room = Room(played)
        # The echo of each answer lands a third of a sample later than the last.
        h = room_impulse(np.random.default_rng(5), 40)
        room.echo = np.zeros_like(played)
        for i, (a, b) in enumerate(spans):
            e = np.convolve(delayed(played[a:b], i % 3 / 3), h)[:played.size - a]
            room.echo[a:a + e.size] += e * 10 ** (-6 / 20)
        room.mic = room.echo + room.rng.standard_normal(played.size).astype(np.float32) * 3e-4
        canceller = EchoCanceller()
        ratios: list[float] = []
        room.run(canceller, dry=True, watch=lambda c: ratios.append(c.talk.ratio))
        assert canceller.reference.runs >= len(spans)
        early = [ratios[a // 1280 + k] for a, _ in spans[2:] for k in (12, 18, 25)]
        print("what the filter leaves 1-2 s into answers 3-6 (dB):",
              " ".join(f"{r:.0f}" for r in early))
        assert float(np.median(early)) < -25

    @pytest.mark.parametrize(("by", "at"), [(0.5, 2.0), (1.0, 2.0), (2.0, 2.0), (-1.0, 2.0),
                                            (-4.0, 2.0), (16.0, 3.5), (-47.0, 3.5),
                                            (320.0, 2.0)])
    def test_an_echo_that_moves_a_few_samples_mid_answer_is_not_a_voice(self, by: float,
                                                                           at: float) -> None:
        # The echo comes a little later or earlier in the middle of an answer (a clock,
        # a sound server, a gap the playback clock took for jitter). A filter learned to
        # -40 dB then leaves, for a fraction of a millisecond, the echo's time
        # derivative: as loud as the echo and orthogonal to its own prediction; for a
        # millisecond or more, the echo and its misplaced estimate, as loud as the
        # microphone. Both passed for a voice within 0.2-0.6 s.
        need_speex()
        played, spans = answers()
        canceller = EchoCanceller()
        Room(played).run(canceller)  # the room, learned
        canceller.take_stats()
        a, _ = spans[1]
        _, onsets = moved_echo(played, a + int(at * R), by).run(canceller)
        stats = canceller.take_stats()
        assert stats is not None
        print(f"echo {by:+} samples later {at} s into answer 2: onsets {onsets}, "
              f"{stats.explained} candidates explained, headroom {stats.headroom_db:.1f} dB, "
              f"held {stats.held}")
        assert onsets == []
        # It came to what would have been a voice by the filter's residual alone.
        assert stats.headroom_db <= 0

    def test_a_voice_is_heard_again_once_the_filter_has_relearned_a_moved_echo(self
                                                                                ) -> None:
        need_speex()
        played, spans = answers()
        canceller = EchoCanceller()
        Room(played).run(canceller)
        user, first = user_over(played, spans[2][0] + 2 * R)
        _, onsets = moved_echo(played, spans[1][0] + 2 * R, -1.0, user).run(canceller)
        heard = [(f + 1) * 1280 / R - first / R for f in onsets]
        print("onsets after the user began (s):", [f"{t:.2f}" for t in heard])
        assert len(heard) == 1 and 0.08 < heard[0] < 0.5

    def test_the_first_answer_after_start_waits_for_the_filter_to_learn_the_room(self
                                                                                 ) -> None:
        # A fresh filter improves fast and unevenly: no guess over the first answer
        # (here 15 s long, over a room with no reverberation, where it learns fastest);
        # the wake word still interrupts it. Over the next answer a voice is heard.
        need_speex()
        first_answer = level(speak(" ".join(ANSWERS), voice="en-us+f3"), 0.5)
        played = np.concatenate([first_answer, silence(1.0), level(speak(ANSWERS[0]), 0.5),
                                 silence(1.0)])
        second = first_answer.size + R
        user = user_over(played, 8 * R)[0] + user_over(played, second + 2 * R)[0]
        room = Room(played, user)
        room.echo = np.concatenate([np.zeros(int(0.04 * R), np.float32), played])[
            :played.size] * np.float32(10 ** (-6 / 20))
        room.mic = room.echo + room.user + room.rng.standard_normal(played.size).astype(
            np.float32) * 3e-4
        canceller = EchoCanceller()
        _, onsets = room.run(canceller, dry=True)  # each answer a run of its own
        stats = canceller.take_stats()
        assert stats is not None
        at = [(f + 1) * 1280 / R for f in onsets]
        print(f"a voice 8 s into the first answer and 2 s into the second: onsets at "
              f"{[f'{t:.2f}' for t in at]} s; held {stats.held}")
        assert len(at) == 1 and second / R + 2 < at[0] < second / R + 2.5
        assert dict(stats.held).get(echo.LEARNING, 0) > 3.0

    def test_without_libspeexdsp_there_is_no_voice_barge_in(self, monkeypatch, caplog
                                                            ) -> None:
        # AEC3's output holds a voice over the echo back: no substitute for the linear
        # filter, so no barge-in by voice at all, and the journal says what to install.
        def missing(**_: object) -> None:
            raise speex_echo.SpeexUnavailable("libspeexdsp.so.1: cannot open shared object")

        monkeypatch.setattr(speex_echo, "LinearEcho", missing)
        played, spans = answers()
        canceller = EchoCanceller()
        assert "voice barge-in is off" in caplog.text and "libspeexdsp1" in caplog.text
        user, _ = user_over(played, spans[1][0] + R)
        _, onsets = Room(played, user).run(canceller)
        assert onsets == []

    def test_a_cough_is_not_a_voice(self) -> None:
        talk = echo.TalkOver()
        quiet = np.random.default_rng(1).standard_normal(R).astype(np.float32) * 1e-4
        cough = quiet.copy()
        cough[8000:8000 + 1280] += np.random.default_rng(2).standard_normal(1280).astype(
            np.float32) * 0.2  # 80 ms
        assert not any(talk.update(cough[i:i + 1280], cough[i:i + 1280], echo=False)
                       for i in range(0, R, 1280))

    def test_what_the_filter_predicted_scaled_is_not_a_voice(self) -> None:
        # A filter 6 dB off (the volume went up) leaves half the echo: loud, and more
        # than the residual it learned, but correlated with its own prediction.
        talk = echo.TalkOver()
        speech = level(speak(ANSWERS[0]), 0.3)
        for i in range(0, 2 * R, 1280):
            if i == 20 * 1280:
                talk.resumed()  # the next answer: the filter learned the whole last one
            talk.update(speech[i:i + 1280], speech[i:i + 1280] * 0.01, echo=True)
        assert talk.ratio < -30 and talk.armed
        fired, correlations = [], []
        for i in range(2 * R, speech.size - 1279, 1280):
            fired.append(talk.update(speech[i:i + 1280], speech[i:i + 1280] * 0.5, echo=True))
            correlations.append(talk.correlation)
        assert not any(fired)
        # The first candidate was turned down for its correlation, before the second
        # of misfit behind it could say the same.
        assert max(correlations) > 0.9


class TestEchoDelay:
    def test_gcc_phat_measures_a_fraction_of_a_sample(self) -> None:
        played, spans = answers()
        a = spans[0][0]
        h = room_impulse(np.random.default_rng(5), 40)
        at = a + 2 * R
        found = []
        for f in (0.0, 1 / 3, 2 / 3):
            echo_ = np.convolve(delayed(played, f), h)[:played.size]
            mic = echo_[at - echo.DELAY_WINDOW:at]
            ref = played[at - echo.DELAY_WINDOW - echo.DELAY_MAX:at]
            found.append(echo.gcc_phat(mic, ref, echo.DELAY_MAX)[0])
        print("measured lags (samples):", [f"{x:.3f}" for x in found])
        # What matters is that the fractions differ as the delays do: a bias common
        # to all is learned by the filter once.
        assert abs(found[1] - found[0] - 1 / 3) < 0.05
        assert abs(found[2] - found[0] - 2 / 3) < 0.05

    def test_the_reference_is_shifted_by_the_fraction(self) -> None:
        x = level(speak(USER), 0.5)
        part = x[8000:8000 + 1280 + 2 * echo.SINC_TAPS]
        for f in (0.0, 0.25, 0.5, 0.8):
            want = delayed(x, f)[8000 + echo.SINC_TAPS:8000 + echo.SINC_TAPS + 1280]
            got = echo.fractional_delay(part, f)
            assert got.size == 1280
            assert dbfs(got - want) - dbfs(want) < -40, f

    def test_gcc_phat_finds_the_lag_and_is_unsure_of_noise(self) -> None:
        rng = np.random.default_rng(3)
        ref = level(speak(ANSWERS[1]), 0.5)[:R + 8000]
        mic = np.concatenate([np.zeros(1234, np.float32), ref])[:ref.size][-8000:] \
            + rng.standard_normal(8000).astype(np.float32) * 0.01
        lag, confidence = echo.gcc_phat(mic, ref[-16000:], 8000)
        assert abs(lag - 1234) < 0.1 and confidence > 15
        _, confidence = echo.gcc_phat(rng.standard_normal(8000), ref[-16000:], 8000)
        assert confidence < echo.DELAY_CONFIDENCE


class TestLinearEcho:
    def test_removes_the_echo_and_leaves_a_voice_over_it(self) -> None:
        need_speex()
        played, spans = answers()
        rng = np.random.default_rng(4)
        echo_ = np.convolve(played, room_impulse(rng))[:played.size].astype(np.float32)
        user, first = user_over(played, spans[2][0] + R)
        mic = echo_ + user
        f = speex_echo.LinearEcho()
        n = mic.size // 160 * 160
        left = f.process(mic[:n], played[:n])
        a, b = spans[1]
        assert dbfs(echo_[a:b]) - dbfs(left[a:b]) > 15
        voiced = slice(first, first + R)
        # The voice is left whole beside the residual: within 1 dB of itself.
        assert abs(dbfs(left[voiced]) - dbfs(user[voiced])) < 1.0

    def test_rejects_blocks_of_the_wrong_size(self) -> None:
        need_speex()
        with pytest.raises(ValueError):
            speex_echo.LinearEcho().process(np.zeros(100, np.float32),
                                            np.zeros(100, np.float32))
