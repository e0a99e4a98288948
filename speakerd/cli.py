"""The `speakerd` command: run, check, status, announce, config --check/--show, version;
maps errors to exit codes."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from speakerd import __version__
from speakerd import config as configmod
from speakerd import log as logmod
from speakerd.errors import EX_OK, EX_SOFTWARE, EX_UNAVAILABLE, SpeakerdError

log = logging.getLogger("speakerd")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="speakerd", description="Wake-word smart speaker daemon.",
        epilog="Exit codes: 0 ok, 78 config error, 69 device or service unavailable, "
               "1 anything else.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_help = ("config file (default: $SPEAKERD_CONFIG, then "
                   f"{configmod.DEFAULT_PATH})")
    run = sub.add_parser("run", help="run the daemon (what speakerd.service starts)")
    run.add_argument("--config", metavar="PATH", help=config_help)
    run.add_argument("--control", metavar="PATH",
                     help="control socket (default: $SPEAKERD_CONTROL, then "
                          "$RUNTIME_DIRECTORY/control under systemd, else none)")
    status = sub.add_parser("status", help="what the running daemon is doing "
                            "(asks its control socket)")
    status.add_argument("--json", action="store_true", help="print the raw JSON reply")
    status.add_argument("--control", metavar="PATH",
                        help="control socket (default: $SPEAKERD_CONTROL, then "
                             "/run/speakerd/control)")
    check = sub.add_parser("check", help="the checklist: config, key, devices, mic level, "
                           "wake word, speaker, realtime service, GPIO, service; exit 0 or 1")
    check.add_argument("--config", metavar="PATH", help=config_help)
    check.add_argument("--listen", metavar="SECONDS", type=_listen_seconds, default=5.0,
                       help="how long to listen to the microphone (default 5; say the wake "
                            "word meanwhile)")
    check.add_argument("--offline", action="store_true",
                       help="skip the realtime service checks")
    check.add_argument("--control", metavar="PATH",
                       help="control socket of a running speakerd (default: "
                            "$SPEAKERD_CONTROL, then /run/speakerd/control)")
    announce = sub.add_parser("announce", help="have the running daemon say TEXT in the "
                              "assistant's voice (waits until it has been played)")
    announce.add_argument("text", nargs="+", metavar="TEXT",
                          help="what to say (several words are joined with spaces)")
    announce.add_argument("--json", action="store_true", help="print the raw JSON reply")
    announce.add_argument("--control", metavar="PATH",
                          help="control socket (default: $SPEAKERD_CONTROL, then "
                               "/run/speakerd/control)")
    cfg = sub.add_parser("config", help="validate or show the config")
    cfg.add_argument("--config", metavar="PATH", help=config_help)
    mode = cfg.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="validate, print OK, exit 0 or 78")
    mode.add_argument("--show", action="store_true",
                      help="print the effective config, secrets masked")
    sub.add_parser("version", help="print the version")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"speakerd {__version__}")
        return EX_OK
    if args.command == "status":
        return _status(args.control, args.json)
    if args.command == "check":
        from speakerd import checks
        try:
            return checks.run(args.config or configmod.default_path(), listen=args.listen,
                              offline=args.offline, control_path=args.control)
        except KeyboardInterrupt:
            return EX_SOFTWARE
    if args.command == "announce":
        return _announce(args.control, " ".join(args.text), args.json)
    path = args.config or configmod.default_path()
    try:
        config = configmod.load(path)
        api_key = configmod.resolve_api_key(config)
        if args.command == "config":
            from speakerd import wakeword

            wakeword.Detector.from_config(config.wake_word, path).close()
            if args.show:
                sys.stdout.write(configmod.to_toml(config, api_key))
                for name in config.wake_word.models:
                    print(f"# wake word {wakeword.model_id(name)}: {wakeword.model_path(name)}")
                from speakerd.tools import catalog
                for tool in catalog.listed(config).tools.values():
                    print(f"# tool {tool.name}: {tool.description}")
                if config.mcp:
                    _show_mcp(config)
            else:
                print(f"{path}: OK")
            return EX_OK
        return _run(config, api_key, args.control)
    except SpeakerdError as e:
        _fail(str(e))
        return e.exit_code
    except KeyboardInterrupt:
        return EX_OK


def _run(config: configmod.Config, api_key: configmod.Secret | None,
         control: str | None = None) -> int:
    from speakerd.daemon import Daemon
    from speakerd.notify import Notifier

    redact = logmod.setup(config.log.level, [api_key.reveal()] if api_key else [])
    from speakerd.audio.device import quiet_alsa_lib
    quiet_alsa_lib()
    if api_key is None:
        log.warning("no API key configured (realtime.api_key_file, the systemd credential "
                    "openai-key, or $OPENAI_API_KEY): conversations will fail until one is set")
    try:
        return asyncio.run(Daemon(config, notifier=Notifier(), redact=redact,
                                  api_key=api_key, control=control).run())
    except SpeakerdError:
        raise
    except Exception as e:
        # The supervisor of last resort: say what broke, then let systemd restart us.
        log.exception("speakerd crashed: %s", e)
        _fail(f"crashed: {redact.redact(repr(e))}")
        return EX_SOFTWARE


def _status(path: str | None, raw: bool) -> int:
    """`speakerd status`: 0 with the daemon's answer, 69 when no daemon answers."""
    import json

    from speakerd.control import client as control

    try:
        reply = control.ask(control.client_path(path), {"request": "status"})
    except control.Unreachable as e:
        _fail(str(e))
        return EX_UNAVAILABLE
    if not reply.get("ok"):
        _fail(f"status refused: {reply.get('error')}")
        return EX_UNAVAILABLE
    print(json.dumps(reply, indent=2) if raw else control.describe(reply))
    return EX_OK


