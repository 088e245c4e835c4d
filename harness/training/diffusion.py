"""``harness train diffusion``: train the small noise-prediction UNets of the embedded datasets.

Reproduces ``harness/weights/digits-ddpm.{pt,json,png}``, the backbone of ``diffpure``,
``diffpure-ddpm`` and ``coup`` on ``digits``. The recipe is DDPM's (Ho et al. 2020,
arXiv 2006.11239): images mapped to [-1, 1]; n uniform in 0..999; x_n = sqrt(a_n) x_0 +
sqrt(1 - a_n) e with the linear schedule beta = linspace(1e-4, 2e-2, 1000) (the
discretisation of the VP-SDE with beta_min 0.1, beta_max 20 that the purifiers
integrate); loss ||e_theta(x_n, n) - e||^2; Adam with a cosine learning-rate decay and
an exponential moving average (EMA) of the weights, which is what ships. Only the
train split is used (digits: the 1347 images of harness.data's fixed split), so the
test images the harness evaluates on were never seen by the purifier either.

Architecture: a ``diffusers.UNet2DModel`` at the dataset's native resolution (digits:
8x8, two resolution levels 8x8 and 4x4; no padding or resizing), small enough that an
adaptive attack differentiating through 10 solver steps stays cheap on a CPU.

Everything is seeded (``torch.manual_seed`` for the initial weights, dedicated
generators for batches, timesteps and noise), so a rerun on the same machine, torch
version and thread count writes the same weights. Besides the ``.pt`` (EMA state_dict)
and the ``.json`` recipe (architecture, hyperparameters, sha256, losses, time), a
``.png`` grid of 100 samples drawn from pure noise by 1000-step ancestral DDPM shows
what the model learned.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from harness.core.registry import HarnessError
from harness.training import TRAINERS, Trainer
from harness.training.common import (
    WEIGHTS_DIR,
    atomic_save,
    checkpoint_or_stop,
    check_gpu_recipe,
    load_resume_checkpoint,
    output_paths,
    record_step,
    sha256_file,
    stop_on_sigint,
    write_record,
)



@dataclass(frozen=True)
class DiffusionRecipe:
    """Architecture and training hyperparameters of one small DDPM (recorded in its json)."""

    name: str
    unet_config: dict
    steps: int
    batch_size: int
    lr: float
    ema_decay: float
    warmup: int = 200
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    extra: dict = field(default_factory=dict)
    #: why the recipe departs from the usual one (recorded in the json's "training")
    note: str = ""
    #: timesteps n are drawn from U{0..max_timestep-1}; below 1000 the model only learns the
    #: low-noise end that purification integrates (t <= max_timestep / 1000)
    max_timestep: int = 1000
    #: random horizontal flips of the training images (natural images only)
    hflip: bool = False
    #: a resumable checkpoint every this many steps (and on Ctrl-C)
    ckpt_every: int = 200
    #: a point of the recorded loss curve every this many steps
    curve_every: int = 50
    #: dtype of the shipped .pt ("float32", or "float16" to halve the file; the loader restores float32)
    save_dtype: str = "float32"


def small_unet_config(size: int, channels: int, widths: tuple[int, ...], groups: int) -> dict:
    """``UNet2DModel`` keyword arguments of a small attention-free UNet: ``size`` pixels, ``channels``, one
    down/up block per width in ``widths``, ``groups`` norm groups.
    """
    n = len(widths)
    return dict(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=list(widths),
        down_block_types=["DownBlock2D"] * n,
        up_block_types=["UpBlock2D"] * n,
        layers_per_block=1,
        norm_num_groups=groups,
        add_attention=False,
        dropout=0.0,
    )


def _gpu_unet_config() -> dict:
    """The GPU recipe's UNet: DDPM's CIFAR-10 layout (widths 128-256-256-256, two residual blocks per level,
    self-attention at 16x16), about 36 M parameters.
    """
    cfg = small_unet_config(32, 3, (128, 256, 256, 256), 32)
    cfg.update(
        layers_per_block=2,
        down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        dropout=0.1,
    )
    return cfg


#: dataset -> recipe ("cpu", the default). digits trains in a few minutes on 2 CPU cores.
RECIPES: dict[str, DiffusionRecipe] = {
    "digits": DiffusionRecipe(
        name="digits-ddpm", unet_config=small_unet_config(8, 1, (16, 32), 8), steps=6000, batch_size=128, lr=2e-3, ema_decay=0.999
    ),
    # 3000 steps (96 epochs of the 4000 train images) instead of the planned 20000: a 2-core CPU
    # shared with other work gives one training about 40 minutes (0.7 s per step); lr as digits.
    "mnist5k": DiffusionRecipe(
        name="mnist5k-ddpm", unet_config=small_unet_config(28, 1, (16, 32, 32), 8), steps=3000, batch_size=128, lr=2e-3,
        ema_decay=0.999,
        note="shortened for a shared 2-core CPU (about 40 min with one thread): 3000 steps instead of 20000",
    ),
    # About 1 s per step with one thread: 3000 steps of 64 images (37 epochs of the 5170 exact training
    # images, flipped at random) in about 50 minutes on the idle machine (61 minutes measured beside a second
    # training and tests on the other core). Purification integrates t <= t* (0.1; the sweep goes to 0.15), so
    # only n < 300 (t <= 0.3) is learned: the network spends all its capacity on the low-noise denoising that
    # purification uses, and cannot sample from pure noise. Its loss is the same on training and test images,
    # and it stopped improving after about 1000 steps; a 4x wider UNet (widths 64-128-128, 4.2 M parameters,
    # 2100 steps with two threads, n < 200) lowered the held-out eps error by 3% and raised DiffPure's
    # single-draw clean accuracy from 56% to 61% (128 test images) at 3x the cost of every network call, so the
    # small one ships (docs/cifar10.md).
    "cifar10": DiffusionRecipe(
        name="cifar10-ddpm", unet_config=small_unet_config(32, 3, (32, 64, 64), 8), steps=3000, batch_size=64, lr=1e-3,
        ema_decay=0.999, max_timestep=300, hflip=True,
        note="sized for a 2-core CPU (about 50 min with one thread); timesteps restricted to n < 300 (t <= 0.3), "
             "the range purification integrates (t* <= 0.15 in the README's sweep)",
    ),
}

#: ``--recipe gpu``: larger recipes for ``--device cuda`` (days on a CPU).
GPU_RECIPES: dict[str, DiffusionRecipe] = {
    # DDPM's CIFAR-10 hyperparameters (Ho et al. 2020: batch 128, lr 2e-4, EMA 0.9999, dropout 0.1,
    # 800k steps; 200k here) on every timestep, so it also samples from pure noise.
    "cifar10": DiffusionRecipe(
        name="cifar10-ddpm", unet_config=_gpu_unet_config(), steps=200_000, batch_size=128, lr=2e-4, ema_decay=0.9999,
        warmup=5000, hflip=True, ckpt_every=5000, curve_every=500,
        note="GPU recipe: DDPM's CIFAR-10 UNet and optimiser, all 1000 timesteps, 200k steps (the paper: 800k)",
    ),
}


def recipe_for(dataset: str, kind: str = "cpu") -> DiffusionRecipe:
    """The ``kind`` (``cpu`` or ``gpu``) diffusion recipe of ``dataset``; a one-line error when there is none."""
    table = {"cpu": RECIPES, "gpu": GPU_RECIPES}.get(kind)
    if table is None:
        raise HarnessError(f"unknown recipe '{kind}' (choose from cpu, gpu)")
    if dataset not in table:
        raise HarnessError(f"no {kind} diffusion recipe for dataset '{dataset}' (choose from {', '.join(table)})")
    return table[dataset]


def _schedule() -> tuple[torch.Tensor, torch.Tensor]:
    betas = torch.linspace(1e-4, 2e-2, 1000, dtype=torch.float64)
    return betas, torch.cumprod(1.0 - betas, 0)


def _load_train(dataset: str, data_dir: str | Path | None = None) -> tuple[torch.Tensor, dict]:
    """The train split (float [0, 1] NCHW) and the identity of its source (kind, file name, sha256)."""
    from harness.data import _load_raw, load_split

    x, _ = load_split(dataset, "train", data_dir)
    return x, dict(_load_raw(dataset, "train", data_dir).source)


@torch.no_grad()
def sample_ddpm(unet: torch.nn.Module, n: int, shape: tuple[int, int, int], generator: torch.Generator) -> torch.Tensor:
    """Ancestral DDPM sampling from pure noise with all 1000 steps; returns images in [0, 1]."""
    betas, ab = _schedule()
    x = torch.randn((n, *shape), generator=generator)
    for i in range(999, -1, -1):
        a_i, a_prev = ab[i].item(), (ab[i - 1].item() if i > 0 else 1.0)
        eps = unet(x, torch.full((n,), float(i))).sample
        x0 = ((x - math.sqrt(1 - a_i) * eps) / math.sqrt(a_i)).clamp(-1, 1)
        # posterior q(x_{i-1} | x_i, x0) mean and variance
        c0 = math.sqrt(a_prev) * betas[i].item() / (1 - a_i)
        ci = math.sqrt(1 - betas[i].item()) * (1 - a_prev) / (1 - a_i)
        x = c0 * x0 + ci * x
        if i > 0:
            var = betas[i].item() * (1 - a_prev) / (1 - a_i)
            x = x + math.sqrt(var) * torch.randn(x.shape, generator=generator)
    return ((x + 1) * 0.5).clamp(0, 1)


def save_grid(images: torch.Tensor, path: Path, nrow: int = 10, scale: int = 4) -> None:
    """Write a grid of [0,1] grey/RGB images as a PNG (nearest-neighbour upscaled)."""
    from PIL import Image

    n, c, h, w = images.shape
    rows = -(-n // nrow)
    pad = 1
    grid = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for k in range(n):
        r, q = divmod(k, nrow)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = images[k]
    arr = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[:, :, 0] if c == 1 else arr, mode="L" if c == 1 else "RGB")
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


@torch.no_grad()
def _heldout_loss(unet, x0: torch.Tensor, levels: list[int], seed: int) -> dict[str, float]:
    """Noise-prediction MSE on held-out images at a few timesteps (a quality record, not used for selection)."""
    _, ab = _schedule()
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in levels:
        e = torch.randn(x0.shape, generator=g)
        a = ab[n].item()
        xn = math.sqrt(a) * x0 + math.sqrt(1 - a) * e
        out[str(n)] = round(F.mse_loss(unet(xn, torch.full((len(x0),), float(n))).sample, e).item(), 5)
    return out


@torch.no_grad()
def purification_grid(unet: torch.nn.Module, x: torch.Tensor, t_star: float, generator: torch.Generator) -> torch.Tensor:
    """Rows of ``x`` (clean), forward-diffused to ``t_star`` and purified by ancestral DDPM from n* = 1000 t*.

    The picture for a model that learned only low noise levels: what DiffPure-DDPM does to
    an image at the default t*.
    """
    betas, ab = _schedule()
    n_star = int(round(1000 * t_star))
    x0 = x * 2.0 - 1.0
    a = ab[n_star - 1].item()
    xt = math.sqrt(a) * x0 + math.sqrt(1 - a) * torch.randn(x0.shape, generator=generator)
    noisy = xt.clone()
    for i in range(n_star - 1, -1, -1):
        a_i, a_prev = ab[i].item(), (ab[i - 1].item() if i > 0 else 1.0)
        eps = unet(xt, torch.full((len(x),), float(i))).sample
        x0_hat = ((xt - math.sqrt(1 - a_i) * eps) / math.sqrt(a_i)).clamp(-1, 1)
        c0 = math.sqrt(a_prev) * betas[i].item() / (1 - a_i)
        ci = math.sqrt(1 - betas[i].item()) * (1 - a_prev) / (1 - a_i)
        xt = c0 * x0_hat + ci * xt
        if i > 0:
            xt = xt + math.sqrt(betas[i].item() * (1 - a_prev) / (1 - a_i)) * torch.randn(xt.shape, generator=generator)
    return torch.cat([x, ((noisy + 1) * 0.5).clamp(0, 1), ((xt + 1) * 0.5).clamp(0, 1)])


def _fingerprint(recipe: DiffusionRecipe, dataset: str, data_source: dict, seed: int, device: torch.device) -> dict:
    """What a checkpoint must agree on to be continued (the step count may grow)."""
    return {"dataset": dataset, "data": data_source, "seed": seed, "device_type": device.type,
            "recipe": {k: v for k, v in asdict(recipe).items() if k not in ("steps", "ckpt_every")}}


def train_diffusion(
    dataset: str,
    *,
    steps: int | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    device: str | torch.device = "cpu",
    grid: bool = True,
    data_dir: str | Path | None = None,
    eval_data_dir: str | Path | None = None,
    resume: bool = False,
    recipe: DiffusionRecipe | str = "cpu",
    progress: bool = True,
) -> dict:
    """Train the small DDPM of ``dataset`` and write ``<out>/<name>.pt``, ``.json`` and ``.png``.

    Args:
        dataset: ``"digits"``, ``"mnist5k"`` or ``"cifar10"``.
        steps: Optimiser steps; None uses the recipe's.
        seed: Seed of the initial weights, batches, flips, timesteps and noise.
        out: Output folder; None means ``harness/weights`` inside the package.
        device: Where to train.
        grid: Also write the PNG (samples from pure noise, or, for a model of low noise
            levels only, test images purified at t* = 0.1).
        data_dir: The training images of a CIFAR dataset (an .npz, JPEG .npz or torchvision folder).
        eval_data_dir: Test images for the held-out loss and the PNG (CIFAR; the
            embedded datasets use their own test split). None: the last 256 training
            images stand in, and the json says so.
        resume: Continue from ``<out>/<name>.ckpt`` (written every ``ckpt_every`` steps
            and on Ctrl-C); the result equals an uninterrupted run's.
        recipe: ``"cpu"`` (default), ``"gpu"`` or a :class:`DiffusionRecipe` (tests).
        progress: Show a tqdm bar.

    Returns:
        The recorded json dict.

    Raises:
        HarnessError: unknown dataset or recipe, a non-positive number of steps, a
            checkpoint of another run.
    """
    from diffusers import UNet2DModel

    if not isinstance(recipe, DiffusionRecipe):
        recipe = recipe_for(dataset, recipe)
    steps = recipe.steps if steps is None else int(steps)
    if steps < 1:
        raise HarnessError(f"steps={steps} is out of range (must be >= 1)")
    if not 1 <= recipe.max_timestep <= 1000:
        raise HarnessError(f"max_timestep={recipe.max_timestep} is out of range (1..1000)")
    device = torch.device(device)
    pt_path, json_path, png_path, ckpt_path = output_paths(out, recipe.name, ".pt", ".json", ".png", ".ckpt")

    x_cpu, data_source = _load_train(dataset, data_dir)
    x_train = x_cpu.to(device) * 2.0 - 1.0
    _, ab = _schedule()
    ab = ab.float().to(device)

    torch.manual_seed(seed)
    unet = UNet2DModel(**recipe.unet_config).to(device)
    ema = copy.deepcopy(unet).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed + 1)  # CPU generator: same draws on any device
    opt = torch.optim.Adam(unet.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda k: min(1.0, (k + 1) / recipe.warmup) * 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps)),
    )

    fingerprint = _fingerprint(recipe, dataset, data_source, seed, device)
    start_step, curve, elapsed, window, running = 0, [], 0.0, [0.0, 0], None
    ck = load_resume_checkpoint(ckpt_path, fingerprint, what="diffusion") if resume else None
    if ck is not None:
        if int(ck["steps"]) != steps:
            raise HarnessError(f"checkpoint '{ckpt_path}' belongs to a run of {ck['steps']} steps, not {steps} (the cosine "
                               f"schedule depends on it); rerun with --steps {ck['steps']} or delete the checkpoint")
        unet.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        gen.set_state(ck["generator"])
        start_step, elapsed = int(ck["step"]), float(ck["elapsed_s"])
        curve, window, running = [list(p) for p in ck["curve"]], list(ck["window"]), ck["running"]
        if progress:
            print(f"resuming {recipe.name} from step {start_step} ({ckpt_path})")
    elif resume and progress:
        print(f"no checkpoint at {ckpt_path}; training {recipe.name} from scratch")

    def save_ckpt(step: int, spent: float) -> None:
        atomic_save(
            {"fingerprint": json.loads(json.dumps(fingerprint)), "model": unet.state_dict(), "ema": ema.state_dict(),
             "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "generator": gen.get_state(), "step": step,
             "steps": steps, "curve": curve, "window": window, "running": running, "elapsed_s": spent},
            ckpt_path,
        )

    t0 = time.perf_counter()
    bar = tqdm(range(start_step, steps), desc=f"train {recipe.name}", unit="step", disable=None if progress else True,
               mininterval=1.0, initial=start_step, total=steps)
    # Ctrl-C stops at the end of the current step and checkpoints there, so --resume
    # continues bit-identically (a checkpoint taken mid-step could not).
    with stop_on_sigint() as stop:
        for step in bar:
            unet.train()
            idx = torch.randint(len(x_train), (recipe.batch_size,), generator=gen).to(device)
            x0 = x_train[idx]
            if recipe.hflip:
                flip = (torch.rand(recipe.batch_size, generator=gen) < 0.5).to(device).view(-1, 1, 1, 1)
                x0 = torch.where(flip, x0.flip(3), x0)
            n = torch.randint(recipe.max_timestep, (recipe.batch_size,), generator=gen).to(device)
            e = torch.randn((recipe.batch_size, *x_train.shape[1:]), generator=gen).to(device)
            a = ab[n].view(-1, 1, 1, 1)
            xn = a.sqrt() * x0 + (1 - a).sqrt() * e
            loss = F.mse_loss(unet(xn, n.float()).sample, e)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), recipe.grad_clip)
            opt.step()
            sched.step()
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), unet.parameters(), strict=True):
                    pe.lerp_(p, 1.0 - recipe.ema_decay)
            value = loss.item()
            running = value if running is None else 0.99 * running + 0.01 * value
            window = record_step(curve, window, value, step, steps, recipe.curve_every)
            bar.set_postfix(loss=f"{running:.4f}")
            checkpoint_or_stop(step, steps, recipe.ckpt_every, stop, lambda k: save_ckpt(k, elapsed + time.perf_counter() - t0),
                               bar, ckpt_path)
    train_time = elapsed + time.perf_counter() - t0

    ema = ema.cpu().eval()
    if recipe.save_dtype not in ("float32", "float16"):
        raise HarnessError(f"save_dtype={recipe.save_dtype!r} must be float32 or float16")
    to = getattr(torch, recipe.save_dtype)
    shipped = {k: v.detach().to(to if v.is_floating_point() else v.dtype).clone().contiguous() for k, v in ema.state_dict().items()}
    ema.load_state_dict(shipped)  # what is measured below is what ships (float16 rounding included), back in float32
    from harness.data import DATASETS, load_split

    heldout_source = "test split"
    if not DATASETS.get(dataset).needs_data_dir:
        x_test = load_split(dataset, "test")[0]
    elif eval_data_dir is not None:
        x_test = load_split(dataset, "test", eval_data_dir)[0][:256]
        heldout_source = f"first 256 images of {Path(eval_data_dir).name}"
    else:
        x_test = x_cpu[-256:]
        heldout_source = "last 256 training images (no --eval-data-dir given; not held out)"
    levels = [n for n in (10, 50, 100, 300, 600) if n < recipe.max_timestep] or [recipe.max_timestep - 1]
    heldout = _heldout_loss(ema, x_test * 2.0 - 1.0, levels, seed)

    atomic_save(shipped, pt_path)

    grid_time, grid_kind = None, None
    if grid:
        t0 = time.perf_counter()
        if recipe.max_timestep == 1000:
            samples = sample_ddpm(ema, 100, tuple(x_train.shape[1:]), torch.Generator().manual_seed(seed + 2))
            grid_kind = "100 samples from pure noise, 1000-step ancestral DDPM"
        else:
            samples = purification_grid(ema, x_test[:10], 0.1, torch.Generator().manual_seed(seed + 2))
            grid_kind = (f"rows: 10 images ({heldout_source}), forward-diffused to t* = 0.1, purified by 100-step ancestral "
                         f"DDPM (the model learned n < {recipe.max_timestep} only, so it cannot sample from pure noise)")
        save_grid(samples, png_path)
        grid_time = round(time.perf_counter() - t0, 2)

    import diffusers

    record = {
        "name": recipe.name,
        "dataset": dataset,
        "kind": "diffusers.UNet2DModel noise predictor (eps), DDPM linear schedule",
        "unet_config": recipe.unet_config,
        "params": sum(p.numel() for p in ema.parameters()),
        "schedule": {"betas": "linspace(1e-4, 2e-2, 1000)", "vp_sde": {"beta_min": 0.1, "beta_max": 20.0},
                     "timestep_input": "n in 0..999 (float)"},
        "data": {"split": "train", "images": int(len(x_train)), "source": data_source, "domain": "2x - 1 in [-1, 1]",
                 "augmentation": "random horizontal flip (p = 0.5)" if recipe.hflip else None},
        "training": {**{k: v for k, v in asdict(recipe).items() if k not in ("name", "unet_config", "extra")}, "steps": steps,
                     "optimizer": "Adam", "lr_schedule": f"linear warmup {recipe.warmup} steps, cosine to 0",
                     "loss": f"mse(eps_theta(x_n, n), e), n ~ U{{0..{recipe.max_timestep - 1}}}",
                     "timesteps_learned": f"n < {recipe.max_timestep} (t <= {recipe.max_timestep / 1000:g})",
                     "weights_shipped": f"EMA, stored as {recipe.save_dtype} (loaded as float32)"},
        "seed": seed,
        "torch_version": torch.__version__,
        "diffusers_version": diffusers.__version__,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "train_time_s": round(train_time, 2),
        "final_train_loss_ema": round(running, 5) if running is not None else None,
        "loss_curve_every": recipe.curve_every,
        "loss_curve": curve,
        "heldout_eps_mse_by_timestep": heldout,
        "heldout_images": heldout_source,
        "sample_grid": png_path.name if grid else None,
        "sample_grid_kind": grid_kind,
        "sample_grid_time_s": grid_time,
        "sha256": sha256_file(pt_path),
        "size_bytes": pt_path.stat().st_size,
        "command": _command(dataset, steps, seed, data_dir, recipe),
        "eval": None,
    }
    write_record(record, json_path)
    if ckpt_path.is_file():
        ckpt_path.unlink()  # the weights are written
    return record


#: The purifiers that take a DDPM backbone, evaluated beside the undefended classifier.
EVAL_DEFENSES = ("diffpure", "diffpure-ddpm", "coup")


def evaluate_backbone(
    dataset: str, *, out: str | Path | None = None, name: str | None = None, classifier: str | None = None,
    classifier_weights: str | None = None, data_dir: str | Path | None = None, n: int = 256,
    defenses: tuple[str, ...] = EVAL_DEFENSES,
) -> dict:
    """Clean and preprocessor-blind accuracy of every DDPM purifier with the written backbone; recorded in its json.

    Each of ``defenses`` runs with ``model_path`` = the written ``.pt`` at its dataset
    defaults (printed in each record's ``defense_config``), beside the undefended
    classifier, on the first ``n`` test images drawn as every run draws them.

    Returns:
        The updated json record; its ``eval`` maps each defense (and ``none``) to its result.

    Raises:
        HarnessError: no written weights, a json whose sha256 is not the file's, or no classifier for a CIFAR dataset.
    """
    from harness.classifiers import default_classifier
    from harness.training.common import engine_eval

    name = name or recipe_for(dataset).name
    pt_path, json_path = output_paths(out, name, ".pt", ".json")
    if not (pt_path.is_file() and json_path.is_file()):
        raise HarnessError(f"'{pt_path}' and its '{json_path.name}' are needed to evaluate; train them first")
    record = json.loads(json_path.read_text())
    if record.get("sha256") != sha256_file(pt_path):
        raise HarnessError(f"'{pt_path.name}' does not match the sha256 in '{json_path.name}'; retrain instead of evaluating")
    clf = classifier or default_classifier(dataset)
    data = str(data_dir) if data_dir is not None else None
    results = {"none": engine_eval("none", dataset, clf, classifier_weights, data, n)}
    for d in defenses:
        results[d] = engine_eval(d, dataset, clf, classifier_weights, data, n, (("model_path", str(pt_path)),))
    record["eval"] = results
    write_record(record, json_path)
    return record


def _command(dataset: str, steps: int, seed: int, data_dir, recipe: DiffusionRecipe) -> str:
    cmd = f"harness train diffusion --dataset {dataset} --steps {steps} --seed {seed} --threads {torch.get_num_threads()}"
    if data_dir is not None:
        cmd += f" --data-dir {Path(data_dir).name}"
    if recipe is GPU_RECIPES.get(dataset):
        cmd += " --recipe gpu --device cuda"
    return cmd


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="digits", choices=sorted(RECIPES), help="which small DDPM to train (default: digits)")
    p.add_argument("--data-dir", default=None,
                   help="CIFAR training images: an .npz (x, y), a JPEG .npz (jpeg_bytes, offsets, y) or a torchvision folder")
    p.add_argument("--eval-data-dir", default=None, help="CIFAR test images for the held-out loss and the PNG")
    p.add_argument("--recipe", default="cpu", choices=["cpu", "gpu"],
                   help="cpu (default: sized for a 2-core CPU) or gpu (DDPM's CIFAR-10 UNet, 200k steps; needs --device cuda)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, batches, timesteps and noise")
    p.add_argument("--out", default=None, help=f"output folder (default: {WEIGHTS_DIR})")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/<name>.ckpt (written every few minutes and on Ctrl-C)")
    p.add_argument("--no-grid", dest="grid", action="store_false", help="skip the PNG")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 is fastest on a busy machine)")
    p.add_argument("--classifier", default=None,
                   help="classifier of the recorded evaluation (default: the dataset's; CIFAR: pass resnet20 and --weights)")
    p.add_argument("--weights", default=None, help="that classifier's weights (as in harness run)")
    p.add_argument("--eval-n", type=int, default=256,
                   help="test images of the recorded evaluation of diffpure, diffpure-ddpm and coup (0 = skip)")
    p.add_argument("--eval-only", action="store_true", help="only (re)compute the recorded evaluation of the written weights")


def _evaluate_after(args: argparse.Namespace) -> dict | None:
    from harness.data import DATASETS

    if not args.eval_n:
        return None
    if DATASETS.get(args.dataset).needs_data_dir and (args.classifier is None or args.eval_data_dir is None):
        print(f"no evaluation recorded: {args.dataset} needs --classifier, --weights and --eval-data-dir")
        return None
    rec = evaluate_backbone(args.dataset, out=args.out, name=recipe_for(args.dataset, args.recipe).name, classifier=args.classifier,
                            classifier_weights=args.weights, data_dir=args.eval_data_dir, n=args.eval_n)
    for d, ev in rec["eval"].items():
        print(f"  {d}: clean {ev['clean_accuracy']:.4f}, preprocessor-blind robust {ev['robust_accuracy']:.4f} "
              f"(n={ev['n_examples']}, worst of {ev['eval_draws']})")
    return rec


def _run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.eval_only:
        _evaluate_after(args)
        return 0
    check_gpu_recipe(args.recipe, args.device)
    rec = train_diffusion(args.dataset, steps=args.steps, seed=args.seed, out=args.out, device=args.device, grid=args.grid,
                          data_dir=args.data_dir, eval_data_dir=args.eval_data_dir, resume=args.resume, recipe=args.recipe)
    print(
        f"{rec['name']}: {rec['params']} parameters, {rec['training']['steps']} steps in {rec['train_time_s']:.1f}s, "
        f"held-out eps MSE {rec['heldout_eps_mse_by_timestep']}; wrote {output_paths(args.out, rec['name'], '.pt')[0]} "
        f"(sha256 {rec['sha256'][:12]}), {rec['name']}.json" + (f" and {rec['name']}.png" if rec["sample_grid"] else "")
    )
    _evaluate_after(args)
    return 0


TRAINERS.register(
    "diffusion",
    Trainer(
        name="diffusion",
        help="train the small noise-prediction UNet (DDPM) of an embedded dataset (writes <name>.pt, .json, .png)",
        add_arguments=_add_arguments,
        run=_run,
    ),
)
