"""``harness``: a thin command-line shell over the Python API, one module per command.

  run        evaluate one (defense, threat, dataset, classifier, seed) cell and store it  (run.py)
  ls         list registered defenses, threats, attacks, shifts, datasets, classifiers  (ls.py)
  results    print the stored results (table, csv or json)                               (results.py)
  show       one job in full: configuration, identity, metrics, curve, environment      (show.py)
  grid       run a YAML grid (local worker processes or Ray), skipping stored cells    (grid.py)
  check      compare stored results with an accuracy table; non-zero exit on regressions (check.py)
  compare    paired comparison of two jobs on their shared examples: 2x2 table, exact McNemar  (compare.py)
  dashboard  the Streamlit leaderboard over a store (read-only)                       (dashboard/cli.py)
  train      train the models the harness ships (``harness train classifier ...``)     (train.py)

Bad input exits with status 2 and a one-line ``error: ...`` on stderr.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from harness.core.registry import HarnessError

#: Command modules in the order ``harness --help`` lists them; each has ``add_parser(sub)``.
COMMANDS = ("run", "ls", "results", "show", "grid", "check", "compare", "train")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of every subcommand."""
    import importlib

    from dashboard.cli import add_dashboard_parser

    p = argparse.ArgumentParser(prog="harness", description="Benchmark harness for adversarial purification defenses.")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"harness.cli.{name}").add_parser(sub)
    add_dashboard_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``harness`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished batches are stored; rerun the same command to resume", file=sys.stderr)
        return 130
