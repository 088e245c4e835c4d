"""``harness train flowpure``: train FlowPure's velocity networks by conditional flow matching.

Reproduces ``harness/weights/flowpure-<variant>-<dataset>.{pt,json}``, the flows of
``flowpure-pgd``, ``flowpure-cw`` and ``flowpure-gauss`` (:mod:`defenses.flowpure`;
spec 2.3, Collaert et al. 2025, arXiv 2505.13280). Per minibatch of clean train images
x1 (labels y), a fresh source x0 is drawn, then

    t ~ U(0, 1),  x_t = t x1 + (1 - t) x0,  loss = mean (v_theta(t, x_t) - (x1 - x0))^2

(torchcfm's ``ConditionalFlowMatcher(sigma=0)``; the mean runs over all pixels). Sources,
all crafted against the victim classifier (default: the dataset's shipped CNN):

- ``pgd``: PGD-linf with a per-example budget eps_i ~ U(0, eps_max), 10 steps of
  eps_i / 4, uniform random start, cross-entropy loss (:func:`threat_models.attacks.pgd`,
  which keeps each example's largest-margin iterate where torchattacks returns the last
  one). The paper uses eps_max = 0.05 with steps of 2/255 on CIFAR, i.e. 1.6x the 8/255
  test budget; the embedded datasets keep that ratio to their own test budget (digits:
  1.6 x 0.2 = 0.32) and the eps-proportional step.
- ``cw``: CW-l2 in tanh space (:func:`cw_l2`) with per-example constant
  c_i ~ U(0, 2), confidence kappa_i ~ U(0, 1), step count n_i ~ U{1..49} and Adam
  learning rate lr_i ~ U(0, 0.02); each example's last iterate at its own n_i is returned
  (as the official ``AdamPerSampleLR``), not its best one.
- ``gauss``: x1 + 0.3 N(0, I), not clipped.

The optimiser is Adam without a schedule, EMA or clipping, as in the paper (its lr is
raised for the small digits UNet; recorded). Everything is seeded: ``torch.manual_seed``
for the initial weights and one CPU ``torch.Generator`` for the batches, budgets,
attacks' random starts, noise and times, so a rerun on the same machine, torch version
and thread count writes the same weights. A checkpoint (model, optimiser, step,
generator state, curve) is written every ``ckpt_every`` steps and on Ctrl-C next to the
output as ``<name>.ckpt``; ``--resume`` continues from it bit-identically, and it is
deleted once the weights are written. The ``.json`` recipe records the architecture, the
hyperparameters, the victim's sha256, the loss curve, the time, the ``.pt``'s sha256 and
the clean and preprocessor-blind robust accuracy measured with the harness engine.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from defenses.flowpure import SIGMA_MAX, VARIANTS, VelocityField, build_unet, weights_name
from harness.training.diffusion import small_unet_config
from harness.core.registry import HarnessError
from harness.training import TRAINERS, Trainer
from harness.training.common import (
    WEIGHTS_DIR,
    atomic_save,
    checkpoint_or_stop,
    engine_eval,
    check_gpu_recipe,
    load_resume_checkpoint,
    output_paths,
    record_step,
    sha256_file,
    stop_on_sigint,
    write_record,
)


#: l_inf test budget per dataset family (threat_models.specs) and the training budget factor.
EPS_FACTOR = 1.6


@dataclass(frozen=True)
class FlowPureRecipe:
    """Architecture and hyperparameters of one dataset's flows (recorded in each json)."""

    unet_config: dict
    #: optimiser steps per variant (the CW pairs cost more per batch)
    steps: dict
    batch_size: int
    lr: float
    eps_max: float
    time_scale: float = 1000.0
    pgd_steps: int = 10
    sigma_max: float = SIGMA_MAX
    cw: dict = field(default_factory=lambda: {"c_max": 2.0, "kappa_max": 1.0, "steps_max": 49, "lr_max": 0.02})
    curve_every: int = 50
    ckpt_every: int = 250
    #: why the recipe departs from the paper's beyond its size (recorded in the json's "training")
    note: str = ""
    #: adversarial sources drawn per training image before training and cached (0: a fresh draw per minibatch, the
    #: paper's); a variant -> count mapping, so Gaussian sources stay fresh
    source_draws: dict = field(default_factory=dict)
    #: None (constant, the paper's) or "cosine" (linear warmup of ``warmup`` steps, then cosine to 0)
    lr_schedule: str | None = None
    warmup: int = 100


