"""The `speakerd` command: run, config --check/--show, version; maps errors to exit codes."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from speakerd import __version__
from speakerd import config as configmod
from speakerd import log as logmod
from speakerd.errors import EX_OK, EX_SOFTWARE, SpeakerdError

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
                from speakerd.daemon import build_tools
                from speakerd.tools import timers, volume
                registry = build_tools(config, volume.Volume("", "", None), timers.Timers())
                for tool in registry.tools.values():
                    print(f"# tool {tool.name}: {tool.description}")
            else:
                print(f"{path}: OK")
            return EX_OK
        return _run(config, api_key)
    except SpeakerdError as e:
        _fail(str(e))
        return e.exit_code
    except KeyboardInterrupt:
        return EX_OK


def _run(config: configmod.Config, api_key: configmod.Secret | None) -> int:
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
                                  api_key=api_key).run())
    except SpeakerdError:
        raise
    except Exception as e:
        # The supervisor of last resort: say what broke, then let systemd restart us.
        log.exception("speakerd crashed: %s", e)
        _fail(f"crashed: {redact.redact(repr(e))}")
        return EX_SOFTWARE


def _fail(line: str) -> None:
    print(f"speakerd: {line}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
