"""Wake-word detection with the real openWakeWord models on espeak-ng speech."""

from __future__ import annotations

import asyncio
import logging
import shutil
from dataclasses import dataclass

import numpy as np
import pytest

from speakerd import config as configmod
from speakerd.audio import capture as cap
from speakerd.errors import ConfigError
from speakerd.tflite import MODELS_DIR
from speakerd.wakeword import Detector, model_path

from .conftest import clean_env, need, run_speakerd
from .speech import frames, have_espeak, silence, speak, to_pcm

ALL = ["hey_jarvis", "alexa", "okay_nabu", "hey_mycroft", "hey_rhasspy"]
LEAD = 1.5  # seconds of silence before each phrase


@pytest.fixture(scope="module")
def detector():
    need(have_espeak(), "espeak-ng")
    d = Detector([(m, model_path(m), 0.5) for m in ALL], refractory_seconds=2.0)
    d.warm_up()
    yield d
    d.close()


@dataclass(frozen=True)
class Hit:
    model: str
    score: float
    seconds: float  # end of the detecting frame, from the start of x


def run(d: Detector, x: np.ndarray) -> list[Hit]:
    d.reset()
    base = d.frame + 1
    found = []
    for f in frames(x):
        hit = d.process(f)
        if hit:
            found.append(Hit(hit.model, hit.score, hit.seconds - base * 0.08))
    return found


POSITIVE = [
    ("hey jarvis", "hey_jarvis", v, s) for v, s in
    [("en-us", 160), ("en-gb", 160), ("en-us+m3", 160), ("en-us+f3", 150), ("en-us+f3", 170)]
] + [
    ("alexa", "alexa", v, 160) for v in ("en-us", "en-gb", "en-us+m3")
] + [
    ("okay nabu", "okay_nabu", v, s) for v, s in
    [("en-us", 160), ("en-us+m3", 160), ("en-us+f3", 150), ("en-us+f3", 170)]
] + [
    # espeak says "mycroft" wrongly; spelled apart it is right.
    ("hey my croft", "hey_mycroft", v, 160) for v in ("en-us", "en-gb", "en-us+m3")
] + [
    ("hey rhasspy", "hey_rhasspy", v, s) for v, s in
    [("en-us", 160), ("en-gb", 160), ("en-us+m3", 160), ("en-us+f3", 150)]
]

NEGATIVE = ["what is the weather today", "turn on the kitchen lights", "hey jason",
            "set a timer for ten minutes", "play some music in the living room",
            "how long do I boil an egg"]