def _recipes() -> dict[str, FlowPureRecipe]:
    from threat_models.specs import DIGITS_LINF_EPS, MNIST_LINF_EPS

    # CPU recipe: the CIFAR-10 DDPM's small UNet (about 1 s per step of 64 with one thread), a few thousand
    # steps with a cosine decay, and PGD/CW sources drawn once per training image (PGD: 3 draws, CW: 2)
    # instead of per minibatch, so that each variant trains within an hour on a 2-core CPU.
    cifar_cpu = FlowPureRecipe(
        unet_config=small_unet_config(32, 3, (32, 64, 64), 8), steps={"pgd": 2600, "cw": 2300, "gauss": 3000}, batch_size=64,
        lr=1e-3, eps_max=0.05, lr_schedule="cosine", source_draws={"pgd": 3, "cw": 2}, ckpt_every=200,
        note="sized for a 2-core CPU (under an hour per variant with one thread): a 1 M-parameter UNet, 2300-3000 steps "
             "with a cosine decay instead of NCSN++ for 300k steps; PGD/CW sources cached (3 / 2 draws per image)",
    )
    return {
        # Each digits variant trains in a few minutes on 2 shared CPU cores.
        "digits": FlowPureRecipe(
            unet_config=small_unet_config(8, 1, (32, 48), 8), steps={"pgd": 1500, "cw": 800, "gauss": 2000}, batch_size=64, lr=1e-3,
            eps_max=round(EPS_FACTOR * DIGITS_LINF_EPS, 6),
        ),
        # The DDPM's UNet size (263 k parameters, 1 MB) and each variant's steps cut to about 20-25 minutes of one
        # shared CPU thread (PGD 1.4 s, CW 3.3 s, Gauss 0.4 s per step); 10k steps of a (32, 64) UNet were planned.
        "mnist5k": FlowPureRecipe(
            unet_config=small_unet_config(28, 1, (16, 32, 32), 8), steps={"pgd": 1000, "cw": 400, "gauss": 2000}, batch_size=64,
            lr=1e-3, eps_max=round(EPS_FACTOR * MNIST_LINF_EPS, 6),
            note="shortened for a shared 2-core CPU (20-25 min of one thread per variant; 10k steps were planned)",
        ),
        "cifar10": cifar_cpu,
        "cifar100": cifar_cpu,
    }


def _gpu_recipes() -> dict[str, FlowPureRecipe]:
    # The paper's optimiser (Adam 2e-4 constant, batch 64, 300k steps, fresh sources per minibatch); a smaller
    # UNet than its NCSN++.
    cifar = FlowPureRecipe(
        unet_config=small_unet_config(32, 3, (64, 128, 128), 32), steps={v: 300_000 for v in VARIANTS}, batch_size=64, lr=2e-4,
        eps_max=0.05, ckpt_every=5000, curve_every=500,
        note="GPU recipe: the paper's optimiser and fresh sources per minibatch; a (64, 128, 128) UNet instead of NCSN++",
    )
    return {"cifar10": cifar, "cifar100": cifar}


RECIPES = _recipes()
#: ``--recipe gpu`` (with ``--device cuda``)
GPU_RECIPES = _gpu_recipes()


