"""The guided-diffusion UNet (Dhariwal & Nichol, NeurIPS 2021, arXiv 2105.05233) and its ImageNet checkpoint.

DiffPure's ImageNet numbers (and Lee & Kim's, and MAEP's DiffPure* baseline) come from
OpenAI's unconditional 256x256 model ``256x256_diffusion_uncond.pt``, which DiffPure
builds from ``model_and_diffusion_defaults()`` updated with its ``configs/imagenet.yml``
(:data:`UNCOND_256`). :class:`GuidedDiffusionUNet` is that network written from its
description (``shared/fixtures/guided_diffusion/README.md``), configured by
:class:`GuidedDiffusionConfig`:

- a sinusoidal time embedding (cos first, frequencies ``exp(-ln(10^4) k / half)``) fed
  as the raw step index 0..999, then ``Linear-SiLU-Linear`` to 4 x model_channels;
- residual blocks with scale-shift norm (``GN(h) (1 + scale) + shift``, scale first),
  up/down-sampling inside the block (nearest x2 / 2x2 mean of both branches after
  GN+SiLU, no convolution) where ``resblock_updown``, and no residual rescaling;
- attention at the listed downsampling factors and in the middle block, heads of
  ``num_head_channels`` channels, the *legacy* QKV layout (the conv's output channels
  are [q|k|v] per head) and the softmax in float32;
- the first convolution's output is a skip too; the decoder concatenates ``[h, skip]``;
- a learned-variance head: 6 output channels, eps first (DiffPure's SDE path uses
  channels 0-2 only).

Its state_dict keys, shapes and order are OpenAI's (``time_embed.*``,
``input_blocks.N.M.*``, ``middle_block.*``, ``output_blocks.N.M.*``, ``out.*``), so the
released file loads with ``strict=True``.

**fp16** (DiffPure's ImageNet mode, ``use_fp16``): :meth:`GuidedDiffusionUNet.convert_to_fp16`
casts the convolutions of the encoder, middle block and decoder to float16, and the
activations there follow; GroupNorm statistics, the attention softmax, the time
embedding and the output head stay float32, and the output is float32. Without
``use_fp16`` the network computes in the dtype of its parameters (float32, or float64
after ``.double()``: every internal up-cast is to at least float32, never down).

**Gradients.** The reference wraps every attention block in a custom checkpoint
function, through which a backward pass to the input fails when the parameters are
frozen (``requires_grad_(False)``). Here every block is plain autograd: the input
gradient is formed whatever the parameters' ``requires_grad``, and the purifiers'
solvers checkpoint whole steps themselves.

**Call conventions** (fixture README section 3): the network takes ``(x, t)`` with x in
[-1, 1] and t the step index; DiffPure's reverse SDE calls it at
``floor(1000 t)`` of the float32 time (:meth:`GuidedDiffusionUNet.vp_timesteps`), the
harness's DDPM sampler at the float step index, as guided-diffusion's
``SpacedDiffusion`` does.

:func:`load_guided_diffusion` reads a checkpoint with ``torch.load(..., weights_only=True)``
and checks every key and shape before loading; the architecture is a JSON beside the
file (``<stem>.json``: the guided-diffusion flags, e.g. ``{"use_fp16": false}``) or
:data:`UNCOND_256`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from defenses.networks.ncsnpp import _file_sha256, _torch_load  # the cached file digest; weights_only, memory-mapped load
from harness.core.registry import HarnessError, MissingFileError

#: Where the ImageNet model comes from (guided-diffusion README; linked from the NVlabs/DiffPure README).
CHECKPOINT_NAME = "256x256_diffusion_uncond.pt"
CHECKPOINT_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt"
CHECKPOINT_SOURCE = f"{CHECKPOINT_URL}, linked from the openai/guided-diffusion and NVlabs/DiffPure READMEs"

#: ``channel_mult`` of guided-diffusion's ``create_model`` when the flag is "" (by image size).
_DEFAULT_CHANNEL_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}


@dataclass(frozen=True)
class GuidedDiffusionConfig:
    """The ``UNetModel`` arguments (unconditional, 2-D) of guided-diffusion.

    ``attention_resolutions`` are *downsampling factors* ds (8, 16, 32 for the 256 model:
    feature maps of 32, 16 and 8 pixels), as ``UNetModel`` takes them; the string flag
    of the scripts ("32,16,8") lists feature resolutions (:meth:`from_flags` converts).
    ``num_head_channels`` > 0 fixes the head width (heads = channels / width, and
    ``num_heads`` is then unused); -1 uses ``num_heads`` heads. ``use_fp16``: the loader
    converts the torso to float16 (DiffPure's mode).
    """

    image_size: int = 256
    in_channels: int = 3
    model_channels: int = 256
    out_channels: int = 6
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (8, 16, 32)
    dropout: float = 0.0
    channel_mult: tuple[float, ...] = (1, 1, 2, 2, 4, 4)
    conv_resample: bool = True
    num_heads: int = 4
    num_head_channels: int = 64
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    use_new_attention_order: bool = False
    use_fp16: bool = True

    def __post_init__(self):
        if self.image_size % 2 ** (len(self.channel_mult) - 1):
            raise HarnessError(
                f"guided-diffusion: image_size={self.image_size} is not divisible by 2^{len(self.channel_mult) - 1}"
            )
        for mult in self.channel_mult:
            ch = int(mult * self.model_channels)
            if ch % 32:
                raise HarnessError(f"guided-diffusion: {ch} channels (channel_mult {mult}) do not split into 32 GroupNorm groups")
            if self.num_head_channels > 0 and ch % self.num_head_channels:
                raise HarnessError(f"guided-diffusion: {ch} channels do not split into heads of {self.num_head_channels}")

    # what defenses._diffusion.backbone_shape reads (the diffusers UNet2DModel names)
    @property
    def sample_size(self) -> int:
        """Image side."""
        return self.image_size

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any], base: "GuidedDiffusionConfig | None" = None) -> "GuidedDiffusionConfig":
        """From guided-diffusion's script flags (``create_model``'s arguments, as in ``configs/imagenet.yml``).

        Flags not given keep ``base`` (default :data:`UNCOND_256`), so ``{"use_fp16": false}``
        is the ImageNet model in float32. ``num_channels``, ``learn_sigma`` and the string
        forms of ``attention_resolutions`` / ``channel_mult`` are converted as
        ``create_model`` does; ``class_cond`` must be false (the harness is unconditional).
        """
        base = UNCOND_256 if base is None else base
        flags = dict(flags)
        known = {f.name for f in dataclasses.fields(cls)} | {
            "num_channels", "learn_sigma", "class_cond", "use_checkpoint", "attention_resolutions", "channel_mult",
        }
        unknown = sorted(set(flags) - known)
        if unknown:
            raise HarnessError(f"guided-diffusion: unknown model flag(s) {', '.join(unknown)}")
        if flags.pop("class_cond", False):
            raise HarnessError("guided-diffusion: class_cond=true is not supported (the purifiers use the unconditional model)")
        flags.pop("use_checkpoint", None)  # a training-memory switch; it changes no value
        values: dict[str, Any] = {}
        if "num_channels" in flags:
            values["model_channels"] = int(flags.pop("num_channels"))
        if "learn_sigma" in flags:
            values["out_channels"] = 6 if flags.pop("learn_sigma") else 3
        size = int(flags.get("image_size", base.image_size))
        if "channel_mult" in flags:
            cm = flags.pop("channel_mult")
            if isinstance(cm, str):
                if cm == "":
                    if size not in _DEFAULT_CHANNEL_MULT:
                        raise HarnessError(f"guided-diffusion: no default channel_mult for image_size {size}; give one")
                    cm = _DEFAULT_CHANNEL_MULT[size]
                else:
                    cm = tuple(float(v) if "." in v else int(v) for v in cm.split(","))
            values["channel_mult"] = tuple(cm)
        if "attention_resolutions" in flags:
            ar = flags.pop("attention_resolutions")
            values["attention_resolutions"] = (
                tuple(size // int(r) for r in ar.split(",")) if isinstance(ar, str) else tuple(int(v) for v in ar)
            )
        for k, v in flags.items():
            values[k] = v
        return dataclasses.replace(base, **values)


#: The ImageNet model as DiffPure builds it: ``UNetModel(image_size=256, model_channels=256, out_channels=6,
#: num_res_blocks=2, attention_resolutions=(8, 16, 32), channel_mult=(1, 1, 2, 2, 4, 4), num_head_channels=64,
#: use_scale_shift_norm=True, resblock_updown=True, use_fp16=True)``, 552,814,086 parameters.
UNCOND_256 = GuidedDiffusionConfig()


# --------------------------------------------------------------------------- layers
def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32, C) computed in (at least) float32 and cast back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(_at_least_float32(x)).type(x.dtype)


def timestep_embedding(timesteps: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32, max_period: int = 10000) -> torch.Tensor:
    """``cat[cos(t f), sin(t f)]`` with ``f_k = exp(-ln(max_period) k / (dim/2))``, k = 0..dim/2-1 (cos first).

    ``t`` is the step index as given (no rescaling); computed in ``dtype`` (float32, as
    the reference, or float64 for a float64 model). Shape: (B,) -> (B, dim).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=timesteps.device) / half)
    args = timesteps.to(dtype)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 convolution ``conv`` when ``use_conv``."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels, self.out_channels, self.use_conv = channels, out_channels or channels, use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """/2: a stride-2 3x3 convolution ``op`` when ``use_conv``, else a 2x2 average pool ``op``."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels, self.out_channels, self.use_conv = channels, out_channels or channels, use_conv
        self.op = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """Time-conditioned residual block, optionally resampling both branches (``up`` / ``down``).

    ``in_layers`` = GN, SiLU, conv3x3 (resampling between the SiLU and the conv);
    ``emb_layers`` = SiLU, Linear to 2 x out (scale, shift) or out (added);
    ``out_layers`` = GN, SiLU, Dropout, conv3x3; output ``skip(x) + h`` with the skip an
    identity, or a 1x1 conv (a 3x3 with ``use_conv``) when the width changes.
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_conv: bool = False, use_scale_shift_norm: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        out = out_channels or channels
        self.channels, self.out_channels, self.use_scale_shift_norm = channels, out, use_scale_shift_norm
        self.up, self.down, self.updown = up, down, up or down
        self.in_layers = nn.Sequential(GroupNorm32(32, channels), nn.SiLU(), nn.Conv2d(channels, out, 3, padding=1))
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out if use_scale_shift_norm else out))
        self.out_layers = nn.Sequential(GroupNorm32(32, out), nn.SiLU(), nn.Dropout(p=dropout), nn.Conv2d(out, out, 3, padding=1))
        if out == channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out, 3, padding=1) if use_conv else nn.Conv2d(channels, out, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[1](self.in_layers[0](x))
            h = self.in_layers[2](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            for layer in self.out_layers[1:]:
                h = layer(h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class QKVAttentionLegacy(nn.Module):
    """Multi-head attention on a (B, heads * 3 * ch, T) qkv whose channels are [q|k|v] *per head*."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def split(self, qkv: torch.Tensor, ch: int) -> tuple[torch.Tensor, ...]:
        """q, k, v as (B * heads, ch, T)."""
        bs, _, length = qkv.shape
        return qkv.reshape(bs * self.n_heads, ch * 3, length).split(ch, dim=1)

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = self.split(qkv, ch)
        return _attend(q, k, v, ch).reshape(bs, -1, length)


