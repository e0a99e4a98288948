"""Runs speakerd on one asyncio loop: wires audio, wake word, socket and tools to the session."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from speakerd import __version__
from speakerd import announce as announcemod
from speakerd import config as configmod
from speakerd import control as controlmod
from speakerd import log as logmod
from speakerd import phrases as phrasesmod
from speakerd import session as s
from speakerd.audio import capture as capmod
from speakerd.audio import cues as cuesmod
from speakerd.audio import device as devmod
from speakerd.audio import echo as echomod
from speakerd.audio import levels as levelsmod
from speakerd.audio import playback as pbmod
from speakerd.audio import resample
from speakerd.buttons import Buttons
from speakerd.errors import EX_SOFTWARE, ConfigError, UnavailableError
from speakerd.leds import Leds
from speakerd.notify import Notifier
from speakerd.phrase_cache import PhraseCache
from speakerd.realtime import client as clientmod
from speakerd.realtime import protocol
from speakerd.realtime import reach as reachmod
from speakerd.tools import Registry, plugins
from speakerd.tools import timers as timermod
from speakerd.tools import volume as volmod
from speakerd.tools.builtin import BUILTIN
from speakerd.wakeword import Detection, Detector

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 5.0  # seconds an answer may still play after SIGTERM
# Seconds the start waits for each device's first open before going on without it.
# Opens take tens of ms; one that takes longer (a sound server slow to answer, a
# busy device) is waited for in its thread while speakerd runs.
OPEN_WAIT = 1.0


def build_tools(c: configmod.Config, volume: volmod.Volume,
                timers: timermod.Timers) -> Registry:
    """The enabled tools: built-ins by name, then plug-ins."""
    available = {**BUILTIN, **{t.name: t for t in volmod.tools(volume)},
                 **{t.name: t for t in timermod.tools(timers)}}
    enabled = set(c.tools.enabled)
    chosen = [t for name, t in available.items() if name in enabled]
    chosen += plugins.load(enabled - set(available))
    return Registry(chosen, timeout=c.tools.timeout_seconds)


def session_settings(c: configmod.Config) -> s.Settings:
    return s.Settings(follow_up_seconds=c.conversation.follow_up_seconds,
                      follow_up_guard_ms=c.audio.follow_up_guard_ms,
                      max_session_seconds=c.conversation.max_session_seconds,
                      wake_cue=c.cues.wake, end_cue=c.cues.end,
                      transcripts=c.log.transcripts, barge_in=c.conversation.barge_in)


class _PlaybackGain:
    """The software gain of the playback path, as the volume control's fallback."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    @property
    def volume(self) -> float:
        d = self._daemon
        return d.playback.volume if d.playback else d.config.audio.playback_volume

    @volume.setter
    def volume(self, value: float) -> None:
        if self._daemon.playback:
            self._daemon.playback.volume = value


