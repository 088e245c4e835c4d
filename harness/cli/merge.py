"""``harness merge SRC... --into DB``: merge results stores from several machines into one, keyed by job identity.

    harness merge node1.db node2.db --into postgresql+psycopg://lab@dbhost:5432/leaderboard
    harness merge postgresql+psycopg://lab@dbhost:5432/leaderboard --into snapshot.db

Identical jobs are kept once; a job whose stored numbers differ between two stores is
refused with both named, before anything is written; the sources are opened read-only
(:mod:`harness.store.merge`).
"""

from __future__ import annotations


def cmd_merge(args) -> int:
    """``harness merge``: merge the source stores into ``--into``; prints one line per source and the total."""
    from harness.store.merge import merge

    summary = merge(args.sources, args.into, log=print)
    print(summary.lines()[-1])
    return 0


def add_parser(sub) -> None:
    """Register ``harness merge``."""
    m = sub.add_parser("merge", help="merge results stores (SQLite files or server URLs) into one, keyed by job identity",
                       description="Copy every job of the source stores that the target lacks (or has only unfinished) into the "
                       "target; identical jobs are kept once, a job whose stored numbers differ is refused with both stores "
                       "named and nothing written. Sources are opened read-only.")
    m.add_argument("sources", nargs="+", metavar="SRC", help="source store: a path or a SQLAlchemy URL (read-only)")
    m.add_argument("--into", required=True, metavar="DB", help="target store: a path or a SQLAlchemy URL (created if missing)")
    m.set_defaults(func=cmd_merge)
