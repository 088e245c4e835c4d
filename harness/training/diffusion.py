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
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from harness.core.registry import HarnessError
from harness.training import TRAINERS, Trainer
from harness.training.common import WEIGHTS_DIR, atomic_save, output_paths, sha256_file, write_record



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


#: dataset -> recipe. digits trains in a few minutes on 2 CPU cores.
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
}


def _schedule() -> tuple[torch.Tensor, torch.Tensor]:
    betas = torch.linspace(1e-4, 2e-2, 1000, dtype=torch.float64)
    return betas, torch.cumprod(1.0 - betas, 0)


def _load_train(dataset: str) -> torch.Tensor:
    try:
        from harness.data import load_split
    except ImportError:  # pragma: no cover - harness.data always ships with the package
        load_split = None
    if load_split is not None:
        x, _ = load_split(dataset, "train")
        return x
    if dataset != "digits":
        raise HarnessError(f"no training data for dataset '{dataset}'")
    from sklearn.datasets import load_digits

    d = load_digits()
    perm = np.random.RandomState(0).permutation(len(d.target))
    x = (d.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)[perm[:-450]]
    return torch.from_numpy(np.ascontiguousarray(x))


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


def train_diffusion(
    dataset: str,
    *,
    steps: int | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    device: str | torch.device = "cpu",
    grid: bool = True,
) -> dict:
    """Train the small DDPM of ``dataset`` and write ``<out>/<name>.pt``, ``.json`` and ``.png``.

    Args:
        dataset: ``"digits"`` (shipped) or ``"mnist5k"``.
        steps: Optimiser steps; None uses the recipe's.
        seed: Seed of the initial weights, batches, timesteps and noise.
        out: Output folder; None means ``harness/weights`` inside the package.
        device: Where to train.
        grid: Also sample and write the 10x10 sample grid PNG.

    Returns:
        The recorded json dict.

    Raises:
        HarnessError: unknown dataset or a non-positive number of steps.
    """
    from diffusers import UNet2DModel

    if dataset not in RECIPES:
        raise HarnessError(f"no diffusion recipe for dataset '{dataset}' (choose from {', '.join(RECIPES)})")
    recipe = RECIPES[dataset]
    steps = recipe.steps if steps is None else int(steps)
    if steps < 1:
        raise HarnessError(f"steps={steps} is out of range (must be >= 1)")
    device = torch.device(device)

    x_train = _load_train(dataset).to(device) * 2.0 - 1.0
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

    start = time.perf_counter()
    bar = tqdm(range(steps), desc=f"train {recipe.name}", unit="step", disable=None, mininterval=1.0)
    running = None
    for _ in bar:
        unet.train()
        idx = torch.randint(len(x_train), (recipe.batch_size,), generator=gen).to(device)
        n = torch.randint(1000, (recipe.batch_size,), generator=gen).to(device)
        e = torch.randn((recipe.batch_size, *x_train.shape[1:]), generator=gen).to(device)
        a = ab[n].view(-1, 1, 1, 1)
        xn = a.sqrt() * x_train[idx] + (1 - a).sqrt() * e
        loss = F.mse_loss(unet(xn, n.float()).sample, e)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), recipe.grad_clip)
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(p, 1.0 - recipe.ema_decay)
        running = loss.item() if running is None else 0.99 * running + 0.01 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}")
    train_time = time.perf_counter() - start

    ema = ema.cpu().eval()
    try:
        from harness.data import load_split

        x_test = load_split(dataset, "test")[0] * 2.0 - 1.0
    except Exception:  # pragma: no cover - only without harness.data
        x_test = None
    heldout = _heldout_loss(ema, x_test, [10, 50, 100, 300, 600], seed) if x_test is not None else None

    pt_path, json_path, png_path = output_paths(out, recipe.name, ".pt", ".json", ".png")
    atomic_save({k: v.detach().clone().contiguous() for k, v in ema.state_dict().items()}, pt_path)

    grid_time = None
    if grid:
        t0 = time.perf_counter()
        samples = sample_ddpm(ema, 100, tuple(x_train.shape[1:]), torch.Generator().manual_seed(seed + 2))
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
        "data": {"split": "train", "images": int(len(x_train)), "domain": "2x - 1 in [-1, 1]", "augmentation": None},
        "training": {**{k: v for k, v in asdict(recipe).items() if k not in ("name", "unet_config", "extra")}, "steps": steps,
                     "optimizer": "Adam", "lr_schedule": f"linear warmup {recipe.warmup} steps, cosine to 0",
                     "loss": "mse(eps_theta(x_n, n), e), n ~ U{0..999}",
                     "weights_shipped": "EMA"},
        "seed": seed,
        "torch_version": torch.__version__,
        "diffusers_version": diffusers.__version__,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "train_time_s": round(train_time, 2),
        "final_train_loss_ema": round(running, 5) if running is not None else None,
        "heldout_eps_mse_by_timestep": heldout,
        "sample_grid": png_path.name if grid else None,
        "sample_grid_time_s": grid_time,
        "sha256": sha256_file(pt_path),
        "size_bytes": pt_path.stat().st_size,
        "command": f"harness train diffusion --dataset {dataset} --steps {steps} --seed {seed} --threads {torch.get_num_threads()}",
    }
    write_record(record, json_path)
    return record


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="digits", choices=sorted(RECIPES), help="which small DDPM to train (default: digits)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, batches, timesteps and noise")
    p.add_argument("--out", default=None, help=f"output folder (default: {WEIGHTS_DIR})")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--no-grid", dest="grid", action="store_false", help="skip the sample-grid PNG")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 is fastest on a busy machine)")


def _run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    rec = train_diffusion(args.dataset, steps=args.steps, seed=args.seed, out=args.out, device=args.device, grid=args.grid)
    print(
        f"{rec['name']}: {rec['params']} parameters, {rec['training']['steps']} steps in {rec['train_time_s']:.1f}s, "
        f"held-out eps MSE {rec['heldout_eps_mse_by_timestep']}; wrote {output_paths(args.out, rec['name'], '.pt')[0]} "
        f"(sha256 {rec['sha256'][:12]}), {rec['name']}.json" + (f" and {rec['name']}.png" if rec["sample_grid"] else "")
    )
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
