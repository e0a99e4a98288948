"""Runs speakerd on one asyncio loop: the shell that feeds the session its inputs, carries
out its actions, and starts, reloads and stops the parts around it."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import Any

from speakerd import __version__
from speakerd import config as configmod
from speakerd import log as logmod
from speakerd import session as s
from speakerd.announce import PREFIX as ANNOUNCED
from speakerd.announce import Announcer
from speakerd.audio.echo import VoiceOnset
from speakerd.audio.echo.wiring import EchoWiring
from speakerd.buttons import Buttons
from speakerd.control import server as controlmod
from speakerd.control.stats import Stats
from speakerd.devices import Devices, PlaybackGain
from speakerd.errors import EX_SOFTWARE, ConfigError
from speakerd.host import Host
from speakerd.leds import Leds
from speakerd.link import Link
from speakerd.notify import Notifier
from speakerd.sounds import Sounds, is_aside
from speakerd.statedir import StateDir
from speakerd.tools import Registry
from speakerd.tools import timers as timermod
from speakerd.tools import volume as volmod
from speakerd.tools.catalog import build_tools
from speakerd.wakeword import Detection

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 5.0  # seconds an answer may still play after SIGTERM
RESTING = (s.State.IDLE, s.State.ERROR)


def session_settings(c: configmod.Config) -> s.Settings:
    return s.Settings(follow_up_seconds=c.conversation.follow_up_seconds,
                      follow_up_guard_ms=c.audio.follow_up_guard_ms,
                      max_session_seconds=c.conversation.max_session_seconds,
                      wake_cue=c.cues.wake, end_cue=c.cues.end,
                      transcripts=c.log.transcripts, barge_in=c.conversation.barge_in)


class Daemon:
    """Owns the loop's state. `await run()` returns the process exit code.

    Inputs from every source go through one queue into `Session.handle`; each
    returned action is carried out by the handler its type names in `_handlers`, and
    then every observer in `_observers` sees the step, in order.
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
        self.statedir = StateDir(state_dir)
        self.session = s.Session(session_settings(config),
                                 muted=config.buttons.remember_mute and self.statedir.muted)
        self.volume = volmod.Volume(config.audio.mixer_control, volmod.mixer_device_for(
            config.audio.playback_device, config.audio.mixer_device),
            PlaybackGain(lambda: self.devices, config.audio.playback_volume))
        self._timers_changed = asyncio.Event()
        self.timers = timermod.Timers(on_change=self._timers_changed.set)
        self.ringer = timermod.Ringer(lambda: self._cue(s.PlayCue("timer")))
        self.tools = tools or build_tools(config, self.volume, self.timers)
        self.mcp: Any = None  # speakerd.tools.mcp.Manager once [[mcp]] is configured
        self._inputs: asyncio.Queue[object] = asyncio.Queue()
        self.stats = Stats()  # what the control socket's status reports
        self._stop = asyncio.Event()
        self._exit_code = 0
        self.reload_failed = False  # the file on disk is not the config that runs
        self._idle = asyncio.Event()  # set whenever the session comes to rest
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self.link = Link(on_input=self.put, stats=self.stats, spawn=self._spawn)
        # Made in run(): the audio threads (which load the models), what rides on them.
        self.devices: Devices | None = None
        self.echo: EchoWiring | None = None
        self.sounds: Sounds | None = None
        self.leds = Leds(config.leds, pin_factory=pin_factory)
        self.buttons: Buttons | None = None
        # The control socket (README, "Control socket").
        self.control_path = controlmod.server_path(control)
        self.control: controlmod.ControlServer | None = None
        self.host = Host(self)
        self.announcer = Announcer(self.host, spawn=self._spawn)
        # Made in run(): what carries out each action, what follows each step.
        self._handlers: dict[type, Callable[[Any], object]] = {}
        self._observers: list[Callable[[s.Step], object]] = []

    # --- life ---------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.stats.watch_errors(self.redact.redact)
        devices = self.devices = Devices(
            self.config, loop, on_frame=self.link.mic_frame, on_result=self._detected,
            on_drained=self._drained, on_flushed=self._flushed, on_change=self.host.show,
            on_failed=self._thread_failed, listening=not self.session.muted)
        self._handlers = self._action_table(devices)
        echo = self.echo = EchoWiring(devices.capture, devices.playback)
        # What each feature does after a step of the session, in this order.
        self._observers = [self._rested,
                           lambda step: echo.follow(not step.resting, step.answering),
                           devices.follow, lambda step: self.host.changed(),
                           self.stats.follow]
        self._configure()
        for sig, why in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")):
            loop.add_signal_handler(sig, self.request_stop, why)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        if self.notifier.watchdog_interval:
            self._spawn(self._watchdog(), "watchdog")
        await devices.open()
        self.buttons = Buttons(self.config.buttons, loop=loop, on_input=self._button,
                               pin_factory=self.pin_factory)
        self.host.show_leds()
        self._spawn(timermod.run(self.timers, self.ringer, self._timers_changed), "timers")
        worker = self._spawn(self._work(), "session")
        self.control = await controlmod.serve(self.host, self.control_path, self._spawn)
        self._log_startup()
        self.sounds = self.link.sounds = Sounds(devices.playback, self.statedir.phrases,
                                                spawn=self._spawn)
        self.sounds.configure(self.config)  # after the start line: espeak-ng runs
        self.notifier.ready(self.host.status_line())
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
            devices.stop()
            if self.buttons:
                self.buttons.close()
            self.leds.close()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        log.info("speakerd stopped")
        return self._exit_code

    async def _wind_down(self) -> None:
        """SIGTERM mid-conversation: let the answer finish if it does so soon."""
        if self.session.state in RESTING:
            return
        self.put(s.EndRequested("shutdown"))
        try:
            await asyncio.wait_for(self._until_idle(), SHUTDOWN_GRACE)
        except TimeoutError:
            log.warning("the answer did not finish within %.0f s of SIGTERM; cut it off",
                        SHUTDOWN_GRACE)
        self.link.close()

    async def _until_idle(self) -> None:
        while self.session.state not in RESTING:
            await self._idle.wait()
            self._idle.clear()

    def _configure(self) -> None:
        """What the config sets beyond the session: at start-up and on SIGHUP."""
        c = self.config
        if self.echo:
            self.echo.configure(c.audio.echo_cancellation, c.conversation.barge_in)
        if self.sounds:
            self.sounds.configure(c)
        if self.mcp is None and c.mcp:
            # Connect to the [[mcp]] servers in background tasks; their tools join the
            # registry as each server answers. No servers: `mcp` is not imported.
            from speakerd.tools import mcp as mcpmod
            self.mcp = mcpmod.Manager((), self.tools, config_path=c.path,
                                      on_secret=self.redact.add, spawn=self._spawn)
        if self.mcp is not None:
            self.mcp.config_path = c.path
            self.mcp.update(c.mcp)

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
            self.reload_failed = True
            self.notifier.ready(self.host.status_line())
            return
        if key:
            self.redact.add(key.reveal())
            self.api_key = key
        self.config = new
        self._configure()
        # Takes effect from the next conversation; devices and models stay as opened.
        self.session.settings = session_settings(new)
        if self.devices:
            self.devices.playback.volume = new.audio.playback_volume
        logmod.set_level(new.log.level)
        log.info("config reloaded from %s", path)
        self.reload_failed = False
        self.notifier.ready(self.host.status_line())

    # --- the one place inputs meet the session -------------------------------------

    def put(self, inp: object) -> None:
        self._inputs.put_nowait(inp)

    async def settled(self) -> None:
        """Return once the session has handled every input queued so far."""
        await self._inputs.join()

    async def _work(self) -> None:
        while True:
            inp = await self._inputs.get()
            before = self.session.state
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
            self._carry_out(actions)
            step = s.Step(before, self.session.state, self.session.wake_word_needed)
            for observe in self._observers:
                observe(step)
            self._inputs.task_done()  # settled() waits for this

    def _carry_out(self, actions: list[s.Action]) -> None:
        for action in actions:
            try:
                self._handlers[type(action)](action)
            except Exception:
                # One failed action must not take the conversation down with it.
                log.exception("could not carry out %s", type(action).__name__)

    def handle_now(self, inp: object) -> None:
        """An input that changes what the speaker shows, not where the conversation is
        (an announcement speaking): taken at once, not behind the queue."""
        self._carry_out(self.session.handle(inp))

    def _rested(self, step: s.Step) -> None:
        if step.resting:
            self._idle.set()

    def _start_over(self) -> None:
        muted = self.session.muted
        self.session = s.Session(session_settings(self.config), muted=muted,
                                 announcing=self.announcer.speaking)
        self._cancel_timers()
        self.link.forget()
        if self.devices:
            self.devices.playback.flush()
            self.devices.capture.stream(False)
        if self.echo:
            self.echo.conversation(False)
        if self.devices:
            self.devices.detector.needed = self.session.wake_word_needed
        self.host.show()

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

    def press(self, button: str) -> None:
        """A button pressed from elsewhere (the control socket), as if on the GPIO."""
        self._button(s.ButtonPressed(button))

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
        elif isinstance(result, VoiceOnset):
            log.debug("a voice over the microphone", extra=logmod.fields(event="voice"))
            self.put(s.VoiceHeard())

    def _thread_failed(self, what: str, error: str) -> None:
        self.request_stop(f"the failure of the {what} thread ({error})", EX_SOFTWARE)

    def _drained(self, rid: str) -> None:
        if rid.startswith(ANNOUNCED):
            self.announcer.drained(rid)
        elif not is_aside(rid):
            if self.echo:
                self.echo.log(f"answer {rid}")
            self.put(s.PlaybackDrained(rid))

    def _flushed(self, played: dict[str, int]) -> None:
        # Cues and announcements are not the conversation's: the session hears only of
        # its own responses.
        heard = {rid: ms for rid, ms in played.items()
                 if not is_aside(rid) and not rid.startswith(ANNOUNCED)}
        if heard:
            for rid, ms in heard.items():
                log.info("answer %s cut off after %d ms had been heard", rid, ms,
                         extra=logmod.fields(event="barge_in"))
            if self.echo:
                self.echo.log("the cut-off answer")
            self.put(s.PlaybackFlushed(heard))

    # --- actions ------------------------------------------------------------------

    def _action_table(self, d: Devices) -> dict[type, Callable[[Any], object]]:
        """Each action the session returns, and what carries it out."""
        link, pb = self.link, d.playback
        return {
            s.Connect: lambda a: link.connect(self.config, self.tools.schemas(), self.api_key),
            s.CloseConnection: lambda a: link.close(),
            s.Send: lambda a: link.send(a.event),
            s.PlayAudio: lambda a: pb.enqueue(a.pcm, a.response_id),
            s.FinishAudio: lambda a: pb.finish(a.response_id),
            s.FlushPlayback: lambda a: pb.flush(),
            s.PlayCue: self._cue,
            s.SayPhrase: lambda a: self.sounds and self.sounds.say(a.situation, a.fallback_cue),
            s.StreamMic: lambda a: link.stream(a.on, d.capture, a.after_frame),
            s.SetWakeWord: self._set_wake_word,
            s.ResetWakeWord: lambda a: d.detector.reset(),
            s.RunTool: self._run_tool,
            s.StartTimer: self._start_timer,
            s.CancelTimer: self._cancel_timer,
            s.SetLeds: lambda a: self.host.show_leds(a.pattern),
            # The session's part of the line; the host adds what only it knows (devices,
            # announcements, a failed reload) around the same state.
            s.SetStatus: lambda a: self.notifier.status(self.host.status_line()),
            s.ConversationStarted: lambda a: self.stats.began(a.trigger),
            s.ConversationEnded: lambda a: self.stats.ended(a.reason),
        }

    def _cue(self, a: s.PlayCue) -> None:
        if self.sounds:
            self.sounds.cue(a.name)

    def _set_wake_word(self, a: s.SetWakeWord) -> None:
        assert self.devices
        self.devices.detector.enabled = a.enabled
        if self.config.buttons.remember_mute:
            self.statedir.remember_mute(not a.enabled)

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

    # --- housekeeping ----------------------------------------------------------------

    async def _watchdog(self) -> None:
        # Pinged from the loop itself: if the loop wedges, the pings stop and
        # systemd restarts us, which is the point of WatchdogSec.
        interval = self.notifier.watchdog_interval
        assert interval
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    def _log_startup(self) -> None:
        c = self.config
        log.info("speakerd %s started: config %s, wake word %s, mic %s, speaker %s, "
                 "model %s at %s", __version__, c.path, ",".join(c.wake_word.models),
                 c.audio.capture_device, c.audio.playback_device, c.realtime.model,
                 c.realtime.url, extra=logmod.fields(state="idle", event="start"))
