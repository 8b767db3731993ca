"""The README's Python example runs as written (in a temporary folder)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    block = re.search(r"## Python API.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert len(block.splitlines()) <= 30
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HASTEN_CACHE", str(tmp_path / "cache"))
    exec(compile(block, str(README), "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out
    loss = float(re.search(r"loss ([0-9.]+)", printed).group(1))
    assert loss < 0.3  # the task is learnable: the example really trains
    assert (tmp_path / "runs" / "mlp" / "summary.json").exists()
