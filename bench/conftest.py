"""pytest-benchmark setup for bench/: run with `pytest bench/ --benchmark-only --benchmark-json=...`."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
