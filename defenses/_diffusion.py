"""Shared machinery of the diffusion purifiers: VP schedule, UNet backbones, solvers.

Used by :mod:`defenses.diffpure` (``diffpure``, ``diffpure-ddpm``) and
:mod:`defenses.coup` (``coup``). Nothing here is registered; the leading underscore
keeps :mod:`defenses` from importing it as a plugin.

**Schedule.** The VP-SDE of Song et al. (arXiv 2011.13456) with beta(t) = beta_min +
t (beta_max - beta_min), beta_min = 0.1, beta_max = 20, and its discretisation, the
DDPM linear schedule beta_i = linspace(1e-4, 2e-2, 1000) (Ho et al., arXiv 2006.11239).
Both give alpha_bar(0.1) ~= 0.897. As in the official DiffPure code, forward noising
uses the *discrete* alpha_bar and the reverse SDE the *continuous* one.

**Backbones.** Noise-prediction networks eps_theta(x, t) are ``diffusers.UNet2DModel``
instances (:func:`load_backbone`): the small UNets shipped in ``harness/weights``
(``<name>.pt`` state_dict + ``<name>.json`` recipe with the architecture and sha256),
trained by ``harness train diffusion`` (``cifar10-ddpm`` is the CIFAR-10 default), and
the public ``google/ddpm-cifar10-32`` (a local diffusers folder or the Hugging Face
cache, never downloaded at run time). With
``backbone=ncsnpp`` it is the papers' own network: the score-SDE DDPM++ of DiffPure's
``checkpoint_8.pth`` (:mod:`defenses.networks.ncsnpp`, EMA weights), which takes
``(x, 999 t)`` (or the DDPM step index) and returns eps, the interface of :class:`EpsNet`.

**Reverse SDE and its noise.** :class:`ReverseVPSDE` integrates the (optionally
classifier-guided) reverse VP-SDE with Euler-Maruyama. Solver time is the *step index*
s in [0, N] with physical time t = t* - s h, h = (t* - t_end) / N: a reparametrisation
of the official ``t' = 1 - t`` of torchsde that makes every solver step, in the forward
pass, in autograd and in the stochastic adjoint, land exactly on the same integer grid.
The Brownian increments over the N unit steps are N standard normal tensors drawn from
the caller's ``torch.Generator`` (:func:`draw_noise`) *before* integration; the autograd
loop (:func:`integrate_em`) and the torchsde adjoint (:func:`integrate_adjoint`, through
:class:`GridBrownian`) consume the very same tensors, so for one generator state the
forward values of every path agree and the gradients are pathwise (the noise is fixed).
N = ceil((t* - t_end) / dt), the official step count (100 at t* = 0.1, dt = 1e-3); the
step is then h = (t* - t_end) / N, i.e. 0.9999e-3 instead of torchsde's 1e-3 steps with a
0.99e-3 last step: a 1e-4 relative change of the grid, no change of NFE.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Literal

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
import torchsde
from torch import nn

from harness.core.config import build_from_recipe, read_recipe
from harness.core.env import WEIGHTS_DIR, sha256_file
from harness.core.registry import HarnessError, MissingFileError
from harness.core.registry import first_line as _first_line
from harness.core.defense import CostLevel, Defense, SetupContext, randn_like
from defenses._transfer import TransferMixin

BETA_MIN = 0.1
BETA_MAX = 20.0
NUM_TIMESTEPS = 1000
#: The reverse SDE stops at t = 1e-5 (DiffPure's ``epsilon_dt1``), not at 0 where the score blows up.
T_END = 1e-5


# --------------------------------------------------------------------------- schedule
def discrete_betas(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """DDPM linear betas, ``linspace(0.1/1000, 20/1000, 1000)`` (= 1e-4 .. 2e-2)."""
    return torch.linspace(BETA_MIN / NUM_TIMESTEPS, BETA_MAX / NUM_TIMESTEPS, NUM_TIMESTEPS, dtype=dtype)


def discrete_alpha_bar(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``alpha_bar[n] = prod_{i<=n} (1 - beta_i)`` for n = 0..999 (zero-based, as the official code)."""
    return torch.cumprod(1.0 - discrete_betas(dtype), dim=0)


def continuous_alpha_bar(t: float | torch.Tensor) -> float | torch.Tensor:
    """``alpha_bar(t) = exp(-(beta_max - beta_min) t^2 / 2 - beta_min t)`` of the VP-SDE."""
    expo = -0.5 * (BETA_MAX - BETA_MIN) * t * t - BETA_MIN * t
    return torch.exp(expo) if isinstance(t, torch.Tensor) else math.exp(expo)


def beta_t(t: float) -> float:
    """``beta(t) = beta_min + t (beta_max - beta_min)``."""
    return BETA_MIN + t * (BETA_MAX - BETA_MIN)


def timestep_index(t_star: float) -> int:
    """Discrete step count n* = round(1000 t*) of a diffusion time (DiffPure's ``--t``)."""
    n = int(round(NUM_TIMESTEPS * t_star))
    if not 1 <= n <= NUM_TIMESTEPS:
        raise HarnessError(f"t_star={t_star} is out of range (needs 1/{NUM_TIMESTEPS} <= t_star <= 1)")
    return n


