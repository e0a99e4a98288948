"""The conversation as a sans-I/O state machine: (state, input) -> actions, nothing else."""

from speakerd.session.rules import *  # noqa: F403
from speakerd.session.rules import _Turn, log  # noqa: F401
