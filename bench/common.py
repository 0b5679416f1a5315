"""Helpers every bench script shares: the git revision stamped on results, and rows written as a CSV."""

from __future__ import annotations

import csv
import os
import subprocess


def git_revision() -> str:
    """Short hash of the checked-out commit, or "unknown" (no git, not a checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_rows_csv(rows: list, folder, name: str) -> str:
    """Write ``rows`` (flat dicts) to ``<folder>/<name>`` (folder created), columns from the first row; return the path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(str(folder), name)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["case"])
        w.writeheader()
        w.writerows(rows)
    return path
