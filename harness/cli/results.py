"""``harness results``: every stored job with its headline numbers (table, csv or json)."""

from __future__ import annotations

import json
import sys


def cmd_results(args) -> int:
    """``harness results``: print the stored results as a table, CSV or JSON (finished jobs unless --all)."""
    import pandas as pd

    from harness.store import Store

    store = Store(args.db, read_only=True)
    rows = store.results_table(status=None if args.all else "done")
    if args.format == "json":
        print(json.dumps(rows, default=str))
        return 0
    if not rows:
        print(f"no results in {store.shown_url}; run e.g. `harness run --defense none --threat preprocessor-blind`")
        return 0
    from harness.evaluation.flags import format_flags

    df = pd.DataFrame(rows)
    df["flags"] = [format_flags(r["flags"]) for r in rows]  # names; `harness show` has the details
    if args.format == "csv":
        df.to_csv(sys.stdout, index=False)
        return 0
    show = df.copy()
    for c in ("psnr_clean", "psnr_adv"):
        if c in show:
            show[c] = show[c].map(lambda v: "-" if v is None or v != v else f"{v:.1f}")
    for c in ("ssim_clean", "ssim_adv"):
        if c in show:
            show[c] = show[c].map(lambda v: "-" if v is None or v != v else f"{v:.3f}")
    for c in ("clean", "robust", "robust_lo", "robust_hi", "robust_single", "robust_majority", "robust_worst", "seeds_mean", "seeds_sd"):
        if c in show:
            show[c] = show[c].map(lambda v: "-" if v is None or v != v else f"{100 * v:.1f}")
    show["eps"] = show["eps"].map(lambda v: "-" if v is None or v != v else f"{v:.4g}")
    if "seconds" in show:
        show["seconds"] = show["seconds"].map(lambda v: "-" if v is None or v != v else f"{v:.1f}")
    show["flags"] = show["flags"].map(lambda v: v or "-")
    print(show.to_string(index=False))
    return 0


def add_parser(sub) -> None:
    """Register ``harness results``."""
    res = sub.add_parser("results", help="print stored results")
    res.add_argument("--db", default=None)
    res.add_argument("--format", default="table", choices=["table", "csv", "json"])
    res.add_argument("--all", action="store_true", help="include running, failed and skipped jobs")
    res.set_defaults(func=cmd_results)
