"""Write an accuracy table (for ``harness check``) from the finished jobs of a store.

    python -m harness.store.tables --db smoke.db > tables/smoke.csv

Used to (re)generate ``tables/smoke.csv`` after a change that is meant to move numbers;
the tolerance column is left empty, so the check uses each stored result's 95% interval.
"""

from __future__ import annotations

import argparse
import csv
import sys

from harness.store import Store

METRICS = ("clean_accuracy", "robust_accuracy")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.store.tables")
    p.add_argument("--db", required=True)
    p.add_argument("--metrics", default=",".join(METRICS))
    a = p.parse_args(argv)
    st = Store(a.db, read_only=True)
    w = csv.writer(sys.stdout, lineterminator="\n")
    w.writerow(["defense", "threat", "dataset", "classifier", "metric", "expected", "tolerance"])
    for j in sorted(st.jobs(status="done"), key=lambda j: (j.dataset, j.defense, j.threat, j.classifier)):
        m = st.metrics(j.id)
        for name in a.metrics.split(","):
            if name in m:
                w.writerow([j.defense, j.threat, j.dataset, j.classifier, name, f"{m[name].value:.6f}", ""])
    return 0


if __name__ == "__main__":
    sys.exit(main())
