"""``harness train consistency``: a consistency model for CMAP on an embedded dataset.

Two methods (Song et al. 2023), chosen by whether the dataset has a shipped DDPM:

- **consistency distillation (CD)** from the shipped DDPM (``digits-ddpm``): for a
  training image x0, a level pair t_n < t_{n+1} of the Karras grid (18 levels,
  t_min 0.002, T 80, rho 7) and z ~ N(0, I), one Heun step of the teacher's probability
  flow ODE (dx/dt = eps_teacher, the DDPM's noise prediction at the VP time whose
  alpha-bar is 1/(1+t^2)) takes x0 + t_{n+1} z to x_hat at t_n; the loss is
  ``|| f(x0 + t_{n+1} z, t_{n+1}) - f_target(x_hat, t_n) ||^2`` with the target an EMA
  (mu 0.95) of the student. The student starts from the teacher's weights
  (``time_input="ddpm-index"``: its time input is the teacher's timestep scale).
- **consistency training (CT)** without a teacher (the improved recipe of Song &
  Dhariwal 2023): the pair x0 + t_{n+1} z, x0 + t_n z with the same z, the student
  itself (stop-gradient) as target, a pseudo-Huber distance weighted by
  1 / (t_{n+1} - t_n), lognormal sampling of n, and a grid that doubles from 10 to 160
  levels over training.

Writes ``<dataset>-cm.pt`` (the EMA student's UNet state dict), ``.json`` (recipe,
parameterisation, loss curve, sha256, how confidently the dataset's shipped classifier
labels one-step samples) and ``.png`` (one-step samples), and resumes from ``.ckpt``.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from defenses._consistency import ConsistencyFunction, consistency_record, ddpm_index, karras_grid, one_step_samples
from harness.core.registry import HarnessError
from harness.training import TRAINERS, Trainer
from harness.training.common import (
    WEIGHTS_DIR,
    atomic_save,
    checkpoint_or_stop,
    load_resume_checkpoint,
    output_paths,
    record_step,
    sha256_file,
    stop_on_sigint,
    write_record,
)


@dataclass(frozen=True)
class ConsistencyRecipe:
    """How one dataset's consistency model is trained (every value is recorded)."""

    name: str
    method: str  # "cd" (from the shipped DDPM) or "ct"
    teacher: str | None
    steps: int
    batch_size: int = 128
    lr: float = 2e-4
    warmup: int = 200
    grid: int = 18  # CD: levels of the Karras grid; CT: final levels (doubling from 10)
    target_ema: float = 0.95  # CD's target network; CT uses the student itself
    ema_decay: float = 0.999  # the shipped weights
    grad_clip: float = 1.0
    curve_every: int = 50
    ckpt_every: int = 500
    unet_config: dict = field(default_factory=dict)


def _teacher_config(name: str) -> dict:
    import json

    return dict(json.loads((WEIGHTS_DIR / f"{name}.json").read_text())["unet_config"])


def recipes() -> dict[str, ConsistencyRecipe]:
    """Dataset -> recipe (digits distils its shipped DDPM; the digits CM trains in ~15 min on 2 cores)."""
    from harness.training.diffusion import small_unet_config

    return {
        "digits": ConsistencyRecipe(name="digits-cm", method="cd", teacher="digits-ddpm", steps=3000,
                                    unet_config=_teacher_config("digits-ddpm")),
        "mnist5k": ConsistencyRecipe(name="mnist5k-cm", method="ct", teacher=None, steps=20000, lr=1e-4, grid=160,
                                     unet_config=small_unet_config(28, 1, (16, 32, 32), 8)),
        # Consistency training, not distillation: cifar10-ddpm learned only n < 300 (VE noise up to 1.23), while
        # the one-step generator CMAP inverts starts at T = 80, so the DDPM cannot teach the levels that matter.
        # The DDPM's UNet size, about 1.2 s per step of 64 with one thread: 2500 steps in about 50 minutes, the
        # final grid 80 levels instead of 160 for so short a run.
        "cifar10": ConsistencyRecipe(name="cifar10-cm", method="ct", teacher=None, steps=2500, batch_size=64, lr=5e-4,
                                     grid=80, ckpt_every=200, unet_config=small_unet_config(32, 3, (32, 64, 64), 8)),
    }