def recipe_for(dataset: str, kind: str = "cpu") -> FlowPureRecipe:
    """The ``kind`` (``cpu`` or ``gpu``) FlowPure recipe of ``dataset``; a one-line error when there is none."""
    table = {"cpu": RECIPES, "gpu": GPU_RECIPES}.get(kind)
    if table is None:
        raise HarnessError(f"unknown recipe '{kind}' (choose from cpu, gpu)")
    if dataset not in table:
        raise HarnessError(f"no {kind} FlowPure recipe for dataset '{dataset}' (choose from {', '.join(table)})")
    return table[dataset]


# --------------------------------------------------------------------------- sources
def _uniform(n: int, high: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return (torch.rand(n, generator=gen) * high).to(device)


def pgd_sources(victim, x, y, *, eps_max: float, steps: int, gen: torch.Generator) -> torch.Tensor:
    """PGD-linf examples with per-example eps ~ U(0, eps_max), ``steps`` steps of eps/4, random start."""
    from threat_models.attacks.pgd import pgd

    eps = _uniform(len(x), eps_max, gen, x.device)
    res = pgd(victim, x, y, norm="linf", eps=eps, steps=steps, step_size=eps / 4, rand_start=True, loss="ce", generator=gen)
    return res.x_adv.detach()


def cw_l2(
    victim,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    c: torch.Tensor,
    kappa: torch.Tensor,
    n_steps: torch.Tensor,
    lr: torch.Tensor,
) -> torch.Tensor:
    """Batched CW-l2 with a per-example Adam (FlowPure's ``AdamPerSampleLR``); returns each last iterate.

    Example i minimises ``||x' - x||^2 + c_i max(z_y - max_{j!=y} z_j, -kappa_i)`` over w,
    with ``x' = (tanh(w) + 1) / 2`` and ``w`` starting at ``atanh((2x - 1)(1 - 1e-6))``,
    for ``n_steps[i]`` Adam steps of learning rate ``lr[i]`` (betas 0.9/0.999, eps 1e-8;
    its bias correction uses its own step count, which equals the shared loop counter
    while it is active). All examples step together; example i stops moving after its
    own count, so the result equals running each example alone.

    Args:
        c, kappa, lr: (B,) floats; n_steps: (B,) ints >= 0.
    """
    view = (-1,) + (1,) * (x.dim() - 1)
    w = torch.atanh((2 * x - 1) * (1 - 1e-6)).detach()
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    b1, b2, adam_eps = 0.9, 0.999, 1e-8
    for k in range(1, int(n_steps.max()) + 1 if len(n_steps) else 1):
        w.requires_grad_(True)
        xa = (torch.tanh(w) + 1) / 2
        logits = victim(xa)
        z_y = logits.gather(1, y[:, None]).squeeze(1)
        other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).max(1).values
        f = torch.clamp(z_y - other, min=-kappa)
        cost = (xa - x).flatten(1).pow(2).sum(1) + c * f
        (g,) = torch.autograd.grad(cost.sum(), w)  # costs are per example: the sum's gradient is each one's
        with torch.no_grad():
            active = (k <= n_steps).to(x.dtype).view(view)
            m = m + active * (1 - b1) * (g - m)
            v = v + active * (1 - b2) * (g * g - v)
            step = lr.view(view) * (m / (1 - b1**k)) / ((v / (1 - b2**k)).sqrt() + adam_eps)
            w = w.detach() - active * step
    return ((torch.tanh(w) + 1) / 2).detach()


def cw_sources(
    victim,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    c_max: float = 2.0,
    kappa_max: float = 1.0,
    steps_max: int = 49,
    lr_max: float = 0.02,
    gen: torch.Generator,
) -> torch.Tensor:
    """CW-l2 sources: per example c ~ U(0, c_max), kappa ~ U(0, kappa_max), n ~ U{1..steps_max}, lr ~ U(0, lr_max)."""
    B, dev = len(x), x.device
    c = _uniform(B, c_max, gen, dev)
    kappa = _uniform(B, kappa_max, gen, dev)
    n_steps = torch.randint(1, steps_max + 1, (B,), generator=gen).to(dev)
    lr = _uniform(B, lr_max, gen, dev)
    return cw_l2(victim, x, y, c=c, kappa=kappa, n_steps=n_steps, lr=lr)


