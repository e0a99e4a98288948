"""Soak the session state machine: the stateful hypothesis test with many more runs.

    .venv/bin/python bench/session_soak.py [EXAMPLES]

Default 20,000 runs of up to 40 steps (the suite runs 150).
"""

import os
import subprocess
import sys
from pathlib import Path

examples = sys.argv[1] if len(sys.argv) > 1 else "20000"
root = Path(__file__).resolve().parent.parent
sys.exit(subprocess.call(
    [sys.executable, "-m", "pytest", "-q", "-p", "no:logging", "-p", "no:cacheprovider",
     "--hypothesis-show-statistics", "tests/test_session_stateful.py"],
    cwd=root, env={**os.environ, "SPEAKERD_SOAK_EXAMPLES": examples}))