class Daemon:
    """Owns the loop's state. `await run()` returns the process exit code.

    Inputs from every source go through one queue into `Session.handle`; each
    returned action is carried out by the handler its type names in `_handlers`.
    """

    def __init__(self, config: configmod.Config, *, notifier: Notifier,
                 redact: logmod.RedactFilter, api_key: configmod.Secret | None = None,
                 tools: Registry | None = None, pin_factory: Any = None,
                 state_dir: str | None = None, control: str | None = None) -> None:
        self.config = config
        self.notifier = notifier
        self.redact = redact
        self.api_key = api_key
        self.pin_factory = pin_factory
        # systemd's StateDirectory=; by hand, mute is simply not remembered.
        state = state_dir or os.environ.get("STATE_DIRECTORY", "").split(":")[0]
        self.mute_file = Path(state) / "muted" if state else None
        # The phrases in the assistant's voice; by hand (no state directory), none.
        self.phrase_cache = PhraseCache(Path(state) / "phrases") if state else None
        muted = bool(config.buttons.remember_mute and self.mute_file
                     and self.mute_file.exists())
        self.session = s.Session(session_settings(config), muted=muted)
        self.volume = volmod.Volume(config.audio.mixer_control, volmod.mixer_device_for(
            config.audio.playback_device, config.audio.mixer_device), _PlaybackGain(self))
        self._timers_changed = asyncio.Event()
        self.timers = timermod.Timers(on_change=self._timers_changed.set)
        self.ringer = timermod.Ringer(lambda: self._cue(s.PlayCue("timer")))
        self.tools = tools or build_tools(config, self.volume, self.timers)
        self.mcp: Any = None  # speakerd.tools.mcp.Manager once [[mcp]] is configured
        self._inputs: asyncio.Queue[object] = asyncio.Queue()
        self._stop = asyncio.Event()
        self._exit_code = 0
        # Devices that are not there (yet): "microphone"/"speaker" -> ALSA name.
        self.missing: dict[str, str] = {}
        # Devices whose thread has not yet said how its first open went.
        self._opening: dict[str, asyncio.Future[None]] = {}
        self._open_began = 0.0
        self._started = False  # the start's wait for the devices is over
        self._reload_failed = False  # the file on disk is not the config that runs
        self._idle = asyncio.Event()  # set whenever the session comes to rest
        self._turn: dict[str, float] = {}  # timings of the current turn, for the debug log
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._client: clientmod.RealtimeClient | None = None
        self._retrying: asyncio.Task[Any] | None = None  # the service, in the background
        self._mic_resampler: resample.Resampler | None = None
        self._cue_ids = itertools.count(1)
        self._cues = cuesmod.make_cues()
        self.phrases = self._make_phrases(config)
        self.capture: capmod.Capture | None = None
        self.playback: pbmod.Playback | None = None
        self.detector: Detector | None = None
        # One echo canceller for the daemon's life ([audio] echo_cancellation =
        # "software"), so it stays adapted to the room; it runs only in conversations.
        self.echo: echomod.EchoCanceller | None = None
        self._mic_path: echomod.MicPath | None = None  # the capture thread's, while it runs
        self.leds = Leds(config.leds, pin_factory=pin_factory)
        self.buttons: Buttons | None = None
        # The control socket (README, "Control socket") and what its status reports.
        self.stats = controlmod.Stats()
        self.control_path = controlmod.server_path(control)
        self.control: controlmod.ControlServer | None = None
        self._levels_lock = asyncio.Lock()
        self.announcer = announcemod.Announcer(self, spawn=self._spawn)
        self._handlers: dict[type, Any] = {
            s.Connect: self._connect, s.CloseConnection: self._close,
            s.Send: self._send, s.PlayAudio: self._play, s.FinishAudio: self._finish,
            s.FlushPlayback: self._flush, s.PlayCue: self._cue, s.SayPhrase: self._say,
            s.StreamMic: self._stream,
            s.SetWakeWord: self._set_wake_word, s.ResetWakeWord: self._reset_wake_word,
            s.RunTool: self._run_tool, s.StartTimer: self._start_timer,
            s.CancelTimer: self._cancel_timer, s.SetLeds: self._leds,
            s.SetStatus: self._status,
        }

    # --- life ---------------------------------------------------------------------

    def make_devices(self, loop: asyncio.AbstractEventLoop) -> None:
        """Load the models (ConfigError) and set up the audio devices' threads."""
        c = self.config
        self.detector = Detector.from_config(c.wake_word, c.path)
        self.detector.warm_up()  # 8 s of feature warm-up now, not on the first word
        self.detector.enabled = not self.session.muted
        self.playback = pbmod.Playback(
            c.audio.playback_device, loop=loop, on_drained=self._drained,
            on_flushed=self._flushed, on_status=lambda e: self._device("speaker", e),
            volume=c.audio.playback_volume)
        self.capture = capmod.Capture(
            c.audio.capture_device, loop=loop, on_frame=self._mic_frame,
            on_status=lambda e: self._device("microphone", e),
            in_thread=self.detector.process, on_result=self._detected)
        self._configure_echo()

    async def open_devices(self) -> None:
        """Open the audio devices, each in its own thread, waiting at most OPEN_WAIT.

        A device that is not there yet (a USB mic not plugged in, a HAT driver not
        loaded) or slow to open does not stop the start: it is named in the log and
        the status, and its thread keeps at it until it opens. The loop never opens
        a device itself: pyalsaaudio holds the GIL through the open.
        """
        assert self.capture and self.playback
        loop = asyncio.get_running_loop()
        self._opening = {what: loop.create_future() for what in ("speaker", "microphone")}
        self._open_began = time.monotonic()
        self.playback.start_opening()
        self.capture.start_opening()
        await asyncio.wait(list(self._opening.values()), timeout=OPEN_WAIT)
        self._started = True
        for what in self._opening:
            name = (self.capture if what == "microphone" else self.playback).device
            self.missing[what] = name
            log.warning("%s %s has not opened in %.0f s; speakerd starts anyway and uses "
                        "it once it opens", what, name, OPEN_WAIT,
                        extra=logmod.fields(event=f"{what}_slow"))

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.stats.watch_errors(self.redact.redact)
        self.make_devices(loop)
        assert self.capture and self.playback
        for sig, why in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")):
            loop.add_signal_handler(sig, self.request_stop, why)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        if self.notifier.watchdog_interval:
            self._spawn(self._watchdog(), "watchdog")
        await self.open_devices()
        self.buttons = Buttons(self.config.buttons, loop=loop, on_input=self._button,
                               pin_factory=self.pin_factory)
        self._show_leds()
        self._spawn(timermod.run(self.timers, self.ringer, self._timers_changed), "timers")
        self._update_mcp()
        worker = self._spawn(self._work(), "session")
        await self._start_control()
        self._log_startup()
        # In the background, after the start line: a few espeak-ng runs, ~0.1 s here.
        self._spawn(self.phrases.render(), "phrases")
        self.notifier.ready(self.status_line())
        try:
            await self._stop.wait()
            await self._wind_down()
        finally:
            self.notifier.stopping()
            if self.control:
                self.control.close()
            self.stats.unwatch_errors()
            worker.cancel()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._cancel_timers()
            self.capture.stop()
            self.playback.stop()
            if self.buttons:
                self.buttons.close()
            self.leds.close()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        log.info("speakerd stopped")
        return self._exit_code

    async def _wind_down(self) -> None:
        """SIGTERM mid-conversation: let the answer finish if it does so soon."""
        if self.session.state in (s.State.IDLE, s.State.ERROR):
            return
        self.put(s.EndRequested("shutdown"))
        try:
            await asyncio.wait_for(self._until_idle(), SHUTDOWN_GRACE)
        except TimeoutError:
            log.warning("the answer did not finish within %.0f s of SIGTERM; cut it off",
                        SHUTDOWN_GRACE)
        if self._client:
            self._client.close()

    async def _until_idle(self) -> None:
        while self.session.state not in (s.State.IDLE, s.State.ERROR):
            await self._idle.wait()
            self._idle.clear()

    def _update_mcp(self) -> None:
        """Connect to the [[mcp]] servers (start-up, SIGHUP) in background tasks; their
        tools join the registry as each server answers. No servers: `mcp` is not imported."""
        if self.mcp is None and self.config.mcp:
            from speakerd.tools import mcp as mcpmod
            self.mcp = mcpmod.Manager((), self.tools, config_path=self.config.path,
                                      on_secret=self.redact.add, spawn=self._spawn)
        if self.mcp is not None:
            self.mcp.config_path = self.config.path
            self.mcp.update(self.config.mcp)

    def _make_phrases(self, config: configmod.Config) -> phrasesmod.Phrases:
        phrases = phrasesmod.Phrases(config.phrases, self.phrase_cache, config.realtime.voice)
        phrases.load_cached()
        return phrases

    def request_stop(self, why: str = "request", exit_code: int = 0) -> None:
        """Wind down and make run() return `exit_code` (non-zero: systemd restarts us)."""
        if not self._stop.is_set():
            log.info("stopping on %s", why)
            self._exit_code = exit_code
            self._stop.set()

    def reload(self) -> None:
        """SIGHUP: re-read the config file; a bad file is reported and the old one kept."""
        self.notifier.reloading()
        path = self.config.path
        try:
            new = configmod.load(path)
            key = configmod.resolve_api_key(new)
        except ConfigError as e:
            log.error("config reload failed, keeping the running config: %s", e)
            self._reload_failed = True
            self.notifier.ready(self.status_line())
            return
        if key:
            self.redact.add(key.reveal())
            self.api_key = key
        if (new.phrases, new.realtime.voice) != (self.config.phrases,
                                                  self.config.realtime.voice):
            self.phrases = self._make_phrases(new)
            self._spawn(self.phrases.render(), "phrases")
        self.config = new
        self._configure_echo()
        self._update_mcp()
        # Takes effect from the next conversation; devices and models stay as opened.
        self.session.settings = session_settings(new)
        if self.playback:
            self.playback.volume = new.audio.playback_volume
        logmod.set_level(new.log.level)
        log.info("config reloaded from %s", path)
        self._reload_failed = False
        self.notifier.ready(self.status_line())

    # --- the one place inputs meet the session -------------------------------------

    def put(self, inp: object) -> None:
        self._inputs.put_nowait(inp)

    async def _work(self) -> None:
        while True:
            inp = await self._inputs.get()
            self._trace(inp)
            before, conv = self.session.state, self.session.conv
            try:
                actions = self.session.handle(inp)
            except Exception:
                # A bug in the rules must not leave a speaker that looks alive but no
                # longer listens: drop the conversation and start over from idle.
                log.exception("the session failed on %s; ending the conversation and "
                              "starting over", type(inp).__name__)
                self._start_over()
                self._inputs.task_done()
                continue
            for action in actions:
                try:
                    self._handlers[type(action)](action)
                except Exception:
                    # One failed action must not take the conversation down with it.
                    log.exception("could not carry out %s", type(action).__name__)
            if self.session.state in (s.State.IDLE, s.State.ERROR):
                self._idle.set()
                self._clean_mic(False)
            elif before in (s.State.IDLE, s.State.ERROR):
                self._clean_mic(True)
            if self._mic_path is not None:
                self._mic_path.over_answer = self.session.state in (
                    s.State.RESPONDING, s.State.AUDIO_PLAYING)
            self._pace_detector()
            self.announcer.session_changed()
            self.stats.step(before, conv, inp, self.session.state)
            self._inputs.task_done()  # settled() waits for this

    def _pace_detector(self) -> None:
        if self.detector:
            self.detector.needed = self.session.wake_word_needed

    def _start_over(self) -> None:
        muted = self.session.muted
        self.session = s.Session(session_settings(self.config), muted=muted,
                                 announcing=self.announcer.speaking)
        self._cancel_timers()
        if self._client:
            self._client.close()
            self._client = None
        if self.playback:
            self.playback.flush()
        if self.capture:
            self.capture.stream(False)
        self._clean_mic(False)
        self._mic_resampler = None
        self._pace_detector()
        self._show_leds()
        self._show_status()

    def _trace(self, inp: object) -> None:
        """The per-turn timing a person needs to see why a turn felt slow (debug)."""
        now = time.monotonic()
        t = self._turn
        if isinstance(inp, protocol.SpeechStarted):
            t.clear()
            t["speech"] = now
        elif isinstance(inp, protocol.SpeechStopped):
            t["spoken_ms"] = (now - t.get("speech", now)) * 1000
            t["stopped"] = now
        elif isinstance(inp, protocol.AudioDelta) and "first_audio" not in t and "stopped" in t:
            t["first_audio"] = now
            log.debug("turn: user spoke %.0f ms; first audio of response %s came %.0f ms "
                      "after the end of speech", t.get("spoken_ms", 0), inp.response_id,
                      (now - t["stopped"]) * 1000)
        elif isinstance(inp, s.PlaybackFlushed):
            log.debug("turn: barge-in after %s ms of the answer were heard",
                      ", ".join(str(ms) for ms in inp.played_ms.values()))

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[Any]) -> None:
        """Every task's end is seen here: none may die unheard."""
        self._tasks.discard(task)
        if task.cancelled() or self._stop.is_set():
            return
        error = task.exception()
        if error is not None:
            log.error("task %s failed", task.get_name(), exc_info=error)
        if task.get_name() in ("session", "watchdog"):
            # Without these the speaker would look alive and no longer listen (or be
            # killed by the watchdog later): stop now and let systemd restart us.
            log.critical("the %s task ended; stopping so that systemd restarts speakerd",
                         task.get_name())
            self.request_stop(f"the end of the {task.get_name()} task", EX_SOFTWARE)

    # --- sources of inputs -----------------------------------------------------------

    def _button(self, inp: s.ButtonPressed) -> None:
        if inp.button in ("volume_up", "volume_down"):
            self.volume.step(10 if inp.button == "volume_up" else -10)
        elif inp.button == "talk" and self.ringer.stop():
            return  # that press silenced a timer
        else:
            if inp.button == "talk" and not self.session.muted:
                self.announcer.interrupt("talk button")  # as it interrupts an answer
            self.put(inp)

    def _detected(self, result: object) -> None:
        if isinstance(result, Detection) and not self.ringer.stop():
            self.announcer.interrupt(f"wake word {result.model}")
            self.put(s.WakeWordDetected(result.model, result.frame))
        elif isinstance(result, echomod.VoiceOnset):
            log.debug("a voice over the microphone", extra=logmod.fields(event="voice"))
            self.put(s.VoiceHeard())

    def _device(self, what: str, event: object) -> None:
        opening = self._opening.pop(what, None)  # this is the first word of its thread
        if opening is not None:
            opening.set_result(None)
        if isinstance(event, devmod.DeviceOpened):
            if what in self.missing:  # the start went on without it
                log.info("%s %s is there now: its open took %.1f s", what, event.device,
                         time.monotonic() - self._open_began)
            self.missing.pop(what, None)
        elif isinstance(event, devmod.DeviceLost):
            self.missing[what] = event.device
            if opening is not None:
                log.error("%s; speakerd starts anyway and keeps trying the %s every "
                          "0.5-10 s", event.error, what,
                          extra=logmod.fields(event=f"{what}_missing"))
        elif isinstance(event, devmod.DeviceBack):
            self.missing.pop(what, None)
        elif isinstance(event, devmod.ThreadFailed):
            self.request_stop(f"the failure of the {what} thread ({event.error})",
                              EX_SOFTWARE)
            return
        # Before that, READY=1 says it: the device that answered first must not show
        # "idle" while the other one has not said yet whether it is there.
        if self._started:
            self._show_leds()
            self._show_status()

    def status_line(self) -> str:
        """The unit's STATUS= line, and the control socket's `status`: a missing device
        first, else an announcement that plays, else the session's state; then
        " (muted)"; then a failed reload, said until a reload succeeds."""
        doing = next((f"waiting for {what} '{self.missing[what]}'"
                      for what in ("microphone", "speaker") if what in self.missing), "")
        line = (s.status_text(self.session.state, self.session.muted, doing) if doing
                else self.session.status)
        if self._reload_failed:
            line += "; config reload failed, old config kept"
        return line

    def _show_status(self) -> None:
        self.notifier.status(self.status_line())

    def _show_leds(self, pattern: str | None = None) -> None:
        # The session decides what the lights show; a missing device, which only the
        # daemon knows of, shows over it.
        self.leds.show("error" if self.missing else pattern or self.session.leds)

    def _drained(self, rid: str) -> None:
        if rid.startswith(announcemod.PREFIX):
            self.announcer.drained(rid)
        elif not rid.startswith("cue:"):
            self._log_echo(f"answer {rid}")
            self.put(s.PlaybackDrained(rid))

    def _flushed(self, played: dict[str, int]) -> None:
        # Cues and announcements are not the conversation's: the session hears only of
        # its own responses.
        heard = {rid: ms for rid, ms in played.items()
                 if not rid.startswith(("cue:", announcemod.PREFIX))}
        if heard:
            for rid, ms in heard.items():
                log.info("answer %s cut off after %d ms had been heard", rid, ms,
                         extra=logmod.fields(event="barge_in"))
            self._log_echo("the cut-off answer")
            self.put(s.PlaybackFlushed(heard))

    # --- echo cancellation and voice barge-in ------------------------------------------

    def _configure_echo(self) -> None:
        """Create the canceller once "software" is configured (start-up, SIGHUP)."""
        if self.config.audio.echo_cancellation == "software" and self.echo is None:
            self.echo = echomod.EchoCanceller()

    def _clean_mic(self, on: bool) -> None:
        """While a conversation is open, the capture thread cancels the echo and (with
        voice barge-in) listens for the user; idle listening pays for neither."""
        if not self.capture or not self.playback:
            return
        c = self.config
        voice = c.conversation.barge_in == "voice"
        canceller = self.echo if c.audio.echo_cancellation == "software" else None
        if on and self._mic_path is None and (canceller or voice):
            self._mic_path = echomod.MicPath(canceller,
                                             echomod.VoiceActivity() if voice else None)
            self.playback.echo = canceller
            self.capture.clean = self._mic_path
        elif not on and self._mic_path is not None:
            self.capture.clean = None
            self.playback.echo = None
            self._mic_path = None
            self._log_echo("the conversation")

    def _log_echo(self, what: str) -> None:
        if self.echo is None:
            return
        stats = self.echo.take_stats()
        if stats is not None and stats.seconds >= 0.5:
            log.info("echo cancellation over %s: %s", what,
                     stats.summary(self.config.conversation.barge_in == "voice"),
                     extra=logmod.fields(event="echo"))

    def _from_client(self, client: clientmod.RealtimeClient, event: object) -> None:
        if client is not self._client:
            return  # a socket of an earlier conversation, still closing
        if self.phrases.take(event):
            return  # a phrase being recorded, outside the conversation
        self.stats.realtime(event, client.ready)
        if isinstance(event, clientmod.Ready):
            self.put(s.SessionReady())
            # Idle and cheap now, before the user's turn: record one missing phrase.
            ask = self.phrases.ask()
            if ask is not None:
                client.send(ask)
        elif isinstance(event, clientmod.Disconnected):
            self._client = None
            self.put(s.Disconnected(event.reason, event.unrecoverable, event.cause))
        else:
            self.put(event)

    def _mic_frame(self, frame: bytes) -> None:
        if self._client is None or self._mic_resampler is None:
            return
        x = self._mic_resampler(resample.s16_to_float(frame))
        self._client.append_audio(resample.float_to_s16(x))

    # --- actions ------------------------------------------------------------------

    def _connect(self, a: s.Connect) -> None:
        c = self.config.realtime
        update = protocol.session_update(model=c.model, instructions=c.instructions,
                                         voice=c.voice, turn_detection=c.turn_detection,
                                         tools=self.tools.schemas(),
                                         transcription_model=self.config.log.transcription_model
                                         if self.config.log.transcripts else "")
        client = clientmod.RealtimeClient(
            url=c.url, model=c.model, api_key=self.api_key, session_update=update,
            on_event=lambda event: self._from_client(client, event))
        self._client = client
        self.phrases.forget_recordings()
        if self._retrying is not None:
            self._retrying.cancel()  # this conversation tries for real
            self._retrying = None

        async def run() -> None:
            try:
                await client.run()
            finally:
                if self._client is client:  # it ended without saying so: say it for it
                    self._from_client(client, clientmod.Disconnected(
                        "the connection ended without a word (a bug in speakerd)"))
        self._spawn(run(), "realtime")

    def _close(self, a: s.CloseConnection) -> None:
        if self._client:
            self._client.close()

    def _send(self, a: s.Send) -> None:
        if self._client:
            self._client.send(a.event)

    def _play(self, a: s.PlayAudio) -> None:
        assert self.playback
        self.playback.enqueue(a.pcm, a.response_id)

    def _finish(self, a: s.FinishAudio) -> None:
        assert self.playback
        self.playback.finish(a.response_id)

    def _flush(self, a: s.FlushPlayback) -> None:
        assert self.playback
        self.playback.flush()

    def _cue(self, a: s.PlayCue) -> None:
        self._play_aside(self._cues[a.name], a.name)

    def _play_aside(self, pcm: bytes, name: str) -> None:
        """Sound that is not an answer: its "cue:" id keeps it from the session."""
        assert self.playback
        rid = f"cue:{name}:{next(self._cue_ids)}"
        self.playback.enqueue(pcm, rid)
        self.playback.finish(rid)

    def _say(self, a: s.SayPhrase) -> None:
        self._retry_in_background(a.situation)
        got = self.phrases.pcm(a.situation)
        if got is None:
            if a.fallback_cue:
                self._cue(s.PlayCue(a.fallback_cue))
            return
        pcm, voice = got
        log.info("saying the %s phrase (%s, %.1f s)", a.situation, voice,
                 len(pcm) / protocol.BYTES_PER_MS / 1000,
                 extra=logmod.fields(event="phrase"))
        self._play_aside(pcm, f"phrase:{a.situation}")

    def _retry_in_background(self, situation: str) -> None:
        """The person was told the service cannot be reached: keep trying it quietly, so
        the journal says when it is back (retries never happen in front of the person)."""
        if situation != protocol.UNREACHABLE or self._retrying is not None:
            return
        self._retrying = self._spawn(reachmod.until_reachable(self.config.realtime.url),
                                     "realtime-retry")
        self._retrying.add_done_callback(self._retry_ended)

    def _retry_ended(self, task: asyncio.Task[Any]) -> None:
        if self._retrying is task:
            self._retrying = None

    def _stream(self, a: s.StreamMic) -> None:
        assert self.capture
        if a.on:
            self._mic_resampler = resample.Resampler(capmod.RATE, protocol.SAMPLE_RATE)
        preroll = self.capture.stream(a.on, a.after_frame)
        if not a.on:
            self._mic_resampler = None
        for frame in preroll:
            self._mic_frame(frame)

    def _set_wake_word(self, a: s.SetWakeWord) -> None:
        assert self.detector
        self.detector.enabled = a.enabled
        if self.config.buttons.remember_mute and self.mute_file:
            try:
                if a.enabled:
                    self.mute_file.unlink(missing_ok=True)
                else:
                    self.mute_file.touch()
            except OSError as e:
                log.warning("could not remember the mute state in %s: %s", self.mute_file, e)

    def _reset_wake_word(self, a: s.ResetWakeWord) -> None:
        assert self.detector
        self.detector.reset()

    def _run_tool(self, a: s.RunTool) -> None:
        async def run() -> None:
            # Every path out reports a ToolDone: the session waits for one per call.
            output, end = '{"error": "the tool failed"}', False
            try:
                result = await self.tools.run(a.call.name, a.call.arguments)
                output, end = result.output, result.end_conversation
            finally:
                self.put(s.ToolDone(a.call.call_id, output, end))
        self._spawn(run(), f"tool {a.call.name}")

    def _start_timer(self, a: s.StartTimer) -> None:
        self._cancel_timer(s.CancelTimer(a.name))
        loop = asyncio.get_running_loop()
        self._timers[a.name] = loop.call_later(a.seconds, self.put,
                                               s.TimerFired(a.name, a.token))

    def _cancel_timers(self) -> None:
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()

    def _cancel_timer(self, a: s.CancelTimer) -> None:
        handle = self._timers.pop(a.name, None)
        if handle:
            handle.cancel()

    def _leds(self, a: s.SetLeds) -> None:
        self._show_leds(a.pattern)

    def _status(self, a: s.SetStatus) -> None:
        # a.text is the session's part of the line; status_line() adds what only the
        # daemon knows (a missing device, a failed reload) around the same state.
        self._show_status()

    # --- housekeeping ----------------------------------------------------------------

    async def _watchdog(self) -> None:
        # Pinged from the loop itself: if the loop wedges, the pings stop and
        # systemd restarts us, which is the point of WatchdogSec.
        interval = self.notifier.watchdog_interval
        assert interval
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    # --- the control socket -------------------------------------------------------------

    async def _start_control(self) -> None:
        """Listen on the control socket, if there is to be one; a speaker that cannot be
        controlled still speaks, so a path it cannot use is an error, not the end."""
        if not self.control_path:
            log.info("no control socket: run under the unit ($RUNTIME_DIRECTORY), or "
                     "give --control PATH or $%s", controlmod.ENV)
            return
        control = controlmod.ControlServer(self, self.control_path, spawn=self._spawn)
        try:
            await control.start()
        except OSError as e:
            log.error("no control socket: cannot listen on %s: %s", self.control_path, e)
            return
        self.control = control

    def announcing(self, on: bool) -> None:
        """An announcement started or stopped making sound: the session says what the
        LEDs and the status show now. Handled at once, not queued, so that the lights
        change with the sound; it changes nothing else in the session."""
        for action in self.session.handle(s.AnnouncementPlaying(on)):
            self._handlers[type(action)](action)

    def press(self, button: str) -> None:
        """A button pressed from elsewhere (the control socket), as if on the GPIO."""
        self._button(s.ButtonPressed(button))

    async def settled(self) -> None:
        """Return once the session has handled every input queued so far."""
        await self._inputs.join()

    async def levels(self, seconds: float) -> dict[str, Any]:
        """`seconds` of microphone levels and wake-word scores from the capture thread
        (the control socket's `levels` reply); UnavailableError without a microphone."""
        mic = self.config.audio.capture_device
        if "microphone" in self.missing or self.detector is None:
            raise UnavailableError(f"the microphone '{mic}' is missing: no levels to report")
        async with self._levels_lock:  # one meter at a time rides on the detector
            loop = asyncio.get_running_loop()
            done: asyncio.Future[dict[str, Any]] = loop.create_future()

            def finished(report: dict[str, Any]) -> None:  # in the capture thread
                loop.call_soon_threadsafe(
                    lambda: done.done() or done.set_result(report))
            detector = self.detector
            meter = levelsmod.Meter(seconds, [(c.name, c.threshold)
                                              for c in detector.classifiers],
                                    detector.trigger_level, finished)
            detector.meter = meter
            try:
                # Frames come every 80 ms while the device delivers; a device that
                # stalls (unplugged mid-way) must not hold the client for ever.
                report = await asyncio.wait_for(done, seconds + 5)
            except TimeoutError:
                raise UnavailableError(f"the microphone '{mic}' delivered too little audio "
                                       f"in {seconds + 5:.0f} s") from None
            finally:
                if detector.meter is meter:
                    detector.meter = None
        return {"device": mic, **report}

    def status(self) -> dict[str, Any]:
        """The control socket's `status` reply (README, "Control socket")."""
        devices = {}
        for what, dev in (("microphone", self.capture), ("speaker", self.playback)):
            got = dev.got if dev else None
            devices[what] = {"device": dev.device if dev else None,
                             "format": got and {"rate": got.rate, "channels": got.channels,
                                                "format": got.format},
                             "missing": what in self.missing}
        c = self.config
        return {
            "version": __version__, "pid": os.getpid(), "state": self.session.state.value,
            "status": self.status_line(),
            "muted": self.session.muted, **self.stats.as_dict(),
            "wake_word": {"models": [{"name": m.name, "threshold": m.threshold}
                                     for m in (self.detector.classifiers if self.detector
                                               else [])],
                          "threshold": c.wake_word.threshold},
            "devices": devices, "waiting_for": dict(self.missing),
            "underruns": self.playback.underruns if self.playback else 0,
            "overruns": self.capture.overruns if self.capture else 0,
            "realtime": {"url": c.realtime.url, "model": c.realtime.model},
            "mcp": self.mcp.status() if self.mcp else [],  # [[mcp]] servers and their tools
            "announcements": self.announcer.status(),
        }

    def _log_startup(self) -> None:
        c = self.config
        log.info("speakerd %s started: config %s, wake word %s, mic %s, speaker %s, "
                 "model %s at %s", __version__, c.path, ",".join(c.wake_word.models),
                 c.audio.capture_device, c.audio.playback_device, c.realtime.model,
                 c.realtime.url, extra=logmod.fields(state="idle", event="start"))