def sde_steps(t_star: float, dt: float, t_end: float = T_END) -> int:
    """Euler-Maruyama steps from t* down to t_end: ``ceil((t* - t_end) / dt)`` (100 at t*=0.1, dt=1e-3)."""
    if not dt > 0:
        raise HarnessError(f"dt={dt} is out of range (must be > 0)")
    if not t_star > t_end:
        raise HarnessError(f"t_star={t_star} must exceed t_end={t_end}")
    return max(1, math.ceil((t_star - t_end) / dt - 1e-9))


# --------------------------------------------------------------------------- backbones
def shipped_weights_dir() -> Path:
    """``harness/weights`` (where the shipped digits DDPM lives)."""
    return WEIGHTS_DIR


#: Datasets with a small backbone shipped in ``harness/weights`` (file stem).
SHIPPED_BACKBONES: dict[str, str] = {"digits": "digits-ddpm", "mnist5k": "mnist5k-ddpm", "cifar10": "cifar10-ddpm"}
#: Datasets also served by a public diffusers model: dataset -> (Hugging Face repo, folder name under --weights-dir);
#: found under --weights-dir before the shipped file, in the Hugging Face cache only when the shipped file is absent.
HF_BACKBONES: dict[str, tuple[str, str]] = {"cifar10": ("google/ddpm-cifar10-32", "ddpm-cifar10-32")}
#: Hugging Face cache to search (None = the hub's default, HF_HUB_CACHE / HF_HOME); nothing is downloaded.
HF_CACHE_DIR: str | None = None
#: Datasets with a published score-SDE NCSN++ checkpoint (``backbone=ncsnpp``): dataset -> file name, searched as
#: ``WEIGHTS_DIR/score_sde/<file>`` (DiffPure's ``pretrained/score_sde/`` layout), then ``WEIGHTS_DIR/<file>``.
NCSNPP_BACKBONES: dict[str, str] = {"cifar10": "checkpoint_8.pth"}

#: Network families of ``model_path`` (the diffusion defenses' ``backbone`` option).
Backbone = Literal["unet2d", "ncsnpp", "guided-diffusion"]
BACKBONE_HELP = (
    "network of model_path: unet2d (a diffusers UNet2DModel folder, or .pt with its .json recipe), ncsnpp "
    "(a score_sde_pytorch checkpoint: DiffPure's CIFAR-10 checkpoint_8.pth, DDPM++ deep continuous, EMA weights) or "
    "guided-diffusion (OpenAI's 256x256_diffusion_uncond.pt, DiffPure's ImageNet model, in DiffPure's fp16 mode)"
)
MODEL_PATH_HELP = (
    "diffusers UNet2DModel folder, or .pt with its .json recipe; with backbone=ncsnpp a score-SDE checkpoint, "
    "with backbone=guided-diffusion a guided-diffusion checkpoint"
)
#: Datasets with a published guided-diffusion checkpoint (``backbone=guided-diffusion``): dataset -> file name,
#: searched as ``WEIGHTS_DIR/guided_diffusion/<file>`` (DiffPure's ``pretrained/guided_diffusion/``), then ``WEIGHTS_DIR/<file>``.
GUIDED_BACKBONES: dict[str, str] = {"imagenet": "256x256_diffusion_uncond.pt", "imagenet-rb5000": "256x256_diffusion_uncond.pt"}



@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """Silence huggingface_hub's deprecation chatter that diffusers triggers on every offline load."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
        yield


def _diffusers_weight_file(folder: Path) -> Path | None:
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    return None


def _is_diffusers_folder(folder: Path) -> Path | None:
    """The folder holding ``config.json`` + weights (``folder`` or ``folder/unet``), or None."""
    for cand in (folder, folder / "unet"):
        if (cand / "config.json").is_file() and _diffusers_weight_file(cand) is not None:
            return cand
    return None


def load_diffusers_folder(folder: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load a ``UNet2DModel`` saved with ``save_pretrained`` (``folder`` or ``folder/unet``)."""
    from diffusers import UNet2DModel

    where = _is_diffusers_folder(folder)
    if where is None:
        raise HarnessError(
            f"'{folder}' is not a diffusers UNet2DModel folder (expected config.json and "
            f"diffusion_pytorch_model.safetensors, or a unet/ subfolder with them)"
        )
    try:
        with _quiet_hub():
            unet = UNet2DModel.from_pretrained(str(where), local_files_only=True, low_cpu_mem_usage=False)
    except Exception as exc:  # diffusers raises many types for a bad folder; report one line
        raise HarnessError(f"cannot load the diffusion UNet from '{where}': {_first_line(exc)}") from None
    wfile = _diffusers_weight_file(where)
    return unet, {"kind": "diffusers-folder", "name": folder.name, "sha256": sha256_file(wfile)}


