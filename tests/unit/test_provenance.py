"""The commit field of results: HASTEN_COMMIT first, else the checkout's git describe, else unknown."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from hasten import provenance


def test_the_environment_names_the_commit_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HASTEN_COMMIT", "abc1234")
    assert provenance.source_commit() == "abc1234"


def test_a_checkout_gives_git_describe_and_elsewhere_unknown(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HASTEN_COMMIT", raising=False)
    monkeypatch.setattr(provenance, "SOURCE", tmp_path)  # not a git checkout
    assert provenance.source_commit() == "unknown"
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    try:
        subprocess.run([*git, "init", "-q"], check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("no git here")
    (repo / "f").write_text("x")
    subprocess.run([*git, "add", "f"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "m"], check=True)
    head = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
    monkeypatch.setattr(provenance, "SOURCE", repo)
    assert provenance.source_commit() == head
    (repo / "f").write_text("y")
    assert provenance.source_commit() == f"{head}-dirty"
