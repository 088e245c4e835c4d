"""FlowPure speed: purification and gradient time per path, and training time per step, as JSON.

    python bench/bench_flowpure.py [--dataset digits] [--batch 64] [--repeats 5] [--device cpu] [--threads N]

For each variant with weights for the dataset: the median seconds of one purification
(no graph) and of one forward+backward of ``sum(classifier(purify(x)))`` along each
gradient path (full, adjoint, surrogate, bpda), on ``--batch`` test images; then the
median seconds of one CFM training step per variant (source crafting + update) with the
dataset's recipe and a freshly initialised UNet.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def _median_s(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times), 5)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="digits")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    from defenses.flowpure import VARIANTS, VelocityField, build_unet
    from harness.classifiers import default_classifier, load_classifier
    from harness.data import DATASETS, load_split
    from harness.core.registry import HarnessError
    from harness.training.flowpure import RECIPES, cfm_loss, make_sources
    from harness.core.defense import DEFENSES, SetupContext

    dev = torch.device(a.device)
    info = DATASETS.get(a.dataset)
    clf = load_classifier(default_classifier(a.dataset), dataset=a.dataset, device=dev).module
    x, y = load_split(a.dataset, "test")
    x, y = x[: a.batch].to(dev), y[: a.batch].to(dev)
    import defenses  # noqa: F401  (registers the variants)

    purify_rows = []
    for variant in VARIANTS:
        d = DEFENSES.get(f"flowpure-{variant}")()
        try:
            d.setup(SetupContext(classifier=clf, dataset=a.dataset, image_shape=tuple(info.image_shape), num_classes=info.num_classes,
                                 device=dev))
        except HarnessError as exc:
            purify_rows.append({"variant": variant, "skipped": str(exc)})
            continue
        d.eval()
        row = {"variant": variant, "nfe_per_call": d.nfe_per_call}
        g = torch.Generator(device=dev).manual_seed(0)
        with torch.no_grad():
            row["purify_s"] = _median_s(lambda: d.purify(x, generator=g), a.repeats)

        def grad(path):
            xr = x.clone().requires_grad_(True)
            d.classify(xr, clf, path=path, generator=g).sum().backward()

        for path in ("full", "adjoint", "surrogate", "bpda"):
            row[f"grad_{path}_s"] = _median_s(lambda: grad(path), a.repeats)
        purify_rows.append(row)

    train_rows = []
    recipe = RECIPES[a.dataset]
    xt, yt = load_split(a.dataset, "train")
    xt, yt = xt[: recipe.batch_size].to(dev), yt[: recipe.batch_size].to(dev)
    for variant in VARIANTS:
        torch.manual_seed(0)
        velocity = VelocityField(build_unet(recipe.unet_config), recipe.time_scale).to(dev)
        opt = torch.optim.Adam(velocity.parameters(), lr=recipe.lr)
        gen = torch.Generator().manual_seed(1)

        def step():
            x0 = make_sources(variant, clf, xt, yt, recipe, gen)
            loss = cfm_loss(velocity, x0, xt, torch.rand(len(xt), generator=gen).to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        s = _median_s(step, a.repeats)
        train_rows.append({"variant": variant, "step_s": s, "recipe_steps": recipe.steps[variant],
                           "estimated_train_min": round(s * recipe.steps[variant] / 60, 1)})
    json.dump(
        {"bench": "flowpure", "dataset": a.dataset, "batch": a.batch, "train_batch": recipe.batch_size, "device": str(dev),
         "torch": torch.__version__, "threads": torch.get_num_threads(), "purify": purify_rows, "train": train_rows},
        sys.stdout, indent=1,
    )
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
