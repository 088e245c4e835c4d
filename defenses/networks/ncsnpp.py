"""The score-SDE NCSN++ / DDPM++ network (Song et al., ICLR 2021, arXiv 2011.13456) and its checkpoints.

Every published DiffPure / COUP / Lee & Kim / DiffHammer CIFAR-10 number comes from the
score-SDE "DDPM++ deep continuous" VP model (``checkpoint_8.pth``,
:data:`DDPMPP_DEEP_CONTINUOUS`), and the CIFAR-10 consistency model of CMAP is an
NCSN++ too (:data:`CM_CIFAR10`). :class:`NCSNpp` builds either from the reference config
fields (:class:`NCSNppConfig`): positional or Gaussian-Fourier time embedding, BigGAN
residual blocks with plain or FIR up/down sampling, attention at the listed
resolutions, skip rescaling, the progressive input (``none``/``input_skip``/``residual``)
and output (``none``/``output_skip``/``residual``) pyramids, conditional on time or not.
Its state_dict keys, shapes, dtypes and order are the reference's (``sigmas`` buffer
first, then the flat ``all_modules`` list), so the authors' files load with
``strict=True`` and an EMA's ``shadow_params`` zip with :meth:`~torch.nn.Module.parameters`.

**Forward-call conventions** (``shared/fixtures/ncsnpp/README.md``):

- DDPM++ continuous (VP): ``eps = net(x, 999 t)`` with x in [-1, 1] (``centered``: no
  ``2x - 1`` inside), t in [0, 1] as a float, not rounded; the output is the noise
  prediction, the score is ``-eps / sqrt(1 - alpha_bar(t))``. Lee & Kim and DiffHammer
  call the same network with the DDPM step index i in place of 999 t. This is the
  ``eps_theta(x, timesteps)`` interface of :class:`defenses._diffusion.EpsNet`, so the
  purifiers' samplers take the network unchanged.
- Consistency model (LYMDLUT's PyTorch port of openai/consistency_models_cifar10):
  ``F = net(x / sqrt(t^2 + 0.25), 0.25 log t)``, the time fed straight to the Fourier
  features (``fourier_log_time=False``; score_sde_pytorch takes the log itself);
  :class:`defenses._consistency.ConsistencyFunction` adds the ``c_skip`` / ``c_out`` parameterisation.

Checkpoints (all read with ``torch.load(..., weights_only=True)``):

- :func:`load_score_sde_checkpoint`: a file as score_sde_pytorch's ``save_checkpoint``
  writes it (``model``, ``ema``, ``optimizer``, ``step``); the weights are the EMA
  ``shadow_params`` copied by position, as DiffPure does (``ema.copy_to``). A plain
  state_dict (or ``{'model': state_dict}``, FlowPure's EMA copy) loads strictly.
- :func:`load_cm_ncsnpp`: a converted consistency-model state_dict (no prefix).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from defenses.networks import layers as L
from harness.core.env import _file_digest
from harness.core.registry import HarnessError, MissingFileError, first_line

_ACTIVATIONS = {"swish": nn.SiLU, "elu": nn.ELU, "relu": nn.ReLU, "lrelu": lambda: nn.LeakyReLU(negative_slope=0.2)}


@dataclass(frozen=True)
class NCSNppConfig:
    """The reference config fields NCSN++ reads (``config.data.*`` and ``config.model.*``).

    ``centered``: inputs are already in [-1, 1] (False: the forward maps x -> 2x - 1).
    ``fourier_log_time``: the Fourier embedding takes ``log(time_cond)`` (score_sde_pytorch)
    rather than ``time_cond`` itself (the consistency-model port). ``sigma_min``,
    ``sigma_max`` and ``num_scales`` only fill the ``sigmas`` buffer (read with
    ``scale_by_sigma``). ``resamp_with_conv`` and ``init_scale`` are kept for fidelity:
    BigGAN blocks do not read the first, and the second is an initialisation detail.
    """

    image_size: int = 32
    num_channels: int = 3
    centered: bool = True
    nf: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 8
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    resamp_with_conv: bool = True
    conditional: bool = True
    fir: bool = False
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
    skip_rescale: bool = True
    resblock_type: str = "biggan"
    progressive: str = "none"
    progressive_input: str = "none"
    progressive_combine: str = "sum"
    attention_type: str = "ddpm"
    embedding_type: str = "positional"
    init_scale: float = 0.0
    fourier_scale: float = 16.0
    conv_size: int = 3
    nonlinearity: str = "swish"
    normalization: str = "GroupNorm"
    scale_by_sigma: bool = False
    sigma_min: float = 0.01
    sigma_max: float = 50.0
    num_scales: int = 1000
    fourier_log_time: bool = True

    def __post_init__(self):
        for name, allowed in (
            ("resblock_type", ("biggan",)), ("progressive", ("none", "output_skip", "residual")),
            ("progressive_input", ("none", "input_skip", "residual")), ("progressive_combine", ("sum", "cat")),
            ("attention_type", ("ddpm",)), ("embedding_type", ("positional", "fourier")),
            ("nonlinearity", tuple(_ACTIVATIONS)), ("normalization", ("GroupNorm",)), ("conv_size", (3,)),
        ):
            if getattr(self, name) not in allowed:
                choices = ", ".join(map(str, allowed))
                raise HarnessError(f"NCSN++: {name}={getattr(self, name)!r} is not supported (choose from {choices})")
        if self.image_size % 2 ** (len(self.ch_mult) - 1):
            raise HarnessError(f"NCSN++: image_size={self.image_size} is not divisible by 2^{len(self.ch_mult) - 1}")

    # what defenses._diffusion.check_backbone_fits reads (the diffusers UNet2DModel names)
    @property
    def in_channels(self) -> int:
        """Image channels (``data.num_channels``)."""
        return self.num_channels

    @property
    def sample_size(self) -> int:
        """Image side (``data.image_size``)."""
        return self.image_size

    @classmethod
    def from_reference(cls, config: Mapping[str, Any], *, flavour: str = "score_sde") -> "NCSNppConfig":
        """From a reference config as nested dicts (``{"data": {...}, "model": {...}, ...}``, ml_collections dumped).

        ``flavour="score_sde"``: score_sde_pytorch's NCSNpp (reads ``data.centered`` and
        ``model.scale_by_sigma``; log of the Fourier time). ``flavour="cm"``: LYMDLUT's
        consistency-model port (no centring, no sigma scaling, Fourier time as given).
        """
        if flavour not in ("score_sde", "cm"):
            raise HarnessError(f"NCSN++: unknown config flavour {flavour!r} (score_sde or cm)")
        data, model = dict(config["data"]), dict(config["model"])
        values: dict[str, Any] = {"image_size": data["image_size"], "num_channels": data["num_channels"]}
        for f in dataclasses.fields(cls):
            if f.name in model:
                v = model[f.name]
                values[f.name] = tuple(v) if isinstance(v, (list, tuple)) else v
        if flavour == "score_sde":
            values["centered"] = bool(data["centered"])
        else:
            values.update(centered=True, scale_by_sigma=False, fourier_log_time=False)
        for k in ("dropout", "init_scale", "fourier_scale", "sigma_min", "sigma_max"):
            values[k] = float(values[k])
        return cls(**values)


#: ``configs/vp/cifar10_ddpmpp_deep_continuous.py`` (= DiffPure's ``configs/cifar10.yml``): the model of ``checkpoint_8.pth``.
DDPMPP_DEEP_CONTINUOUS = NCSNppConfig()
#: ``configs/cifar10_ve_cd.py`` of openai/consistency_models_cifar10 (CD-LPIPS, CMAP's CIFAR-10 model), LYMDLUT's port.
CM_CIFAR10 = NCSNppConfig(
    ch_mult=(2, 2, 2), num_res_blocks=4, dropout=0.0, fir=True, progressive_input="residual", embedding_type="fourier",
    sigma_min=0.02, sigma_max=100.0, num_scales=18, fourier_log_time=False,
)


class NCSNpp(nn.Module):
    """NCSN++ / DDPM++ (score_sde_pytorch ``models/ncsnpp.py``), configured by :class:`NCSNppConfig`.

    The modules form one flat ``all_modules`` list that :meth:`forward` consumes in order
    (the reference's layout; the key names follow from it).

    Shape:
        x: (B, C, H, W) in the model's data space; time_cond: (B,) (or a scalar) -> (B, C, H, W).
    """

    def __init__(self, config: NCSNppConfig = DDPMPP_DEEP_CONTINUOUS):
        super().__init__()
        self.config = cfg = config
        self.act = act = _ACTIVATIONS[cfg.nonlinearity]()
        sigmas = np.exp(np.linspace(np.log(cfg.sigma_max), np.log(cfg.sigma_min), cfg.num_scales))
        self.register_buffer("sigmas", torch.from_numpy(sigmas))  # float64, as the reference
        nf, n_levels = cfg.nf, len(cfg.ch_mult)
        self.all_resolutions = [cfg.image_size // 2**i for i in range(n_levels)]
        temb_dim = 4 * nf
        block = functools.partial(
            L.ResnetBlockBigGANpp, act=act, dropout=cfg.dropout, fir=cfg.fir, fir_kernel=cfg.fir_kernel,
            skip_rescale=cfg.skip_rescale, temb_dim=temb_dim,
        )
        attn = functools.partial(L.AttnBlockpp, skip_rescale=cfg.skip_rescale)
        fir = dict(fir=cfg.fir, fir_kernel=cfg.fir_kernel)

        m: list[nn.Module] = []
        if cfg.embedding_type == "fourier":
            m.append(L.GaussianFourierProjection(embedding_size=nf, scale=cfg.fourier_scale))
            embed_dim = 2 * nf
        else:
            embed_dim = nf
        if cfg.conditional:
            m += [nn.Linear(embed_dim, temb_dim), nn.Linear(temb_dim, temb_dim)]
        channels = cfg.num_channels
        m.append(L.conv3x3(channels, nf))
        hs_c, in_ch, pyr_ch = [nf], nf, channels
        for i in range(n_levels):  # down path
            for _ in range(cfg.num_res_blocks):
                out_ch = nf * cfg.ch_mult[i]
                m.append(block(in_ch=in_ch, out_ch=out_ch))
                in_ch = out_ch
                if self.all_resolutions[i] in cfg.attn_resolutions:
                    m.append(attn(channels=in_ch))
                hs_c.append(in_ch)
            if i != n_levels - 1:
                m.append(block(in_ch=in_ch, down=True))
                if cfg.progressive_input == "input_skip":
                    m.append(L.Combine(dim1=pyr_ch, dim2=in_ch, method=cfg.progressive_combine))
                    if cfg.progressive_combine == "cat":
                        in_ch *= 2
                elif cfg.progressive_input == "residual":
                    m.append(L.Downsample(in_ch=pyr_ch, out_ch=in_ch, with_conv=True, **fir))
                    pyr_ch = in_ch
                hs_c.append(in_ch)
        in_ch = hs_c[-1]
        m += [block(in_ch=in_ch), attn(channels=in_ch), block(in_ch=in_ch)]  # middle
        pyramid_ch = 0
        for i in reversed(range(n_levels)):  # up path
            for _ in range(cfg.num_res_blocks + 1):
                out_ch = nf * cfg.ch_mult[i]
                m.append(block(in_ch=in_ch + hs_c.pop(), out_ch=out_ch))
                in_ch = out_ch
            if self.all_resolutions[i] in cfg.attn_resolutions:
                m.append(attn(channels=in_ch))
            if cfg.progressive != "none":
                if i == n_levels - 1 or cfg.progressive == "output_skip":
                    m.append(L.group_norm(in_ch))
                    m.append(L.conv3x3(in_ch, channels if cfg.progressive == "output_skip" else in_ch))
                    pyramid_ch = channels if cfg.progressive == "output_skip" else in_ch
                else:  # residual, below the top level
                    m.append(L.Upsample(in_ch=pyramid_ch, out_ch=in_ch, with_conv=True, **fir))
                    pyramid_ch = in_ch
            if i != 0:
                m.append(block(in_ch=in_ch, up=True))
        assert not hs_c
        if cfg.progressive != "output_skip":
            m += [L.group_norm(in_ch), L.conv3x3(in_ch, channels)]
        self.all_modules = nn.ModuleList(m)
        # parameter-free resamplers of the pyramids (no keys; attributes of the root in the reference too)
        if cfg.progressive == "output_skip":
            self.pyramid_upsample = L.Upsample(in_ch=channels, with_conv=False, **fir)
        if cfg.progressive_input == "input_skip":
            self.pyramid_downsample = L.Downsample(in_ch=channels, with_conv=False, **fir)

    def _time_embedding(self, modules, time_cond: torch.Tensor) -> torch.Tensor | None:
        cfg = self.config
        if cfg.embedding_type == "fourier":
            temb = next(modules)(torch.log(time_cond) if cfg.fourier_log_time else time_cond)
        elif cfg.conditional:
            # float32 as in the reference, then the dtype of the first Linear (float64 models)
            temb = L.positional_embedding(time_cond, cfg.nf).to(self.all_modules[0].weight.dtype)
        if not cfg.conditional:
            return None
        temb = next(modules)(temb)
        return next(modules)(self.act(temb))

    def _norm_act_conv(self, modules, h: torch.Tensor) -> torch.Tensor:
        norm, conv = next(modules), next(modules)  # in list order (a nested next() call would take them reversed)
        return conv(self.act(norm(h)))

    def forward(self, x: torch.Tensor, time_cond: torch.Tensor | float) -> torch.Tensor:
        cfg = self.config
        time_cond = torch.as_tensor(time_cond, device=x.device)
        if time_cond.ndim == 0:
            time_cond = time_cond.expand(x.shape[0])
        modules = iter(self.all_modules)
        temb = self._time_embedding(modules, time_cond)
        if not cfg.centered:
            x = 2 * x - 1.0
        n_levels = len(cfg.ch_mult)
        pyramid_in = x if cfg.progressive_input != "none" else None

        hs = [next(modules)(x)]
        for i in range(n_levels):
            for _ in range(cfg.num_res_blocks):
                h = next(modules)(hs[-1], temb)
                if h.shape[-1] in cfg.attn_resolutions:
                    h = next(modules)(h)
                hs.append(h)
            if i != n_levels - 1:
                h = next(modules)(hs[-1], temb)
                if cfg.progressive_input == "input_skip":
                    pyramid_in = self.pyramid_downsample(pyramid_in)
                    h = next(modules)(pyramid_in, h)
                elif cfg.progressive_input == "residual":
                    pyramid_in = next(modules)(pyramid_in)
                    pyramid_in = (pyramid_in + h) / math.sqrt(2.0) if cfg.skip_rescale else pyramid_in + h
                    h = pyramid_in
                hs.append(h)

        h = next(modules)(hs[-1], temb)
        h = next(modules)(h)
        h = next(modules)(h, temb)

        pyramid = None
        for i in reversed(range(n_levels)):
            for _ in range(cfg.num_res_blocks + 1):
                h = next(modules)(torch.cat([h, hs.pop()], dim=1), temb)
            if h.shape[-1] in cfg.attn_resolutions:
                h = next(modules)(h)
            if cfg.progressive != "none":
                if i == n_levels - 1:
                    pyramid = self._norm_act_conv(modules, h)
                elif cfg.progressive == "output_skip":
                    pyramid = self.pyramid_upsample(pyramid) + self._norm_act_conv(modules, h)
                else:  # residual
                    pyramid = next(modules)(pyramid)
                    pyramid = (pyramid + h) / math.sqrt(2.0) if cfg.skip_rescale else pyramid + h
                    h = pyramid
            if i != 0:
                h = next(modules)(h, temb)
        assert not hs

        if cfg.progressive == "output_skip":
            h = pyramid
        else:
            h = self._norm_act_conv(modules, h)
        if next(modules, None) is not None:
            raise RuntimeError("NCSN++ forward left modules unused (the module list does not match the config)")
        if cfg.scale_by_sigma:
            # the reference divides by the float64 sigmas, which would promote the output to float64
            used = self.sigmas[time_cond.long()] if cfg.embedding_type == "positional" else time_cond
            h = h / used.to(h.dtype).reshape(-1, *([1] * (h.ndim - 1)))
        return h


# --------------------------------------------------------------------------- parameterisations
# --------------------------------------------------------------------------- checkpoints
#: Where DiffPure's CIFAR-10 score model comes from (spec section 1; linked from the NVlabs/DiffPure README).
SCORE_SDE_SOURCE = (
    "Google Drive id 16_-Ahc6ImZV5ClUc0vM5Iivf8OJ1VSif, linked from the NVlabs/DiffPure README"
)


def missing_checkpoint(path: str | Path) -> MissingFileError:
    """The one-line error for a score-SDE checkpoint path that names nothing: where it goes and where to get it."""
    p = Path(path)
    where = f"'{p}'" if p.is_absolute() else f"'{p}' (= {p.absolute()})"
    return MissingFileError(
        f"score-SDE checkpoint {where} does not exist: put DiffPure's CIFAR-10 checkpoint_8.pth there ({SCORE_SDE_SOURCE})"
    )


def network_code_digest() -> dict[str, str]:
    """sha256 of this module's and the layers module's source (enters a job identity with the weights)."""
    return {Path(f).name: _file_sha256(f) for f in (__file__, L.__file__)}


def _file_sha256(path: str | Path) -> str:
    # cached per (path, mtime): a grid resolves every cell before running it, and checkpoint_8.pth is 1.7 GB
    p = str(Path(path).resolve())
    return _file_digest(p, os.stat(p).st_mtime_ns)


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``, memory-mapped where the file allows it (only the tensors used are read)."""
    for mmap in (True, False):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as exc:  # pickle / zip / weights_only errors of a foreign or truncated file: one line
            if mmap and isinstance(exc, RuntimeError) and "mmap" in str(exc):
                continue  # a legacy (non-zip) file cannot be mapped
            raise HarnessError(f"cannot load checkpoint '{path}': {first_line(exc)}") from None
    raise AssertionError("unreachable")


def strip_module_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` prefix ``torch.nn.DataParallel`` puts on every key (score_sde_pytorch's ``create_model``)."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())


def load_state_strict(net: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """``net.load_state_dict(state, strict=True)`` with a one-line error naming the first missing/unexpected/mismatched keys."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if keys:
                parts.append(f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
        raise HarnessError(f"'{path.name}' does not fit the NCSN++ ({type(net).__name__}, nf={net.config.nf}): " + "; ".join(parts))
    net.load_state_dict(state, strict=True)


def copy_ema(net: nn.Module, shadow: Sequence[torch.Tensor], path: Path) -> None:
    """Copy an EMA's ``shadow_params`` into the trainable parameters, by position (score_sde ``ema.copy_to``).

    The reference zips silently; here the count and every shape must match, so a file
    of another architecture is refused instead of half-loaded.
    """
    params = [(k, p) for k, p in net.named_parameters() if p.requires_grad]
    if len(shadow) != len(params):
        raise HarnessError(
            f"'{path.name}': its EMA has {len(shadow)} shadow parameters, "
            f"the NCSN++ (nf={net.config.nf}) has {len(params)} trainable ones"
        )
    for i, ((name, p), s) in enumerate(zip(params, shadow)):
        if not torch.is_tensor(s) or tuple(s.shape) != tuple(p.shape):
            got = tuple(s.shape) if torch.is_tensor(s) else type(s).__name__
            raise HarnessError(f"'{path.name}': EMA shadow parameter {i} is {got}, the NCSN++ expects {tuple(p.shape)} ({name})")
    with torch.no_grad():
        for (_, p), s in zip(params, shadow):
            p.copy_(s)


def copy_frozen(net: nn.Module, model: Any, path: Path) -> None:
    """The parameters an EMA does not track (requires_grad=False: the Fourier ``W``) from the checkpoint's ``model`` entry.

    score_sde_pytorch restores ``model`` first and lets ``ema.copy_to`` overwrite the
    trainable parameters; the DDPM++ has no frozen parameter, so nothing is read then.
    """
    frozen = [k for k, p in net.named_parameters() if not p.requires_grad]
    if not frozen:
        return
    state = strip_module_prefix(model) if _is_state_dict(model) else {}
    bad = [k for k in frozen if k not in state or tuple(state[k].shape) != tuple(net.get_parameter(k).shape)]
    if bad:
        raise HarnessError(f"'{path.name}': the fixed parameter(s) {', '.join(bad)} are not in its EMA and not in its 'model' entry")
    with torch.no_grad():
        for k in frozen:
            net.get_parameter(k).copy_(state[k])


def architecture_beside(path: Path, default: NCSNppConfig, flavour: str) -> tuple[NCSNppConfig, str | None]:
    """The architecture of a checkpoint: ``<stem>.json`` beside it (a reference config dump), else ``default``.

    The JSON holds the score_sde / consistency-model config as nested dicts, either bare
    (``{"data": {...}, "model": {...}}``) or under ``"config"`` (the layout of
    ``shared/fixtures/ncsnpp/*.config.json``). Returns the config and the JSON's file name.
    """
    side = path.with_suffix(".json")
    if not side.is_file():
        return default, None
    try:
        doc = json.loads(side.read_text())
        return NCSNppConfig.from_reference(doc.get("config", doc), flavour=flavour), side.name
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise HarnessError(f"'{side}' is not an NCSN++ config (data/model sections of a score_sde config): {exc}") from None


def load_score_sde_checkpoint(path: str | Path, config: NCSNppConfig | None = None) -> tuple[NCSNpp, dict[str, Any]]:
    """Load a score_sde_pytorch checkpoint (DiffPure's ``checkpoint_8.pth``) into an :class:`NCSNpp`.

    - ``{'model', 'ema', 'optimizer', 'step'}`` (``save_checkpoint``): the weights are
      ``ema['shadow_params']`` copied by position into the trainable parameters, as
      DiffPure does (``restore_checkpoint`` then ``ema.copy_to``); ``model`` (the raw
      training weights, ``module.``-prefixed) is not used, and neither is ``optimizer``.
    - a plain state_dict, or ``{'model': state_dict}`` without ``ema`` (FlowPure stores
      the EMA weights so): loaded with ``strict=True`` after stripping ``module.``.

    The architecture is ``config``, else the config in ``<stem>.json`` beside the file
    (:func:`architecture_beside`), else :data:`DDPMPP_DEEP_CONTINUOUS`.

    Returns:
        ``(net, source)`` with ``net`` in eval mode; ``source`` has ``kind``, ``name``,
        ``sha256`` (of the file) and ``identity`` (file digest, weights used, architecture,
        network code digest), which enters the job identity.

    Raises:
        HarnessError: the file is missing, unreadable or does not fit the architecture.
    """
    return _load(Path(path).expanduser(), config, DDPMPP_DEEP_CONTINUOUS, "score_sde", "score-sde-checkpoint")


def load_cm_ncsnpp(path: str | Path, config: NCSNppConfig | None = None) -> tuple[NCSNpp, dict[str, Any]]:
    """Load a consistency-model NCSN++ state_dict (LYMDLUT's converted CIFAR-10 checkpoints) strictly.

    A plain state_dict (``module.`` stripped) or ``{'model': state_dict}``; the fixed
    Fourier frequencies ``all_modules.0.W`` come from the file like every other tensor
    (an EMA ``shadow_params`` list would leave them out, so that layout is refused). The
    architecture is ``config``, else ``<stem>.json`` beside the file, else
    :data:`CM_CIFAR10`. Wrap the result in :class:`defenses._consistency.ConsistencyFunction` for ``f(x, t)``.

    Returns:
        ``(net, source)`` as :func:`load_score_sde_checkpoint`; ``net`` in eval mode.
    """
    return _load(Path(path).expanduser(), config, CM_CIFAR10, "cm", "cm-ncsnpp")


def _load(p: Path, config: NCSNppConfig | None, default: NCSNppConfig, flavour: str, kind: str) -> tuple[NCSNpp, dict[str, Any]]:
    if p.is_dir():
        raise HarnessError(f"'{p}' is a folder: an NCSN++ backbone is one checkpoint file (e.g. checkpoint_8.pth)")
    if not p.is_file():
        if flavour == "score_sde":
            raise missing_checkpoint(p)
        raise HarnessError(f"consistency-model checkpoint '{p}' does not exist")
    side = None
    if config is None:
        config, side = architecture_beside(p, default, flavour)
    ckpt = _torch_load(p)
    net = NCSNpp(config)
    info: dict[str, Any] = {"architecture_file": side}
    try:
        ema = ckpt.get("ema") if isinstance(ckpt, Mapping) else None
        if flavour == "score_sde" and isinstance(ema, Mapping) and "shadow_params" in ema:
            copy_ema(net, list(ema["shadow_params"]), p)
            copy_frozen(net, ckpt.get("model"), p)
            info.update(weights="ema", ema_num_updates=_plain(ema.get("num_updates")), step=_plain(ckpt.get("step")))
        elif _is_state_dict(ckpt) or (isinstance(ckpt, Mapping) and _is_state_dict(ckpt.get("model"))):
            load_state_strict(net, strip_module_prefix(ckpt if _is_state_dict(ckpt) else ckpt["model"]), p)
            info.update(weights="state_dict")
        else:
            keys = sorted(map(str, ckpt)) if isinstance(ckpt, Mapping) else type(ckpt).__name__
            expected = "a state_dict" if flavour == "cm" else "a score_sde checkpoint (model, ema, optimizer, step) or a state_dict"
            raise HarnessError(f"'{p.name}' holds {keys}, not {expected}")
    except HarnessError as exc:
        json_name = p.with_suffix(".json").name
        hint = f"architecture from {side}" if side else f"another architecture? put its config beside it as {json_name}"
        raise HarnessError(f"{exc} ({hint})") from None
    return net.eval(), _source(kind, p, config, info)


def _plain(v: Any) -> Any:
    return v.item() if torch.is_tensor(v) and v.numel() == 1 else v


def _source(kind: str, path: Path, config: NCSNppConfig, info: dict[str, Any]) -> dict[str, Any]:
    digest = _file_sha256(path)
    identity = {
        "file_sha256": digest, **info, "arch": "ncsnpp", "config": dataclasses.asdict(config), "code": network_code_digest(),
    }
    return {"kind": kind, "name": path.name, "sha256": digest, "identity": identity}
