"""``harness``: a thin command-line shell over the Python API, one module per command.

  run        evaluate one (defense, threat, dataset, classifier, seed) cell and store it  (run.py)
  ls         list registered defenses, threats, attacks, shifts, datasets, classifiers  (ls.py)
  results    print the stored results (table, csv or json)                               (results.py)
  show       one job in full: configuration, identity, metrics, curve, environment      (show.py)
  grid       run a YAML grid (local worker processes or Ray), skipping stored cells    (grid.py)
  check      compare stored results with an accuracy table; non-zero exit on regressions (check.py)
  compare    paired comparison of two jobs on their shared examples: 2x2 table, exact McNemar  (compare.py)
  report     the leaderboard as Markdown (or a CSV summary) from a store or a committed table  (report.py)
  merge      merge stores from several machines into one, keyed by job identity (merge.py)
  dashboard  the Streamlit leaderboard over a store (read-only)                       (dashboard/cli.py)
  train      train the models the harness ships (``harness train classifier ...``)     (train.py)

Bad input exits with status 2 and a one-line ``error: ...`` on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from harness.core.registry import HarnessError

#: Command modules in the order ``harness --help`` lists them; each has ``add_parser(sub)``.
COMMANDS = ("run", "ls", "results", "show", "grid", "check", "compare", "report", "merge", "train")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argparse parser of every subcommand (``only``: of that one command alone).

    Building one command's parser imports only that command's module: ``harness train``
    registers its trainers, which import the models, so ``harness run`` skips that.
    """
    import importlib

    from dashboard.cli import add_dashboard_parser

    p = argparse.ArgumentParser(prog="harness", description="Benchmark harness for adversarial purification defenses.")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        if only is None or only == name:
            importlib.import_module(f"harness.cli.{name}").add_parser(sub)
    if only is None or only == "dashboard":
        add_dashboard_parser(sub)
    return p


#: OpenMP threads sleep at a barrier instead of spinning, unless the user chose otherwise. Set before torch loads
#: its OpenMP runtime: beside a busy process, spinning threads wait for a partner that lost its core, and a run
#: slowed ninefold instead of in proportion to the load (bench/bench_threads.py, docs/benchmarks.md).
OMP_WAIT_POLICY = "PASSIVE"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``harness`` console script."""
    os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)  # inherited by grid workers and the Ray tasks' env
    args_list = list(sys.argv[1:] if argv is None else argv)
    first = args_list[0] if args_list else None
    parser = build_parser(first if first in (*COMMANDS, "dashboard") else None)
    args = parser.parse_args(args_list)
    try:
        return int(args.func(args) or 0)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished batches are stored; rerun the same command to resume", file=sys.stderr)
        return 130
