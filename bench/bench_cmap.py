"""CMAP's costs and its surrogate's strength; prints one JSON object.

- ``purify``: purification throughput (images per second) of the no-grad defense (N
  latents, K Adam steps, one batched network call per step).
- ``full_step``: time and peak memory of one full-gradient step (the attacker's gradient
  through all K unrolled Adam steps) for each K in ``--ks``, with and without per-step
  checkpointing. Memory as in ``bench/bench_ncsnpp.py``: CUDA ``max_memory_allocated``
  above the pre-step level, or on CPU the resident-set growth during the step in a fresh
  process per measurement.
- ``--sweep-sigma``: the surrogate path's noise level sigma_a: a PGD attack through
  ``S(x) = f(2x - 1 + sigma_a e, sigma_a)`` with EOT, evaluated on the full defense; the
  strongest sigma_a is the one with the lowest robust accuracy.

Usage::

    python bench/bench_cmap.py --ks 5,10,20 --batch 8               # shipped digits consistency model
    python bench/bench_cmap.py --sweep-sigma --n 32
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_diffusion import _rss_mb  # noqa: E402
from bench.bench_ncsnpp import _MALLOC_ENV  # noqa: E402


def _defense(args, steps: int, checkpoint: bool):
    import defenses  # noqa: F401
    from defenses.cmap import CMAP
    from harness.classifiers import load_classifier
    from harness.core.defense import SetupContext

    dev = torch.device(args.device)
    clf = load_classifier("digits-cnn", dataset="digits", device=dev)
    d = CMAP.from_dict({"steps": steps, "n_latents": args.n_latents or 4, "checkpoint": checkpoint})
    d.setup(SetupContext(classifier=clf.module, dataset="digits", image_shape=(1, 8, 8), num_classes=10, device=dev))
    from harness.data import eval_subset

    x = eval_subset("digits", args.batch, 0).x.to(dev)
    return d.eval(), clf.module, x


def measure_full(args, steps: int, checkpoint: bool) -> dict:
    """One full-gradient step: seconds and peak memory (MiB) above the pre-step level."""
    from harness.core.defense import GradientPath

    d, clf, x = _defense(args, steps, checkpoint)
    dev = x.device

    def step():
        xx = x.clone().requires_grad_(True)
        out = d.classify(xx, clf, path=GradientPath.FULL, generator=torch.Generator(device=dev).manual_seed(0))
        return torch.autograd.grad(out.logsumexp(1).sum(), xx)[0]

    step()  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        secs, peak = time.perf_counter() - t0, (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        before = _rss_mb()
        t0 = time.perf_counter()
        step()
        secs = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    return {"K": steps, "N": d.config.n_latents, "batch": args.batch, "checkpoint": checkpoint,
            "grad_step_s": round(secs, 3), "peak_mem_mb": round(peak, 1)}


def measure_purify(args) -> dict:
    d, clf, x = _defense(args, args.purify_steps, False)
    g = torch.Generator(device=x.device).manual_seed(0)
    d.classify(x, clf, generator=g)  # warm-up
    t0 = time.perf_counter()
    d.classify(x, clf, generator=g)
    secs = time.perf_counter() - t0
    return {"K": args.purify_steps, "N": d.config.n_latents, "batch": args.batch, "seconds": round(secs, 3),
            "images_per_s": round(args.batch / secs, 2), "nfe_per_image": d.nfe_per_call}


def sweep_sigma(args) -> dict:
    from harness.evaluation import RunConfig, resolve, run_job
    from harness.store import Store

    out, store = {}, Store("sqlite://")
    for s in (0.1, 0.25, 0.5, 1.0, 2.0, 5.0):
        cfg = RunConfig(defense="cmap", threat="adaptive", n_examples=args.n, overrides=(
            ("gradient_path", "surrogate"), ("also_paths", ""), ("attacks", "pgd"), ("threat.steps", str(args.pgd_steps)),
            ("eval_draws", "4"), ("sigma_a", str(s)),
        ))
        res = run_job(resolve(cfg), store, progress=False)
        out[str(s)] = round(res.metrics["robust_accuracy"]["value"], 4)
    best = min(out, key=out.get)
    return {"n": args.n, "pgd_steps": args.pgd_steps, "robust_accuracy_by_sigma_a": out, "strongest_sigma_a": float(best)}


def reconstruction(args) -> dict:
    """What limits CMAP on a dataset: how close its fitted latents' images come to the input, step by step.

    One optimisation of the N latents per image to the largest K of ``--recon-ks`` (the
    defense's own Adam steps, lr and loss); at each K of the list: PSNR and SSIM of the
    best reconstruction (lowest L_a, the image :meth:`CMAP.purify` returns) against the
    clean input, and the classifier's accuracy on the inputs, on the best reconstruction
    and by the defense's vote over the N images.
    """
    import defenses  # noqa: F401
    from defenses.cmap import CMAP
    from harness.classifiers import load_classifier
    from harness.core.defense import SetupContext
    from harness.data import eval_subset
    from harness.evaluation.quality import psnr, ssim

    dev = torch.device(args.device)
    sub = eval_subset(args.dataset, args.n, 0, data_dir=args.data_dir)
    clf = load_classifier(args.classifier, dataset=args.dataset, weights=args.weights, device=dev).module.eval()
    ks = sorted(int(v) for v in args.recon_ks.split(","))
    d = CMAP.from_dict({"steps": ks[-1], **({"n_latents": args.n_latents} if args.n_latents else {})})
    d.setup(SetupContext(classifier=clf, dataset=args.dataset, image_shape=tuple(sub.x.shape[1:]), num_classes=10, device=dev))
    d.eval()
    x, y = sub.x.to(dev), sub.y.to(dev)
    with torch.no_grad():
        clean_acc = (clf(x).argmax(1) == y).float().mean().item()
    z = d.initial_latents(x, torch.Generator(device=dev).manual_seed(0))
    m, v = torch.zeros_like(z), torch.zeros_like(z)
    rows, t0 = [], time.perf_counter()
    for k in range(1, ks[-1] + 1):
        z, m, v = d.adam_step(z, m, v, k, x, differentiable=False)
        if k in ks:
            with torch.no_grad():
                x_hat = d.images(z)
                _, l_a = d.latent_loss(z, x)
                best = x_hat[torch.arange(len(x), device=dev), l_a.argmin(1)]
                rows.append({
                    "K": k, "seconds": round(time.perf_counter() - t0, 1),
                    "psnr_db": round(psnr(best, x).mean().item(), 2), "ssim": round(ssim(best, x).mean().item(), 4),
                    "accuracy_best_reconstruction": round((clf(best).argmax(1) == y).float().mean().item(), 4),
                    "accuracy_vote": round((d.vote_logits(x_hat, clf).argmax(1) == y).float().mean().item(), 4),
                })
    return {"dataset": args.dataset, "n": len(y), "N": d.settings.n_latents, "lr": d.settings.lr,
            "consistency_model": (d.source or {}).get("sha256"), "accuracy_inputs": round(clean_acc, 4), "by_K": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ks", default="5,10,20", help="K values of the full-gradient step")
    p.add_argument("--n-latents", type=int, default=None, help="N (default: 4; --reconstruction: the dataset's)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--purify-steps", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sweep-sigma", action="store_true", help="sweep the surrogate's sigma_a instead")
    p.add_argument("--n", type=int, default=32, help="examples of the sigma_a sweep")
    p.add_argument("--pgd-steps", type=int, default=10)
    p.add_argument("--reconstruction", action="store_true", help="reconstruction quality and accuracy of the fitted latents by K")
    p.add_argument("--recon-ks", default="10,20,40,80,160", help="K values of --reconstruction (one optimisation to the largest)")
    p.add_argument("--dataset", default="digits", help="--reconstruction: dataset (cifar10 needs --data-dir, --weights)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--classifier", default="digits-cnn")
    p.add_argument("--weights", default=None, help="classifier weights (cifar10: ../shared/models/resnet20-12fca82f.th)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        k, ck = args.child.split(":")
        print(json.dumps(measure_full(args, int(k), ck == "1")))
        return 0
    if args.reconstruction:
        print(json.dumps({"reconstruction": reconstruction(args)}, indent=1))
        return 0
    if args.sweep_sigma:
        print(json.dumps({"sigma_a_sweep": sweep_sigma(args)}, indent=1))
        return 0
    rows = []
    for k in (int(v) for v in args.ks.split(",")):
        for ck in (False, True):
            if torch.device(args.device).type == "cpu":
                cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--child", f"{k}:{int(ck)}"]
                rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True,
                                                      env={**os.environ, **_MALLOC_ENV}).stdout))
            else:
                rows.append(measure_full(args, k, ck))
    print(json.dumps({"device": args.device, "torch_threads": torch.get_num_threads(), "purify": measure_purify(args),
                      "full_step": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
