"""``harness check``: stored results against an accuracy table; exit 1 on any regression."""

from __future__ import annotations


def cmd_check(args) -> int:
    from harness.store import Store
    from harness.store.check import check, format_rows, load_table

    table = load_table(args.table)  # a malformed table is reported before the store is opened
    rows = check(table, Store(args.db, read_only=True))
    print(format_rows(rows))
    bad = [r for r in rows if not r.ok]
    print(f"{len(rows) - len(bad)}/{len(rows)} within tolerance")
    return 1 if bad else 0


def add_parser(sub) -> None:
    """Register ``harness check``."""
    ck = sub.add_parser("check", help="compare stored results with an accuracy table (CSV)")
    ck.add_argument("table", help="CSV: defense,threat,dataset,classifier,metric,expected,tolerance")
    ck.add_argument("--db", default=None)
    ck.set_defaults(func=cmd_check)