class QKVAttention(QKVAttentionLegacy):
    """The same with the "new" layout: channels [all q | all k | all v], split before the heads."""

    def split(self, qkv: torch.Tensor, ch: int) -> tuple[torch.Tensor, ...]:
        bs, _, length = qkv.shape
        return tuple(t.reshape(bs * self.n_heads, ch, length) for t in qkv.chunk(3, dim=1))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ch: int) -> torch.Tensor:
    """softmax(q^T k / sqrt(ch)) v with q and k each scaled by ch^-1/4 and the softmax in (at least) float32."""
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = torch.softmax(_at_least_float32(weight), dim=-1).type(weight.dtype)
    return torch.einsum("bts,bcs->bct", weight, v)


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions: ``x + proj_out(attention(qkv(GN(x))))``, no rescaling."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1, use_new_attention_order: bool = False):
        super().__init__()
        self.channels = channels
        self.num_heads = num_heads if num_head_channels == -1 else channels // num_head_channels
        self.norm = GroupNorm32(32, channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.attention = (QKVAttention if use_new_attention_order else QKVAttentionLegacy)(self.num_heads)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(b, c, *spatial)


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that hands the time embedding to the residual blocks it holds."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


# --------------------------------------------------------------------------- the network
class GuidedDiffusionUNet(nn.Module):
    """guided-diffusion's ``UNetModel`` (unconditional, 2-D), built from a :class:`GuidedDiffusionConfig`.

    Shape:
        x: (B, in_channels, image_size, image_size) in [-1, 1]; timesteps: (B,) step
        indices 0..999 (int or float) -> (B, out_channels, image_size, image_size), in x's
        dtype (float32 in fp16 mode).
    """

    #: DiffPure resizes ImageNet images to this network with ``F.interpolate(mode="bilinear", align_corners=False)``,
    #: without antialiasing, both ways (read by the purifiers' adapter, :mod:`defenses._transfer`).
    resize_antialias = False

    def __init__(self, config: GuidedDiffusionConfig = UNCOND_256):
        super().__init__()
        self.config = cfg = config
        mc = cfg.model_channels
        ted = 4 * mc
        heads_up = cfg.num_heads if cfg.num_heads_upsample == -1 else cfg.num_heads_upsample
        self.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))

        def res(ch_in: int, ch_out: int, **kw) -> ResBlock:
            return ResBlock(ch_in, ted, cfg.dropout, out_channels=ch_out, use_scale_shift_norm=cfg.use_scale_shift_norm, **kw)

        def attn(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(ch, heads, cfg.num_head_channels, cfg.use_new_attention_order)

        ch = input_ch = int(cfg.channel_mult[0] * mc)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        chans, ds = [ch], 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(mult * mc))]
                ch = int(mult * mc)
                if ds in cfg.attention_resolutions:
                    layers.append(attn(ch, cfg.num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                down = res(ch, ch, down=True) if cfg.resblock_updown else Downsample(ch, cfg.conv_resample, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch, cfg.num_heads), res(ch, ch))
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + chans.pop(), int(mc * mult))]
                ch = int(mc * mult)
                if ds in cfg.attention_resolutions:
                    layers.append(attn(ch, heads_up))
                if level and i == cfg.num_res_blocks:
                    layers.append(res(ch, ch, up=True) if cfg.resblock_updown else Upsample(ch, cfg.conv_resample, ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(32, ch), nn.SiLU(), nn.Conv2d(input_ch, cfg.out_channels, 3, padding=1))
        for layer in self.zero_initialised_layers():
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def zero_initialised_layers(self) -> list[nn.Module]:
        """The layers the reference builds as zeros (``zero_module``): every residual block's last conv, every
        attention ``proj_out`` and the output conv, so that a fresh network is the identity plus zero.
        """
        layers: list[nn.Module] = []
        for m in self.modules():
            if isinstance(m, ResBlock):
                layers.append(m.out_layers[3])
            elif isinstance(m, AttentionBlock):
                layers.append(m.proj_out)
        return layers + [self.out[2]]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the torso computes in: float16 after :meth:`convert_to_fp16`, else the parameters'."""
        return self.input_blocks[0][0].weight.dtype

    def convert_to_fp16(self) -> "GuidedDiffusionUNet":
        """Cast the convolutions of the encoder, middle block and decoder to float16 (DiffPure's fp16 mode)."""
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            for m in part.modules():
                if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                    m.half()
        return self

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb_dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels, emb_dtype))
        hs = []
        h = x.type(self.dtype)
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h.type(x.dtype))

    @staticmethod
    def vp_timesteps(t: float, x: torch.Tensor) -> torch.Tensor:
        """The step index DiffPure's reverse SDE feeds this network at VP time t: ``floor(1000 t)`` of the float32 t, int64.

        (``(t.float() * 1000).long()``, ``runners/diffpure_sde.py``.) Shape: (B,), one
        index per image of ``x``.
        """
        t32 = torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)
        return (t32 * 1000).long()


