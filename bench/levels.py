"""What a `levels` request (or `speakerd check`) adds to the capture thread's work.

    .venv/bin/python bench/levels.py [SECONDS [REPEATS]]

speakerd's Detector fed the same speech-and-noise audio from memory (not paced, so the
figure is the detector's own work), alternately (a) as at idle, no meter attached,
and (b) with a levels meter attached for the whole run. Prints CPU seconds per
minute of audio for each (medians of REPEATS) and (b)'s ratio to (a).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))


def main() -> None:
    seconds = int(sys.argv[1]) if len(sys.argv) > 1 else 60
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    from bench.wakeword import audio
    from speakerd.audio.levels import Meter
    from speakerd.config import WakeWordConfig
    from speakerd.wakeword import Detector

    pcm = audio(seconds)
    frames = [pcm[i:i + 2560] for i in range(0, len(pcm) - 2559, 2560)]
    detector = Detector.from_config(WakeWordConfig())
    detector.warm_up()
    figures: dict[str, list[float]] = {"idle (no meter)": [], "levels meter attached": []}
    for _ in range(repeats):
        for name in figures:
            if name.startswith("levels"):
                detector.meter = Meter(seconds * 2, [(c.name, c.threshold) for c in
                                                     detector.classifiers],
                                       detector.trigger_level, lambda report: None)
            started = time.process_time()
            for frame in frames:
                detector.process(frame)
            figures[name].append((time.process_time() - started) * 60 / seconds)
            detector.meter = None
    detector.close()
    base = statistics.median(figures["idle (no meter)"])
    print(f"{seconds} s of audio, {repeats} runs each, medians; CPU s per minute of audio")
    for name, values in figures.items():
        m = statistics.median(values)
        print(f"  {name:24s} {m:6.3f}   ratio {m / base:5.3f}")


if __name__ == "__main__":
    main()