class TestDetection:
    @pytest.mark.parametrize(("text", "model", "voice", "speed"), POSITIVE,
                             ids=[f"{m}-{v}-{s}" for _, m, v, s in POSITIVE])
    def test_positive_detected_once_at_the_right_time(self, detector, text, model, voice,
                                                      speed):
        phrase = speak(text, voice, speed)
        found = run(detector, np.concatenate([silence(LEAD), phrase, silence(1.5)]))
        assert [d.model for d in found] == [model]
        end = LEAD + phrase.size / 16000
        # After the phrase began, and no later than the model's latency after it ended.
        assert LEAD < found[0].seconds <= end + 1.0, (found[0].seconds, end)

    @pytest.mark.parametrize("voice", ["en-us", "en-gb", "en-us+f3"])
    def test_ordinary_sentences_do_not_trigger(self, detector, voice):
        x = np.concatenate([silence(1.0)] + [np.concatenate([speak(t, voice), silence(0.3)])
                                             for t in NEGATIVE])
        assert run(detector, x) == []

    def test_silence_and_noise_do_not_trigger(self, detector):
        rng = np.random.default_rng(3)
        white = 0.1 * rng.standard_normal(16000 * 10).astype(np.float32)
        pink = np.cumsum(rng.standard_normal(16000 * 10)).astype(np.float32)
        pink = 0.1 * (pink - np.convolve(pink, np.ones(400) / 400, "same")) / pink.std()
        assert run(detector, silence(10)) == []
        assert run(detector, white) == []
        assert run(detector, pink.astype(np.float32)) == []

    def test_three_wake_words_in_a_minute_of_speech_and_noise(self):
        need(have_espeak(), "espeak-ng")
        rng = np.random.default_rng(11)
        stream = 0.003 * rng.standard_normal(16000 * 60).astype(np.float32)
        # Speech everywhere but around the wake words.
        t = 0.5
        for n in range(40):
            s = speak(NEGATIVE[n % len(NEGATIVE)], ["en-us", "en-gb"][n % 2])
            start = int(t * 16000)
            if start + s.size >= stream.size:
                break
            if not any(at - 2.5 < t < at + 3 for at in (10, 30, 48)):
                stream[start:start + s.size] += 0.7 * s
            t += s.size / 16000 + 0.4
        times = {10.0: "en-us", 30.0: "en-gb", 48.0: "en-us+m3"}
        spans = []
        for at, voice in times.items():
            w = speak("hey jarvis", voice)
            stream[int(at * 16000):int(at * 16000) + w.size] += w
            spans.append((at, at + w.size / 16000))
        d = Detector([("hey_jarvis", model_path("hey_jarvis"), 0.5)], refractory_seconds=2.0)
        d.warm_up()
        found = run(d, stream)
        d.close()
        assert len(found) == 3, found
        for hit, (start, end) in zip(found, spans, strict=True):
            assert start < hit.seconds <= end + 1.0

    def test_reset_stops_the_wake_words_tail_from_triggering_again(self):
        need(have_espeak(), "espeak-ng")
        # No refractory period: only the model reset after a detection holds it to one.
        d = Detector([("hey_jarvis", model_path("hey_jarvis"), 0.5)], refractory_seconds=0)
        d.warm_up()
        x = np.concatenate([silence(LEAD), speak("hey jarvis", "en-gb"), silence(2)])
        assert len(run(d, x)) == 1
        scores = []  # what the model says frame by frame without a reset
        d.reset()
        for f in frames(x):
            d.frame += 1
            if d._reset.is_set():
                d._reset.clear()
                d.classifiers[0].reset()
            for e in d.features.process(np.frombuffer(f, "<i2").astype(np.float32)):
                scores.extend(d.classifiers[0].process(e))
        assert sum(p >= 0.5 for p in scores) >= 2  # so without the reset it would re-trigger
        d.close()

    def test_trigger_level_needs_consecutive_frames(self):
        need(have_espeak(), "espeak-ng")
        x = np.concatenate([silence(LEAD), speak("alexa", "en-us+m3"), silence(1.5)])
        one = Detector([("alexa", model_path("alexa"), 0.5)], trigger_level=1)
        strict = Detector([("alexa", model_path("alexa"), 0.5)], trigger_level=10)
        for d in (one, strict):
            d.warm_up()
        assert len(run(one, x)) == 1
        assert run(strict, x) == []

    def test_near_misses_are_logged_at_debug(self, caplog):
        need(have_espeak(), "espeak-ng")
        d = Detector([("alexa", model_path("alexa"), 0.99)])
        d.warm_up()
        with caplog.at_level(logging.DEBUG, logger="speakerd.wakeword"):
            found = run(d, np.concatenate([silence(LEAD), speak("alexa", "en-us+m3"),
                                           silence(1)]))
        assert found == []
        assert "near miss: alexa scored 0.7" in caplog.text

    def test_disabled_detector_reports_nothing(self, detector):
        detector.enabled = False
        try:
            x = np.concatenate([silence(LEAD), speak("hey jarvis"), silence(1)])
            assert run(detector, x) == []
        finally:
            detector.enabled = True


