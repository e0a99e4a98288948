"""ALSA devices for tests: file-backed PCMs over `null`, and PulseAudio null sinks for pacing.

The asoundrc is written and ALSA_CONFIG_PATH set when this module is imported (by
conftest, before anything loads alsa-lib), so every test and every speakerd
subprocess sees the same hermetic device list and nothing of the host's:

- `fileout:FILE=/path`             playback; every byte written lands in FILE (raw)
- `filein:FILE=/path`              capture; reads FILE, then zeros forever
- `spk`, `mic`                     PulseAudio null sinks (24 kHz / 16 kHz mono), paced
                                   in real time; `mic` captures what is played into
                                   the `mic` sink (`paplay -d mic`)
- `spk2`, `mic2`                   the same on a second daemon that a test may kill
- `default`                        `spk` and `mic`, as a Pi's default device would be
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

DIR = Path(tempfile.mkdtemp(prefix="speakerd-alsa-"))
ASOUNDRC = DIR / "asoundrc"


def _pulse_pcms(suffix: str) -> str:
    server = f'server "unix:{DIR}/pulse{suffix}/native"'
    hint = 'hint { show on; description "test device" }'
    return (f'pcm.spk{suffix} {{ type pulse; {server}; device "spk"; {hint} }}\n'
            f'pcm.mic{suffix} {{ type pulse; {server}; device "mic.monitor"; {hint} }}\n'
            f'ctl.spk{suffix} {{ type pulse; {server}; device "spk" }}\n')


ASOUNDRC.write_text(f"""
pcm.fileout {{
    @args [ FILE ]
    @args.FILE {{ type string }}
    type file
    file $FILE
    format "raw"
    slave.pcm {{ type null }}
}}
pcm.filein {{
    @args [ FILE ]
    @args.FILE {{ type string }}
    type file
    file "/dev/null"
    infile $FILE
    format "raw"
    slave.pcm {{ type null }}
}}
pcm.null {{ type null }}
pcm.!default {{ type asym; playback.pcm "spk"; capture.pcm "mic" }}
ctl.!default {{ type pulse; server "unix:{DIR}/pulse/native" }}
{_pulse_pcms("")}
{_pulse_pcms("2")}
""")
os.environ["ALSA_CONFIG_PATH"] = str(ASOUNDRC)


class Pulse:
    """A user-mode PulseAudio daemon with a 24 kHz `spk` and a 16 kHz `mic` null sink.

    A parec stays attached to each monitor for the daemon's life: an idle null sink
    sleeps for up to ~2 s, which would otherwise stall the first write of a test.
    What the speaker played is appended to `speaker_file` (24 kHz s16le mono).
    """

    def __init__(self, suffix: str = "") -> None:
        self.dir = DIR / f"pulse{suffix}"
        self.socket = self.dir / "native"
        self.speaker_file = self.dir / "speaker.raw"
        # What PulseAudio itself says (errors only): an assertion it aborts on.
        self.log_path = self.dir / "pulseaudio.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.monitors: list[subprocess.Popen[bytes]] = []

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "PULSE_SERVER": f"unix:{self.socket}", "HOME": str(self.dir),
                "XDG_RUNTIME_DIR": str(self.dir), "DBUS_SESSION_BUS_ADDRESS": "disabled:"}

    def start(self, timeout: float = 20) -> None:
        self.dir.mkdir(exist_ok=True)
        script = self.dir / "default.pa"
        script.write_text(
            f"load-module module-native-protocol-unix socket={self.socket} auth-anonymous=1\n"
            "load-module module-null-sink sink_name=spk rate=24000 channels=1\n"
            "load-module module-null-sink sink_name=mic rate=16000 channels=1\n")
        self.socket.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            # No shared memory: PulseAudio 16 aborts (memblock_replace_import:
            # n_imported > 0) when a client whose memfd blocks module-loopback still
            # holds disconnects, as `speakerd check` does in the room; the socket
            # carries these few kB/s as well.
            ["pulseaudio", "-n", "-F", str(script), "--daemonize=no", "--system=no",
             "--disable-shm=yes",
             "--exit-idle-time=-1", "--use-pid-file=no", "--log-target=stderr",
             "--log-level=error"],
            env=self.env, stdout=subprocess.DEVNULL, stderr=self.log_path.open("ab"))
        deadline = time.monotonic() + timeout
        while subprocess.run(["pactl", "info"], env=self.env, capture_output=True,
                             timeout=10).returncode != 0:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("pulseaudio did not start")
            time.sleep(0.05)
        self.speaker_file.write_bytes(b"")
        with self.speaker_file.open("ab") as out:
            self.monitors = [
                subprocess.Popen(["parec", "-d", "spk.monitor", "--raw", "--format=s16le",
                                  "--rate=24000", "--channels=1", "--latency-msec=10"],
                                 env=self.env, stdout=out),
                subprocess.Popen(["parec", "-d", "mic.monitor", "--raw", "--format=s16le",
                                  "--rate=16000", "--channels=1"],
                                 env=self.env, stdout=subprocess.DEVNULL)]

    def stop(self) -> None:
        for p in [*self.monitors, self.proc]:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.monitors = []

    def speaker_bytes(self) -> bytes:
        return self.speaker_file.read_bytes()

    def play_into_mic(self, wav: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["paplay", "-d", "mic", str(wav)], env=self.env)


def pulse_available() -> bool:
    return all(shutil.which(c) for c in ("pulseaudio", "pactl", "parec", "paplay"))
