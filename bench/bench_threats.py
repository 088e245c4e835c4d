r"""Per-threat cost per example, throughput and peak memory, printed as JSON.

    python bench/bench_threats.py [--defense none[,diffpure,...]] [--dataset digits] [--n 128] [--device cpu] [--plugin FILE]
    python bench/bench_threats.py --dataset cifar10 --data-dir ../shared/data/cifar10_test_first1017.npz \
        --classifier resnet20 --weights ../shared/models/resnet20-12fca82f.th \
        --defense diffpure,diffpure-ddpm,coup,cmap --threats preprocessor-blind,bpda,adaptive --n 8 --n-threat adaptive=4

Each (defense, threat) runs once on a fresh in-memory store with its dataset defaults, so
the numbers are those of the cells users run (a grid is sized from ``seconds_per_example``).
``--n-threat THREAT=N`` gives one threat its own number of examples (the adaptive cells of
the diffusion purifiers take minutes per example on a CPU). Peak memory is the process's
max RSS increase on the CPU (resource.getrusage) and torch.cuda.max_memory_allocated on a GPU.
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
    p.add_argument("--defense", default="none", help="one defense or a comma-separated list")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--classifier", default=None)
    p.add_argument("--weights", default=None)
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--n-threat", action="append", default=[], help="THREAT=N: examples for one threat")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--threats", default="preprocessor-blind,bpda,adaptive")
    p.add_argument("--plugin", action="append", default=[])
    p.add_argument("--set", action="append", default=[])
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    from harness.core.registry import HarnessError
    from harness.evaluation import RunConfig, parse_set, resolve, run_job
    from harness.evaluation.plan import IncompatibleError
    from harness.store import Store

    per_threat = dict(item.split("=", 1) for item in a.n_threat)
    results = []
    for defense in a.defense.split(","):
        for threat in a.threats.split(","):
            n = int(per_threat.get(threat, a.n))
            cfg = RunConfig(defense=defense, threat=threat, dataset=a.dataset, n_examples=n, device=a.device,
                            classifier=a.classifier, weights=a.weights, data_dir=a.data_dir,
                            overrides=parse_set(a.set), plugins=tuple(a.plugin))
            try:
                job = resolve(cfg)
            except (IncompatibleError, HarnessError) as exc:
                results.append({"defense": defense, "threat": threat, "skipped": str(exc)})
                continue
            if job.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(job.device)
            rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            t0 = time.perf_counter()
            out = run_job(job, Store("sqlite://"), progress=False)
            dt = time.perf_counter() - t0
            row = {
                "defense": defense, "threat": threat, "dataset": a.dataset, "n": n, "device": str(job.device),
                "gradient_path": job.path.value, "eot_samples": job.eot, "eval_draws": job.draws,
                "seconds": round(dt, 3), "seconds_per_example": round(dt / n, 3), "examples_per_s": round(n / dt, 3),
                "clean_accuracy": out.metrics["clean_accuracy"]["value"],
                "robust_accuracy": out.metrics["robust_accuracy"]["value"],
            }
            if job.device.type == "cuda":
                row["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(job.device) / 2**20, 1)
            row["max_rss_increase_mib"] = round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024, 1)
            results.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    json.dump({"bench": "threats", "torch": torch.__version__, "threads": torch.get_num_threads(), "results": results},
              sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
