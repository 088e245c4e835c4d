"""Building blocks of the score-SDE NCSN++ (Song et al. 2021, arXiv 2011.13456), in plain PyTorch.

Module and parameter names (``GroupNorm_0``, ``Conv_0``, ``Dense_0``, ``NIN_0``,
``Conv2d_0``, ``W``, ...) are those of ``score_sde_pytorch``'s ``models/layerspp.py``, so
the authors' state_dicts load with ``strict=True``; the computations follow the paper
and the fixture description in ``shared/fixtures/ncsnpp/README.md`` (section 3).

**FIR resampling** (StyleGAN2's ``upfirdn2d``, Karras et al. 2020) is written here as a
native op: zero insertion, padding and a depthwise convolution with the normalised
outer product of a 1-D kernel (``[1, 3, 3, 1]`` in NCSN++). The kernels are registered
as non-persistent buffers, so ``.to(device)`` / ``.double()`` move them and no
state_dict key is added. No CUDA extension is compiled or needed.

**Initialisation** is PyTorch's default for convolutions and linear layers (and
Glorot-uniform for the ``NIN`` maps): these modules exist to carry trained weights. The
reference's DDPM initialisation (zeroed output layers at ``init_scale=0``) is not
reproduced; it only matters for training from scratch.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

_SQRT2 = math.sqrt(2.0)


# --------------------------------------------------------------------------- FIR resampling
def fir_kernel_2d(taps: Sequence[float]) -> torch.Tensor:
    """The separable 2-D FIR kernel ``outer(k, k) / sum`` of 1-D taps, float32 (``[1,3,3,1]`` -> 4x4, sum 1)."""
    k = torch.as_tensor(list(taps), dtype=torch.float32)
    if k.ndim == 1:
        k = torch.outer(k, k)
    return k / k.sum()


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Upsample, FIR-filter, downsample, per channel and identically along H and W.

    1. insert ``up - 1`` zeros after every sample;
    2. pad ``pad[0]`` zeros before and ``pad[1]`` after (negative values crop);
    3. convolve (a true convolution: the kernel is flipped) with ``kernel`` over the
       valid region;
    4. keep every ``down``-th sample.

    Shape:
        x: (N, C, H, W); kernel: (kh, kw) -> (N, C, (H*up + p0 + p1 - kh) // down + 1, ...).
    """
    n, c, h, w = x.shape
    y = x.reshape(n * c, 1, h, w)
    if up > 1:
        # (nc, 1, h, 1, w, 1) padded to (nc, 1, h, up, w, up): every sample followed by up-1 zeros
        y = F.pad(y.reshape(n * c, 1, h, 1, w, 1), (0, up - 1, 0, 0, 0, up - 1)).reshape(n * c, 1, h * up, w * up)
    p0, p1 = pad
    if p0 or p1:
        y = F.pad(y, (p0, p1, p0, p1))
    k = torch.flip(kernel, (0, 1)).to(dtype=y.dtype, device=y.device)[None, None]
    y = F.conv2d(y, k, stride=down)
    return y.reshape(n, c, y.shape[-2], y.shape[-1])