class TestPause:
    """Not running the models while the session ignores the wake word."""

    @staticmethod
    def clip() -> list[bytes]:
        need(have_espeak(), "espeak-ng")
        return frames(np.concatenate([
            silence(LEAD), speak("hey jarvis", "en-gb"), silence(0.3),
            speak("turn on the kitchen lights"), silence(4),
            speak("hey jarvis", "en-us"), silence(2)]))

    @staticmethod
    def scores(d: Detector, chunks: list[bytes], paused: range
               ) -> tuple[list[dict[str, float]], list[int]]:
        out, hits = [], []
        for i, f in enumerate(chunks):
            d.needed = i not in paused
            before = d.features.audio
            if d.process(f):
                hits.append(i)
            if i in paused:
                assert d.features.audio is before  # no model ran
            out.append(dict(d.scores))
        return out, hits

    @pytest.mark.parametrize("pause_s", [0.8, 5.0], ids=["short", "long"])
    def test_scores_after_a_pause_are_those_of_a_detector_that_never_paused(self, pause_s):
        chunks = self.clip()
        ref = Detector([("hey_jarvis", model_path("hey_jarvis"), 0.5)], refractory_seconds=0)
        d = Detector([("hey_jarvis", model_path("hey_jarvis"), 0.5)], refractory_seconds=0)
        for x in (ref, d):
            x.warm_up()
        want, hits = self.scores(ref, chunks, range(0))
        assert len(hits) == 2
        # As in a conversation: the models rest from just after the wake word.
        paused = range(hits[0] + 1, hits[0] + 1 + round(pause_s / 0.08))
        got, got_hits = self.scores(d, chunks, paused)
        assert got_hits == hits
        after = [i for i in range(paused.stop, len(chunks)) if want[i]]
        assert len(after) > 40
        diff = max(abs(got[i]["hey_jarvis"] - want[i]["hey_jarvis"]) for i in after)
        assert diff < 1e-5, diff
        # The second wake word, after the pause, is there with the same score.
        assert max(got[i]["hey_jarvis"] for i in after) > 0.5
        ref.close()
        d.close()

    def test_resuming_does_not_hear_the_wake_word_from_before_the_pause(self):
        # A conversation starts on the wake word; when the models run again, what
        # they remember must not be that wake word.
        need(have_espeak(), "espeak-ng")
        d = Detector([("hey_jarvis", model_path("hey_jarvis"), 0.5)], refractory_seconds=0)
        d.warm_up()
        chunks = frames(np.concatenate([silence(LEAD), speak("hey jarvis", "en-gb"),
                                        silence(6)]))
        found: list[int] = []
        for i, f in enumerate(chunks):
            d.needed = not (found and found[0] < i <= found[0] + 40)  # 3.2 s of rest
            if d.process(f):
                found.append(i)
        assert len(found) == 1
        assert d.needed and max(d.scores.values()) < 0.1
        d.close()


class TestAgainstPackage:
    def test_scores_match_pyopen_wakeword_as_shipped(self):
        need(have_espeak(), "espeak-ng")
        from pyopen_wakeword import Model, OpenWakeWord, OpenWakeWordFeatures
        x = np.concatenate([silence(1), speak("hey jarvis"), silence(1),
                            speak("turn on the lights"), silence(1)])
        chunks = frames(x)
        feats, model = OpenWakeWordFeatures.from_builtin(), OpenWakeWord.from_builtin(
            Model.HEY_JARVIS)
        ref = [p for c in chunks for e in feats.process_streaming(c)
               for p in model.process_streaming(e)]
        d = Detector([("hey_jarvis", model_path("hey_jarvis"), 0.5)])
        ours = [p for c in chunks
                for e in d.features.process(np.frombuffer(c, "<i2").astype(np.float32))
                for p in d.classifiers[0].process(e)]
        d.close()
        assert len(ours) == len(ref)
        # Different thread counts sum in a different order; nothing more.
        assert np.max(np.abs(np.array(ours) - np.array(ref))) < 1e-5
        assert [p >= 0.5 for p in ours] == [p >= 0.5 for p in ref]
        assert max(ref) > 0.9


