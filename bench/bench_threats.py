"""Per-threat throughput (examples/s) and peak memory, printed as JSON.

    python bench/bench_threats.py [--defense none] [--dataset digits] [--n 128] [--device cpu] [--plugin FILE]

Each threat model runs once on a fresh in-memory store with its dataset defaults, so
the numbers are those of the cells users run. Peak memory is the process's max RSS
increase on the CPU (resource.getrusage) and torch.cuda.max_memory_allocated on a GPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--defense", default="none")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threats", default="preprocessor-blind,bpda,adaptive")
    p.add_argument("--plugin", action="append", default=[])
    p.add_argument("--set", action="append", default=[])
    a = p.parse_args()

    from harness.evaluation import RunConfig, parse_set, resolve, run_job
    from harness.store import Store

    results = []
    for threat in a.threats.split(","):
        cfg = RunConfig(defense=a.defense, threat=threat, dataset=a.dataset, n_examples=a.n, device=a.device,
                        overrides=parse_set(a.set), plugins=tuple(a.plugin))
        job = resolve(cfg)
        if job.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(job.device)
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        out = run_job(job, Store("sqlite://"), progress=False)
        dt = time.perf_counter() - t0
        row = {
            "defense": a.defense, "threat": threat, "dataset": a.dataset, "n": a.n, "device": str(job.device),
            "gradient_path": job.path.value, "eot_samples": job.eot, "eval_draws": job.draws,
            "seconds": round(dt, 3), "examples_per_s": round(a.n / dt, 2),
            "robust_accuracy": out.metrics["robust_accuracy"]["value"],
        }
        if job.device.type == "cuda":
            row["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(job.device) / 2**20, 1)
        row["max_rss_increase_mib"] = round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024, 1)
        results.append(row)
    json.dump({"bench": "threats", "torch": torch.__version__, "threads": torch.get_num_threads(), "results": results},
              sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
