"""Announcements: the house asks, and the speaker says a text in the assistant's voice.

Each announcement is a one-off realtime session of its own (its own socket, no
microphone, no tools), kept outside the conversation's state machine: the session
stays IDLE while one plays, and its audio goes through the same playback path as an
answer (gain, resampling, drain callback) under response ids `announce:N`, which the
daemon routes here rather than to the session.

The rules, as the README states them:
- one at a time, in the order asked, at most MAX_QUEUED waiting or playing;
- only while no conversation is open: one waits for the conversation to end, at
  most WAIT_SECONDS from the request, so it never talks over an answer nor into an
  open microphone (the model would take it for the user's next turn);
- mute does not stop it: mute stops listening, not speaking;
- the wake word or the talk button cuts a playing announcement off (as it cuts off
  an answer) and the conversation starts; one not yet heard waits for that
  conversation to end instead;
- every request is answered: after the drain, or with why it was not played.

machine.py holds the rules of saying one (sans-I/O), runner.py the queue and the
connection, against a Stage the daemon provides.
"""

from speakerd.announce.machine import INSTRUCTIONS, prompt
from speakerd.announce.runner import (
    MAX_QUEUED,
    MAX_TEXT,
    PREFIX,
    REPLY_TIMEOUT,
    WAIT_SECONDS,
    Announcer,
    Stage,
    check_text,
)

__all__ = ["INSTRUCTIONS", "MAX_QUEUED", "MAX_TEXT", "PREFIX", "REPLY_TIMEOUT",
           "WAIT_SECONDS", "Announcer", "Stage", "check_text", "prompt"]
