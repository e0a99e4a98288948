"""Lets `python -m speakerd` behave as the `speakerd` command."""

import sys

from speakerd.cli import main

sys.exit(main())
