"""`hasten bench`: every method measured side by side on the user's own model and hardware.

rows.py    the registry of rows (one per method or combination)
runner.py  runs each row as a real `hasten train` subprocess and measures the produced model
report.py  metrics, ratios against the baseline, report.json / .md / .html
plots.py   the report's charts
cli.py     the `hasten bench` subcommand (add_parser, run)
"""

from hasten.bench.report import pareto_front, ratio, steps_to_target
from hasten.bench.rows import ROWS, Row, combine, get_row, register

__all__ = ["ROWS", "Row", "combine", "get_row", "pareto_front", "ratio", "register", "steps_to_target"]
