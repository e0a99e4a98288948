"""CPU of the wake-word detector alone, side by side, on the same real-time-paced audio.

    .venv/bin/python bench/wakeword.py [SECONDS [REPEATS]]

(a) bare pyopen-wakeword as shipped (its interpreters use TFLite's default thread pool)
(b) speakerd's Detector (one thread per interpreter, XNNPACK)
each with one model and with all five, each in a fresh process fed from memory at
real-time pace. Prints CPU seconds per minute of audio and the ratio to (a) with the
same models, start-up time (including the feature extractor's warm-up) and RSS after
loading. The whole `speakerd run` process at idle is bench/idle.py.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))

ALL = ["hey_jarvis", "alexa", "okay_nabu", "hey_mycroft", "hey_rhasspy"]


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


PHRASES = ("what is the weather today", "hey jarvis", "turn on the kitchen lights",
           "set a timer for ten minutes")


def audio(seconds: int, phrases: tuple[str, ...] = PHRASES) -> bytes:
    """Speech, noise and (by default) a wake word every 15 s: what a kitchen sounds like."""
    import numpy as np

    from tests.speech import speak, to_pcm
    rng = np.random.default_rng(5)
    x = 0.003 * rng.standard_normal(16000 * seconds).astype(np.float32)
    t = 0
    n = 0
    while True:
        s = speak(phrases[n % len(phrases)])
        if t + s.size >= x.size:
            break
        x[t:t + s.size] += 0.7 * s
        t += s.size + 16000 * 2
        n += 1
    return to_pcm(x)


def paced(chunks: list[bytes], handle) -> None:
    start = time.monotonic()
    for n, chunk in enumerate(chunks):
        handle(chunk)
        delay = start + (n + 1) * 0.08 - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def variant(name: str, models: list[str], seconds: int) -> dict[str, float]:
    pcm = audio(seconds)
    chunks = [pcm[i:i + 2560] for i in range(0, len(pcm) - 2559, 2560)]
    t0 = time.monotonic()
    if name == "a":
        from pyopen_wakeword import Model, OpenWakeWord, OpenWakeWordFeatures
        feats = OpenWakeWordFeatures.from_builtin()
        ww = [OpenWakeWord.from_builtin(Model(m)) for m in models]
        for _ in feats.process_streaming(bytes(2560)):
            pass

        def handle(chunk: bytes) -> None:
            for emb in feats.process_streaming(chunk):
                for w in ww:
                    for _ in w.process_streaming(emb):
                        pass
    else:
        from speakerd.wakeword import Detector, model_path
        det = Detector([(m, model_path(m), 0.5) for m in models])
        det.warm_up()
        handle = det.process  # type: ignore[assignment]
    startup = time.monotonic() - t0
    rss = rss_mb()
    before = cpu()
    paced(chunks, handle)
    return {"startup": startup, "rss": rss, "cpu": cpu() - before, "seconds": seconds}


def main(seconds: int, repeats: int = 3) -> None:
    # Interleaved repeats, medians reported: the baseline itself moves +-10% from run
    # to run on a shared machine.
    runs: dict[tuple[str, int], list[dict[str, float]]] = {}
    for _ in range(repeats):
        for models in (["hey_jarvis"], ALL):
            for name in ("a", "b"):
                out = subprocess.run([sys.executable, __file__, "--variant", name,
                                      ",".join(models), str(seconds)], capture_output=True,
                                     text=True, env={**os.environ, "PYTHONPATH": str(HERE)})
                if out.returncode:
                    print(out.stderr[-2000:])
                    raise SystemExit(1)
                result = json.loads(out.stdout.strip().splitlines()[-1])
                runs.setdefault((name, len(models)), []).append(result)
    rows = {key: {k: statistics.median(r[k] for r in results) for k in results[0]}
            for key, results in runs.items()}
    labels = {"a": "(a) pyopen-wakeword as shipped", "b": "(b) speakerd Detector"}
    print(f"{seconds} s of paced audio per run, median of {repeats} interleaved runs; "
          f"CPU seconds per minute of audio; {os.cpu_count()} CPUs")
    for n in (1, 5):
        base = rows[("a", n)]["cpu"] / rows[("a", n)]["seconds"] * 60
        for name in ("a", "b"):
            r = rows[(name, n)]
            per_min = r["cpu"] / r["seconds"] * 60
            print(f"{labels[name]:34s} {n} model(s): {per_min:6.2f} s/min  "
                  f"ratio {per_min / base:5.2f}  start-up {r['startup']:.2f} s  "
                  f"RSS {r['rss']:.0f} MB")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--variant":
        result = variant(sys.argv[2], sys.argv[3].split(","), int(sys.argv[4]))
        print(json.dumps(result))
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 30,
             int(sys.argv[2]) if len(sys.argv) > 2 else 3)