class TestConfig:
    def test_custom_model_path_loads_and_detects(self, tmp_path, write_config):
        need(have_espeak(), "espeak-ng")
        custom = tmp_path / "kitchen_buddy.tflite"
        shutil.copy(model_path("hey_jarvis"), custom)
        c = configmod.load(write_config(f"[wake_word]\nmodels = ['{custom}']\n"
                                        "model_thresholds = { kitchen_buddy = 0.6 }\n"))
        d = Detector.from_config(c.wake_word)
        d.warm_up()
        found = run(d, np.concatenate([silence(LEAD), speak("hey jarvis"), silence(1)]))
        d.close()
        assert [(f.model, f.score >= 0.6) for f in found] == [("kitchen_buddy", True)]
        assert d.classifiers[0].threshold == 0.6

    def test_invalid_model_file_is_a_config_error(self, tmp_path, write_config):
        bad = tmp_path / "broken.tflite"
        bad.write_bytes(b"not a model at all")
        path = write_config(f"[wake_word]\nmodels = ['{bad}']\n")
        with pytest.raises(ConfigError, match=r"wake_word.models: .*broken.tflite is not a "
                           r"TFLite model \(built-in models: alexa, "):
            Detector.from_config(configmod.load(path).wake_word, str(path))
        r = run_speakerd("config", "--check", "--config", str(path), env=clean_env())
        assert r.returncode == 78
        assert r.stderr.startswith(f"speakerd: {path}: wake_word.models: ")

    def test_a_model_that_is_not_a_classifier_is_refused(self, write_config):
        path = write_config(f"[wake_word]\nmodels = ['{MODELS_DIR}/melspectrogram.tflite']\n")
        with pytest.raises(ConfigError, match="is not an openWakeWord classifier"):
            Detector.from_config(configmod.load(path).wake_word, str(path))

    def test_show_lists_resolved_model_files(self, write_config):
        r = run_speakerd("config", "--show", "--config",
                         str(write_config("[wake_word]\nmodels = ['alexa', 'okay_nabu']\n")))
        assert r.returncode == 0, r.stderr
        assert f"# wake word alexa: {model_path('alexa')}" in r.stdout
        assert f"# wake word okay_nabu: {model_path('okay_nabu')}" in r.stdout


async def test_capture_thread_runs_detection_and_hands_it_to_the_loop(tmp_path):
    need(have_espeak(), "espeak-ng")
    clip = np.concatenate([silence(LEAD), speak("hey jarvis", "en-gb"), silence(2)])
    (tmp_path / "in.raw").write_bytes(to_pcm(clip))
    d = Detector([("hey_jarvis", model_path("hey_jarvis"), 0.5)])
    d.warm_up()
    loop = asyncio.get_running_loop()
    heard: asyncio.Future[object] = loop.create_future()
    threads: set[str] = set()

    def in_thread(frame: bytes):
        import threading
        threads.add(threading.current_thread().name)
        return d.process(frame)

    c = cap.Capture(f"filein:FILE={tmp_path}/in.raw", loop=loop, on_frame=lambda f: None,
                    in_thread=in_thread, on_result=lambda r: heard.done() or
                    heard.set_result(r), max_pending_frames=100_000)
    c.start()
    try:
        hit = await asyncio.wait_for(heard, 30)
    finally:
        c.stop()
        d.close()
    assert hit.model == "hey_jarvis"
    assert threads == {"capture"}  # inference never ran on the loop


def test_the_models_rest_only_where_the_session_ignores_the_wake_word():
    from speakerd import session as s

    def needed(state: s.State) -> bool:  # what the daemon reads to pace the detector
        session = s.Session()
        session.state = state
        return session.wake_word_needed
    WAKE_WORD_IGNORED = {state for state in s.State if not needed(state)}
    for state in s.State:
        ignored = s.WakeWordDetected in s.IGNORED.get(state, ())
        if state in WAKE_WORD_IGNORED:
            assert ignored, state  # resting there would lose a wake word it acts on
    # ...and it does run where a wake word barges in or starts a conversation.
    assert not {s.State.IDLE, s.State.RESPONDING, s.State.AUDIO_PLAYING} & set(
        WAKE_WORD_IGNORED)