# --------------------------------------------------------------------------- teacher
class _Teacher:
    """The probability-flow ODE of a DDPM noise predictor in the VE convention."""

    def __init__(self, name: str, device: torch.device):
        from defenses._diffusion import EpsNet, load_recipe_checkpoint

        net, self.source = load_recipe_checkpoint(WEIGHTS_DIR / f"{name}.pt")
        self.eps_net = EpsNet(net).to(device).eval()
        for p in self.eps_net.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """dx/dt at (x, t): the DDPM's eps at x / sqrt(1 + t^2), timestep n(t)."""
        scale = torch.sqrt(1 + t**2).view(-1, 1, 1, 1)
        return self.eps_net(x / scale, ddpm_index(t))

    @torch.no_grad()
    def heun(self, x: torch.Tensor, t1: torch.Tensor, t0: torch.Tensor) -> torch.Tensor:
        """One Heun step of the ODE from t1 down to t0."""
        dt = (t0 - t1).view(-1, 1, 1, 1)
        d1 = self.eps(x, t1)
        x_euler = x + dt * d1
        return x + dt * (d1 + self.eps(x_euler, t0)) / 2


def _ct_levels(step: int, total: int, s0: int = 10, s1: int = 160) -> int:
    """The improved-CT grid size at ``step``: doubling from s0 to s1 over training."""
    doublings = int(math.log2(s1 // s0))
    stage = min(doublings, int(step / max(1, total / (doublings + 1))))
    return min(s0 * 2**stage, s1) + 1


def _ct_indices(grid: torch.Tensor, batch: int, gen: torch.Generator, p_mean: float = -1.1, p_std: float = 2.0) -> torch.Tensor:
    """Lognormal sampling of the level pair (n, n+1) (improved CT)."""
    lo, hi = torch.log(grid[:-1]), torch.log(grid[1:])
    w = torch.erf((hi - p_mean) / (math.sqrt(2) * p_std)) - torch.erf((lo - p_mean) / (math.sqrt(2) * p_std))
    return torch.multinomial(w.float(), batch, replacement=True, generator=gen)


def _pseudo_huber(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    c = 0.00054 * math.sqrt(a[0].numel())
    return torch.sqrt(((a - b) ** 2).flatten(1).sum(1) + c**2) - c


# --------------------------------------------------------------------------- training
def _loss(recipe, student, target, teacher, x0, step, gen, device) -> torch.Tensor:
    z = torch.randn(x0.shape, generator=gen).to(device)
    if recipe.method == "cd":
        grid = karras_grid(recipe.grid).float().to(device)
        n = torch.randint(0, recipe.grid - 1, (x0.shape[0],), generator=gen).to(device)
        t0, t1 = grid[n], grid[n + 1]
        x1 = x0 + t1.view(-1, 1, 1, 1) * z
        with torch.no_grad():
            tgt = target(teacher.heun(x1, t1, t0), t0)
        return F.mse_loss(student(x1, t1), tgt)
    grid = karras_grid(_ct_levels(step, recipe.steps, s1=recipe.grid)).float()
    n = _ct_indices(grid, x0.shape[0], gen).to(device)
    grid = grid.to(device)
    t0, t1 = grid[n], grid[n + 1]
    with torch.no_grad():
        tgt = student(x0 + t0.view(-1, 1, 1, 1) * z, t0)
    d = _pseudo_huber(student(x0 + t1.view(-1, 1, 1, 1) * z, t1), tgt)
    return (d / (t1 - t0)).mean()


def _classifier_check(fn: ConsistencyFunction, dataset: str, shape, seed: int, n: int = 500, classifier: str | None = None,
                      weights: str | None = None) -> dict | None:
    """How a classifier (default: the dataset's shipped one) labels n one-step samples (confidence, classes)."""
    from harness.classifiers import default_classifier, load_classifier

    if classifier is None:
        try:
            classifier = default_classifier(dataset)
        except HarnessError:
            return None  # CIFAR has no shipped classifier: pass --classifier and --weights
    clf = load_classifier(classifier, dataset=dataset, weights=weights)
    x = one_step_samples(fn, n, shape, torch.Generator().manual_seed(seed + 5))
    with torch.no_grad():
        p = torch.softmax(clf.module(x), 1)
    conf, label = p.max(1)
    return {
        "n": n, "classifier": clf.name, "mean_max_softmax": round(float(conf.mean()), 4),
        "fraction_confident_0.9": round(float((conf > 0.9).float().mean()), 4),
        "class_counts": torch.bincount(label, minlength=p.shape[1]).tolist(),
    }


def train_consistency(
    dataset: str = "digits", *, steps: int | None = None, seed: int = 0, out=None, resume: bool = False,
    device: str = "cpu", progress: bool = True, grid_png: bool = True, data_dir=None, classifier: str | None = None,
    classifier_weights: str | None = None, recipe: ConsistencyRecipe | None = None,
) -> dict[str, Any]:
    """Train (or resume) the consistency model of ``dataset``; returns the written record.

    ``data_dir``: the training images of a CIFAR dataset; ``classifier`` and
    ``classifier_weights``: who labels the one-step samples recorded in the json (default:
    the dataset's shipped classifier; none for CIFAR unless given); ``recipe``: override
    the dataset's (tests).
    """
    from diffusers import UNet2DModel

    from harness.data import load_split

    if recipe is None:
        if dataset not in recipes():
            raise HarnessError(f"no consistency recipe for dataset '{dataset}' (have: {', '.join(sorted(recipes()))})")
        recipe = recipes()[dataset]
    steps = recipe.steps if steps is None else int(steps)
    if steps < 1:
        raise HarnessError(f"steps={steps} is out of range (must be >= 1)")
    recipe = ConsistencyRecipe(**{**asdict(recipe), "steps": steps})
    device = torch.device(device)
    pt_path, json_path, png_path, ckpt_path = output_paths(out, recipe.name, ".pt", ".json", ".png", ".ckpt")
    x_train = load_split(dataset, "train", data_dir)[0].to(device) * 2 - 1
    from harness.data import _load_raw

    data_source = dict(_load_raw(dataset, "train", data_dir).source)

    torch.manual_seed(seed)
    teacher = _Teacher(recipe.teacher, device) if recipe.method == "cd" else None
    unet = UNet2DModel(**recipe.unet_config)
    if teacher is not None:
        unet.load_state_dict(teacher.eps_net.net.state_dict())
        student = ConsistencyFunction(unet, time_input="ddpm-index").to(device)
    else:
        student = ConsistencyFunction(unet, time_input="log", time_scale=1000.0).to(device)
    target, ema = copy.deepcopy(student).eval(), copy.deepcopy(student).eval()
    for p in list(target.parameters()) + list(ema.parameters()):
        p.requires_grad_(False)
    opt = torch.optim.Adam(student.parameters(), lr=recipe.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / recipe.warmup))
    gen = torch.Generator().manual_seed(seed + 1)
    fingerprint = {"recipe": asdict(recipe), "dataset": dataset, "seed": seed, "data": data_source,
                   "teacher_sha256": teacher.source["sha256"] if teacher else None}
    start, curve, elapsed, window = 0, [], 0.0, [0.0, 0]
    ck = load_resume_checkpoint(ckpt_path, fingerprint, what="consistency") if resume else None
    if ck is not None:
        student.load_state_dict(ck["student"])
        target.load_state_dict(ck["target"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        gen.set_state(ck["gen"])
        start, curve, elapsed, window = int(ck["step"]), [list(c) for c in ck["curve"]], float(ck["elapsed_s"]), list(ck["window"])

    def save_ckpt(step: int, spent: float) -> None:
        atomic_save({"fingerprint": fingerprint, "student": student.state_dict(), "target": target.state_dict(),
                     "ema": ema.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "gen": gen.get_state(),
                     "step": step, "curve": curve, "window": window, "elapsed_s": spent}, ckpt_path)

    t0 = time.perf_counter()
    bar = tqdm(range(start, steps), desc=f"train {recipe.name}", unit="step", disable=None if progress else True,
               initial=start, total=steps, mininterval=1.0)
    with stop_on_sigint() as stop:
        for step in bar:
            student.train()
            idx = torch.randint(len(x_train), (recipe.batch_size,), generator=gen).to(device)
            loss = _loss(recipe, student, target, teacher, x_train[idx], step, gen, device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), recipe.grad_clip)
            opt.step()
            sched.step()
            with torch.no_grad():
                mu = recipe.target_ema if recipe.method == "cd" else 0.0
                for pt, pe, ps in zip(target.parameters(), ema.parameters(), student.parameters()):
                    pt.mul_(mu).add_(ps, alpha=1 - mu)
                    pe.mul_(recipe.ema_decay).add_(ps, alpha=1 - recipe.ema_decay)
            window = record_step(curve, window, loss.item(), step, steps, recipe.curve_every)
            bar.set_postfix(loss=f"{curve[-1][1]:.5f}" if curve else None)
            checkpoint_or_stop(step, steps, recipe.ckpt_every, stop, lambda k: save_ckpt(k, elapsed + time.perf_counter() - t0),
                               bar, ckpt_path)
    train_time = elapsed + time.perf_counter() - t0

    ema = ema.cpu().eval()
    atomic_save({k: v.detach().clone().contiguous() for k, v in ema.net.state_dict().items()}, pt_path)
    shape = tuple(x_train.shape[1:])
    if grid_png:
        from harness.training.diffusion import save_grid

        save_grid(one_step_samples(ema, 100, shape, torch.Generator().manual_seed(seed + 2)), png_path)
    record = {
        "name": recipe.name, "dataset": dataset, "kind": "consistency model (diffusers.UNet2DModel backbone)",
        "method": {"cd": "consistency distillation from the shipped DDPM (Heun steps, L2)",
                   "ct": "consistency training (improved: pseudo-Huber, lognormal levels, doubling grid)"}[recipe.method],
        "teacher": teacher.source if teacher else None,
        "unet_config": recipe.unet_config, "consistency": consistency_record(ema),
        "params": sum(p.numel() for p in ema.parameters()),
        "data": {"split": "train", "images": int(len(x_train)), "source": data_source, "domain": "2x - 1 in [-1, 1]"},
        "training": asdict(recipe), "seed": seed, "torch_version": torch.__version__, "device": str(device),
        "torch_threads": torch.get_num_threads(), "train_time_s": round(train_time, 2), "loss_curve": curve,
        "one_step_samples": _classifier_check(ema, dataset, shape, seed, classifier=classifier, weights=classifier_weights),
        "sample_grid": png_path.name if grid_png else None,
        "sha256": sha256_file(pt_path), "size_bytes": pt_path.stat().st_size,
        "command": f"harness train consistency --dataset {dataset} --steps {steps} --seed {seed} --threads {torch.get_num_threads()}"
                   + (f" --data-dir {Path(data_dir).name}" if data_dir else ""),
    }
    write_record(record, json_path)
    if ckpt_path.is_file():
        ckpt_path.unlink()
    return record


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="digits",
                   help="digits (distilled from digits-ddpm), mnist5k or cifar10 (consistency training)")
    p.add_argument("--data-dir", default=None, help="CIFAR training images (an .npz, JPEG .npz or torchvision folder)")
    p.add_argument("--classifier", default=None, help="who labels the recorded one-step samples (default: the dataset's)")
    p.add_argument("--weights", default=None, help="that classifier's weights (as in harness run)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help=f"output folder (default: {WEIGHTS_DIR})")
    p.add_argument("--resume", action="store_true", help="continue from <out>/<dataset>-cm.ckpt (written every few minutes, on Ctrl-C)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 reproduces the shipped file)")


def _run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    rec = train_consistency(args.dataset, steps=args.steps, seed=args.seed, out=args.out, resume=args.resume, device=args.device,
                            data_dir=args.data_dir, classifier=args.classifier, classifier_weights=args.weights)
    chk = rec["one_step_samples"]
    seen = (f"one-step samples: mean max softmax {chk['mean_max_softmax']}, classes {chk['class_counts']}" if chk
            else "no classifier labelled the samples (pass --classifier and --weights)")
    print(f"{rec['name']}: {rec['train_time_s']:.0f} s; {seen}; wrote {output_paths(args.out, rec['name'], '.pt')[0]} "
          f"(sha256 {rec['sha256'][:12]})")
    return 0


TRAINERS.register(
    "consistency", Trainer("consistency", "consistency model for CMAP (distilled from the shipped DDPM)", _add_arguments, _run)
)
