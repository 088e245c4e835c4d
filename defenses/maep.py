"""MAEP: the masked-autoencoder purifier (arXiv 2501.16904; spec section 2.5).

A ViT masked autoencoder P = D o E trained from scratch with the MAEP loss
``|| D(E(x_adv; M)) - x ||_1``: the encoder E sees only the visible patches of an
adversarial image (a random mask M per sample, ratio 0.75 by default), the decoder D
sees every token (mask tokens where patches were hidden), and the target is the *clean*
image on every pixel. At inference nothing is masked: one deterministic forward pass
(NFE 1). Training is ``harness train maep`` (:mod:`harness.training.maep`).

The architecture follows the common PyTorch CIFAR MAE (IcarusWizard/MAE, the spec's
inferred backbone): patch size 2, a cls token, learned positional embeddings for the
encoder and the decoder, pre-norm transformer blocks, a linear head to ``C*p*p`` values
per token, inputs mapped to [-1, 1] inside. :data:`ARCH_PRESETS` holds the spec's
ViT-Tiny MAE (CIFAR) and a small variant for the 8x8 digits.

Any resolution (the paper's cross-resolution transfer): a purifier trained on s x s
images purifies larger images (H and W multiples of s) as non-overlapping s x s tiles,
stitched back (config ``tile``; the effective tile size is written into the config at
setup, so it is part of every job's identity). The weights' sha256 is written there
too (``weights_sha256``), so retrained weights never reuse a stored number.

Shipped: ``harness/weights/maep-digits.pt`` (300 k parameters, 1.2 MB; recipe in the
``.json``). On digits (n=256, eps 0.2) it keeps 96.9% clean accuracy and 91.0% under
the preprocessor-blind PGD (undefended: 1.6%), 84.8% under BPDA; the adaptive threat,
which differentiates through it exactly, leaves 0.8%. The paper evaluated only the
preprocessor-blind setting.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.config import read_recipe
from harness.core.env import WEIGHTS_DIR, sha256_file
from harness.core.registry import HarnessError, MissingFileError
from harness.core.registry import first_line as _first_line
from harness.core.defense import Defense, DefenseConfig, GradientPath, SetupContext, register_defense
from defenses._transfer import TransferMixin, adapter_field, trained_on_field

#: Folder of the shipped weights (``maep-<dataset>.pt`` with its ``.json`` recipe).

#: Format tag stored in every MAEP checkpoint (a dict: format, arch, state_dict).
CHECKPOINT_FORMAT = "maep-v1"


# --------------------------------------------------------------------------- architecture
@dataclass(frozen=True)
class MAEArch:
    """Sizes of a ViT masked autoencoder (stored in every checkpoint).

    Attributes:
        image_size: Side s of the square images it was trained on (the tile size).
        channels: Image channels C.
        patch: Patch side p (s must be a multiple of p); ``(s/p)^2`` tokens.
        emb: Token width (encoder and decoder).
        enc_depth, enc_heads: Encoder blocks and attention heads.
        dec_depth, dec_heads: Decoder blocks and attention heads.
        mlp_ratio: Hidden width of each block's MLP, as a multiple of ``emb``.
    """

    image_size: int
    channels: int
    patch: int = 2
    emb: int = 192
    enc_depth: int = 12
    enc_heads: int = 3
    dec_depth: int = 4
    dec_heads: int = 3
    mlp_ratio: float = 4.0

    def __post_init__(self):
        for k in ("image_size", "channels", "patch", "emb", "enc_depth", "enc_heads", "dec_depth", "dec_heads"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) < 1:
                raise HarnessError(f"MAE architecture: {k}={getattr(self, k)!r} must be a positive integer")
        if self.image_size % self.patch:
            raise HarnessError(f"MAE architecture: image_size={self.image_size} is not a multiple of patch={self.patch}")
        for heads in (self.enc_heads, self.dec_heads):
            if self.emb % heads:
                raise HarnessError(f"MAE architecture: emb={self.emb} is not divisible by {heads} heads")
        if not self.mlp_ratio > 0:
            raise HarnessError(f"MAE architecture: mlp_ratio={self.mlp_ratio} must be > 0")

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch) ** 2

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MAEArch":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise HarnessError(f"MAE architecture: unknown size(s) {', '.join(unknown)} (known: {', '.join(sorted(names))})")
        try:
            return cls(**values)
        except TypeError as exc:
            raise HarnessError(f"MAE architecture: {exc}") from None


#: Named sizes (without image_size/channels, which come from the dataset).
#: ``vit-tiny`` is the spec's CIFAR default (ViT-Tiny MAE, IcarusWizard/MAE); ``small``
#: fits the 8x8 digits (16 tokens) in about 1 MB.
ARCH_PRESETS: dict[str, dict[str, Any]] = {
    "vit-tiny": dict(patch=2, emb=192, enc_depth=12, enc_heads=3, dec_depth=4, dec_heads=3, mlp_ratio=4.0),
    "small": dict(patch=2, emb=64, enc_depth=4, enc_heads=4, dec_depth=2, dec_heads=4, mlp_ratio=4.0),
    # mnist5k (28x28): patch 4 gives 49 tokens; patch 2's 196 tokens cost 4x per step on a CPU
    "small-p4": dict(patch=4, emb=64, enc_depth=4, enc_heads=4, dec_depth=2, dec_heads=4, mlp_ratio=4.0),
    # CIFAR on a 2-core CPU: patch 4 (64 tokens) and a 6-block encoder of width 128 (1.7 M parameters, 0.5 s per
    # step of 64 images with one thread); the spec's ViT-Tiny (patch 2, 256 tokens, 12 blocks of 192) costs
    # about 20x as much per step.
    "cifar-cpu": dict(patch=4, emb=128, enc_depth=6, enc_heads=4, dec_depth=2, dec_heads=4, mlp_ratio=4.0),
}


class Block(nn.Module):
    """Pre-norm transformer block (timm ``Block`` layout): x + Attn(LN(x)), then x + MLP(LN(x)).

    Shape:
        x: (B, N, D) -> (B, N, D).
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class MaskedAutoencoder(nn.Module):
    """ViT masked autoencoder over p x p patches: the MAEP purifier network.

    ``forward(x, keep)`` encodes only the patches listed in ``keep`` (all of them when
    ``keep`` is None: inference), fills the others with the mask token, decodes all
    tokens and returns the reconstruction in the [0, 1] pixel scale, *unclamped* (the
    training loss sees the raw output; :class:`MAEP` clamps).

    Shape:
        x: (B, C, s, s) in [0, 1]; keep: (B, K) long token indices or None -> (B, C, s, s).
    """

    def __init__(self, arch: MAEArch):
        super().__init__()
        self.arch = arch
        a = arch
        t = a.tokens
        self.patch_embed = nn.Conv2d(a.channels, a.emb, a.patch, stride=a.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, a.emb))
        self.enc_pos = nn.Parameter(torch.zeros(1, t, a.emb))
        self.encoder = nn.ModuleList(Block(a.emb, a.enc_heads, a.mlp_ratio) for _ in range(a.enc_depth))
        self.enc_norm = nn.LayerNorm(a.emb, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, a.emb))
        self.dec_pos = nn.Parameter(torch.zeros(1, t + 1, a.emb))
        self.decoder = nn.ModuleList(Block(a.emb, a.dec_heads, a.mlp_ratio) for _ in range(a.dec_depth))
        self.dec_norm = nn.LayerNorm(a.emb, eps=1e-6)
        self.head = nn.Linear(a.emb, a.channels * a.patch * a.patch)
        self._init_weights()

    def _init_weights(self) -> None:
        for p in (self.cls_token, self.enc_pos, self.mask_token, self.dec_pos):
            nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        a = self.arch
        b = x.shape[0]
        tok = self.patch_embed(2.0 * x - 1.0).flatten(2).transpose(1, 2) + self.enc_pos  # (B, T, D), row-major
        if keep is not None:
            tok = tok.gather(1, keep[..., None].expand(-1, -1, a.emb))
        h = torch.cat([self.cls_token.expand(b, -1, -1), tok], 1)
        for blk in self.encoder:
            h = blk(h)
        h = self.enc_norm(h)
        if keep is not None:
            full = self.mask_token.expand(b, a.tokens, a.emb).to(h.dtype)
            full = full.scatter(1, keep[..., None].expand(-1, -1, a.emb), h[:, 1:])
            h = torch.cat([h[:, :1], full], 1)
        h = h + self.dec_pos
        for blk in self.decoder:
            h = blk(h)
        y = self.head(self.dec_norm(h)[:, 1:])  # (B, T, C*p*p)
        g, p = a.image_size // a.patch, a.patch
        y = y.view(b, g, g, a.channels, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, a.channels, a.image_size, a.image_size)
        return (y + 1.0) * 0.5