# --------------------------------------------------------------------------- checkpoints
def missing_checkpoint(path: str | Path) -> MissingFileError:
    """The one-line error for a guided-diffusion checkpoint that is not there: where it goes and where to get it."""
    p = Path(path)
    where = f"'{p}'" if p.is_absolute() else f"'{p}' (= {p.absolute()})"
    return MissingFileError(
        f"guided-diffusion checkpoint {where} does not exist: put OpenAI's {CHECKPOINT_NAME} there ({CHECKPOINT_SOURCE})"
    )


def network_code_digest() -> dict[str, str]:
    """sha256 of this module's source (enters a job identity beside the checkpoint's sha256)."""
    return {Path(__file__).name: _file_sha256(__file__)}


def architecture_beside(path: Path) -> tuple[GuidedDiffusionConfig, str | None]:
    """The architecture of a checkpoint: ``<stem>.json`` beside it, else :data:`UNCOND_256`.

    The JSON holds guided-diffusion flags, bare (``{"use_fp16": false}``) or under
    ``create_model_arguments`` (the layout of ``shared/fixtures/guided_diffusion/*.config.json``);
    flags not given keep DiffPure's ImageNet values.
    """
    side = path.with_suffix(".json")
    if not side.is_file():
        return UNCOND_256, None
    try:
        doc = json.loads(side.read_text())
        flags = doc.get("create_model_arguments", doc) if isinstance(doc, dict) else None
        if not isinstance(flags, dict):
            raise TypeError("not a JSON object")
        return GuidedDiffusionConfig.from_flags(flags), side.name
    except (ValueError, TypeError, AttributeError) as exc:
        raise HarnessError(f"'{side}' is not a guided-diffusion architecture (a JSON object of model flags): {exc}") from None


