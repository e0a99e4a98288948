"""Logs known records through speakerd.log, for the journal and redaction tests.

usage: log_probe.py journal|stderr   (the key comes from $PROBE_KEY, never argv)
"""

import logging
import os
import sys

from speakerd import log

key = os.environ["PROBE_KEY"]
log.setup("debug", [key], use_journal=sys.argv[1] == "journal")
logger = logging.getLogger("speakerd.probe")
logger.info("state is now %s", "listening", extra=log.fields(state="listening", session="s1"))
logger.info("wake word heard", extra=log.fields(event="wake"))
logger.debug("debug line at debug level")
logger.info("key in a message: %s and inline %s", key, "sk-abcdefghijklmnopqrstuv")
try:
    raise RuntimeError(f"handshake failed with header Bearer {key}")
except RuntimeError:
    logger.exception("exception carrying the key")
logger.info("field carrying the key", extra=log.fields(event=key))