def _listen_seconds(text: str) -> float:
    from speakerd.audio.levels import MAX_SECONDS, MIN_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not MIN_SECONDS <= seconds <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"from {MIN_SECONDS:g} to {MAX_SECONDS:g} seconds")
    return seconds
# Refusals that mean the speaker cannot speak now (no key, no service, no speaker):
# exit 69 as when the daemon itself is unreachable.
_UNAVAILABLE_CODES = ("unavailable", "no_api_key", "no_speaker")


def _announce(path: str | None, text: str, raw: bool) -> int:
    """`speakerd announce TEXT`: 0 once played, 69 unreachable or unavailable, 1 refused."""
    import json

    from speakerd.announce import REPLY_TIMEOUT
    from speakerd.control import client as control

    try:
        reply = control.ask(control.client_path(path), {"request": "announce", "text": text},
                            timeout=REPLY_TIMEOUT)
    except control.Unreachable as e:
        _fail(str(e))
        return EX_UNAVAILABLE
    if raw:
        print(json.dumps(reply))
    if not reply.get("ok"):
        if not raw:
            _fail(f"not announced: {reply.get('error')}")
        return EX_UNAVAILABLE if reply.get("code") in _UNAVAILABLE_CODES else EX_SOFTWARE
    if not raw:
        waited = reply.get("waited_ms", 0) / 1000
        print(f"announced: {reply.get('played_ms', 0) / 1000:.1f} s of speech"
              + (f", after waiting {waited:.0f} s" if waited >= 1 else ""))
    return EX_OK


def _show_mcp(config: configmod.Config) -> None:
    """Connect to each [[mcp]] server once and list its tools, or say why it cannot."""
    from speakerd.control import client as control
    from speakerd.tools import mcp

    logging.getLogger("speakerd.tools.mcp").setLevel(logging.ERROR)  # said below instead
    for state in asyncio.run(mcp.probe(config.mcp, config.path)):
        summary = control.mcp_summary(state.as_dict(), names=False)
        print(f"# mcp {state.name} ({state.where}): {summary}")
        for name in state.tools:
            print(f"# mcp tool {name} (from {state.name})")


def _fail(line: str) -> None:
    print(f"speakerd: {line}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
