"""The bench's charts, drawn from a report dict (so they can be redrawn from report.json alone).

loss_vs_time.png      validation loss against training wall time, one line per row
pareto_time.png       final val loss against training time, the Pareto front marked
quality_latency.png   final val loss against inference latency, the Pareto front marked
peak_memory.png       peak memory per row
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hasten.bench.report import pareto_front, training_seconds


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _ok_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in report["rows"] if r["status"] == "ok"]


def _loss_vs_time(report: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in _ok_rows(report):
        evals = row.get("evals") or []
        if evals:
            ax.plot([training_seconds(e) for e in evals], [e["val_loss"] for e in evals], marker="o", ms=3,
                    label=row["name"])
    if report.get("baseline_final_val_loss") is not None:
        ax.axhline(report["baseline_final_val_loss"], color="grey", ls="--", lw=0.8, label="baseline final")
    ax.set(xlabel="training seconds (first step, evaluations and checkpoints left out)", ylabel="validation loss",
           title="Validation loss vs training time")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pareto(report: dict[str, Any], x_key: str, x_label: str, title: str, path: Path) -> None:
    """Scatter of final val loss against `x_key`, with the non-dominated rows joined and marked."""
    plt = _pyplot()
    points = [(r["name"], r[x_key], r["final_val_loss"]) for r in _ok_rows(report)
              if r.get(x_key) is not None and r.get("final_val_loss") is not None]
    front = set(pareto_front(points))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, x, y in points:
        on_front = name in front
        ax.scatter([x], [y], s=50 if on_front else 30, color="tab:red" if on_front else "tab:blue", zorder=3)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ordered = sorted((x, y) for name, x, y in points if name in front)
    if ordered:
        ax.step([x for x, _ in ordered], [y for _, y in ordered], where="post", color="tab:red", lw=1,
                label="Pareto front")
        ax.legend(fontsize=8)
    ax.set(xlabel=x_label, ylabel="final validation loss (lower is better)", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _peak_memory(report: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    rows = [r for r in _ok_rows(report) if r.get("peak_memory_gib") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([r["name"] for r in rows], [r["peak_memory_gib"] for r in rows], color="tab:green")
    ax.set(ylabel="peak memory (GiB)", title="Peak memory per row")
    ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(report: dict[str, Any], out: Path) -> dict[str, Path]:
    """Draw the four charts into `out`; returns {title: path} in display order."""
    paths = {"Validation loss vs training time": out / "loss_vs_time.png",
             "Quality vs training time": out / "pareto_time.png",
             "Quality vs inference latency": out / "quality_latency.png",
             "Peak memory": out / "peak_memory.png"}
    _loss_vs_time(report, paths["Validation loss vs training time"])
    _pareto(report, "wall_time_s", "training wall time (s)", "Quality vs training time",
            paths["Quality vs training time"])
    _pareto(report, "inference_ms", "inference latency (ms, fixed batch)", "Quality vs inference latency",
            paths["Quality vs inference latency"])
    _peak_memory(report, paths["Peak memory"])
    return paths
