"""One EOT gradient of APGD, looped (pyautoattack's own loop) against batched (one stacked call); prints JSON.

For a stochastic defense (default ``diffpure`` on ``digits``, its strongest gradient path,
the shipped weights) and each EOT sample count (default 1 and 20), it times one gradient
the way pyautoattack's APGD takes it (``model(x)``, its per-example loss summed,
``autograd.grad``), with ``eot_iter = K`` and the plain model (looped) or ``eot_iter = 1``
and :class:`~threat_models.attacks._pyautoattack.BatchedEOT` (batched), and counts the
calls to the defended model per gradient. Both are the same estimator (the mean of the K
per-draw loss gradients), but a purifier that draws its noise per solver step for the whole
batch (DiffPure) orders its stream differently for one stacked batch than for K calls, so
the two gradients are different draws of it: ``cosine`` compares them (a defense drawing
one noise tensor per call, like the tests' ``toy-noise``, gives the identical gradient).
The first gradient of each setting is a warm-up and not timed.

Usage::

    OMP_NUM_THREADS=1 python bench/bench_eot.py [--defense diffpure] [--n 32] [--eot 1 20] [--device cpu] [--repeat 3]

Measured on one CPU thread (DiffPure, digits, n=32): EOT 20 took 6.3 s looped and 3.2 s
batched (one call of 640 images instead of 20 of 32); EOT 1 is the same call either way.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--defense", default="diffpure")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--n", type=int, default=32, help="images per gradient")
    p.add_argument("--eot", type=int, nargs="+", default=[1, 20])
    p.add_argument("--repeat", type=int, default=3, help="gradients timed per setting (the median is reported)")
    p.add_argument("--max-forward", type=int, default=1024)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()

    from pyautoattack.autopgd_base import APGDAttack

    from harness.evaluation import RunConfig, resolve
    from harness.evaluation.forward import DefendedForward
    from threat_models.attacks._pyautoattack import eot_model, pyautoattack

    pyautoattack()
    job = resolve(RunConfig(defense=a.defense, threat="adaptive", dataset=a.dataset, n_examples=a.n, device=a.device))
    dev = job.device
    x = torch.as_tensor(job.subset.x[: a.n]).to(dev).float()
    y = torch.as_tensor(job.subset.y[: a.n]).to(dev).long()
    out = {"defense": a.defense, "dataset": a.dataset, "path": job.path.value, "n": len(y), "device": str(dev),
           "threads": torch.get_num_threads(), "max_forward": a.max_forward, "settings": []}
    for k in a.eot:
        row: dict = {"eot": k}
        grads = {}
        for mode in ("looped", "batched"):
            times, calls = [], []
            for rep in range(a.repeat + 1):  # rep 0: warm-up
                gen = torch.Generator(device=dev).manual_seed(rep)
                model = DefendedForward(job.defense, job.classifier.module, job.path, gen, eot_samples=k,
                                        max_forward=a.max_forward)
                n_calls = [0]
                fwd = model.forward

                def counted(z, fwd=fwd, n_calls=n_calls):
                    n_calls[0] += 1
                    return fwd(z)

                model.forward = counted
                module, eot_iter = eot_model(model, mode == "batched")
                att = APGDAttack(module, n_iter=1, eps=0.1, norm="Linf", eot_iter=eot_iter, loss="ce", device=dev)
                if hasattr(module, "bind"):
                    module.bind(att, y)
                xa = x.clone().requires_grad_(True)
                t0 = time.perf_counter()
                g = torch.zeros_like(x)
                for _ in range(att.eot_iter):  # pyautoattack's gradient, as in attack_single_run
                    with torch.enable_grad():
                        loss = torch.nn.functional.cross_entropy(att.model(xa), y, reduction="none").sum()
                    g += torch.autograd.grad(loss, [xa])[0].detach()
                g /= float(att.eot_iter)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                if rep > 0:
                    times.append(time.perf_counter() - t0)
                calls.append(n_calls[0])
                if rep == 0:
                    grads[mode] = g
            times.sort()
            row[mode] = {"grad_s": round(times[len(times) // 2], 4), "classifier_calls_per_grad": calls[0]}
        row["speedup"] = round(row["looped"]["grad_s"] / max(row["batched"]["grad_s"], 1e-9), 2)
        gl, gb = grads["looped"].flatten(1), grads["batched"].flatten(1)
        row["cosine_looped_batched"] = round(float(torch.nn.functional.cosine_similarity(gl, gb, dim=1).mean()), 4)
        out["settings"].append(row)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
