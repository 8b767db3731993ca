"""The bench report: metrics per row, ratios against the baseline, and the files that hold them.

Every number comes from a row's own run (summary.json, metrics.jsonl, the timed forward pass);
nothing is copied from elsewhere. The functions that turn row results into metrics are pure, so
they are tested on hand-made numbers; the writers only format what they are given.

    results (bench_row.json dicts) ─► row_metrics ─► add_ratios ─► build_report ─► report.json
                                                                               ├─► report.md
                                                                               └─► report.html + PNGs
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

MB = 1e6
NOT_REACHED = "not reached"
BUSY_SHARE = 0.1  # other processes' CPU share above which a row's timings are flagged
TRAINED = ("ok", "trained")  # rows whose training numbers count; "trained": its inference is not timed yet


def _fmt_num(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}g}"


def _fmt_reached(key: str) -> Callable[[dict[str, Any]], str]:
    """A formatter for the steps/time-to-baseline-loss columns: 'not reached' is a result, not n/a."""
    def fmt(row: dict[str, Any]) -> str:
        if row.get("status") in TRAINED and row.get("reached_baseline_loss") is False:
            return NOT_REACHED
        return _fmt_num(row.get(key))
    return fmt


def _fmt_ratio(key: str) -> Callable[[dict[str, Any]], str]:
    def fmt(row: dict[str, Any]) -> str:
        value = row.get(key)
        return "n/a" if value is None else f"{value:.2f}x"
    return fmt


def _fmt_key(key: str, digits: int = 4) -> Callable[[dict[str, Any]], str]:
    return lambda row: _fmt_num(row.get(key), digits)


# (key in the row dict, column header, formatter). The header names the unit; ratios are row / baseline.
COLUMNS: list[tuple[str, str, Callable[[dict[str, Any]], str]]] = [
    ("name", "row", lambda r: str(r["name"])),
    ("family", "family", lambda r: str(r.get("family", ""))),
    ("benefit", "benefit", lambda r: str(r.get("benefit", ""))),
    ("status", "status", lambda r: str(r.get("status", ""))),
    ("wall_time_s", "wall time (s)", _fmt_key("wall_time_s")),
    ("tokens_per_second", "tokens/s", _fmt_key("tokens_per_second")),
    ("mfu", "MFU", _fmt_key("mfu", 3)),
    ("peak_memory_gib", "peak memory (GiB)", _fmt_key("peak_memory_gib", 3)),
    ("trainable_params", "trainable params", _fmt_key("trainable_params")),
    ("final_val_loss", "final val loss", _fmt_key("final_val_loss")),
    ("steps_to_baseline_loss", "steps to baseline loss", _fmt_reached("steps_to_baseline_loss")),
    ("time_to_baseline_loss_s", "time to baseline loss (s)", _fmt_reached("time_to_baseline_loss_s")),
    ("inference_ms", "inference (ms)", _fmt_key("inference_ms", 3)),
    ("model_mb", "model (MB)", _fmt_key("model_mb", 3)),
    ("tokens_per_second_ratio", "tokens/s vs baseline", _fmt_ratio("tokens_per_second_ratio")),
    ("time_to_baseline_loss_ratio", "time to baseline loss vs baseline", _fmt_ratio("time_to_baseline_loss_ratio")),
    ("memory_ratio", "memory vs baseline", _fmt_ratio("memory_ratio")),
    ("inference_latency_ratio", "inference latency vs baseline", _fmt_ratio("inference_latency_ratio")),
]
HEADERS = [header for _, header, _ in COLUMNS]


def training_seconds(record: dict[str, Any]) -> float:
    """An evaluation's training seconds: steps only, the first one (compilation), evaluations and
    checkpoint saves left out, as a time budget counts them; wall seconds in older results."""
    return float(record.get("train_s", record["elapsed_s"]))


def steps_to_target(evals: Sequence[dict[str, Any]], target: float | None) -> tuple[int, float] | None:
    """(step, training seconds) of the first evaluation whose val_loss is at or below `target`."""
    if target is None or not math.isfinite(target):
        return None
    for record in sorted(evals, key=lambda r: r["step"]):
        loss = record.get("val_loss")
        if loss is not None and math.isfinite(loss) and loss <= target:
            return int(record["step"]), training_seconds(record)
    return None


def ratio(value: float | None, reference: float | None) -> float | None:
    """value / reference, or None when either is missing, non-finite, or the reference is zero."""
    if value is None or reference is None:
        return None
    if not (math.isfinite(value) and math.isfinite(reference)) or reference == 0:
        return None
    return value / reference


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def row_metrics(result: dict[str, Any], target: float | None) -> dict[str, Any]:
    """The report's metrics of one row result, measured against the baseline's final val loss."""
    summary = result.get("summary") or {}
    evals = result.get("evals") or []
    reached = steps_to_target(evals, target) if result.get("status") in TRAINED else None
    model_bytes = result.get("model_bytes")
    return dict(
        name=result["name"], family=result.get("family", ""), benefit=result.get("benefit", ""),
        status=result.get("status", "failed"), error=result.get("error"),
        overrides=result.get("overrides", []), description=result.get("description", ""),
        wall_time_s=_finite(summary.get("wall_time_s")), process_time_s=_finite(result.get("process_time_s")),
        steps=summary.get("steps"), tokens=summary.get("tokens"), stop_reason=summary.get("stop_reason", ""),
        tokens_per_second=_finite(summary.get("tokens_per_second")), mfu=_finite(summary.get("mfu")),
        peak_memory_gib=_finite(summary.get("peak_memory_gib")),
        trainable_params=summary.get("trainable_params", summary.get("params")),
        precision=summary.get("precision"), loss_kernel=summary.get("loss_kernel"),
        final_val_loss=_finite(summary.get("quantized_val_loss", summary.get("final_val_loss"))),  # what it ships
        reached_baseline_loss=None if target is None or result.get("status") not in TRAINED else reached is not None,
        steps_to_baseline_loss=reached[0] if reached else None,
        time_to_baseline_loss_s=reached[1] if reached else None,
        inference_ms=_finite(result.get("inference_ms")),
        model_mb=model_bytes / MB if isinstance(model_bytes, int) else None,
        other_cpu_share=_finite(result.get("other_cpu_share")), evals=evals, train=result.get("train") or [],
        slot=result.get("slot"), started_at=result.get("started_at"), ended_at=result.get("ended_at"),
    )


def add_ratios(rows: list[dict[str, Any]], baseline: str = "baseline") -> list[dict[str, Any]]:
    """Copies of `rows` with the four ratios against the row named `baseline` (None without one)."""
    base = next((r for r in rows if r["name"] == baseline and r["status"] in TRAINED), {})
    pairs = dict(tokens_per_second_ratio="tokens_per_second", time_to_baseline_loss_ratio="time_to_baseline_loss_s",
                 memory_ratio="peak_memory_gib", inference_latency_ratio="inference_ms")
    return [{**row, **{name: ratio(row.get(key), base.get(key)) for name, key in pairs.items()}} for row in rows]


def pareto_front(points: Sequence[tuple[str, float, float]]) -> list[str]:
    """Names of the points no other point beats on both axes (lower x and lower y are better).

    A point is dominated when another is at least as good on both axes and better on one. The
    names come back in order of increasing x.
    """
    front = []
    for name, x, y in points:
        dominated = any(ox <= x and oy <= y and (ox < x or oy < y) for _, ox, oy in points)
        if not dominated:
            front.append((x, y, name))
    return [name for _, _, name in sorted(front)]


def build_report(results: list[dict[str, Any]], environment: dict[str, Any],
                 baseline: str = "baseline") -> dict[str, Any]:
    """The whole report as one JSON-able dict: environment and one metrics dict per row."""
    base = next((r for r in results if r["name"] == baseline and r.get("status") in TRAINED), None)
    target = _finite((base or {}).get("summary", {}).get("final_val_loss"))
    rows = add_ratios([row_metrics(r, target) for r in results], baseline)
    return dict(format="hasten-bench/1", environment=environment, baseline=baseline,
                baseline_final_val_loss=target, columns=HEADERS, rows=rows)


def table_cells(report: dict[str, Any]) -> list[list[str]]:
    """The formatted table: one list of cells per row, in COLUMNS order."""
    return [[fmt(row) for _, _, fmt in COLUMNS] for row in report["rows"]]


def _notes(report: dict[str, Any]) -> list[str]:
    env = report["environment"]
    budget = env.get("budget", {})
    notes = [
        f"Device: {env.get('device')}; torch {env.get('torch')}; hasten {env.get('hasten')}; {env.get('date')}.",
        f"Budget per row: {budget.get('value')} {budget.get('kind')}; same recipe, data and seed for every row.",
        "Ratios are row / baseline: above 1 is better for tokens/s; below 1 is better for time, memory and latency.",
        "Steps/time to baseline loss: first evaluation at or below the baseline's final val loss "
        f"({_fmt_num(report.get('baseline_final_val_loss'))}); time in training seconds (the first step, "
        "which compiles, evaluations and checkpoint saves left out, as the time budget counts them).",
        "Wall time is the training loop's (compilation included, process start-up excluded); "
        "inference is the median forward pass of the produced model, loaded eager in fp32.",
    ]
    if (pending := env.get("pending_rows")) is not None:  # written while the bench runs
        notes.insert(0, "Partial report, rewritten as rows finish: "
                     + (f"rows not finished yet: {', '.join(pending)}; " if pending else "every row has trained; ")
                     + "a row marked `trained` has not had its inference timed yet.")
    if str(env.get("device", "")).startswith("cpu"):
        notes.append("On CPU, peak memory is the process's peak resident set and MFU is n/a; "
                     "timings are noisy, so compare ratios rather than absolute seconds.")
    if budget.get("kind") == "seconds":
        notes.append("Under a time budget each row's learning-rate schedule spans its time (optim.horizon=time, "
                     "unless set otherwise), so every row ends its decay as its time runs out.")
    if (together := env.get("concurrent", 1)) > 1:
        notes.append(f"Rows trained up to {together} at a time ({'one per GPU' if str(env.get('device', '')).startswith('cuda') else 'each on its share of the cores, train.threads'}); "
                     "the distributed rows ran after them, alone, and inference was timed after all training, "
                     "one row at a time. The share of CPU time used by other processes is not measured then.")
    busy = [f"{r['name']} ({r['other_cpu_share']:.0%})" for r in report["rows"]
            if (r.get("other_cpu_share") or 0) > BUSY_SHARE]
    if busy:
        notes.append("Other processes used part of the CPU while these rows trained (share of all CPU time): "
                     f"{', '.join(busy)}; their timings are inflated.")
    kernels: dict[str, list[str]] = {}
    for row in report["rows"]:
        if row.get("loss_kernel"):
            kernels.setdefault(row["loss_kernel"], []).append(row["name"])
    if kernels:  # QuACK's kernel where it is installed, else Triton's: a baseline of another machine may differ
        notes.append("Output head and loss (train.loss_chunk, train.loss_kernel) computed by: "
                     + "; ".join(f"{kernel} ({', '.join(names)})" for kernel, names in kernels.items()) + ".")
    for row in report["rows"]:
        if row["status"] in TRAINED and row.get("stop_reason") and not row["stop_reason"].startswith("time limit"):
            notes.append(f"Row `{row['name']}` stopped early: {row['stop_reason']}.")
        if row["status"] == "failed":
            first = (row.get("error") or "").strip().splitlines()
            notes.append(f"Row `{row['name']}` failed: {first[-1] if first else 'no error recorded'}")
    return notes


def markdown(report: dict[str, Any]) -> str:
    """report.md: the table and the notes."""
    lines = ["# hasten bench", "", "| " + " | ".join(HEADERS) + " |",
             "|" + "|".join("---" if i < 4 else "---:" for i in range(len(HEADERS))) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in table_cells(report)]
    lines += ["", "## Notes", ""] + [f"- {note}" for note in _notes(report)]
    lines += ["", "## Rows", ""] + [f"- `{r['name']}`: {r['description']} (`{' '.join(r['overrides'])}`)"
                                     for r in report["rows"]]
    return "\n".join(lines) + "\n"


def html_page(report: dict[str, Any], images: dict[str, Path]) -> str:
    """report.html: self-contained (plots embedded as base64 PNGs)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in HEADERS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
                   for cells in table_cells(report))
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in _notes(report))
    figures = "".join(
        f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,'
        f'{base64.b64encode(path.read_bytes()).decode()}"><figcaption>{html.escape(title)}</figcaption></figure>'
        for title, path in images.items())
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td:nth-child(-n+4){text-align:left}"
             "img{max-width:640px}figure{display:inline-block;margin:1em}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>hasten bench</title><style>{style}</style>"
            f"</head><body><h1>hasten bench</h1><table><tr>{head}</tr>{body}</table><ul>{notes}</ul>"
            f"{figures}</body></html>\n")


