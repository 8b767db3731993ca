"""Atomic publication of folders, shared by the tokenizer cache and the token cache."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def publish_folder(folder: Path, write: Callable[[Path], None]) -> None:
    """Fill a temp folder with `write(temp)`, then rename it to `folder`, so readers never see half of it.

    If another process published the same folder first, its copy is kept: equal inputs give equal
    contents, and the rename of a folder onto a non-empty one fails instead of mixing the two.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the published folder is an ordinary one
        try:
            os.replace(tmp, folder)
        except OSError:
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