def check_state(net: nn.Module, state: Any, path: Path) -> None:
    """Every key and shape of ``state`` against ``net``: a one-line error naming the first mismatch."""
    if not (isinstance(state, Mapping) and state and all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items())):
        what = sorted(map(str, state))[:5] if isinstance(state, Mapping) else type(state).__name__
        raise HarnessError(f"'{path.name}' is not a state_dict of tensors (it holds {what})")
    own = net.state_dict()
    arch = f"guided-diffusion UNet (image_size {net.config.image_size}, model_channels {net.config.model_channels})"
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        counts = ", ".join(f"{len(v)} {w}" for w, v in (("missing", missing), ("unexpected", unexpected),
                                                         ("of another shape", shapes)) if v)
        if missing:
            first = f"first missing key '{missing[0]}'"
        elif unexpected:
            first = f"first unexpected key '{unexpected[0]}'"
        else:
            k = shapes[0]
            first = f"first shape mismatch '{k}': file {tuple(state[k].shape)}, network {tuple(own[k].shape)}"
        hint = f"another architecture? put its flags beside it as {path.with_suffix('.json').name}"
        raise HarnessError(f"'{path.name}' does not fit the {arch}: {first} ({counts} keys; {hint})")


def load_guided_diffusion(path: str | Path, config: GuidedDiffusionConfig | None = None) -> tuple[GuidedDiffusionUNet, dict[str, Any]]:
    """Load a guided-diffusion checkpoint (``256x256_diffusion_uncond.pt`` as OpenAI saves it: a plain state_dict).

    The architecture is ``config``, else ``<stem>.json`` beside the file
    (:func:`architecture_beside`), else :data:`UNCOND_256`. Every key and shape is checked
    (:func:`check_state`) before ``load_state_dict(strict=True)``; then, with
    ``use_fp16``, the torso is converted to float16 (DiffPure's order: load, then convert).

    Returns:
        ``(net, source)`` with ``net`` in eval mode; ``source`` has ``kind``, ``name``,
        ``sha256`` (of the file) and ``identity`` (file digest, architecture, the JSON's
        name, network code digest), which enters the job identity.

    Raises:
        HarnessError: the file is missing (MissingFileError, naming where to get it), a
            folder, unreadable, or does not fit the architecture.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        raise HarnessError(f"'{p}' is a folder: a guided-diffusion backbone is one checkpoint file (e.g. {CHECKPOINT_NAME})")
    if not p.is_file():
        raise missing_checkpoint(p)
    side = None
    if config is None:
        config, side = architecture_beside(p)
    state = _torch_load(p)
    if isinstance(state, Mapping) and state and all(isinstance(k, str) for k in state) and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}  # saved from DataParallel
    with torch.device("meta"):
        net = GuidedDiffusionUNet(config)
    check_state(net, state, p)
    # the file's tensors become the parameters (no second 2 GB copy), in the dtype the network declares
    own = net.state_dict()
    net.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True, assign=True)
    if config.use_fp16:
        net.convert_to_fp16()
    digest = _file_sha256(p)
    identity = {"file_sha256": digest, "architecture_file": side, "arch": "guided-diffusion-unet",
                "config": dataclasses.asdict(config), "code": network_code_digest()}
    return net.eval(), {"kind": "guided-diffusion", "name": p.name, "sha256": digest, "identity": identity}
