"""Audio I/O through real alsa-lib: file-backed PCMs for exact bytes, PulseAudio for pacing."""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
import threading
import time

import alsaaudio
import numpy as np
import pytest
import soxr

from speakerd.audio import capture as cap
from speakerd.audio import device, resample
from speakerd.audio import playback as pb
from speakerd.audio.cues import make_cues
from speakerd.audio.resample import DeviceFormat
from speakerd.errors import UnavailableError

RNG = np.random.default_rng(7)


def sine(rate: int, seconds: float, freq: float = 440.0, level: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (level * np.sin(2 * math.pi * freq * t)).astype(np.float32)


def s16(x: np.ndarray) -> bytes:
    return resample.float_to_s16(x)


class Frames:
    """Collects what a Capture hands to the loop; wait(n) until n frames have arrived."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.times: list[float] = []
        self.status: list[object] = []
        self._event = asyncio.Event()
        self._want = 0

    def on_frame(self, frame: bytes) -> None:
        self.frames.append(frame)
        self.times.append(time.monotonic())
        if len(self.frames) >= self._want:
            self._event.set()

    def on_status(self, event: object) -> None:
        self.status.append(event)

    async def wait(self, n: int, timeout: float = 20) -> list[bytes]:
        self._want = n
        if len(self.frames) < n:
            self._event.clear()
            await asyncio.wait_for(self._event.wait(), timeout)
        return self.frames[:n]


async def capture_frames(device: str, n: int, **kw) -> tuple[list[bytes], cap.Capture]:
    got = Frames()
    c = cap.Capture(device, loop=asyncio.get_running_loop(), on_frame=got.on_frame,
                    on_status=got.on_status, max_pending_frames=100_000, streaming=True,
                    **kw)
    c.start()
    try:
        frames = await got.wait(n)
    finally:
        c.stop()
    return frames, c


class TestCaptureFileBacked:
    async def test_16k_mono_s16_arrives_bit_exact_in_80ms_frames(self, tmp_path):
        pcm = s16(sine(16000, 1.0) + 0.05 * RNG.standard_normal(16000).astype(np.float32))
        (tmp_path / "in.raw").write_bytes(pcm)
        frames, c = await capture_frames(f"filein:FILE={tmp_path}/in.raw", 15)
        assert c.got == DeviceFormat(16000, 1, "S16_LE")
        assert all(len(f) == cap.FRAME_BYTES for f in frames)
        assert b"".join(frames)[:len(pcm)] == pcm
        assert c.dropped == 0

    async def test_keeps_delivering_frames_after_the_file_ends(self, tmp_path):
        # alsa-lib 1.2.8's file plugin goes on reading after EOF (what it returns
        # then is not zeros, whatever its docs imply): the stream must not stall.
        pcm = s16(sine(16000, 0.4))
        (tmp_path / "in.raw").write_bytes(pcm)
        frames, c = await capture_frames(f"filein:FILE={tmp_path}/in.raw", 20)
        assert b"".join(frames)[:len(pcm)] == pcm
        assert len(frames) == 20 and c.overruns == 0

    async def test_48k_stereo_s32_becomes_16k_mono_like_soxr(self, tmp_path):
        left = sine(48000, 1.0, 300)
        right = 0.3 * RNG.standard_normal(48000).astype(np.float32)
        ints = np.clip(np.rint(np.stack([left, right], 1).astype(np.float64) * 2**31),
                       -2**31, 2**31 - 1).astype(np.int64)
        ints = np.concatenate([ints, np.zeros((24000, 2), np.int64)])  # explicit silence
        (tmp_path / "in.raw").write_bytes(ints.astype("<i4").tobytes())
        fmt = DeviceFormat(48000, 2, "S32_LE")
        frames, c = await capture_frames(f"filein:FILE={tmp_path}/in.raw", 18, fmt=fmt)
        assert c.got == fmt
        got = np.frombuffer(b"".join(frames), "<i2")
        # soxr streams are chunk-invariant: the one-shot result is the reference.
        ref_in = (ints[:, 0] / 2**31).astype(np.float32)
        ref = np.frombuffer(s16(soxr.resample(ref_in, 48000, 16000, quality="HQ")), "<i2")
        n = 18 * cap.FRAME_SAMPLES  # 1.44 s: all of the file's second plus silence
        assert np.array_equal(got[:n], ref[:n])

    async def test_float_8_channels_takes_the_configured_channel(self, tmp_path):
        data = 0.2 * RNG.standard_normal((16000, 8)).astype(np.float32)
        data[:, 3] = sine(16000, 1.0, 500)
        (tmp_path / "in.raw").write_bytes(data.astype("<f4").tobytes())
        frames, _ = await capture_frames(f"filein:FILE={tmp_path}/in.raw", 12,
                                         fmt=DeviceFormat(16000, 8, "FLOAT_LE"), channel=3)
        got = b"".join(frames)
        assert got == s16(data[:, 3])[:len(got)]

    async def test_a_slow_loop_drops_the_oldest_frames_and_counts_them(self, tmp_path):
        (tmp_path / "in.raw").write_bytes(s16(sine(16000, 1.0)))
        got = Frames()
        c = cap.Capture(f"filein:FILE={tmp_path}/in.raw", loop=asyncio.get_running_loop(),
                        on_frame=got.on_frame, max_pending_frames=3, streaming=True)
        c.start()
        time.sleep(0.5)  # block the loop on purpose: the unpaced file device races ahead
        await got.wait(3)
        c.stop()
        assert c.dropped > 0
        assert c.frames >= c.dropped + len(got.frames)

    def test_unknown_device_is_a_clear_error_listing_known_pcms(self):
        c = cap.Capture("nosuchmic", loop=asyncio.new_event_loop(), on_frame=print)
        with pytest.raises(UnavailableError) as e:
            c.open()
        msg = str(e.value)
        assert msg.startswith("cannot open ALSA capture device 'nosuchmic': ")
        assert "(PCMs alsa-lib knows: " in msg and "spk2" in msg and "\n" not in msg
        assert e.value.exit_code == 69


class Sink:
    """Records drain and flush callbacks on the loop, with the frames written by then."""

    def __init__(self) -> None:
        self.playback: pb.Playback | None = None
        self.written_at_drain: list[int] = []
        self.drained: list[tuple[str, float]] = []
        self.flushed: list[dict[str, int]] = []
        self._changed = asyncio.Event()

    def on_drained(self, rid: str) -> None:
        self.drained.append((rid, time.monotonic()))
        assert self.playback is not None
        self.written_at_drain.append(self.playback.frames_written)
        self._changed.set()

    def on_flushed(self, played: dict[str, int]) -> None:
        self.flushed.append(played)
        self._changed.set()

    async def until(self, predicate, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            self._changed.clear()
            await asyncio.wait_for(self._changed.wait(), max(0.0, deadline - time.monotonic()))


def make_playback(device: str, sink: Sink, **kw) -> pb.Playback:
    p = pb.Playback(device, loop=asyncio.get_running_loop(), on_drained=sink.on_drained,
                    on_flushed=sink.on_flushed, **kw)
    sink.playback = p
    p.start()
    return p


class TestPlaybackFileBacked:
    async def test_one_response_reaches_the_file_byte_exact_then_drains_once(self, tmp_path):
        out = tmp_path / "out.raw"
        sink = Sink()
        p = make_playback(f"fileout:FILE={out}", sink)
        pcm = s16(sine(24000, 1.3, 523) + 0.01 * RNG.standard_normal(31200).astype(np.float32))
        for i in range(0, len(pcm), 4800):
            p.enqueue(pcm[i:i + 4800], "r1")
        p.finish("r1")
        await sink.until(lambda: sink.drained)
        assert sink.written_at_drain == [len(pcm) // 2]  # never before the last write
        p.stop()  # the file plugin holds back up to a period until the device closes
        assert out.read_bytes() == pcm
        assert [rid for rid, _ in sink.drained] == ["r1"]

    async def test_three_back_to_back_responses_in_order_each_drained_once(self, tmp_path):
        out = tmp_path / "out.raw"
        sink = Sink()
        p = make_playback(f"fileout:FILE={out}", sink)
        parts = [s16(sine(24000, d, f)) for d, f in ((0.5, 300), (0.25, 600), (0.75, 900))]
        for n, pcm in enumerate(parts):
            p.enqueue(pcm[:1000], f"r{n}")
            p.enqueue(pcm[1000:], f"r{n}")
            p.finish(f"r{n}")
        await sink.until(lambda: len(sink.drained) == 3)
        p.stop()
        ends = np.cumsum([len(x) // 2 for x in parts])
        assert all(w >= end for w, end in zip(sink.written_at_drain, ends, strict=True))
        assert out.read_bytes() == b"".join(parts)
        assert [rid for rid, _ in sink.drained] == ["r0", "r1", "r2"]
        assert p.opens == 1  # the device stayed open across responses

    async def test_48k_stereo_s32_device_gets_soxr_converted_audio(self, tmp_path):
        out = tmp_path / "out.raw"
        sink = Sink()
        fmt = DeviceFormat(48000, 2, "S32_LE")
        p = make_playback(f"fileout:FILE={out}", sink, fmt=fmt)
        x = sine(24000, 1.0, 700)
        p.enqueue(s16(x), "r")
        p.finish("r")
        await sink.until(lambda: sink.drained)
        p.stop()
        assert p.got == fmt
        got = np.frombuffer(out.read_bytes(), "<i4").reshape(-1, 2)
        ref = soxr.resample(resample.s16_to_float(s16(x)), 24000, 48000, quality="HQ")
        want = np.frombuffer(resample.from_float(ref, DeviceFormat(48000, 1, "S32_LE")), "<i4")
        assert np.array_equal(got[:, 0], got[:, 1])
        assert np.array_equal(got[:, 0], want)

    async def test_software_volume_is_applied_before_the_write(self, tmp_path):
        out = tmp_path / "out.raw"
        sink = Sink()
        p = make_playback(f"fileout:FILE={out}", sink, volume=0.25)
        x = s16(sine(24000, 0.5, 440, 0.8))
        p.enqueue(x, "r")
        p.finish("r")
        await sink.until(lambda: sink.drained)
        p.stop()
        got = np.frombuffer(out.read_bytes(), "<i2").astype(np.int32)
        want = np.rint(np.frombuffer(x, "<i2") * 0.25).astype(np.int32)
        assert np.max(np.abs(got - want)) <= 1

    async def test_finish_without_audio_drains_at_once(self, tmp_path):
        sink = Sink()
        p = make_playback(f"fileout:FILE={tmp_path}/out.raw", sink)
        p.finish("silent")
        await sink.until(lambda: sink.drained)
        p.stop()
        assert [r for r, _ in sink.drained] == ["silent"]

    async def test_cues_play_through_the_same_path(self, tmp_path):
        out = tmp_path / "out.raw"
        sink = Sink()
        p = make_playback(f"fileout:FILE={out}", sink)
        cues = make_cues()
        p.enqueue(cues["wake"], "cue:wake")
        p.finish("cue:wake")
        await sink.until(lambda: sink.drained)
        p.stop()
        assert out.read_bytes() == cues["wake"]
        assert set(cues) == {"wake", "end", "error", "timer", "check"}
        assert all(0 < len(v) // 48 <= 1000 for v in cues.values())  # short: at most 1 s

    def test_unknown_device_is_a_clear_error(self):
        p = pb.Playback("nosuchspeaker", loop=asyncio.new_event_loop(), on_drained=print)
        with pytest.raises(UnavailableError, match=r"^cannot open ALSA playback device "
                           r"'nosuchspeaker': .*\(PCMs alsa-lib knows: .*\)$"):
            p.check()


def test_nan_and_inf_from_a_float_device_become_silence_and_full_scale():
    raw = np.array([np.nan, np.inf, -np.inf, 0.5], "<f4").tobytes()
    x = resample.to_float(raw, DeviceFormat(16000, 1, "FLOAT_LE"))
    assert x.tolist() == [0.0, 1.0, -1.0, 0.5]


class TestNegotiation:
    def test_alsa_settles_on_what_the_device_takes(self, tmp_path):
        pcm, got = device.negotiate(alsaaudio.PCM_PLAYBACK, f"fileout:FILE={tmp_path}/o.raw",
                                 DeviceFormat(22050, 3, "FLOAT_LE"), 20)
        pcm.close()
        assert got == DeviceFormat(22050, 3, "FLOAT_LE")


def tone_s16(seconds: float, freq: float = 440.0) -> bytes:
    return s16(sine(24000, seconds, freq))


def rms(pcm: bytes) -> float:
    x = np.frombuffer(pcm, "<i2").astype(np.float64)
    return float(np.sqrt(np.mean(x**2))) if x.size else 0.0


async def until(predicate, timeout: float = 20) -> None:
    """Wait for a condition the audio threads change, re-checking every 10 ms."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.01)


class TestPaced:
    """Against PulseAudio null sinks, which play and record in real time."""

    async def test_drain_fires_after_real_play_out(self, pulse):
        sink = Sink()
        p = make_playback("spk", sink)
        before = len(pulse.speaker_bytes())
        start = time.monotonic()
        p.enqueue(tone_s16(2.0, 660), "long")
        p.finish("long")
        await sink.until(lambda: sink.drained, timeout=30)
        took = sink.drained[0][1] - start
        p.stop()
        assert took >= 1.9, took  # 2 s of audio cannot have played out sooner
        heard = pulse.speaker_bytes()[before:]
        loud = [rms(heard[i:i + 4800]) > 1000 for i in range(0, len(heard) - 4800, 4800)]
        assert sum(loud) >= 18  # about 2 s of tone in 100 ms blocks reached the speaker

    async def test_flush_interrupts_a_long_drain_and_reports_played_ms(self, pulse):
        sink = Sink()
        p = make_playback("spk", sink)
        p.enqueue(tone_s16(6.0), "long")
        p.finish("long")
        await until(lambda: p.played_ms("long") >= 1000)
        asked = time.monotonic()
        p.flush()
        await sink.until(lambda: sink.flushed)
        answered = time.monotonic() - asked
        p.stop()
        assert sink.drained == []
        played = sink.flushed[0]["long"]
        assert 1000 <= played <= 1000 + 1000 * answered + 300, (played, answered)
        assert answered < 0.5  # two periods of 20 ms, with room for a shared machine

    async def test_audio_after_flush_plays_and_drains(self, pulse):
        sink = Sink()
        p = make_playback("spk", sink)
        p.enqueue(tone_s16(3.0), "a")
        await until(lambda: p.played_ms("a") >= 200)
        p.flush()
        p.enqueue(tone_s16(0.3), "b")
        p.finish("b")
        await sink.until(lambda: sink.drained)
        p.stop()
        assert [r for r, _ in sink.drained] == ["b"]
        assert list(sink.flushed[0]) == ["a"]

    async def test_starved_response_underruns_and_recovers(self, pulse):
        # And however short the gap, what follows the underrun is placed on the device's
        # clock afresh: the echo canceller is told, not left to take it for one run.
        calls: list[str] = []

        class Echo:
            def played(self, samples, rate, heard_at, written_at) -> None:
                if not calls or calls[-1] != "played":
                    calls.append("played")

            def flushed(self) -> None:
                calls.append("flushed")

            def ran_dry(self) -> None:
                calls.append("ran_dry")

        sink = Sink()
        p = make_playback("spk", sink)
        p.echo = Echo()
        p.enqueue(tone_s16(0.2), "r")
        await until(lambda: p.played_ms("r") >= 200)
        await until(lambda: p.underruns or p._commands.qsize() == 0)
        # The device has run dry mid-response; the rest arrives late.
        await asyncio.sleep(0.3)  # hold back the rest of the answer: that is the test
        p.enqueue(tone_s16(0.3), "r")
        p.finish("r")
        await sink.until(lambda: sink.drained)
        p.stop()
        assert p.underruns >= 1
        assert p.played_ms("r") >= 450
        i = calls.index("ran_dry")
        assert calls[0] == "played" and "played" in calls[i:]

    async def test_capture_delivers_a_frame_per_80_ms_of_audio(self, pulse, tmp_path):
        import subprocess
        wav = tmp_path / "speech.wav"
        subprocess.run(["espeak-ng", "-w", str(wav), "testing one two three"], check=True)
        got = Frames()
        c = cap.Capture("mic", loop=asyncio.get_running_loop(), on_frame=got.on_frame,
                        streaming=True)
        c.start()
        try:
            await got.wait(5)
            player = pulse.play_into_mic(wav)
            await got.wait(40, timeout=30)
            player.wait(20)
        finally:
            c.stop()
        gaps = np.diff(got.times[5:40])
        rate = len(gaps) / (got.times[39] - got.times[5])
        assert 11.0 <= rate <= 14.0, rate  # 12.5 frames a second: real time
        # Two frames per 160 ms read; PulseAudio sometimes hands over two reads at once.
        assert max(gaps) <= 0.5, gaps
        assert max(rms(f) for f in got.frames) > 300  # the speech came through
        assert c.got == DeviceFormat(16000, 1, "S16_LE")


class TestDeviceLoss:
    """A second daemon that the test stops and starts, as a USB device would vanish."""

    @pytest.fixture
    def pulse2(self, pulse):
        from .audio_devices import Pulse
        daemon = Pulse("2")
        daemon.start()
        yield daemon
        daemon.stop()

    async def test_capture_reports_loss_retries_and_recovers(self, pulse2, caplog):
        got = Frames()
        c = cap.Capture("mic2", loop=asyncio.get_running_loop(), on_frame=got.on_frame,
                        on_status=got.on_status, retry_first=0.1, retry_cap=0.5,
                        streaming=True)
        c.start()
        try:
            await got.wait(3)
            pulse2.stop()
            await until(lambda: any(isinstance(e, device.DeviceLost) for e in got.status))
            pulse2.start()
            await until(lambda: any(isinstance(e, device.DeviceBack) for e in got.status), 30)
            n = len(got.frames)
            await got.wait(n + 3)
        finally:
            c.stop()
        assert c.reopens >= 1
        assert "microphone mic2 failed: " in caplog.text

    async def test_playback_survives_the_device_going_away(self, pulse2):
        sink = Sink()
        p = make_playback("spk2", sink)
        p.enqueue(tone_s16(4.0), "a")
        p.finish("a")
        await until(lambda: p.played_ms("a") >= 300)
        pulse2.stop()
        await sink.until(lambda: sink.drained, timeout=20)  # reported, not waited on forever
        pulse2.start()
        p.enqueue(tone_s16(0.3), "b")
        p.finish("b")
        await sink.until(lambda: len(sink.drained) == 2, timeout=30)
        p.stop()
        assert p.errors >= 1 and p.opens >= 2


# Opening this PCM fails inside alsa-lib's configuration evaluation (no such card), where
# alsa-lib calls its error handler with its own config lock held: as for 'default' on a
# machine whose sound card has not appeared yet.
BROKEN_PCM = """
pcm.broken {
    @func refer
    name {
        @func concat
        strings [ "cards." { @func card_driver card "nosuchcard" } ".pcm.default" ]
    }
}
"""

TWO_OPENERS = """
import sys, threading, alsaaudio
from speakerd.audio import device
from speakerd.audio.resample import DeviceFormat
assert device.quiet_alsa_lib()
sys.setswitchinterval(1e-6)  # hand the GIL over as often as possible
failures = []
def opener(kind):
    for _ in range(200):
        try:
            device.negotiate(kind, "broken", DeviceFormat(16000, 1, "S16_LE"), 80)
        except alsaaudio.ALSAAudioError as e:
            failures.append(str(e))
threads = [threading.Thread(target=opener, args=(k,), daemon=True)
           for k in (alsaaudio.PCM_CAPTURE, alsaaudio.PCM_PLAYBACK)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(len(failures), failures[0])
"""


def test_both_audio_threads_retrying_a_missing_device_do_not_deadlock(tmp_path):
    # The microphone and speaker threads retry their missing devices on their own
    # timers; two opens at once used to wedge the whole process (alsa-lib's lock
    # against the GIL), so the watchdog killed a daemon that was only waiting for a
    # sound card. A subprocess, because a deadlocked GIL would take pytest with it.
    conf = tmp_path / "asound.conf"
    conf.write_text(BROKEN_PCM)
    env = {**os.environ, "ALSA_CONFIG_PATH": str(conf)}
    try:
        r = subprocess.run([sys.executable, "-c", TWO_OPENERS], env=env, timeout=60,
                           capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        pytest.fail("two threads opening a missing ALSA device deadlocked")
    assert r.returncode == 0, r.stderr
    count, first = r.stdout.split(" ", 1)
    assert int(count) == 400 and "broken" in first


# Opens the FIFO for writing after a while: another process, so that it comes even
# when this one is stalled.
LATE_WRITER = ("import os, sys, time; time.sleep(2); os.open(sys.argv[1], os.O_WRONLY); "
               "time.sleep(30)")


def test_an_open_that_blocks_lets_the_other_threads_run(tmp_path):
    # alsa-lib's open of a filein PCM on a fresh FIFO waits for a writer, as an open
    # waits for a sound server slow to answer; pyalsaaudio holds the GIL through it.
    fifo = tmp_path / "mic.fifo"
    os.mkfifo(fifo)
    opened = threading.Event()

    def open_it() -> None:
        pcm, _ = device.negotiate(alsaaudio.PCM_CAPTURE, f"filein:FILE={fifo}",
                                  cap.PREFERRED, cap.PERIOD_MS)
        opened.set()
        pcm.close()
    writer = subprocess.Popen([sys.executable, "-c", LATE_WRITER, str(fifo)])
    try:
        threading.Thread(target=open_it, daemon=True).start()
        ticks = 0
        deadline = time.monotonic() + 20
        while not opened.wait(0.01):  # this thread's turns while the other one opens
            ticks += 1
            assert time.monotonic() < deadline, "the open never returned"
    finally:
        writer.kill()
        writer.wait()
    # About 200 in the writer's 2 s; none while the open held every thread.
    assert ticks >= 50, ticks


class TestStreaming:
    async def test_idle_capture_hands_no_frames_but_keeps_a_pre_roll(self, tmp_path):
        pcm = s16(sine(16000, 6.0, 350) + 0.1 * RNG.standard_normal(96000).astype(np.float32))
        (tmp_path / "in.raw").write_bytes(pcm)
        got = Frames()
        results: list[object] = []
        preroll: list[bytes] = []

        def in_thread(frame: bytes):
            # Runs in the capture thread before frame number c.frames joins the ring:
            # switching streaming on here is deterministic, unlike from the loop.
            if c.frames == 20:
                assert got.frames == []  # frames 0-19 were never handed to the loop
                preroll.extend(c.stream(True, after_frame=17))
            return "tick" if c.frames % 10 == 9 else None

        c = cap.Capture(f"filein:FILE={tmp_path}/in.raw", loop=asyncio.get_running_loop(),
                        on_frame=got.on_frame, in_thread=in_thread,
                        on_result=results.append, preroll_seconds=0.4,
                        max_pending_frames=100_000)
        c.start()
        try:
            await got.wait(10)
        finally:
            c.stop()
        assert len(preroll) == 2  # frames 18 and 19, from a 5-frame ring
        start = 18 * cap.FRAME_BYTES
        whole = b"".join(preroll + got.frames[:10])
        assert whole == pcm[start:start + len(whole)]  # contiguous, in order, nothing lost
        assert results[:2] == ["tick", "tick"]  # results went to the loop while idle


class TestThreadFailure:
    """A bug inside an audio thread must be reported, not leave a deaf speaker behind."""

    async def test_a_failing_detector_reports_the_capture_thread_failed(self, pulse, caplog):
        got = Frames()

        def broken_detector(frame: bytes) -> None:
            raise ValueError("a bug in the detector")

        c = cap.Capture("mic", loop=asyncio.get_running_loop(), on_frame=got.on_frame,
                        on_status=got.on_status, in_thread=broken_detector)
        c.start()
        try:
            await until(lambda: got.status)
        finally:
            c.stop()
        assert got.status == [device.ThreadFailed("capture", "ValueError('a bug in the "
                                                  "detector')")]
        assert "the microphone thread failed" in caplog.text
        assert "a bug in the detector" in caplog.text  # with its traceback