def upsample_2d(x: torch.Tensor, kernel: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """FIR upsampling by ``factor`` (the kernel is scaled by factor^2 to keep the mean): H, W -> factor H, factor W."""
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel * factor**2, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: torch.Tensor, kernel: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """FIR downsampling by ``factor``: H, W -> H / factor, W / factor."""
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel, down=factor, pad=((p + 1) // 2, p // 2))


def conv_downsample_2d(x: torch.Tensor, weight: torch.Tensor, kernel: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Fused 3x3 convolution and FIR downsampling: FIR filter with padding, then a strided convolution (no bias)."""
    p = (kernel.shape[0] - factor) + (weight.shape[-1] - 1)
    return F.conv2d(upfirdn2d(x, kernel, pad=((p + 1) // 2, p // 2)), weight, stride=factor)


def upsample_conv_2d(x: torch.Tensor, weight: torch.Tensor, kernel: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Fused FIR upsampling and convolution: a strided transposed convolution, then the FIR filter (no bias).

    Written from StyleGAN2's definition. score_sde_pytorch's port of this op indexes the
    weight with ``w[..., ::-1, ::-1]`` (TensorFlow syntax), which PyTorch rejects ("step
    must be greater than zero"; the same bug was fixed in diffusers PR #535), so no
    released PyTorch NCSN++ checkpoint uses it; it is reached only by
    ``progressive='residual'`` with ``fir=True``.
    """
    p = (kernel.shape[0] - factor) - (weight.shape[-1] - 1)
    # conv_transpose2d takes (in, out, kh, kw); flipping makes it the adjoint of a correlation with `weight`
    y = F.conv_transpose2d(x, torch.flip(weight, (2, 3)).transpose(0, 1), stride=factor)
    return upfirdn2d(y, kernel * factor**2, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))


def naive_upsample_2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Nearest-neighbour upsampling (every pixel repeated factor x factor times)."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h, 1, w, 1).expand(n, c, h, factor, w, factor).reshape(n, c, h * factor, w * factor)


def naive_downsample_2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Mean over factor x factor blocks."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h // factor, factor, w // factor, factor).mean(dim=(3, 5))


class _FIR(nn.Module):
    """Mixin: the FIR kernel as a non-persistent buffer (moves with the module, no state_dict key)."""

    fir_kernel: torch.Tensor

    def _set_kernel(self, taps: Sequence[float]) -> None:
        self.fir_taps = tuple(taps)
        self.register_buffer("fir_kernel", fir_kernel_2d(taps), persistent=False)


class FIRConv2d(_FIR):
    """A convolution fused with FIR up- or downsampling (``up_or_down_sampling.Conv2d``; keys ``weight``, ``bias``).

    Shape:
        (N, in_ch, H, W) -> (N, out_ch, 2H, 2W) if up, (N, out_ch, H/2, W/2) if down, else (N, out_ch, H, W).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, up: bool = False, down: bool = False,
                 resample_kernel: Sequence[float] = (1, 3, 3, 1), use_bias: bool = True):
        super().__init__()
        if up and down:
            raise ValueError("FIRConv2d: up and down are exclusive")
        if kernel < 1 or kernel % 2 != 1:
            raise ValueError(f"FIRConv2d: kernel must be odd, got {kernel}")
        self.weight = nn.Parameter(torch.empty(out_ch, in_ch, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_ch)) if use_bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.up, self.down, self.kernel = up, down, kernel
        self._set_kernel(resample_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            x = upsample_conv_2d(x, self.weight, self.fir_kernel)
        elif self.down:
            x = conv_downsample_2d(x, self.weight, self.fir_kernel)
        else:
            x = F.conv2d(x, self.weight, padding=self.kernel // 2)
        return x if self.bias is None else x + self.bias.reshape(1, -1, 1, 1)


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    """3x3 convolution with bias."""
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=padding)


def conv1x1(in_ch: int, out_ch: int) -> nn.Conv2d:
    """1x1 convolution with bias."""
    return nn.Conv2d(in_ch, out_ch, kernel_size=1)


def group_norm(channels: int) -> nn.GroupNorm:
    """``GroupNorm(min(C // 4, 32), C, eps=1e-6)``, the normalisation of every NCSN++ block."""
    return nn.GroupNorm(num_groups=min(channels // 4, 32), num_channels=channels, eps=1e-6)


class _Resample(_FIR):
    """x2 up- or downsampling, optionally with a 3x3 convolution: ``Conv_0`` (plain) or the fused FIR ``Conv2d_0``."""

    up: bool

    def __init__(self, in_ch: int, out_ch: int | None = None, with_conv: bool = False, fir: bool = False,
                 fir_kernel: Sequence[float] = (1, 3, 3, 1)):
        super().__init__()
        out_ch = out_ch or in_ch
        if with_conv and not fir:
            self.Conv_0 = conv3x3(in_ch, out_ch) if self.up else conv3x3(in_ch, out_ch, stride=2, padding=0)
        elif with_conv:
            self.Conv2d_0 = FIRConv2d(in_ch, out_ch, kernel=3, up=self.up, down=not self.up, resample_kernel=fir_kernel)
        self.with_conv, self.fir = with_conv, fir
        self._set_kernel(fir_kernel)


class Upsample(_Resample):
    """x2 upsampling: nearest (then ``Conv_0``) or FIR (fused with ``Conv2d_0``)."""

    up = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fir:
            h = naive_upsample_2d(x)
            return self.Conv_0(h) if self.with_conv else h
        return self.Conv2d_0(x) if self.with_conv else upsample_2d(x, self.fir_kernel)


class Downsample(_Resample):
    """/2 downsampling: 2x2 mean, a stride-2 ``Conv_0``, or FIR (fused with ``Conv2d_0``)."""

    up = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fir:
            if self.with_conv:
                return self.Conv_0(F.pad(x, (0, 1, 0, 1)))  # pad right/bottom, then a stride-2 valid conv
            return F.avg_pool2d(x, 2, stride=2)
        return self.Conv2d_0(x) if self.with_conv else downsample_2d(x, self.fir_kernel)


# --------------------------------------------------------------------------- time embeddings
def positional_embedding(labels: torch.Tensor, dim: int, max_positions: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding ``[sin(l f_k), cos(l f_k)]``, ``f_k = exp(-k ln(max_positions) / (dim/2 - 1))``.

    Computed in float32 from ``labels.float()`` (as the reference does, whatever the
    model's dtype). Shape: (B,) -> (B, dim).
    """
    if labels.ndim != 1:
        raise ValueError(f"positional_embedding expects labels of shape (B,), got {tuple(labels.shape)}")
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32, device=labels.device) * -(math.log(max_positions) / (half - 1)))
    arg = labels.float()[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class GaussianFourierProjection(nn.Module):
    """Random Fourier features ``[sin(2 pi t W), cos(2 pi t W)]`` with fixed ``W ~ N(0, scale^2)`` (key ``W``, not trained).

    Shape: (B,) -> (B, 2 * embedding_size).
    """

    def __init__(self, embedding_size: int = 256, scale: float = 1.0):
        super().__init__()
        self.W = nn.Parameter(torch.randn(embedding_size) * scale, requires_grad=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # this multiplication order is the reference's; float32 sin/cos of arguments of a few
        # hundred radians is where the order shows (fixture README section 5)
        proj = t[:, None] * self.W[None, :] * 2 * math.pi
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)


# --------------------------------------------------------------------------- blocks
class NIN(nn.Module):
    """Per-pixel linear map ``y[b,o,h,w] = sum_c x[b,c,h,w] W[c,o] + b[o]`` (``W`` is (in, out): nn.Linear's transpose)."""

    def __init__(self, in_dim: int, num_units: int):
        super().__init__()
        self.W = nn.Parameter(torch.empty(in_dim, num_units))
        self.b = nn.Parameter(torch.zeros(num_units))
        nn.init.xavier_uniform_(self.W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw,co->bohw", x, self.W) + self.b[None, :, None, None]


class AttnBlockpp(nn.Module):
    """Single-head self-attention over all H*W positions, residual (scaled by 1/sqrt 2 with ``skip_rescale``)."""

    def __init__(self, channels: int, skip_rescale: bool = False):
        super().__init__()
        self.GroupNorm_0 = group_norm(channels)
        self.NIN_0 = NIN(channels, channels)
        self.NIN_1 = NIN(channels, channels)
        self.NIN_2 = NIN(channels, channels)
        self.NIN_3 = NIN(channels, channels)
        self.skip_rescale = skip_rescale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.GroupNorm_0(x)
        q, k, v = self.NIN_0(h), self.NIN_1(h), self.NIN_2(h)
        w = torch.einsum("bchw,bcij->bhwij", q, k) * (c ** -0.5)
        w = F.softmax(w.reshape(b, hh, ww, hh * ww), dim=-1).reshape(b, hh, ww, hh, ww)
        h = self.NIN_3(torch.einsum("bhwij,bcij->bchw", w, v))
        return (x + h) / _SQRT2 if self.skip_rescale else x + h


class Combine(nn.Module):
    """Merge an input-pyramid level into the features: 1x1 conv of the pyramid, then concatenation or sum."""

    def __init__(self, dim1: int, dim2: int, method: str = "cat"):
        super().__init__()
        if method not in ("cat", "sum"):
            raise ValueError(f"Combine: method must be cat or sum, got {method!r}")
        self.Conv_0 = conv1x1(dim1, dim2)
        self.method = method

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.Conv_0(x)
        return torch.cat([h, y], dim=1) if self.method == "cat" else h + y


class ResnetBlockBigGANpp(_FIR):
    """BigGAN residual block with optional x2 up/down sampling of both branches, time-conditioned.

    ``h = Conv_1(Dropout(act(GN_1(Conv_0(resample(act(GN_0(x)))) + Dense_0(act(temb))))))``;
    shortcut ``Conv_2(resample(x))`` (1x1, present iff in != out, up or down); output
    ``(x + h) / sqrt 2`` with ``skip_rescale``. Resampling is nearest / 2x2 mean
    (``fir=False``) or the FIR ops above.
    """

    def __init__(self, act: nn.Module, in_ch: int, out_ch: int | None = None, temb_dim: int | None = None,
                 up: bool = False, down: bool = False, dropout: float = 0.1, fir: bool = False,
                 fir_kernel: Sequence[float] = (1, 3, 3, 1), skip_rescale: bool = True):
        super().__init__()
        out_ch = out_ch or in_ch
        self.GroupNorm_0 = group_norm(in_ch)
        self.Conv_0 = conv3x3(in_ch, out_ch)
        if temb_dim is not None:
            self.Dense_0 = nn.Linear(temb_dim, out_ch)
        self.GroupNorm_1 = group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = conv3x3(out_ch, out_ch)
        self.has_shortcut = in_ch != out_ch or up or down
        if self.has_shortcut:
            self.Conv_2 = conv1x1(in_ch, out_ch)
        self.act = act
        self.up, self.down, self.fir, self.skip_rescale = up, down, fir, skip_rescale
        self.in_ch, self.out_ch = in_ch, out_ch
        self._set_kernel(fir_kernel)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return upsample_2d(x, self.fir_kernel) if self.fir else naive_upsample_2d(x)
        if self.down:
            return downsample_2d(x, self.fir_kernel) if self.fir else naive_downsample_2d(x)
        return x

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self._resample(self.act(self.GroupNorm_0(x)))
        x = self._resample(x)
        h = self.Conv_0(h)
        if temb is not None:
            h = h + self.Dense_0(self.act(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(self.act(self.GroupNorm_1(h))))
        if self.has_shortcut:
            x = self.Conv_2(x)
        return (x + h) / _SQRT2 if self.skip_rescale else x + h
