"""Which source a result comes from, for the commit field of every benchmark and bench report."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SOURCE = Path(__file__).resolve().parent


def source_commit() -> str:
    """`HASTEN_COMMIT` when set (for a copy of the tree whose git metadata is absent or stale, such
    as one synced to another machine), else `git describe --always --dirty` of the checkout hasten
    runs from, else "unknown"."""
    if given := os.environ.get("HASTEN_COMMIT", "").strip():
        return given
    try:
        found = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=SOURCE,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return found.stdout.strip() if found.returncode == 0 and found.stdout.strip() else "unknown"
