"""Write an accuracy table (for ``harness check``) from the finished jobs of a store.

    python -m harness.store.tables --db smoke.db > tables/smoke.csv

Used to (re)generate ``tables/smoke.csv`` after a change that is meant to move numbers;
the tolerance column is left empty, so the check uses each stored result's 95% interval.
The ``shift`` and ``trained_on`` columns tell apart the colour-shift and cross-dataset
cells of one defense; their paired changes (``*_change``) are checked too.
"""

from __future__ import annotations

import argparse
import csv
import sys

from harness.store import Store
from harness.store.check import shift_label, trained_on

METRICS = ("clean_accuracy", "robust_accuracy", "clean_accuracy_change", "robust_accuracy_change")


def main(argv=None) -> int:
    """Write the accuracy table of the store's finished jobs to stdout as CSV; returns 0."""
    p = argparse.ArgumentParser(prog="python -m harness.store.tables")
    p.add_argument("--db", required=True)
    p.add_argument("--metrics", default=",".join(METRICS))
    a = p.parse_args(argv)
    st = Store(a.db, read_only=True)
    w = csv.writer(sys.stdout, lineterminator="\n")
    w.writerow(["defense", "threat", "dataset", "classifier", "shift", "trained_on", "metric", "expected", "tolerance"])
    jobs = [(j, shift_label(j.config), trained_on(j.config)) for j in st.jobs(status="done")]
    for j, shift, source in sorted(jobs, key=lambda t: (t[0].dataset, t[0].defense, t[0].threat, t[0].classifier, t[1], t[2])):
        m = st.metrics(j.id)
        for name in a.metrics.split(","):
            if name in m:
                w.writerow([j.defense, j.threat, j.dataset, j.classifier, shift, source, name, f"{m[name].value:.6f}", ""])
    return 0


if __name__ == "__main__":
    sys.exit(main())