def gauss_sources(x: torch.Tensor, *, sigma_max: float, gen: torch.Generator) -> torch.Tensor:
    """``x + sigma_max * N(0, I)``, not clipped."""
    return x + sigma_max * torch.randn(x.shape, generator=gen).to(x.device)


def make_sources(variant: str, victim, x, y, recipe: FlowPureRecipe, gen: torch.Generator) -> torch.Tensor:
    """The flow's source images for clean ``x``: PGD or CW adversarial examples against ``victim``, or Gaussian-noised ``x``."""
    if variant == "pgd":
        return pgd_sources(victim, x, y, eps_max=recipe.eps_max, steps=recipe.pgd_steps, gen=gen)
    if variant == "cw":
        return cw_sources(victim, x, y, gen=gen, **recipe.cw)
    return gauss_sources(x, sigma_max=recipe.sigma_max, gen=gen)


def _data_identity(dataset: str, data_dir) -> dict:
    """Which training images (kind, file name, sha256), as the job identity records them."""
    from harness.data import _load_raw

    return dict(_load_raw(dataset, "train", data_dir).source)


def source_cache(
    variant: str, victim, x: torch.Tensor, y: torch.Tensor, recipe: FlowPureRecipe, *, draws: int, seed: int, path: Path,
    fingerprint: dict, batch: int = 256, progress: bool = True,
) -> tuple[torch.Tensor, float]:
    """``draws`` adversarial sources per training image, shaped (draws, N, C, H, W), cached at ``path``.

    Generated in a fixed order (draw by draw, batches of ``batch`` images) from a generator
    seeded with ``seed + 7``, so the cache is a function of the seed, the images, the
    victim and the recipe: a file whose fingerprint differs is regenerated, never used.
    Returns the sources and the seconds their generation took (when they were made).
    """
    want = json.loads(json.dumps(fingerprint))
    if path.is_file():
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            ck = None
        if isinstance(ck, dict) and ck.get("fingerprint") == want and tuple(ck["sources"].shape[:2]) == (draws, len(x)):
            return ck["sources"].to(x.device), float(ck["generation_s"])
    gen = torch.Generator().manual_seed(seed + 7)
    t0 = time.perf_counter()
    out = torch.empty((draws, *x.shape), dtype=x.dtype)
    bar = tqdm(total=draws * len(x), desc=f"{variant} sources", unit="img", disable=None if progress else True, mininterval=2.0)
    for k in range(draws):
        for lo in range(0, len(x), batch):
            xb, yb = x[lo : lo + batch], y[lo : lo + batch]
            out[k, lo : lo + len(xb)] = make_sources(variant, victim, xb, yb, recipe, gen).cpu()
            bar.update(len(xb))
    bar.close()
    spent = time.perf_counter() - t0
    atomic_save({"fingerprint": want, "sources": out, "generation_s": spent}, path)
    return out.to(x.device), spent