def load_recipe_checkpoint(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load ``<name>.pt`` (a UNet2DModel state_dict) built from the ``unet_config`` of ``<name>.json``.

    The recipe's sha256 must match the file, so a swapped or truncated checkpoint fails
    loudly instead of silently changing every number.
    """
    from diffusers import UNet2DModel

    recipe_path = path.with_suffix(".json")
    if not recipe_path.is_file():
        raise HarnessError(f"diffusion checkpoint '{path}' has no recipe '{recipe_path.name}' beside it (it holds the architecture)")
    recipe = read_recipe(recipe_path, "diffusion checkpoint")
    digest = sha256_file(path)
    if recipe.get("sha256") and recipe["sha256"] != digest:
        raise HarnessError(
            f"diffusion checkpoint '{path}' has sha256 {digest[:12]}..., its recipe says {str(recipe['sha256'])[:12]}..."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise HarnessError(f"cannot load diffusion weights '{path}': {_first_line(exc)}") from None
    unet = build_from_recipe(UNet2DModel, recipe.get("unet_config"), f"diffusion recipe '{recipe_path}': unet_config")
    try:
        unet.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise HarnessError(f"diffusion weights '{path.name}' do not fit the recipe's UNet: {_first_line(exc)}") from None
    return unet, {"kind": "recipe-checkpoint", "name": path.stem, "sha256": digest}


def _from_hf_cache(repo: str) -> tuple[nn.Module, dict[str, Any]] | None:
    """``UNet2DModel.from_pretrained(repo, local_files_only=True)`` (root, then ``unet/``), or None."""
    from diffusers import UNet2DModel

    for sub in (None, "unet"):
        try:
            with _quiet_hub():
                unet = UNet2DModel.from_pretrained(
                    repo, subfolder=sub, cache_dir=HF_CACHE_DIR, local_files_only=True, low_cpu_mem_usage=False
                )
        except Exception:  # not in the cache (OSError/EnvironmentError/ValueError by version)
            continue
        return unet, {"kind": "hf-cache", "name": repo, "sha256": _state_sha256(unet)}
    return None


def _state_sha256(net: nn.Module) -> str:
    """sha256 over a module's parameters and buffers (for weights with no single file to hash)."""
    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_model_path(model_path: str | None, backbone: str = "unet2d") -> None:
    """A one-line error when ``model_path`` names nothing (run when a defense is built, before data and classifier load)."""
    if not model_path:
        return
    p = Path(model_path).expanduser()
    if p.exists():
        return
    if backbone == "ncsnpp":
        from defenses.networks.ncsnpp import missing_checkpoint

        raise missing_checkpoint(p)
    if backbone == "guided-diffusion":
        from defenses.networks.guided_diffusion import missing_checkpoint as missing_guided

        raise missing_guided(p)
    raise HarnessError(f"model_path '{p}' does not exist (give a diffusers UNet2DModel folder or a .pt with its .json recipe)")


def _published_checkpoint(
    what: str, files: dict[str, str], folder: str, source: str, load: Callable[[Any], tuple[nn.Module, dict[str, Any]]],
    dataset: str, model_path: str | None, weights_dir: Path | None,
) -> tuple[nn.Module, dict[str, Any]]:
    """``load(model_path)``, else ``load`` of ``weights_dir/<folder>/<file>`` or ``weights_dir/<file>``
    (``<file>`` = ``files[dataset]``, the dataset's published checkpoint); else a one-line error naming
    the place and ``source`` (where it is published).
    """
    if model_path:
        return load(model_path)
    name = files.get(dataset)
    if name is None:
        raise HarnessError(f"no {what} checkpoint is known for dataset '{dataset}': pass --set model_path=FILE")
    for cand in ([Path(weights_dir) / folder / name, Path(weights_dir) / name] if weights_dir else []):
        if cand.is_file():
            return load(cand)
    where = f"{weights_dir}/{folder}/{name}" if weights_dir else f"WEIGHTS_DIR/{folder}/{name}"
    raise MissingFileError(
        f"{what} checkpoint {name} for '{dataset}' not found: put it at {where} and pass --weights-dir, "
        f"or pass --set model_path=FILE ({source})"
    )


def load_ncsnpp_backbone(dataset: str, model_path: str | None, weights_dir: Path | None) -> tuple[nn.Module, dict[str, Any]]:
    """The score-SDE NCSN++ of ``model_path``, else ``weights_dir/score_sde/<file>``, else ``weights_dir/<file>``.

    ``<file>`` is the dataset's published checkpoint (:data:`NCSNPP_BACKBONES`).
    """
    from defenses.networks.ncsnpp import SCORE_SDE_SOURCE, load_score_sde_checkpoint

    return _published_checkpoint("score-SDE NCSN++", NCSNPP_BACKBONES, "score_sde", SCORE_SDE_SOURCE,
                                 load_score_sde_checkpoint, dataset, model_path, weights_dir)


def load_guided_backbone(dataset: str, model_path: str | None, weights_dir: Path | None) -> tuple[nn.Module, dict[str, Any]]:
    """The guided-diffusion UNet of ``model_path``, else ``weights_dir/guided_diffusion/<file>``, else ``weights_dir/<file>``.

    ``<file>`` is the dataset's published checkpoint (:data:`GUIDED_BACKBONES`); the
    architecture is DiffPure's ImageNet model unless a ``<stem>.json`` beside the file
    says otherwise (:func:`defenses.networks.guided_diffusion.load_guided_diffusion`).
    """
    from defenses.networks.guided_diffusion import CHECKPOINT_SOURCE, load_guided_diffusion

    return _published_checkpoint("guided-diffusion", GUIDED_BACKBONES, "guided_diffusion", CHECKPOINT_SOURCE,
                                 load_guided_diffusion, dataset, model_path, weights_dir)


def load_backbone(
    dataset: str, model_path: str | None, weights_dir: Path | None, backbone: str = "unet2d"
) -> tuple[nn.Module, dict[str, Any]]:
    """Find and load the noise-prediction network of a dataset.

    ``backbone="ncsnpp"``: a score-SDE checkpoint (:func:`load_ncsnpp_backbone`);
    ``backbone="guided-diffusion"``: a guided-diffusion checkpoint (:func:`load_guided_backbone`).
    Otherwise a UNet, in this order: ``model_path`` (a diffusers folder, or a ``.pt`` with
    its ``.json`` recipe); ``weights_dir/<name>.pt`` (the shipped name) and, for CIFAR-10,
    ``weights_dir/ddpm-cifar10-32`` (or ``weights_dir`` itself, a diffusers folder); the
    shipped file (``harness/weights/cifar10-ddpm.pt`` for CIFAR-10); for CIFAR-10 the
    Hugging Face cache (``local_files_only``), reached only without the shipped file.

    Returns:
        ``(unet, source)``; ``source`` (kind, name, sha256) enters the defense identity.

    Raises:
        HarnessError: one line naming what to supply when nothing is found.
    """
    if backbone == "ncsnpp":
        return load_ncsnpp_backbone(dataset, model_path, weights_dir)
    if backbone == "guided-diffusion":
        return load_guided_backbone(dataset, model_path, weights_dir)
    if model_path:
        check_model_path(model_path, backbone)
        p = Path(model_path).expanduser()
        if p.is_file():
            return load_recipe_checkpoint(p)
        if p.is_dir():
            return load_diffusers_folder(p)
        raise MissingFileError(
            f"model_path '{p}' does not exist (give a diffusers UNet2DModel folder or a .pt with its .json recipe)"
        )
    stem = SHIPPED_BACKBONES.get(dataset)
    hf = HF_BACKBONES.get(dataset)
    if stem is None and hf is None:
        raise MissingFileError(
            f"no diffusion backbone for dataset '{dataset}': train one with `harness train diffusion --dataset {dataset}` "
            f"and pass --set model_path=FILE.pt, or pass --set model_path=DIR (a diffusers UNet2DModel folder)"
        )
    # What the user pointed --weights-dir at comes first, then the shipped file, then the Hugging Face cache.
    if weights_dir is not None:
        if stem is not None and (Path(weights_dir) / f"{stem}.pt").is_file():
            return load_recipe_checkpoint(Path(weights_dir) / f"{stem}.pt")
        if hf is not None:
            repo, folder_name = hf
            for cand in (Path(weights_dir) / folder_name, Path(weights_dir) / repo.replace("/", "--"), Path(weights_dir)):
                if cand.is_dir() and _is_diffusers_folder(cand) is not None:
                    return load_diffusers_folder(cand)
    if stem is not None and (shipped_weights_dir() / f"{stem}.pt").is_file():
        return load_recipe_checkpoint(shipped_weights_dir() / f"{stem}.pt")
    if hf is not None:
        found = _from_hf_cache(hf[0])
        if found is not None:
            return found
    wants = []
    if stem is not None:
        wants.append(f"'{stem}.pt' in {shipped_weights_dir()} (`harness train diffusion --dataset {dataset}`)")
    if hf is not None:
        where = f"{weights_dir}/{hf[1]}" if weights_dir else f"WEIGHTS_DIR/{hf[1]}"
        wants.append(f"{hf[0]}'s diffusers folder (config.json + diffusion_pytorch_model.safetensors) at {where} with --weights-dir")
    raise MissingFileError(f"no diffusion backbone for dataset '{dataset}' found: need {' or '.join(wants)}, or pass --set model_path=FILE")


class EpsNet(nn.Module):
    """Adapter: ``eps_theta(x, t)`` from a diffusers ``UNet2DModel`` (or any ``net(x, t)``).

    Keeps the first C output channels (learned-sigma models output 2C) and unwraps the
    diffusers output object.

    Shape:
        x: (B, C, H, W) in the diffusion domain [-1, 1]; timesteps: (B,) floats; out: like x.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        out = self.net(x, timesteps)
        out = getattr(out, "sample", out)
        if out.shape[1] != x.shape[1]:
            out = out[:, : x.shape[1]]
        return out

    def at_time(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """eps at VP time t in [0, 1]: the network's own ``vp_timesteps(t, x)`` where it has one
        (the guided-diffusion UNet: DiffPure's ``floor(1000 t)``), else ``999 t`` (score_sde's continuous
        convention, also the DDPM-trained UNets').
        """
        vp = getattr(self.net, "vp_timesteps", None)
        if vp is not None:
            return self(x, vp(t, x))
        return self(x, torch.full((x.shape[0],), (NUM_TIMESTEPS - 1) * t, dtype=x.dtype, device=x.device))


def backbone_shape(net: nn.Module, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """The (C, H, W) images a backbone takes, from its config (``image_shape`` where it does not say)."""
    cfg = getattr(net, "config", None)
    if cfg is None:
        return tuple(image_shape)
    size = cfg.get("sample_size") if hasattr(cfg, "get") else getattr(cfg, "sample_size", None)
    size = size if isinstance(size, (tuple, list)) else (size, size)
    if size[0] is None:
        size = tuple(image_shape[1:])
    return (int(cfg.in_channels), int(size[0]), int(size[1]))


def check_backbone_fits(net: nn.Module, image_shape: tuple[int, int, int], dataset: str) -> None:
    """A one-line error when the backbone does not take ``image_shape`` images."""
    have = backbone_shape(net, image_shape)
    if have != tuple(image_shape):
        want = "x".join(map(str, image_shape))
        raise HarnessError(f"diffusion backbone takes {'x'.join(map(str, have))} images but dataset '{dataset}' has {want}")


# --------------------------------------------------------------------------- noise
def draw_noise(like: torch.Tensor, n: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    """``n`` standard normal tensors shaped like ``like``, drawn in order from ``generator``."""
    return [randn_like(like, generator) for _ in range(n)]


class GridBrownian(torchsde.BaseBrownian):
    """A Brownian motion on the integer grid 0..N whose unit increments are given tensors.

    ``W(k+1) - W(k) = increments[k]`` (standard normal, unit time per step). torchsde's
    Euler (forward) and Milstein (adjoint) solvers with ``dt=1`` only ask for increments
    between grid points, which this returns exactly; the adjoint's reversed queries
    ``(-tb, -ta)`` map back onto the same grid (torchsde's ``ReverseBrownian``).
    """

    def __init__(self, increments: list[torch.Tensor]):
        super().__init__()
        self._inc = increments
        self._shape = tuple(increments[0].shape)

    def _index(self, t: Any) -> int:
        f = float(t)
        k = round(f)
        if abs(f - k) > 1e-6 or not 0 <= k <= len(self._inc):
            raise RuntimeError(f"GridBrownian queried off its grid at t={f}")
        return k

    def __call__(self, ta, tb=None, return_U=False, return_A=False):
        if tb is None or return_U or return_A:
            raise RuntimeError("GridBrownian only gives increments W(tb) - W(ta) on its grid")
        ka, kb = self._index(ta), self._index(tb)
        if kb < ka:
            return -self(tb, ta)
        if kb - ka == 1:
            return self._inc[ka]
        if kb == ka:
            return torch.zeros_like(self._inc[0])
        return torch.stack(self._inc[ka:kb]).sum(0)

    def __repr__(self) -> str:
        return f"GridBrownian(steps={len(self._inc)}, shape={self._shape})"

    @property
    def dtype(self):
        return self._inc[0].dtype

    @property
    def device(self):
        return self._inc[0].device

    @property
    def shape(self):
        return torch.Size(self._shape)

    @property
    def levy_area_approximation(self):
        return "none"


# --------------------------------------------------------------------------- guidance
def log_max_softmax_grad(
    classifier: nn.Module, x: torch.Tensor, *, create_graph: bool
) -> torch.Tensor:
    """``grad_x log max_y softmax(classifier((x + 1) / 2))`` (COUP's guidance), per example.

    With ``create_graph`` the result stays a differentiable function of ``x`` (double
    backpropagation through the classifier); otherwise it is computed on a detached copy
    and carries no graph (the official COUP behaviour, and what no-grad evaluation needs).
    """
    with torch.enable_grad():
        if create_graph and x.requires_grad:
            xin = x
        else:
            xin, create_graph = x.detach().requires_grad_(True), False
        logits = classifier((xin + 1) * 0.5)
        # log max softmax = max log_softmax (same value, no log(0) for confident classifiers)
        logp = F.log_softmax(logits.float() if logits.dtype == torch.float16 else logits, dim=-1).max(dim=-1).values
        (grad,) = torch.autograd.grad(logp.sum(), xin, create_graph=create_graph)
    return grad


# --------------------------------------------------------------------------- solvers
class ReverseVPSDE(nn.Module):
    """The reverse VP-SDE in step-index time, for torchsde and for the autograd loop.

    Physical time t = t_start - s h runs from t_start (s = 0) to t_end (s = N). One
    Euler-Maruyama step (t decreasing by h) is

        x <- x + h [beta(t)/2 x + beta(t) (s_theta(x, t) + lambda guidance(x))] + sqrt(beta(t) h) z,

    with s_theta(x, t) = -eps_theta(x, 999 t) / sqrt(1 - alpha_bar(t)) (continuous
    alpha_bar, the official ``score_sde`` convention; the network's own time input where
    :meth:`EpsNet.at_time` knows one). In torchsde terms: drift ``f(s, y)`` = h [...],
    diffusion ``g(s)`` = sqrt(beta(t) h), ``dt = 1``.

    Args:
        eps_net: eps_theta(x, timesteps) (an :class:`EpsNet`, or any ``net(x, timesteps)``).
        image_shape: (C, H, W) of the states (torchsde works on flat (B, C*H*W) states).
        t_start: t* where integration starts.
        n_steps: N.
        t_end: where it stops.
        guidance: optional ``guidance(x) -> tensor like x`` (already scaled by lambda).
        times: optional explicit grid t_0 = t_start > t_1 > ... > t_N (N + 1 floats): step k
            then goes from t_k to t_{k+1} with h_k = t_k - t_{k+1} (e.g. torchsde's float32
            grid, to replay a reference solve); None = the uniform grid.
    """

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(
        self,
        eps_net: nn.Module,
        image_shape: tuple[int, ...],
        t_start: float,
        n_steps: int,
        t_end: float = T_END,
        guidance: Callable[[torch.Tensor], torch.Tensor] | None = None,
        times: list[float] | None = None,
    ):
        super().__init__()
        self.eps_net = eps_net
        self.image_shape = tuple(image_shape)
        self.t_start, self.t_end, self.n_steps = float(t_start), float(t_end), int(n_steps)
        self.h = (self.t_start - self.t_end) / self.n_steps
        self.guidance = guidance
        self.times = None if times is None else [float(v) for v in times]
        if self.times is not None and (len(self.times) != self.n_steps + 1 or any(a <= b for a, b in zip(self.times, self.times[1:]))):
            raise HarnessError(f"ReverseVPSDE: times must be {self.n_steps + 1} decreasing values, got {len(self.times)}")

    def _grid_index(self, s: float) -> int:
        k = round(s)
        if abs(s - k) > 1e-6:
            raise HarnessError(f"ReverseVPSDE: an explicit time grid is queried at step-time s={s}, not a grid point")
        return min(max(k, 0), self.n_steps)

    def time(self, s: float) -> float:
        return self.t_start - s * self.h if self.times is None else self.times[self._grid_index(s)]

    def step_size(self, s: float) -> float:
        """h, or on an explicit grid h_k of the step that starts at s (the last step's at s = N)."""
        if self.times is None:
            return self.h
        k = min(self._grid_index(s), self.n_steps - 1)
        return self.times[k] - self.times[k + 1]

    def drift(self, s: float, x: torch.Tensor) -> torch.Tensor:
        """Drift increment h [beta/2 x + beta (score + guidance)] at step-time s; x image-shaped."""
        t, h = self.time(s), self.step_size(s)
        b = beta_t(t)
        at_time = getattr(self.eps_net, "at_time", None)
        if at_time is not None:
            eps = at_time(x, t)
        else:
            eps = self.eps_net(x, torch.full((x.shape[0],), (NUM_TIMESTEPS - 1) * t, dtype=x.dtype, device=x.device))
        score = eps * (-1.0 / math.sqrt(1.0 - continuous_alpha_bar(t)))
        if self.guidance is not None:
            score = score + self.guidance(x)
        return (0.5 * b * h) * x + (b * h) * score

    def diffusion(self, s: float) -> float:
        return math.sqrt(beta_t(self.time(s)) * self.step_size(s))

    def step(self, x: torch.Tensor, z: torch.Tensor, k: int) -> torch.Tensor:
        """One Euler-Maruyama step k -> k+1 with the standard normal increment z."""
        return x + self.drift(float(k), x) + self.diffusion(float(k)) * z

    # torchsde interface (flat states)
    def f(self, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.drift(float(s), y.view(-1, *self.image_shape)).flatten(1)

    def g(self, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.full_like(y, self.diffusion(float(s)))


def integrate_em(
    sde: ReverseVPSDE, x: torch.Tensor, noise: list[torch.Tensor], *, checkpoint: bool
) -> torch.Tensor:
    """Autograd through Euler-Maruyama with fixed noise (the ``full`` gradient path).

    With ``checkpoint`` (and a graph being built) the steps are checkpointed in segments
    chosen by the number of steps (:func:`checkpointed_steps`): each step's UNet
    activations are recomputed in the backward pass, so activation memory does not grow
    with N, and for long solves only every segment's first state is kept.
    """
    return checkpointed_steps(sde.step, x, noise, checkpoint=checkpoint)


#: Solves of at least this many steps are checkpointed in two levels (see :func:`checkpoint_segment_length`).
TWO_LEVEL_FROM = 32


def checkpoint_segment_length(n_steps: int) -> int:
    """Steps per outer checkpoint segment: 1 (a checkpoint per step) below :data:`TWO_LEVEL_FROM` steps,
    else ``ceil(sqrt(N))``.

    A checkpoint per step keeps the N states (and recomputes each step once); two levels
    keep ~sqrt(N) segment inputs plus, while one segment is differentiated, its ~sqrt(N)
    step inputs, at the price of a second recomputation of every step. Short solves
    hold few states, so they take the cheaper single level.
    """
    return 1 if n_steps < TWO_LEVEL_FROM else math.isqrt(n_steps - 1) + 1


def _precision_flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@contextlib.contextmanager
def _precision(flags: tuple[bool, bool]) -> Iterator[None]:
    """TF32 flags as they were in the forward pass (COUP's strict float32), while a segment is recomputed."""
    old = _precision_flags()
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _step_checkpoints(step, x: torch.Tensor, noise: list[torch.Tensor], lo: int, hi: int) -> torch.Tensor:
    """Steps lo..hi-1, each a non-reentrant ``torch.utils.checkpoint`` (its input kept, its activations recomputed)."""
    for k in range(lo, hi):
        x = torch.utils.checkpoint.checkpoint(step, x, noise[k], k, use_reentrant=False)
    return x


class _Segment(torch.autograd.Function):
    """Steps lo..hi-1 as one autograd node that keeps only its input.

    Forward: the steps without a graph. Backward: the steps again from the kept input,
    each checkpointed (:func:`_step_checkpoints`), and their vector-Jacobian product, so
    one segment's step inputs and one step's activations are alive at a time. (A
    non-reentrant checkpoint around per-step checkpoints would not do: the inner
    checkpoints of the forward pass keep their inputs referenced by the graph.)
    """

    @staticmethod
    def forward(ctx, x, step, noise, lo, hi):
        ctx.step, ctx.noise, ctx.lo, ctx.hi, ctx.flags = step, noise, lo, hi, _precision_flags()
        ctx.save_for_backward(x)
        for k in range(lo, hi):
            x = step(x, noise[k], k)
        return x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (x0,) = ctx.saved_tensors
        with torch.enable_grad(), _precision(ctx.flags):
            xi = x0.detach().requires_grad_(True)
            out = _step_checkpoints(ctx.step, xi, ctx.noise, ctx.lo, ctx.hi)
            (grad,) = torch.autograd.grad(out, xi, grad_out)
        return grad, None, None, None, None


def checkpointed_steps(
    step: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    x: torch.Tensor,
    noise: list[torch.Tensor],
    *,
    checkpoint: bool,
    segment: int | None = None,
) -> torch.Tensor:
    """``x <- step(x, z_k, k)`` for every noise tensor, checkpointed when a graph is built and ``checkpoint``.

    ``segment`` (default :func:`checkpoint_segment_length`) steps per outer segment: 1 is
    a non-reentrant ``torch.utils.checkpoint`` per step (the N states are kept); more
    makes each segment one :class:`_Segment` node that keeps its input alone, and whose
    backward pass recomputes its steps with a checkpoint each. The recomputations repeat
    the same operations on the same tensors, so forward values and the gradient with
    respect to ``x`` are those of the plain loop (gradients of parameters inside
    ``step`` are not formed on the segmented path; the purifiers freeze theirs).
    """
    use_ckpt = checkpoint and torch.is_grad_enabled() and x.requires_grad
    if not use_ckpt:
        for k, z in enumerate(noise):
            x = step(x, z, k)
        return x
    seg = checkpoint_segment_length(len(noise)) if segment is None else max(1, int(segment))
    if seg == 1:
        return _step_checkpoints(step, x, noise, 0, len(noise))
    for lo in range(0, len(noise), seg):
        x = _Segment.apply(x, step, noise, lo, min(lo + seg, len(noise)))
    return x


def integrate_adjoint(sde: ReverseVPSDE, x: torch.Tensor, noise: list[torch.Tensor]) -> torch.Tensor:
    """``torchsde.sdeint_adjoint`` (Euler forward, torchsde's default Milstein adjoint) on the same noise.

    Memory is that of a no-grad solve; the backward pass integrates the adjoint SDE with
    a VJP of the drift per step (about 2-3x the forward cost).
    """
    shape = x.shape
    y0 = x.reshape(shape[0], -1)
    flat = [z.reshape(shape[0], -1) for z in noise]
    ts = torch.tensor([0.0, float(len(noise))], dtype=y0.dtype, device=y0.device)
    ys = torchsde.sdeint_adjoint(
        sde, y0, ts, bm=GridBrownian(flat), method="euler", dt=1.0, adjoint_params=()
    )
    return ys[-1].view(shape)


def ddpm_sequence(max_timestep: int, steps: int) -> list[int]:
    """Lee & Kim's timestep sequence: ``[k - 1 for k in range(stride, max_t + 1, stride)]``, stride = max_t // steps."""
    if steps < 1 or max_timestep < 1 or steps > max_timestep:
        raise HarnessError(f"need 1 <= steps <= max_timestep, got steps={steps}, max_timestep={max_timestep}")
    stride = max_timestep // steps
    return [k - 1 for k in range(stride, max_timestep + 1, stride)]


class DDPMSampler(nn.Module):
    """Ancestral DDPM (eta = 1) / DDIM (eta = 0) updates over a timestep sequence (spec 2.1b).

    For a pair (i -> j), j the previous element (or -1, with alpha_bar_{-1} = 1)::

        x0 = (x - sqrt(1 - a_i) eps) / sqrt(a_i)
        c1 = eta sqrt((1 - a_i/a_j)(1 - a_j)/(1 - a_i));  c2 = sqrt(1 - a_j - c1^2)
        x  <- sqrt(a_j) x0 + c1 z + c2 eps
    """

    def __init__(self, eps_net: nn.Module, seq: list[int], eta: float = 1.0):
        super().__init__()
        self.eps_net = eps_net
        self.seq = list(seq)
        self.eta = float(eta)
        ab = discrete_alpha_bar().tolist()
        self._ab = lambda n: 1.0 if n < 0 else ab[n]
        # (i, j) pairs in the order they are applied
        nxt = [-1] + self.seq[:-1]
        self.pairs = list(zip(reversed(self.seq), reversed(nxt), strict=True))

    def step(self, x: torch.Tensor, z: torch.Tensor, k: int) -> torch.Tensor:
        i, j = self.pairs[k]
        a_i, a_j = self._ab(i), self._ab(j)
        eps = self.eps_net(x, torch.full((x.shape[0],), float(i), dtype=x.dtype, device=x.device))
        x0 = (x - math.sqrt(1.0 - a_i) * eps) / math.sqrt(a_i)
        c1 = self.eta * math.sqrt((1.0 - a_i / a_j) * (1.0 - a_j) / (1.0 - a_i))
        c2 = math.sqrt(max(1.0 - a_j - c1 * c1, 0.0))
        return math.sqrt(a_j) * x0 + c1 * z + c2 * eps


def integrate_steps(stepper: nn.Module, x: torch.Tensor, noise: list[torch.Tensor], *, checkpoint: bool) -> torch.Tensor:
    """Apply ``stepper.step(x, z, k)`` for each noise tensor, checkpointed (:func:`checkpointed_steps`) when a graph is built."""
    return checkpointed_steps(stepper.step, x, noise, checkpoint=checkpoint)


@contextlib.contextmanager
def strict_fp32(device: torch.device) -> Iterator[None]:
    """No autocast and no TF32 inside (COUP's paper insists on plain float32)."""
    if device.type != "cuda":
        with torch.autocast(device_type=device.type, enabled=False):
            yield
        return
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device_type="cuda", enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# --------------------------------------------------------------------------- base defense
class DiffusionDefense(TransferMixin, Defense):
    """Common base of the diffusion purifiers: backbone binding and per-dataset defaults.

    Config fields whose value is ``None`` mean "the dataset's default": :meth:`setup`
    replaces them by ``DATASET_DEFAULTS[ctx.dataset]`` (else ``DEFAULTS``, the papers'
    CIFAR-10 values), so the effective values are what :meth:`identity` and the job
    record hold, and ``setup_notes`` lists the CPU-scaled ones for the run to print.
    A user's ``--set`` always wins. Without :meth:`setup` (e.g. unit tests that inject a
    backbone with :meth:`use_backbone`), ``DEFAULTS`` apply. The backbone is the one of
    ``trained_on`` (default: the evaluated dataset), behind an adapter when its images
    differ from the data's (:mod:`defenses._transfer`).
    """

    stochastic = True
    #: Official (CIFAR-10) values of the ``None``-able config fields.
    DEFAULTS: ClassVar[dict[str, Any]] = {}
    #: Per-dataset overrides of :attr:`DEFAULTS` (CPU-scaled settings of the embedded datasets).
    DATASET_DEFAULTS: ClassVar[dict[str, dict[str, Any]]] = {}
    #: cells that differentiate through the purifier cost ~100 purifier NFEs per gradient per
    #: EOT sample: 64 examples unless --n-examples says otherwise (spec section 6 suggests
    #: 64-128; 64 keeps the digits adaptive cell under 5 minutes on a 2-core CPU)
    default_examples: ClassVar[dict[str, int]] = {CostLevel.GRADIENT.value: 64}

    def __init__(self, config=None):
        super().__init__(config)
        check_model_path(getattr(self.config, "model_path", None), getattr(self.config, "backbone", "unet2d"))
        self.eps_net: EpsNet | None = None
        self.backbone_source: dict[str, Any] | None = None
        self.image_shape: tuple[int, int, int] | None = None
        self.nfe_per_call = self._count_nfe(self.effective_config())

    # -- config
    def effective_config(self):
        """The config with ``None`` fields filled from :attr:`DEFAULTS` (what purify uses)."""
        fill = {k: v for k, v in self.DEFAULTS.items() if getattr(self.config, k) is None}
        return dataclasses.replace(self.config, **fill) if fill else self.config

    def _resolve_for(self, dataset: str) -> None:
        per = self.DATASET_DEFAULTS.get(dataset, {})
        fill, notes = {}, []
        for k, v in self.DEFAULTS.items():
            if getattr(self.config, k) is None:
                fill[k] = per.get(k, v)
                if k in per and per[k] != v:
                    notes.append(f"{k}={per[k]} (dataset default for '{dataset}'; paper value {v})")
        if fill:
            self.config = dataclasses.replace(self.config, **fill)
        self.setup_notes = [f"{self.name}: " + "; ".join(notes)] if notes else []
        self.nfe_per_call = self._count_nfe(self.config)

    def _count_nfe(self, cfg) -> int:  # pragma: no cover - overridden
        return 0

    # -- backbone
    def use_backbone(self, net: nn.Module, source: dict[str, Any] | None = None) -> "DiffusionDefense":
        """Bind a noise-prediction network directly (tests, notebooks); :meth:`setup` then keeps it."""
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        self.eps_net = EpsNet(net)
        self.backbone_source = dict(source or {"kind": "injected", "name": type(net).__name__, "sha256": None})
        # Format-independent identity of the weights (the same UNet as .bin, .safetensors or
        # a shipped .pt gives the same job hash; any changed weight gives another).
        self.backbone_source["weights_sha256"] = _state_sha256(net)
        return self

    def setup(self, ctx: SetupContext) -> None:
        self._resolve_for(ctx.dataset)
        self.image_shape = tuple(ctx.image_shape)
        if self.eps_net is None:
            cfg = self.config
            net, source = load_backbone(
                self.training_dataset(ctx), getattr(cfg, "model_path", None), ctx.weights_dir, getattr(cfg, "backbone", "unet2d")
            )
            self.use_backbone(net, source)
        # the backbone says how its authors resized to it (DiffPure's ImageNet model: bilinear without antialiasing)
        antialias = bool(getattr(self.eps_net.net, "resize_antialias", True))
        self.bind_transfer(ctx, backbone_shape(self.eps_net.net, self.image_shape), antialias=antialias)
        self.to(ctx.device)

    def identity(self) -> dict[str, Any]:
        out = super().identity()
        src = self.backbone_source
        out["backbone"] = None if src is None else src["weights_sha256"]
        if src is not None and src.get("identity"):
            out["backbone_source"] = src["identity"]  # an NCSN++ checkpoint: file sha256, weights used, architecture, code
        return out

    def _net(self) -> EpsNet:
        if self.eps_net is None:
            raise HarnessError(f"defense '{self.name}' has no diffusion backbone: call setup(ctx) first (or use_backbone)")
        return self.eps_net
