"""CMAP: consistency-model latent optimisation with voting (arXiv 2412.08394; spec section 2.4).

No public code exists and the paper's numbers were stripped, so Algorithm 1 is written
from the text with the consistency model of :mod:`defenses._consistency`:

1. N latents z_i ~ N(0, I) per input image (from the defense's generator);
2. K Adam steps on ``L = mean_i [MAE(x_hat_i, x) - lambda SSIM(x_hat_i, x)] + beta L_d``,
   x_hat_i = (G(z_i) + 1) / 2 with the one-step generator G(z) = f(T z, T), and the
   latent moment term ``L_d = MSE(mean_i z_i, 0) + MSE(var_i z_i, 1)`` per latent
   dimension across the N vectors (``moments=scalar``: over all N x d entries);
3. the label by majority vote over the N generated images, ties broken by the summed
   softmax (``ties=softmax``) or the lowest class (``ties=lowest``).

Every image's optimisation is batched across its N latents and across images: one
network call per Adam step for the whole batch (the loss is a sum over images and Adam
is elementwise, so the images stay independent). Adam is written out (the same update
as ``torch.optim.Adam``, checked by a test) so that the ``full`` gradient path can
differentiate through it. SSIM is pytorch-msssim's (the harness's quality metric).

Gradient paths (spec 2.4 and 7.11):

- ``bpda``: the N images computed without a graph; the attacker's logits are the mean of
  the classifier's logits on them with the identity as the backward of the purifier;
- ``surrogate``: one-step consistency purification at level ``sigma_a``,
  ``S(x) = (f(2x - 1 + sigma_a e, sigma_a) + 1) / 2`` with fresh noise e per call (EOT
  over e); ``bench/bench_cmap.py --sweep-sigma`` finds the strongest sigma_a;
- ``full``: backpropagation through all K unrolled Adam steps (second-order: each step's
  gradient is built with ``create_graph``), checkpointed per step, logits the mean over
  the N latents; EOT is over the latent initialisation. Exact, and expensive: the
  digits defaults keep K small, and every job records K and N.

The defense provides ``latent_generator`` (:meth:`CMAP.fit_latents`,
:meth:`CMAP.images`, :meth:`CMAP.latent_loss`) for the consistency-disruption attack.

Values the paper does not give are recorded config fields: the spec proposes N 8, K 100,
Adam lr 0.05, lambda 1, beta 1 on CIFAR-10; the defaults here are N 4, K 40, lr 0.1 on every
dataset (CPU-sized; docs/cifar10.md measures CIFAR-10's reconstruction by K). Measured on
64 test digits (single vote / worst of 10 votes): lr 0.05 at K 20 gives 87% single; lr 0.1
at K 20 97% / 91%; N 4 K 40 97% / 95%; N 8 K 20 95% / 95% at more cost.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from defenses._consistency import ConsistencyFunction, load_consistency
from harness.core.defense import (
    CostLevel,
    Defense,
    DefenseConfig,
    GradientPath,
    SetupContext,
    bpda,
    randn_like,
    register_defense,
)
from harness.core.env import WEIGHTS_DIR
from harness.core.registry import HarnessError, MissingFileError
from harness.evaluation.quality import ssim

ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


@dataclass(frozen=True)
class CMAPConfig(DefenseConfig):
    """Options of the CMAP defense (None: the dataset's default, given in each help)."""

    model_path: str | None = field(default=None, metadata={"help": "consistency model .pt (with its .json); default: shipped <dataset>-cm"})
    n_latents: int | None = field(default=None, metadata={"help": "N latents per image (default 4; the spec proposes 8 on CIFAR-10)"})
    steps: int | None = field(default=None, metadata={"help": "K Adam steps (default 40; the spec proposes 100 on CIFAR-10)"})
    lr: float | None = field(default=None, metadata={"help": "Adam learning rate on z (default 0.1; the spec proposes 0.05 on CIFAR-10)"})
    lam: float = field(default=1.0, metadata={"help": "lambda, the SSIM weight in L_a"})
    beta: float = field(default=1.0, metadata={"help": "beta, the weight of the latent moment term L_d"})
    moments: Literal["per-dimension", "scalar"] = field(default="per-dimension", metadata={"help": "L_d statistics"})
    ties: Literal["softmax", "lowest"] = field(default="softmax", metadata={"help": "vote ties: summed softmax or lowest class"})
    sigma_a: float = field(default=0.5, metadata={"help": "noise level of the one-step surrogate path"})
    checkpoint: bool | None = field(default=None, metadata={"help": "checkpoint each unrolled Adam step on the full path (CIFAR: true)"})
    backbone: Literal["unet", "ncsnpp"] = field(default="unet", metadata={
        "help": "unet: a harness-trained diffusers UNet (<name>.pt + .json recipe); ncsnpp: the NCSN++ of the public PyTorch "
        "port of OpenAI's CD-LPIPS CIFAR-10 model (a converted state_dict, --set model_path=FILE.pth)"})

    def __post_init__(self):
        for k in ("n_latents", "steps"):
            v = getattr(self, k)
            if v is not None and v < 1:
                raise ValueError(f"{k}={v} must be >= 1")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if self.sigma_a <= 0:
            raise ValueError(f"sigma_a={self.sigma_a} must be > 0")


def _moment_loss(z: torch.Tensor, moments: str) -> torch.Tensor:
    """(B,) latent distribution consistency: MSE of the mean to 0 plus MSE of the variance to 1.

    ``z``: (B, N, ...). Per dimension across the N vectors (unbiased variance; N >= 2), or
    ``scalar``: one mean and variance per image over all N x d entries.
    """
    B, N = z.shape[:2]
    flat = z.reshape(B, N, -1)
    if moments == "scalar" or N < 2:
        mean, var = flat.reshape(B, -1).mean(1), flat.reshape(B, -1).var(1)
        return mean**2 + (var - 1) ** 2
    mean, var = flat.mean(1), flat.var(1)
    return (mean**2).mean(1) + ((var - 1) ** 2).mean(1)


@register_defense("cmap")
class CMAP(Defense):
    """CMAP: N latents per image optimised K Adam steps toward the input, then a vote over their images."""

    version = "1"
    Config = CMAPConfig
    stochastic = True
    gradient_paths = frozenset({GradientPath.BPDA, GradientPath.SURROGATE, GradientPath.FULL})
    provides = frozenset({"latent_generator"})
    #: adaptive: the exact unrolled gradient, then the one-step surrogate, then BPDA (spec 3.4)
    also_attack_through = (GradientPath.SURROGATE,)
    #: every purification is N x K network calls: costly cells get few examples unless told
    default_examples: ClassVar[dict[str, int]] = {CostLevel.FORWARD.value: 64, CostLevel.GRADIENT.value: 16}
    DEFAULTS: ClassVar[dict[str, Any]] = {"n_latents": 8, "steps": 100, "lr": 0.05, "checkpoint": True}
    #: the embedded datasets: smaller N and K for a CPU; no checkpointing (memory is small,
    #: and recomputing the second-order steps costs several times the unrolled pass)
    DATASET_DEFAULTS: ClassVar[dict[str, dict[str, Any]]] = {
        "digits": {"n_latents": 4, "steps": 40, "lr": 0.1, "checkpoint": False},
        "mnist5k": {"n_latents": 4, "steps": 40, "lr": 0.1, "checkpoint": False},
        # CIFAR-10 on a CPU with the shipped cifar10-cm: the embedded datasets' N and K; checkpointing on (the unrolled
        # steps of 32x32 latents are large)
        "cifar10": {"n_latents": 4, "steps": 40, "lr": 0.1, "checkpoint": True},
    }

    def __init__(self, config=None):
        super().__init__(config)
        self.cm: ConsistencyFunction | None = None
        self.source: dict[str, Any] | None = None
        self.nfe_per_call = self.settings.n_latents * (self.settings.steps + 1)

    # ----------------------------------------------------------------- setup
    @property
    def settings(self) -> CMAPConfig:
        """The config with ``None`` fields filled from :attr:`DEFAULTS` (setup fills the dataset's first)."""
        fill = {k: v for k, v in self.DEFAULTS.items() if getattr(self.config, k) is None}
        return dataclasses.replace(self.config, **fill) if fill else self.config

    def _fill(self, per: dict) -> list[str]:
        """Write the dataset's defaults into the config (so the identity holds the values used)."""
        fill, notes = {}, []
        for k, v in self.DEFAULTS.items():
            if getattr(self.config, k) is None:
                fill[k] = per.get(k, v)
                if k in per and per[k] != v:
                    notes.append(f"{k}={per[k]} (dataset default; CIFAR value {v})")
        if fill:
            self.config = dataclasses.replace(self.config, **fill)
        self.nfe_per_call = self.config.n_latents * (self.config.steps + 1)
        return notes

    def use_model(self, fn: ConsistencyFunction, source: dict[str, Any] | None = None) -> "CMAP":
        """Bind a consistency function directly (tests, notebooks); :meth:`setup` then keeps it."""
        fn.eval()
        for p in fn.parameters():
            p.requires_grad_(False)
        self.cm, self.source = fn, dict(source or {"kind": "injected"})
        return self

    def setup(self, ctx: SetupContext) -> None:
        notes = self._fill(self.DATASET_DEFAULTS.get(ctx.dataset, {}))
        self.setup_notes = [f"cmap: {'; '.join(notes)}"] if notes else []
        if self.cm is None and self.config.backbone == "ncsnpp":
            self.use_model(*_load_ncsnpp_cm(self.config.model_path, ctx))
        if self.cm is None:
            path = Path(self.config.model_path) if self.config.model_path else (ctx.weights_dir or WEIGHTS_DIR) / f"{ctx.dataset}-cm.pt"
            if not path.is_file():
                raise MissingFileError(
                    f"consistency model '{path}' for dataset '{ctx.dataset}' is missing: train it with "
                    f"`harness train consistency --dataset {ctx.dataset}` or pass --set model_path=FILE.pt"
                )
            fn, source = load_consistency(path)
            self.use_model(fn, source)
        self.to(ctx.device)

    def identity(self) -> dict[str, Any]:
        out = super().identity()
        out["consistency_model"] = None if self.source is None else self.source.get("sha256")
        return out

    def _cm(self) -> ConsistencyFunction:
        if self.cm is None:
            raise HarnessError("defense 'cmap' has no consistency model: call setup(ctx) first (or use_model)")
        return self.cm

    # ----------------------------------------------------------------- the latent generator
    def images(self, z: torch.Tensor) -> torch.Tensor:
        """(B, N, C, H, W) latents -> their one-step images in [0, 1] (differentiable in z)."""
        B, N = z.shape[:2]
        x_hat = (self._cm().generate(z.reshape(B * N, *z.shape[2:])) + 1) / 2
        return x_hat.clamp(0, 1).reshape(z.shape)

    def latent_loss(self, z: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image (B,) the CMAP loss L_a + beta L_d, and the per-latent (B, N) L_a."""
        B, N = z.shape[:2]
        x_hat = self.images(z)
        xr = x[:, None].expand_as(x_hat).reshape(B * N, *x.shape[1:])
        flat = x_hat.reshape(B * N, *x.shape[1:])
        l_a = ((flat - xr).abs().flatten(1).mean(1) - self.config.lam * ssim(flat, xr)).view(B, N)
        return l_a.mean(1) + self.config.beta * _moment_loss(z, self.config.moments), l_a

    def initial_latents(self, x: torch.Tensor, generator: torch.Generator | None, n: int | None = None) -> torch.Tensor:
        """(B, N, C, H, W) standard normal latents drawn from ``generator``."""
        n = n or self.settings.n_latents
        return randn_like(x[:, None].expand(x.shape[0], n, *x.shape[1:]).contiguous(), generator)

    def adam_step(self, z, m, v, k: int, x: torch.Tensor, *, differentiable: bool):
        """One Adam step on the CMAP loss (the update of ``torch.optim.Adam``, no weight decay)."""
        b1, b2 = ADAM_BETAS
        with torch.enable_grad():
            zz = z if (differentiable and z.requires_grad) else z.detach().requires_grad_(True)
            loss, _ = self.latent_loss(zz, x if differentiable else x.detach())
            (g,) = torch.autograd.grad(loss.sum(), zz, create_graph=differentiable)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        step = self.settings.lr * (m / (1 - b1**k)) / (torch.sqrt(v / (1 - b2**k)) + ADAM_EPS)
        z = zz - step if differentiable else (z - step).detach()
        return z, m if differentiable else m.detach(), v if differentiable else v.detach()

    def fit_latents(
        self, x: torch.Tensor, generator: torch.Generator | None, *, differentiable: bool = False, n: int | None = None
    ) -> torch.Tensor:
        """Algorithm 1, steps 1-2: the K-step optimised latents (B, N, ...) for inputs ``x``."""
        z = self.initial_latents(x, generator, n)
        m, v = torch.zeros_like(z), torch.zeros_like(z)
        for k in range(1, self.settings.steps + 1):
            if differentiable and self.settings.checkpoint:
                z, m, v = torch.utils.checkpoint.checkpoint(
                    lambda a, b, c, xx, k=k: self.adam_step(a, b, c, k, xx, differentiable=True), z, m, v, x, use_reentrant=False
                )
            else:
                z, m, v = self.adam_step(z, m, v, k, x, differentiable=differentiable)
        return z

    # ----------------------------------------------------------------- purification and the vote
    def purify(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """The best reconstruction of the N (lowest L_a): the image the quality metrics and BPDA use.

        Differentiable in x (through the unrolled Adam steps) when autograd is on and x needs grad.
        """
        differentiable = torch.is_grad_enabled() and x.requires_grad
        z = self.fit_latents(x, generator, differentiable=differentiable)
        with torch.set_grad_enabled(differentiable):
            x_hat = self.images(z)
            _, l_a = self.latent_loss(z, x)
        best = l_a.argmin(1)
        return x_hat[torch.arange(x.shape[0], device=x.device), best]

    def vote_logits(self, x_hat: torch.Tensor, classifier: nn.Module) -> torch.Tensor:
        """(B, classes) scores whose argmax is the vote over the N images (ties as configured)."""
        B, N = x_hat.shape[:2]
        with torch.no_grad():
            logits = classifier(x_hat.reshape(B * N, *x_hat.shape[2:])).view(B, N, -1)
        counts = F.one_hot(logits.argmax(-1), logits.shape[-1]).sum(1).float()
        if self.config.ties == "softmax":
            return counts + torch.softmax(logits, -1).sum(1) / (N + 1)
        return counts - torch.arange(logits.shape[-1], device=x_hat.device) * 1e-3

    def purify_surrogate(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """One-step consistency purification at ``sigma_a`` (differentiable, fresh noise per call)."""
        s = self.config.sigma_a
        noisy = 2 * x - 1 + s * randn_like(x, generator)
        return ((self._cm()(noisy, s) + 1) / 2).clamp(0, 1)

    def classify(self, x, classifier, *, path=None, generator=None):
        """The vote (path None), or differentiable logits for an attacker along ``path``."""
        if path is None:
            with torch.no_grad():
                x_hat = self.check_range(self.images(self.fit_latents(x.detach(), generator)))
            return self.vote_logits(x_hat, classifier)
        path = GradientPath(path)
        if path is GradientPath.CLASSIFIER:
            return classifier(x)
        if path is GradientPath.SURROGATE:
            return classifier(self.purify_along(x, path, generator=generator))
        B = x.shape[0]
        if path is GradientPath.BPDA:
            with torch.no_grad():
                x_hat = self.check_range(self.images(self.fit_latents(x.detach(), generator)))
            rep = x[:, None].expand_as(x_hat).reshape(B * x_hat.shape[1], *x.shape[1:])
            inputs = bpda(rep, x_hat.reshape(rep.shape))
        elif path is GradientPath.FULL:
            x_hat = self.check_range(self.images(self.fit_latents(x, generator, differentiable=True)))
            inputs = x_hat.reshape(B * x_hat.shape[1], *x.shape[1:])
        else:
            raise HarnessError(f"defense 'cmap' has no '{path.value}' gradient path (supports: bpda, full, surrogate)")
        logits = classifier(inputs)
        return logits.view(B, -1, logits.shape[-1]).mean(1)


def _load_ncsnpp_cm(model_path: str | None, ctx: SetupContext) -> tuple[ConsistencyFunction, dict[str, Any]]:
    """The CD-LPIPS NCSN++ (a user's converted state_dict) as f(x, t): Fourier time embedding of 0.25 ln t."""
    from defenses.networks.ncsnpp import load_cm_ncsnpp

    if not model_path:
        raise MissingFileError(
            "cmap backbone=ncsnpp needs the consistency model's file: --set model_path=FILE.pth (the PyTorch port of "
            "OpenAI's CD-LPIPS CIFAR-10 checkpoint as a state_dict; its architecture from FILE.json beside it, else CD-LPIPS's)"
        )
    path = Path(model_path).expanduser()
    if not path.is_file():
        raise MissingFileError(f"consistency model '{path}' (backbone ncsnpp) does not exist")
    net, source = load_cm_ncsnpp(path)
    size = net.config.image_size
    if tuple(ctx.image_shape[1:]) != (size, size) or ctx.image_shape[0] != net.config.num_channels:
        raise HarnessError(
            f"cmap backbone=ncsnpp: the consistency model takes {net.config.num_channels}x{size}x{size} images, dataset "
            f"'{ctx.dataset}' has {'x'.join(map(str, ctx.image_shape))}"
        )
    return ConsistencyFunction(net), source
