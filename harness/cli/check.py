"""``harness check``: stored results against an accuracy table; exit 1 on any regression (``--fail-on-flags``: or flag)."""

from __future__ import annotations


def cmd_check(args) -> int:
    """``harness check``: compare the store against an accuracy table; returns 1 if a row fails
    (or, with --fail-on-flags, a matched job is flagged), else 0.
    """
    from harness.store import Store
    from harness.store.check import check, flagged_cells, format_rows, load_table

    table = load_table(args.table)  # a malformed table is reported before the store is opened
    rows = check(table, Store(args.db, read_only=True))
    print(format_rows(rows))
    bad = [r for r in rows if not r.ok]
    print(f"{len(rows) - len(bad)}/{len(rows)} within tolerance")
    if args.fail_on_flags:
        flagged = flagged_cells(rows)
        unknown = len({r.job_id for r in rows if r.job_id and r.flags is None})
        for line in flagged:
            print(f"flagged  {line}")
        jobs = len({r.job_id for r in rows if r.job_id})
        print(f"{len(flagged)}/{jobs} matched jobs flagged" + (f" ({unknown} stored before flags existed)" if unknown else ""))
        if flagged:
            return 1
    return 1 if bad else 0


def add_parser(sub) -> None:
    """Register ``harness check``."""
    ck = sub.add_parser("check", help="compare stored results with an accuracy table (CSV)")
    ck.add_argument("table", help="CSV: defense,threat,dataset,classifier,metric,expected,tolerance")
    ck.add_argument("--db", default=None)
    ck.add_argument("--fail-on-flags", action="store_true",
                    help="also exit 1 when a matched job carries flags (not_converged, zero_gradients, ...), listing them")
    ck.set_defaults(func=cmd_check)