def random_keep(batch: int, tokens: int, ratio: float, generator: torch.Generator | None, device=None) -> torch.Tensor:
    """Indices of the visible tokens of a random mask per sample (MAE's shuffle-and-keep).

    ``round(tokens * (1 - ratio))`` tokens stay visible (at least one), the same count in
    every sample so the batch stays rectangular; which ones is uniform per sample.

    Returns:
        (batch, K) long tensor, sorted per row.
    """
    if not 0.0 <= ratio < 1.0:
        raise HarnessError(f"mask ratio {ratio} is out of range (0 <= ratio < 1)")
    n_keep = max(1, int(round(tokens * (1.0 - ratio))))
    gdev = generator.device if generator is not None else device
    noise = torch.rand(batch, tokens, generator=generator, device=gdev)
    keep = noise.argsort(dim=1)[:, :n_keep].sort(dim=1).values
    return keep.to(device) if device is not None else keep


# --------------------------------------------------------------------------- checkpoints

def checkpoint_dict(net: MaskedAutoencoder) -> dict[str, Any]:
    """What a MAEP ``.pt`` holds: format tag, architecture and state_dict (weights_only-safe)."""
    state = {k: v.detach().cpu().clone().contiguous() for k, v in net.state_dict().items()}
    return {"format": CHECKPOINT_FORMAT, "arch": dataclasses.asdict(net.arch), "state_dict": state}


