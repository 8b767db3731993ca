"""`python -m hasten.bench ...`: the `hasten bench` subcommand on its own."""

import argparse
import sys

from hasten.bench.cli import add_parser, run
from hasten.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hasten")
    add_parser(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run(ns)
    except ConfigError as err:
        print(f"hasten: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
