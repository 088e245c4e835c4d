"""Grid parent at scale: peak RSS and seconds per cell for 1,000 versus 100,000 cheap cells.

    python bench/bench_grid_scale.py                          # 1000 vs 100000, dry run and scheduled run
    python bench/bench_grid_scale.py --sizes 1000,20000 --modes dry

The cells are the toy plugin's ``toy-noise`` under a one-step BPDA on one digit, one cell
per attack seed (``seeds: [0 .. N-1]``), so each has its own job identity and nothing of a
cell is shared but its networks. Each size runs in a fresh process, so its peak RSS
(``ru_maxrss``) is its own:

- **dry**: :func:`harness.scheduler.cells.iter_plan` over every cell (what ``harness grid
  --dry-run`` does, without printing): every cell resolved and identified;
- **scheduled**: :func:`harness.scheduler.run_grid` into a new SQLite store through an
  executor that replays one real batch (computed once, in this process) for every task
  instead of computing it: planning, the per-job resolution when a task is handed out,
  ``begin``/``write``/``finish`` in the store and the aggregation are the grid's own, only
  the workers' arithmetic is left out. Seconds per cell is the parent's whole cost.

The bars (issue 25): the peak RSS of the larger grid at most 1.3 times the smaller's, and
under 5 ms of scheduling per cell.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PLUGIN = ROOT / "tests" / "plugins" / "toy_defenses.py"


def grid_file(n: int, folder: Path) -> Path:
    p = folder / f"scale{n}.yaml"
    p.write_text(
        f"name: scale{n}\nn_examples: 1\nseeds: [{', '.join(map(str, range(n)))}]\n"
        "set: {batch_size: 1, threat.steps: 1, eot_samples: 1, eval_draws: 1}\n"
        f"plugins: [{PLUGIN}]\ndefenses: [toy-noise]\nthreats: [bpda]\ndatasets: [digits]\n"
    )
    return p


class ReplayExecutor:
    """Hands every task the same precomputed batch (the parent's scheduling cost without the workers' compute)."""

    def __init__(self, payload: dict):
        self.payload = payload

    def run(self, tasks, store_url, on_event, start=None):
        for t in tasks:
            t = start(t) if start is not None else t
            if t is None:
                continue
            if 0 not in t.skip:
                on_event("batch", t.job_id, 0, self.payload)
            on_event("done", t.job_id, None, None)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(n: int, mode: str) -> dict:
    """One measurement in this process: the grid of ``n`` cells, dry or scheduled."""
    import torch

    from harness.evaluation import iter_batches, resolve
    from harness.scheduler import load_grid, run_grid
    from harness.scheduler.cells import iter_plan
    from harness.store import Store

    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(prefix="grid-scale-"))
    spec = load_grid(grid_file(n, folder))
    first = next(iter_plan(spec, None, with_jobs=True))  # imports, plugin, the shared networks: the fixed cost
    payload = next(iter(iter_batches(resolve(first.cfg))))[1]
    base = peak_rss_mib()
    t0 = time.perf_counter()
    if mode == "dry":
        counts: dict[str, int] = {}
        for c in iter_plan(spec, None):
            counts[c.state] = counts.get(c.state, 0) + 1
    else:
        summary = run_grid(spec, Store(str(folder / "r.db")), executor=ReplayExecutor(payload), log=lambda *_: None)
        counts = summary.counts()
    seconds = time.perf_counter() - t0
    return {"cells": n, "mode": mode, "counts": counts, "seconds": seconds, "ms_per_cell": 1e3 * seconds / n,
            "peak_rss_mib": peak_rss_mib(), "rss_before_mib": base}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000,100000", help="two grid sizes, small then large")
    p.add_argument("--modes", default="dry,scheduled")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        n, mode = a.child.split(":")
        print(json.dumps(child(int(n), mode)))
        return 0
    sizes = [int(s) for s in a.sizes.split(",")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for mode in a.modes.split(","):
        rows = []
        for n in sizes:
            out = subprocess.run([sys.executable, __file__, "--child", f"{n}:{mode}"], capture_output=True, text=True, env=env,
                                 check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            rows.append(r)
            print(f"{mode:<9} {n:>7} cells: {r['seconds']:8.1f} s, {r['ms_per_cell']:.2f} ms per cell, peak RSS "
                  f"{r['peak_rss_mib']:.0f} MiB (after the first cell {r['rss_before_mib']:.0f} MiB)  {r['counts']}", flush=True)
        small, large = rows[0], rows[-1]
        ratio = large["peak_rss_mib"] / small["peak_rss_mib"]
        print(f"{mode:<9} peak RSS ratio {large['cells']} / {small['cells']} cells: {ratio:.3f} (bar 1.3); "
              f"{large['ms_per_cell']:.2f} ms per cell at {large['cells']} (bar 5)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