def load_checkpoint(path: str | Path) -> tuple[MaskedAutoencoder, dict[str, Any]]:
    """Load a MAEP ``.pt`` written by ``harness train maep``.

    The file is read with ``weights_only=True``; when a ``.json`` recipe lies beside it,
    its recorded sha256 must match the file.

    Returns:
        ``(net, source)``: the network (eval mode) and ``{"name", "sha256", "arch"}``.

    Raises:
        HarnessError: unreadable file, not a MAEP checkpoint, or a sha256 mismatch (one line).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFileError(f"MAEP weights '{path}' do not exist")
    digest = sha256_file(path)
    recipe = path.with_suffix(".json")
    if recipe.is_file():
        recorded = read_recipe(recipe, "MAEP").get("sha256")
        if recorded and recorded != digest:
            raise HarnessError(
                f"MAEP weights '{path}' have sha256 {digest[:12]}..., their recipe {recipe.name} says {str(recorded)[:12]}..."
            )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors come in many types; report one line
        raise HarnessError(f"cannot load MAEP weights '{path}': {_first_line(exc)}") from None
    if not (isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT and "arch" in ckpt and "state_dict" in ckpt):
        raise HarnessError(f"'{path}' is not a MAEP checkpoint (expected a dict with format '{CHECKPOINT_FORMAT}', arch, state_dict)")
    net = MaskedAutoencoder(MAEArch.from_dict(dict(ckpt["arch"])))
    try:
        net.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        raise HarnessError(f"MAEP weights '{path.name}' do not fit their recorded architecture: {_first_line(exc)}") from None
    net.eval()
    return net, {"name": path.name, "sha256": digest, "arch": dataclasses.asdict(net.arch)}


def shipped_weights(dataset: str) -> Path:
    """Where the shipped purifier of ``dataset`` lives (it may not exist)."""
    return WEIGHTS_DIR / f"maep-{dataset}.pt"


def train_command(dataset: str) -> str:
    """The command that trains the purifier of ``dataset`` (for error messages)."""
    extra = " --classifier C --weights CLASSIFIER_WEIGHTS --data-dir DIR" if dataset.startswith("cifar") else ""
    return f"harness train maep --dataset {dataset}{extra}"


def find_weights(dataset: str, weights: str | None, weights_dir: Path | None) -> Path:
    """The checkpoint to load: ``weights``, else ``weights_dir/maep-<dataset>.pt``, else the shipped file.

    Raises:
        HarnessError: one line naming the missing file and the command that trains it.
    """
    if weights:
        p = Path(weights).expanduser()
        if not p.is_file():
            raise MissingFileError(f"MAEP weights '{p}' do not exist (train them with `{train_command(dataset)} --out DIR`)")
        return p
    name = f"maep-{dataset}.pt"
    if weights_dir is not None and (Path(weights_dir) / name).is_file():
        return Path(weights_dir) / name
    p = shipped_weights(dataset)
    if p.is_file():
        return p
    raise MissingFileError(
        f"MAEP weights '{name}' for dataset '{dataset}' are missing from {WEIGHTS_DIR}: "
        f"run `{train_command(dataset)}` (or pass --set weights=FILE.pt)"
    )


# --------------------------------------------------------------------------- tiling
def tile_size_for(tile: str, trained: int, h: int, w: int) -> int | None:
    """The tile side for an ``h x w`` input, or None when the input is one tile.

    Raises:
        HarnessError: (one line) the input does not fit the purifier under ``tile``.
    """
    if (h, w) == (trained, trained):
        return None
    if tile == "off":
        raise HarnessError(
            f"maep: the purifier was trained on {trained}x{trained} images and tile=off, but the input is {h}x{w} (use tile=auto)"
        )
    if h % trained or w % trained:
        raise HarnessError(
            f"maep: a {h}x{w} input does not split into {trained}x{trained} tiles (the purifier was trained at "
            f"{trained}x{trained}; H and W must be multiples of {trained})"
        )
    return trained


def to_tiles(x: torch.Tensor, s: int) -> torch.Tensor:
    """(B, C, H, W) -> (B * H/s * W/s, C, s, s), row-major over the tile grid."""
    b, c, h, w = x.shape
    return x.view(b, c, h // s, s, w // s, s).permute(0, 2, 4, 1, 3, 5).reshape(-1, c, s, s)


def from_tiles(t: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`to_tiles`."""
    c, s = t.shape[1], t.shape[-1]
    return t.view(b, h // s, w // s, c, s, s).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


# --------------------------------------------------------------------------- defense
@dataclass(frozen=True)
class MAEPConfig(DefenseConfig):
    """Options of ``maep``."""

    weights: str | None = field(
        default=None,
        metadata={
            "help": "MAEP checkpoint (.pt from `harness train maep`); None = maep-<dataset>.pt from --weights-dir, else the shipped one"
        },
    )
    tile: str = field(
        default="auto",
        metadata={
            "help": "auto: purify inputs larger than the trained size s as non-overlapping s x s tiles; off: refuse them; "
            "setup records the effective tile size s"
        },
    )
    weights_sha256: str | None = field(
        default=None, metadata={"help": "sha256 of the checkpoint; filled in at setup, and checked when given"}
    )
    trained_on: str | None = trained_on_field()
    adapter: Literal["auto", "resize", "tile", "none"] = adapter_field(
        "images the trained size s does not tile: auto (tile when larger than s, else resize) | tile (resize to the "
        "nearest multiple of s, then tiles) | resize (to s x s; channels replicated/averaged) | none (refuse)"
    )

    def __post_init__(self):
        if not (self.tile in ("auto", "off") or (self.tile.isdigit() and int(self.tile) > 0)):
            raise HarnessError(f"maep: tile={self.tile!r} must be auto, off, or the purifier's trained image size")


@register_defense("maep")
class MAEP(TransferMixin, Defense):
    """MAEP: masked-autoencoder purifier (arXiv 2501.16904).

    ``purify(x) = clamp(D(E(x)), 0, 1)`` with nothing masked: a ViT MAE trained with the
    MAEP loss (L1 between the reconstruction of a masked adversarial image and the clean
    image), applied once. Inputs larger than the trained size s are purified as s x s
    tiles (``tile``).

    Randomness: none; the ``generator`` is ignored. Deterministic, so attacks need no EOT
    and every image is scored from one purification.

    Gradient paths: ``full`` (plain autograd through one encoder + decoder pass, about
    3x the forward cost) and ``bpda``; NFE = 1 per call.

    Shape:
        x: (B, C, H, W) float32 in [0, 1], H and W multiples of s -> same shape, in [0, 1].

    Example:
        >>> d = MAEP.from_dict({})
        >>> d.setup(ctx)                          # loads harness/weights/maep-<dataset>.pt
        >>> x_pur = d.purify(x)
    """

    version = "1"
    Config = MAEPConfig
    stochastic = False
    gradient_paths = frozenset({GradientPath.FULL})
    nfe_per_call = 1

    def __init__(self, config: MAEPConfig | None = None):
        super().__init__(config)
        self.net: MaskedAutoencoder | None = None
        self.source: dict[str, Any] | None = None

    def use_model(self, net: MaskedAutoencoder, source: dict[str, Any] | None = None) -> "MAEP":
        """Bind a network directly (tests, notebooks); :meth:`setup` then keeps it."""
        net.eval()
        self.net = net
        self.source = source or {"name": "injected", "sha256": None, "arch": dataclasses.asdict(net.arch)}
        return self

    def setup(self, ctx: SetupContext) -> None:
        if self.net is None:
            path = find_weights(self.training_dataset(ctx), self.config.weights, ctx.weights_dir)
            net, source = load_checkpoint(path)
            if self.config.weights_sha256 and self.config.weights_sha256 != source["sha256"]:
                raise HarnessError(
                    f"maep: weights '{path}' have sha256 {source['sha256'][:12]}..., the config pins {self.config.weights_sha256[:12]}..."
                )
            self.use_model(net, source)
        arch = self.net.arch
        c, h, w = ctx.image_shape
        s = self._tile_side()
        mode = self.config.adapter
        tiles_as_is = c == arch.channels and h % s == 0 and w % s == 0 and mode != "resize"
        if tiles_as_is or mode == "none":
            if c != arch.channels:
                raise HarnessError(
                    f"maep: the purifier takes {arch.channels}-channel images but dataset '{ctx.dataset}' has {c} channels "
                    "(adapter=none)"
                )
            self.bind_transfer(ctx, None)
            tiled = tile_size_for(self.config.tile, s, h, w)
            if tiled is not None:
                self.setup_notes = [f"maep: {h}x{w} images purified as {h // s}x{w // s} tiles of {s}x{s} (trained size)"]
        elif mode == "tile" or (mode == "auto" and max(h, w) > s):
            inner = (arch.channels, max(1, round(h / s)) * s, max(1, round(w / s)) * s)
            self.bind_transfer(ctx, inner, mode="tile")
        else:
            self.bind_transfer(ctx, (arch.channels, s, s), mode="resize")
        # Record the effective tiling and the weights' hash in the config: both enter the job identity.
        fill: dict[str, Any] = {}
        if self.source.get("sha256"):
            fill["weights_sha256"] = self.source["sha256"]
        if self.config.tile == "auto":
            fill["tile"] = str(s)
        if fill:
            self.config = dataclasses.replace(self.config, **fill)
        self.to(ctx.device)

    def _net(self) -> MaskedAutoencoder:
        if self.net is None:
            raise HarnessError("defense 'maep' has no network: call setup(ctx) first (or use_model)")
        return self.net

    def _tile_side(self) -> int:
        s = self._net().arch.image_size
        if self.config.tile not in ("auto", "off") and int(self.config.tile) != s:
            raise HarnessError(f"maep: tile={self.config.tile} but the purifier was trained on {s}x{s} images (its tile size)")
        return s

    def purify(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        net = self._net()
        x = self.adapt_in(x) if x.dim() == 4 else x
        if x.dim() != 4 or x.shape[1] != net.arch.channels:
            raise HarnessError(f"maep: expected (B, {net.arch.channels}, H, W) images, got shape {tuple(x.shape)}")
        b, _, h, w = x.shape
        s = tile_size_for(self.config.tile, self._tile_side(), h, w)
        if s is None:
            return self.adapt_out(net(x).clamp(0.0, 1.0))
        return self.adapt_out(from_tiles(net(to_tiles(x, s)), b, h, w).clamp(0.0, 1.0))