def cfm_loss(velocity: VelocityField, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Conditional flow matching with sigma = 0: ``mean (v(t, x_t) - (x1 - x0))^2``, x_t = t x1 + (1 - t) x0."""
    tv = t.view(-1, *([1] * (x1.dim() - 1)))
    xt = tv * x1 + (1 - tv) * x0
    return F.mse_loss(velocity(t, xt), x1 - x0)


def _evaluate(variant: str, dataset: str, classifier: str, clf_weights: str | None, data_dir: str | None, pt_path: Path, n: int) -> dict:
    """Clean and preprocessor-blind robust accuracy of the written flow, with the harness engine."""
    return engine_eval(f"flowpure-{variant}", dataset, classifier, clf_weights, data_dir, n, (("weights", str(pt_path)),))


# --------------------------------------------------------------------------- training
def train_flowpure(
    variant: str,
    dataset: str,
    *,
    classifier: str | None = None,
    classifier_weights: str | None = None,
    data_dir: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    resume: bool = False,
    device: str | torch.device = "cpu",
    eval_n: int = 256,
    recipe: FlowPureRecipe | str | None = None,
    progress: bool = True,
    eval_data_dir: str | None = None,
) -> dict:
    """Train the flow of one variant and dataset; write ``<out>/flowpure-<variant>-<dataset>.{pt,json}``.

    Args:
        variant: ``"pgd"``, ``"cw"`` or ``"gauss"``.
        dataset: Registry name of the dataset (its train split is used).
        classifier: Victim classifier; None = the dataset's default.
        classifier_weights, data_dir: as ``harness run --weights`` / ``--data-dir``.
        steps: Optimiser steps; None = the recipe's for this variant.
        seed: Seed of the initial weights and of every random draw.
        out: Output folder; None = ``harness/weights``.
        resume: Continue from ``<out>/<name>.ckpt`` if it exists.
        device: Where to train.
        eval_n: Examples for the engine evaluation recorded in the json (0 = skip).
        recipe: ``"cpu"`` (the default), ``"gpu"`` or a :class:`FlowPureRecipe` (tests use a tiny UNet).
        progress: Show a tqdm bar.
        eval_data_dir: The test images of the recorded evaluation (CIFAR: the training
            ``data_dir`` holds the train split only); None = ``data_dir``.

    Returns:
        The recorded json dict.

    Raises:
        HarnessError: unknown variant or dataset, bad step count, a checkpoint of another run.
    """
    from harness import classifiers as C
    from harness.data import load_split

    if variant not in VARIANTS:
        raise HarnessError(f"unknown FlowPure variant '{variant}' (choose from {', '.join(VARIANTS)})")
    if not isinstance(recipe, FlowPureRecipe):
        recipe = recipe_for(dataset, recipe or "cpu")
    steps = int(recipe.steps[variant]) if steps is None else int(steps)
    if steps < 1:
        raise HarnessError(f"steps={steps} is out of range (must be >= 1)")
    device = torch.device(device)
    name = weights_name(variant, dataset)
    pt_path, json_path, ckpt_path, cache_path = output_paths(out, name, ".pt", ".json", ".ckpt", ".sources.pt")

    clf_name = classifier or C.default_classifier(dataset)
    clf = C.load_classifier(clf_name, dataset=dataset, weights=classifier_weights, device=device)
    victim = clf.module
    x_train, y_train = load_split(dataset, "train", data_dir)
    x_train, y_train = x_train.to(device), y_train.to(device)

    torch.manual_seed(seed)
    velocity = VelocityField(build_unet(recipe.unet_config), recipe.time_scale).to(device)
    opt = torch.optim.Adam(velocity.parameters(), lr=recipe.lr)
    sched = None
    if recipe.lr_schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda k: min(1.0, (k + 1) / recipe.warmup) * 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps))
        )
    elif recipe.lr_schedule is not None:
        raise HarnessError(f"unknown lr_schedule '{recipe.lr_schedule}' (None or 'cosine')")
    gen = torch.Generator().manual_seed(seed + 1)  # CPU generator: same draws on any device

    # What a checkpoint must agree on to be resumed (steps may grow).
    run_id = {"variant": variant, "dataset": dataset, "classifier_sha256": clf.sha256, "seed": seed,
              "recipe": {k: v for k, v in asdict(recipe).items() if k not in ("steps", "ckpt_every")}}
    start_step, curve, elapsed = 0, [], 0.0
    window = [0.0, 0]  # loss sum and count since the last curve point
    if sched is not None:
        run_id["steps"] = steps  # the cosine schedule depends on the total
    draws = int(recipe.source_draws.get(variant, 0))
    cache, cache_s = None, None
    if draws:
        cache_id = {k: run_id[k] for k in ("variant", "dataset", "classifier_sha256", "seed")}
        cache_id.update(data=_data_identity(dataset, data_dir), draws=draws,
                        sources={"eps_max": recipe.eps_max, "pgd_steps": recipe.pgd_steps, "cw": recipe.cw})
        run_id["source_cache"] = cache_id
    ck = load_resume_checkpoint(ckpt_path, run_id, what="FlowPure") if resume else None
    if draws:
        cache, cache_s = source_cache(variant, victim, x_train, y_train, recipe, draws=draws, seed=seed, path=cache_path,
                                      fingerprint=cache_id, progress=progress)
    if ck is not None:
        velocity.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if sched is not None:
            sched.load_state_dict(ck["scheduler"])
        gen.set_state(ck["generator"])
        start_step, curve, elapsed, window = int(ck["step"]), [list(p) for p in ck["curve"]], float(ck["elapsed_s"]), list(ck["window"])
        if progress:
            print(f"resuming {name} from step {start_step} ({ckpt_path})")
    elif resume and progress:
        print(f"no checkpoint at {ckpt_path}; training {name} from scratch")

    def save_ckpt(step: int, spent: float) -> None:
        atomic_save(
            {"fingerprint": run_id, "model": velocity.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
             **({"scheduler": sched.state_dict()} if sched is not None else {}),
             "step": step, "curve": curve, "window": window, "elapsed_s": spent},
            ckpt_path,
        )

    t0 = time.perf_counter()
    bar = tqdm(range(start_step, steps), desc=f"train {name}", unit="step", disable=None if progress else True, mininterval=1.0,
               initial=start_step, total=steps)
    running = None
    # Ctrl-C stops at the end of the current step and checkpoints there, so --resume
    # continues bit-identically (a checkpoint taken mid-step could not).
    with stop_on_sigint() as stop:
        for step in bar:
            velocity.train()
            idx = torch.randint(len(x_train), (recipe.batch_size,), generator=gen).to(device)
            x1, y = x_train[idx], y_train[idx]
            if cache is None:
                x0 = make_sources(variant, victim, x1, y, recipe, gen)
            else:
                k = torch.randint(draws, (recipe.batch_size,), generator=gen).to(device)
                x0 = cache[k, idx]
            t = torch.rand(recipe.batch_size, generator=gen).to(device)
            loss = cfm_loss(velocity, x0, x1, t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            value = loss.item()
            window = record_step(curve, window, value, step, steps, recipe.curve_every)
            running = value if running is None else 0.98 * running + 0.02 * value
            bar.set_postfix(loss=f"{running:.5f}")
            checkpoint_or_stop(step, steps, recipe.ckpt_every, stop, lambda k: save_ckpt(k, elapsed + time.perf_counter() - t0),
                               bar, ckpt_path)
    train_time = elapsed + time.perf_counter() - t0

    velocity = velocity.cpu().eval()
    state = {k: v.detach().clone().contiguous() for k, v in velocity.unet.state_dict().items()}
    atomic_save(state, pt_path)

    import diffusers
    import torchdiffeq


    cw = recipe.cw
    sources = {
        "pgd": {"attack": "PGD-linf (threat_models.attacks.pgd, best-margin iterate)", "eps": f"U(0, {recipe.eps_max}) per example",
                "eps_max": recipe.eps_max, "eps_rule": f"{EPS_FACTOR} x the dataset's l_inf test budget (paper: 0.05 on CIFAR)",
                "steps": recipe.pgd_steps, "step_size": "eps / 4 per example", "random_start": True, "loss": "ce"},
        "cw": {"attack": "CW-l2 in tanh space, per-example Adam, last iterate", "c": f"U(0, {cw['c_max']})",
               "kappa": f"U(0, {cw['kappa_max']})", "steps": f"U{{1..{cw['steps_max']}}}", "lr": f"U(0, {cw['lr_max']})"},
        "gauss": {"noise": f"x1 + {recipe.sigma_max} N(0, I), not clipped", "sigma_max": recipe.sigma_max},
    }[variant]
    record: dict[str, Any] = {
        "name": name,
        "dataset": dataset,
        "variant": variant,
        "kind": "diffusers.UNet2DModel velocity field v(t, x) on [0,1] images, conditional flow matching (sigma=0)",
        "classifier": {"name": clf.name, "sha256": clf.sha256},
        "unet_config": recipe.unet_config,
        "time_scale": recipe.time_scale,
        "time_input": f"the UNet's timestep is t * {recipe.time_scale:g}, t in [0, 1]",
        "params": sum(p.numel() for p in velocity.parameters()),
        "sources": sources,
        "eps_max": recipe.eps_max if variant == "pgd" else None,
        "sigma_max": recipe.sigma_max,
        "cfm": "t ~ U(0,1); x_t = t x1 + (1-t) x0 (x0 = source, x1 = clean); loss mean (v(t, x_t) - (x1 - x0))^2",
        "data": {"split": "train", "images": int(len(x_train)), "source": _data_identity(dataset, data_dir), "domain": "[0, 1]",
                 "augmentation": None,
                 "pairs": "fresh for every minibatch"},
        "training": {"steps": steps, "batch_size": recipe.batch_size, "optimizer": "Adam", "lr": recipe.lr,
                     "lr_note": "paper 2e-4 (NCSN++ on CIFAR, 300k steps); raised for the small UNet" if recipe.lr != 2e-4
                     else "paper value",
                     "lr_schedule": (f"linear warmup {recipe.warmup} steps, cosine to 0" if recipe.lr_schedule == "cosine"
                                     else None),
                     "ema": None, "grad_clip": None, "ckpt_every": recipe.ckpt_every,
                     **({"note": recipe.note} if recipe.note else {})},
        "source_cache": ({"draws_per_image": draws, "generated_once": True, "generator_seed": seed + 7,
                          "per_step": "each minibatch image takes one of its cached draws at random"} if draws
                         else {"draws_per_image": None, "generated_once": False, "per_step": "fresh sources per minibatch"}),
        "source_generation_s": round(cache_s, 2) if cache_s is not None else None,
        "total_time_s": round(train_time + (cache_s or 0.0), 2),
        "seed": seed,
        "torch_version": torch.__version__,
        "diffusers_version": diffusers.__version__,
        "torchdiffeq_version": torchdiffeq.__version__,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "train_time_s": round(train_time, 2),
        "final_loss": curve[-1][1] if curve else None,
        "loss_curve_every": recipe.curve_every,
        "loss_curve": curve,
        "sha256": sha256_file(pt_path),
        "size_bytes": pt_path.stat().st_size,
        "command": f"harness train flowpure --variant {variant} --dataset {dataset} --classifier {clf.name} --steps {steps} --seed {seed}"
                   + (f" --data-dir {Path(data_dir).name}" if data_dir else "")
                   + (" --recipe gpu --device cuda" if recipe is GPU_RECIPES.get(dataset) else ""),
        "eval": None,
    }
    # The defense reads the architecture from this json, so it must exist before the evaluation.
    write_record(record, json_path)
    for done in (ckpt_path, cache_path):
        if done.is_file():
            done.unlink()  # the weights are written; a failed evaluation is redone with --eval-only
    if eval_n:
        record["eval"] = _evaluate(variant, dataset, clf.name, classifier_weights, eval_data_dir or data_dir, pt_path, eval_n)
        write_record(record, json_path)
    return record


def reevaluate(
    variant: str,
    dataset: str,
    *,
    out: str | Path | None = None,
    eval_n: int = 256,
    classifier_weights: str | None = None,
    data_dir: str | None = None,
) -> dict:
    """Recompute the engine evaluation recorded in an existing ``<name>.json`` (no training).

    For weights whose recorded accuracies predate an engine change, or whose training
    was interrupted during the evaluation. The json's sha256 must match the ``.pt``.

    Returns:
        The updated json dict.
    """
    name = weights_name(variant, dataset)
    pt_path, json_path = output_paths(out, name, ".pt", ".json")
    if not (pt_path.is_file() and json_path.is_file()):
        raise HarnessError(
            f"'{pt_path}' and its '{json_path.name}' are needed to re-evaluate; "
            f"train them with `harness train flowpure --variant {variant} --dataset {dataset}`"
        )
    record = json.loads(json_path.read_text())
    if record.get("sha256") != sha256_file(pt_path):
        raise HarnessError(f"'{pt_path.name}' does not match the sha256 in '{json_path.name}'; retrain instead of re-evaluating")
    record["eval"] = _evaluate(variant, dataset, record["classifier"]["name"], classifier_weights, data_dir, pt_path, eval_n)
    write_record(record, json_path)
    return record


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variant", required=True, choices=VARIANTS, help="source distribution: pgd, cw or gauss")
    p.add_argument("--dataset", default="digits", choices=sorted(RECIPES), help="train split to use (default: digits)")
    p.add_argument("--classifier", default=None, help="victim classifier (default: the dataset's shipped CNN)")
    p.add_argument("--weights", default=None, help="weights of the victim classifier (as in harness run)")
    p.add_argument("--data-dir", default=None, help="CIFAR training images (an .npz, JPEG .npz or torchvision folder)")
    p.add_argument("--eval-data-dir", default=None, help="CIFAR test images of the recorded evaluation (default: --data-dir)")
    p.add_argument("--recipe", default="cpu", choices=["cpu", "gpu"],
                   help="cpu (default: sized for a 2-core CPU) or gpu (the paper's optimiser, 300k steps; needs --device cuda)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and of every random draw")
    p.add_argument("--out", default=None, help=f"output folder (default: {WEIGHTS_DIR})")
    p.add_argument("--resume", action="store_true", help="continue from <out>/flowpure-<variant>-<dataset>.ckpt")
    p.add_argument("--eval-n", type=int, default=256, help="examples of the recorded engine evaluation (0 = skip)")
    p.add_argument("--eval-only", action="store_true", help="only recompute the recorded evaluation of the existing weights")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")


def _run(args: argparse.Namespace) -> int:
    if args.eval_only:
        rec = reevaluate(args.variant, args.dataset, out=args.out, eval_n=args.eval_n or 256, classifier_weights=args.weights,
                         data_dir=args.eval_data_dir or args.data_dir)
        ev = rec["eval"]
        print(f"{rec['name']}: clean {ev['clean_accuracy']:.4f}, preprocessor-blind robust {ev['robust_accuracy']:.4f} "
              f"(n={ev['n_examples']}); updated {rec['name']}.json")
        return 0
    check_gpu_recipe(args.recipe, args.device)
    rec = train_flowpure(
        args.variant, args.dataset, classifier=args.classifier, classifier_weights=args.weights, data_dir=args.data_dir,
        steps=args.steps, seed=args.seed, out=args.out, resume=args.resume, device=args.device, eval_n=args.eval_n,
        recipe=args.recipe, eval_data_dir=args.eval_data_dir,
    )
    ev = rec["eval"]
    acc = f"; clean {ev['clean_accuracy']:.4f}, preprocessor-blind robust {ev['robust_accuracy']:.4f} (n={ev['n_examples']})" if ev else ""
    print(
        f"{rec['name']}: {rec['params']} parameters, {rec['training']['steps']} steps in {rec['train_time_s']:.1f}s, "
        f"final CFM loss {rec['final_loss']}{acc}; wrote {output_paths(args.out, rec['name'], '.pt')[0]} "
        f"(sha256 {rec['sha256'][:12]}) and {rec['name']}.json"
    )
    return 0


TRAINERS.register(
    "flowpure",
    Trainer(
        name="flowpure",
        help="train a FlowPure velocity network by conditional flow matching (writes flowpure-<variant>-<dataset>.pt and .json)",
        add_arguments=_add_arguments,
        run=_run,
    ),
)
