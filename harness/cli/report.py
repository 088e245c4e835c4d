"""``harness report``: the leaderboard as a Markdown page (or its CSV summary) from a store or a committed table.

    harness report --db smoke.db --dataset digits --out docs/leaderboard-digits.md
    harness report --db cifar.db --dataset cifar10 --format csv --out tables/cifar10.csv
    harness report --table tables/smoke.csv --brief --out README.md --insert

The numbers and marks are the dashboard's (``dashboard/queries.py``); the layout is
``dashboard/report.py``. The store is opened read-only.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path


def command_args(args) -> str:
    """The arguments of this invocation that decide its output, canonically spelled (what the page says produced it)."""
    from harness.store.store import display_url

    words = ["--table", args.table] if args.table else ["--db", display_url(args.db)] if args.db else []  # no password
    for d in args.dataset or ():
        words += ["--dataset", d]
    if args.brief:
        words.append("--brief")
    if args.format != "markdown":
        words += ["--format", args.format]
    return shlex.join(words)  # without --out and --insert: the same page wherever it is written


def cmd_report(args) -> int:
    """``harness report``: write the leaderboard of a store or table as Markdown (or the summary CSV)."""
    from dashboard import report
    from harness.core.registry import HarnessError

    if args.insert and not args.out:
        raise HarnessError("--insert needs --out FILE (the file whose `<!-- BEGIN harness report ... -->` block is replaced)")
    if args.table and args.format == "csv":
        raise HarnessError("--format csv writes the summary of a store: give --db, not --table")
    from harness.store import DEFAULT_DB

    db = args.db or os.environ.get("HARNESS_DB") or DEFAULT_DB
    jobs, source = report.jobs_from_table(args.table) if args.table else report.jobs_from_store(db)
    argstr = command_args(args)
    if args.format == "csv":
        text = report.to_summary_csv(jobs[jobs["dataset"].isin(args.dataset)] if args.dataset else jobs)
    else:
        text = report.render(jobs, source, argstr, datasets=args.dataset, brief=args.brief)
    if not args.out or args.out == "-":
        sys.stdout.write(text)
        return 0
    out = Path(args.out)
    if args.insert:
        if not out.is_file():
            raise HarnessError(f"--insert: {out} does not exist")
        text = report.insert_block(out.read_text(), argstr, text)
    elif not out.parent.is_dir():
        raise HarnessError(f"folder {out.parent} does not exist")
    out.write_text(text)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    """Register ``harness report``."""
    rp = sub.add_parser("report", help="the leaderboard as Markdown (or a CSV summary) from a store or a table",
                        description="Write the leaderboard of a results store (or of a committed table) as Markdown: one row "
                        "per defense and classifier, sorted by the worst case over threats, a column per threat with the 95%% "
                        "interval, gradient path and EOT, flags, clean accuracy, cost, the settings and commits.")
    src = rp.add_mutually_exclusive_group()
    src.add_argument("--db", default=None, help="results store: path or SQLAlchemy URL, read-only (default $HARNESS_DB or results.db)")
    src.add_argument("--table", default=None, metavar="CSV",
                     help="a committed table instead: a `harness report --format csv` summary, or a `harness check` accuracy table")
    rp.add_argument("--dataset", action="append", metavar="D", help="only this dataset (repeatable; default: every dataset)")
    rp.add_argument("--brief", action="store_true", help="the leaderboard tables only (what the README embeds)")
    rp.add_argument("--format", default="markdown", choices=["markdown", "csv"],
                    help="csv: one row per finished job with every field the page shows (reads back with --table)")
    rp.add_argument("--out", "-o", default=None, metavar="FILE", help="write here (default: stdout)")
    rp.add_argument("--insert", action="store_true",
                    help="replace only the block between `<!-- BEGIN harness report ARGS -->` and `<!-- END harness report -->` "
                    "of FILE, where ARGS are this command's arguments without --out and --insert")
    rp.set_defaults(func=cmd_report)
