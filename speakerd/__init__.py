"""speakerd: a wake-word smart speaker daemon for the Raspberry Pi."""

__version__ = "0.1.0"
