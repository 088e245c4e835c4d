"""``harness show``: one job in full (flags, configuration, identity, metrics, curves, environment) as JSON."""

from __future__ import annotations

import json


def cmd_show(args) -> int:
    """``harness show``: print one stored job in full as JSON."""
    from harness.cli.compare import find_job
    from harness.store import Store

    store = Store(args.db, read_only=True)
    j = find_job(store, args.job_id)
    out = {
        "job_id": j.id, "status": j.status, "reason": j.reason, "flags": j.flags, "config": j.config, "identity": j.identity,
        "metrics": {k: {"value": m.value, "lower": m.lower, "upper": m.upper, "n": m.n} for k, m in store.metrics(j.id).items()},
        "curves": store.curves(j.id), "timings": j.timings, "nfe": j.nfe, "environment": j.environment,
    }
    print(json.dumps(out, indent=2, default=str))
    return 0


def add_parser(sub) -> None:
    """Register ``harness show``."""
    sh = sub.add_parser("show", help="one job in full (JSON)")
    sh.add_argument("job_id", help="job id or a unique prefix")
    sh.add_argument("--db", default=None)
    sh.set_defaults(func=cmd_show)