def write_report(report: dict[str, Any], out: Path, plots: bool = True) -> list[Path]:
    """Write report.json, report.md, the PNG plots and report.html into `out`; returns the paths.
    Without `plots` (the partial reports written as rows finish) report.html has no figures."""
    from hasten.bench.plots import write_plots

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json", out / "report.md", out / "report.html"]
    paths[0].write_text(json.dumps(report, indent=1, default=str))
    paths[1].write_text(markdown(report))
    images = write_plots(report, out) if plots else {}
    paths[2].write_text(html_page(report, images))
    return paths + list(images.values())


# Side-by-side comparison of two reports (e.g. two machines).
COMPARED = [("wall_time_s", "wall time (s)"), ("tokens_per_second", "tokens/s"),
            ("peak_memory_gib", "peak memory (GiB)"), ("final_val_loss", "final val loss"),
            ("inference_ms", "inference (ms)")]


def compare_rows(a: dict[str, Any], b: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of the rows of two reports side by side, with B/A for each metric."""
    headers = ["row"] + [f"{h} {side}" for _, h in COMPARED for side in ("A", "B", "B/A")]
    by_name_b = {r["name"]: r for r in b["rows"]}
    names = [r["name"] for r in a["rows"]] + [r["name"] for r in b["rows"] if r["name"] not in
                                              {x["name"] for x in a["rows"]}]
    by_name_a = {r["name"]: r for r in a["rows"]}
    cells = []
    for name in names:
        ra, rb = by_name_a.get(name, {}), by_name_b.get(name, {})
        line = [name]
        for key, _ in COMPARED:
            r = ratio(rb.get(key), ra.get(key))
            line += [_fmt_num(ra.get(key)), _fmt_num(rb.get(key)), "n/a" if r is None else f"{r:.2f}x"]
        cells.append(line)
    return headers, cells


def compare_markdown(a: dict[str, Any], b: dict[str, Any], labels: tuple[str, str]) -> str:
    """compare.md: where each report comes from, then the side-by-side table."""
    headers, cells = compare_rows(a, b)
    lines = ["# hasten bench comparison", ""]
    for side, label, rep in (("A", labels[0], a), ("B", labels[1], b)):
        env = rep.get("environment", {})
        lines.append(f"- {side}: `{label}` ({env.get('device')}, torch {env.get('torch')}, {env.get('date')}, "
                     f"budget {env.get('budget', {}).get('value')} {env.get('budget', {}).get('kind')})")
    lines += ["", "| " + " | ".join(headers) + " |", "|---|" + "---:|" * (len(headers) - 1)]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(lines) + "\n"


def load_report(path: str | Path) -> dict[str, Any]:
    """A report.json written by `hasten bench`, or a ConfigError that says what is wrong with it."""
    from hasten.config import ConfigError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--compare: {path} is not a file; give two report.json files written by hasten bench.")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"--compare: {path} is not valid JSON ({err}).") from None
    if not isinstance(report, dict) or not isinstance(report.get("rows"), list):
        raise ConfigError(f"--compare: {path} is not a hasten bench report.json (it has no 'rows').")
    return report


# Repeats with other seeds (`--seeds N`): every row's spread, and its difference to the baseline
# taken seed by seed (a paired comparison: the rows of one seed share initialization and data order).
SEEDED = [("final_val_loss", "val loss"), ("tokens_per_second_ratio", "tokens/s vs baseline"),
          ("memory_ratio", "memory vs baseline"), ("steps_to_baseline_loss", "steps to baseline loss")]


def _mean_std(values: list[float]) -> dict[str, Any]:
    n = len(values)
    mean = sum(values) / n if n else None
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return dict(mean=mean, std=std, n=n, values=values)


def seed_summary(reports: dict[int, dict[str, Any]], baseline: str = "baseline") -> dict[str, Any]:
    """Per row over the seeds' reports ({seed: report}): mean, sample std and values of SEEDED, and of
    the val loss minus the baseline's of the same seed; only the seeds where the row (and, for the
    difference, the baseline) finished count."""
    names = list(dict.fromkeys(r["name"] for report in reports.values() for r in report["rows"]))
    rows = []
    for name in names:
        per_seed = {seed: {r["name"]: r for r in report["rows"]} for seed, report in reports.items()}
        ok = {seed: rows_[name] for seed, rows_ in per_seed.items() if rows_.get(name, {}).get("status") == "ok"}
        row: dict[str, Any] = dict(name=name, seeds=sorted(ok))
        for key, _ in SEEDED:
            row[key] = _mean_std([r[key] for r in ok.values() if _finite(r.get(key)) is not None])
        deltas = [r["final_val_loss"] - per_seed[seed][baseline]["final_val_loss"] for seed, r in ok.items()
                  if per_seed[seed].get(baseline, {}).get("status") == "ok"
                  and _finite(r.get("final_val_loss")) is not None
                  and _finite(per_seed[seed][baseline].get("final_val_loss")) is not None]
        row["val_loss_minus_baseline"] = _mean_std(deltas)
        rows.append(row)
    return dict(format="hasten-bench-seeds/1", seeds=sorted(reports), baseline=baseline, rows=rows)


def seeds_markdown(summary: dict[str, Any]) -> str:
    """seeds.md: mean ± sample standard deviation over the seeds, per row."""

    def cell(stat: dict[str, Any], digits: int, signed: bool = False) -> str:
        if stat["mean"] is None:
            return "-"
        mean = f"{stat['mean']:+.{digits}f}" if signed else f"{stat['mean']:.{digits}f}"
        return mean if stat["std"] is None else f"{mean} ± {stat['std']:.{digits}f}"

    lines = [f"# hasten bench over seeds {', '.join(map(str, summary['seeds']))}", "",
             "| row | seeds ok | val loss | val loss - baseline (same seed) | tokens/s vs baseline | memory vs baseline "
             "| steps to baseline loss (seeds that reached it) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in summary["rows"]:
        steps = r["steps_to_baseline_loss"]
        lines.append(f"| {r['name']} | {len(r['seeds'])} | {cell(r['final_val_loss'], 4)} | "
                     f"{cell(r['val_loss_minus_baseline'], 4, signed=True)} | {cell(r['tokens_per_second_ratio'], 3)} | "
                     f"{cell(r['memory_ratio'], 3)} | {cell(steps, 1)} ({steps['n']} of {len(r['seeds'])}) |")
    lines += ["", "Mean ± sample standard deviation over the seeds where the row finished; the difference to the "
              "baseline is taken seed by seed (same initialization, data order and validation windows); steps to "
              "the baseline's loss (of the same seed) over the seeds where the row reached it. Each seed's full "
              "report is in `seed-<seed>/`."]
    return "\n".join(lines) + "\n"
