"""The echo check: play speech-like noise on the speaker, hear it come back at the
microphone,
and say how late the echo is and how much of it the canceller removes. (Not a sweep:
at each moment a sweep is one tone, which AEC3's filter learns from slowly.)

Only with `[audio] echo_cancellation = "software"`: that is what it tests, through
the same capture and playback threads and the same canceller as `speakerd run`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from speakerd import config as configmod
from speakerd.audio import capture as capmod
from speakerd.audio import echo as echomod
from speakerd.audio import playback as pbmod
from speakerd.audio import speex_echo
from speakerd.checks.report import Report, fail, ok, skip, warn

SECONDS = 4.0
PEAK = 0.5
GOOD_DB = 20.0  # AEC3 on a fresh instance removes 30 dB in a quiet room
HEARD_DBFS = -50.0  # the test noise at the microphone: below this it did not hear it
BARGE_IN_FIX = ("voice barge-in needs the microphone to hear the speaker: raise the "
                "volume or move them closer; or set [conversation] barge_in = \"wake_word\"")


def babble(rate: int = pbmod.RATE, seconds: float = SECONDS) -> bytes:
    """Noise shaped like speech's spectrum and rhythm (syllables at 4 Hz, a pause every
    second): wideband, so the delay shows as one sharp peak and the filters adapt as
    fast as they do on a voice, without a voice on disk; s16le mono at `rate`."""
    rng = np.random.default_rng(0)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    noise = rng.standard_normal(n)
    # Speech falls off above ~500 Hz: a one-pole low-pass tilts white noise that way.
    spectrum = np.fft.rfft(noise)
    f = np.fft.rfftfreq(n, 1 / rate)
    shaped = np.fft.irfft(spectrum / np.sqrt(1 + (f / 500) ** 2), n)
    syllables = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) ** 0.5
    pauses = (t % 1.0) < 0.8
    x = shaped * syllables * pauses
    x *= PEAK / np.max(np.abs(x))
    return (x * 32767).astype("<i2").tobytes()


@dataclass(frozen=True, slots=True)
class Measured:
    lag_ms: float | None  # the echo behind what was played, None if not found
    mic_dbfs: float  # the microphone while the speaker played
    removed_db: float  # by AEC3, what the server gets
    linear_db: float | None  # by speex's filter, what the barge-in detector hears


async def measure(config: configmod.Config) -> Measured | None:
    """Play the noise with the canceller watching both ends; None if nothing played."""
    loop = asyncio.get_running_loop()
    canceller = echomod.EchoCanceller()
    drained: asyncio.Future[None] = loop.create_future()

    def on_drained(rid: str) -> None:
        if not drained.done():
            drained.set_result(None)
    speaker = pbmod.Playback(config.audio.playback_device, loop=loop, on_drained=on_drained,
                             volume=config.audio.playback_volume)
    mic = capmod.Capture(config.audio.capture_device, loop=loop, on_frame=lambda f: None)
    mic.clean = echomod.MicPath(canceller, None)
    speaker.echo = canceller
    pcm = babble()
    mic.open()
    mic.start()
    speaker.start()
    try:
        speaker.enqueue(pcm, "echo-check")
        speaker.finish("echo-check")
        await asyncio.wait_for(drained, len(pcm) / 2 / pbmod.RATE + 5)
        await asyncio.sleep(0.3)  # the room's tail, through the capture thread
    finally:
        speaker.stop()
        mic.stop()
    stats = canceller.take_stats()
    if stats is None:
        return None
    linear = -canceller.talk.ratio if canceller.talk.ratio < 0 else None
    return Measured(canceller.delay.lag_ms, stats.mic_dbfs, stats.reduction_db, linear)


def judge(report: Report, m: Measured | None) -> None:
    if m is None:
        report.add(fail("echo", "the canceller saw nothing played: the speaker took no audio",
                        "run check without --listen first: the speaker tone says why"))
        return
    if m.mic_dbfs < HEARD_DBFS or m.lag_ms is None:
        level = "digital silence" if m.mic_dbfs < -120 else f"{m.mic_dbfs:.0f} dBFS"
        report.add(warn("echo", f"the microphone did not hear the speaker ({level} while "
                        "it played)", BARGE_IN_FIX))
        return
    text = (f"heard {m.lag_ms:.0f} ms after it played; {m.removed_db:.0f} dB removed "
            f"from what the server gets")
    if m.linear_db is not None:
        text += f", {m.linear_db:.0f} dB by the barge-in detector's filter"
    if m.removed_db < GOOD_DB:
        report.add(warn("echo", text, "a speaker that distorts or a mic that clips leaves "
                        "echo the canceller cannot model: lower the volume or the capture "
                        "gain"))
    else:
        report.add(ok("echo", text))


def check(report: Report, config: configmod.Config) -> None:
    if config.audio.echo_cancellation != "software":
        report.add(skip("echo", f'[audio] echo_cancellation = "{config.audio.echo_cancellation}"'
                        ': speakerd does not cancel the echo itself'))
        return
    if not speex_echo.available():
        report.add(warn("echo", "libspeexdsp is not installed: no voice barge-in without it "
                        "(the wake word still interrupts)", "sudo apt install libspeexdsp1"))
    judge(report, asyncio.run(measure(config)))
