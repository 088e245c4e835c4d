"""Harness overhead: the share of a run's wall time spent outside network forward/backward passes.

    python bench/bench_overhead.py [--defense none] [--threat adaptive] [--n 64] [--profile 15]

Runs one job (default ``none`` under ``adaptive`` on digits, 256 examples) with
``run_job`` into a fresh SQLite file and times, with wrappers, every **network call**: the classifier's forward (a forward
pre-hook and hook on the classifier module), the defense's ``purify`` /
``purify_adjoint`` / ``purify_surrogate`` (with the classifier calls inside them, e.g.
COUP's guidance, counted once), and every backward pass (``torch.autograd.grad`` and
``Tensor.backward``, whose cost is the networks' backward). Everything else of the run
(attack bookkeeping, projections, scoring, the store, aggregation) is overhead:
``overhead_share = 1 - network_s / wall_s``. ``store_write_s`` and ``finish_s`` (aggregation,
metrics, environment) time the store writes and the job's finish on their own. With ``--profile N`` the same job runs
again under cProfile (into another file) and the N functions with the largest own time
outside torch's compiled code are listed: where the overhead goes. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class NetTimer:
    """Wall time of the outermost network call in flight (nested calls are counted once)."""

    def __init__(self):
        self.depth, self.t0, self.total, self.calls = 0, 0.0, 0.0, 0

    def enter(self) -> None:
        if self.depth == 0:
            self.t0 = time.perf_counter()
        self.depth += 1

    def leave(self) -> None:
        self.depth -= 1
        if self.depth == 0:
            self.total += time.perf_counter() - self.t0
            self.calls += 1

    def wrap(self, fn):
        def timed(*args, **kwargs):
            self.enter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.leave()

        return timed


def _instrument(job, timer: NetTimer) -> list:
    """Hooks and patches that feed ``timer``; returns what to undo."""
    clf = job.classifier.module
    handles = [
        clf.register_forward_pre_hook(lambda m, a: timer.enter()),
        clf.register_forward_hook(lambda m, a, out: timer.leave()),
    ]
    undo = [h.remove for h in handles]
    for d in {id(job.defense): job.defense, id(job.reference_defense): job.reference_defense}.values():
        if d is None:
            continue
        for name in ("purify", "purify_adjoint", "purify_surrogate"):
            orig = getattr(d, name)
            setattr(d, name, timer.wrap(orig))
            undo.append(lambda d=d, name=name: delattr(d, name))
    grad, backward = torch.autograd.grad, torch.Tensor.backward
    torch.autograd.grad, torch.Tensor.backward = timer.wrap(grad), timer.wrap(backward)
    undo.append(lambda: setattr(torch.autograd, "grad", grad))
    undo.append(lambda: setattr(torch.Tensor, "backward", backward))
    return undo


def _job(a):
    from harness.evaluation import RunConfig, parse_set, resolve

    cfg = RunConfig(defense=a.defense, threat=a.threat, dataset=a.dataset, n_examples=a.n, seed=a.seed,
                    overrides=parse_set(a.set), device=a.device)
    return resolve(cfg)


def _run(job, db: str) -> dict:
    """``run_job`` (what ``harness run`` calls) into ``db``, timing the store writes and the job's finish."""
    from harness.evaluation import lifecycle
    from harness.store import Store

    store = Store(db)
    spent = {"write_batch": 0.0, "finish": 0.0}

    def timed(name, fn):
        def inner(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - t
        return inner

    store.write_batch = timed("write_batch", store.write_batch)
    finish = lifecycle.JobWriter.finish
    lifecycle.JobWriter.finish = timed("finish", finish)  # aggregation, finish_job, environment
    try:
        t0 = time.perf_counter()
        out = lifecycle.run_job(job, store, progress=False)
        wall = time.perf_counter() - t0
    finally:
        lifecycle.JobWriter.finish = finish
    store.close()
    return {"wall_s": wall, "store_write_s": spent["write_batch"], "finish_s": spent["finish"],
            "robust_accuracy": out.metrics["robust_accuracy"]["value"], "clean_accuracy": out.metrics["clean_accuracy"]["value"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--defense", default="none")
    p.add_argument("--threat", default="adaptive")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", type=int, default=0, help="also run under cProfile and list the top N own-time functions")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    tmp = tempfile.mkdtemp(prefix="bench_overhead_")
    job = _job(a)
    timer = NetTimer()
    undo = _instrument(job, timer)
    try:
        res = _run(job, os.path.join(tmp, "a.db"))
    finally:
        for u in reversed(undo):
            u()
    report = {
        "defense": a.defense, "threat": a.threat, "dataset": a.dataset, "n": a.n, "device": a.device,
        "attacks": [pa.label for pa in job.plan.attacks], "torch_threads": torch.get_num_threads(),
        "wall_s": round(res["wall_s"], 3), "network_s": round(timer.total, 3), "network_calls": timer.calls,
        "overhead_s": round(res["wall_s"] - timer.total, 3),
        "overhead_share": round(1 - timer.total / res["wall_s"], 4),
        "store_write_s": round(res["store_write_s"], 4), "finish_s": round(res["finish_s"], 4),
        "clean_accuracy": res["clean_accuracy"], "robust_accuracy": res["robust_accuracy"],
    }
    if a.profile:
        prof = cProfile.Profile()
        job2 = _job(a)
        prof.enable()
        _run(job2, os.path.join(tmp, "b.db"))
        prof.disable()
        st = pstats.Stats(prof)
        rows = []
        for (file, line, fn), (_cc, nc, tt, ct, _callers) in st.stats.items():
            rows.append((tt, nc, ct, f"{Path(file).name}:{line}:{fn}" if file != "~" else fn))
        rows.sort(reverse=True)
        report["profile_total_s"] = round(sum(r[0] for r in rows), 3)
        report["profile_top_own_time"] = [
            {"fn": name, "own_s": round(tt, 4), "calls": nc, "cum_s": round(ct, 4)} for tt, nc, ct, name in rows[: a.profile]
        ]
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
