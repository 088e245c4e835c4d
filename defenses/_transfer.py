"""Cross-dataset use of a purifier: which dataset its weights come from, and the adapter to the data.

Every shipped purifier has two config fields from here:

- ``trained_on``: the dataset whose weights it loads (``--set trained_on=mnist5k``); None
  means the evaluated dataset. :meth:`TransferMixin.bind_transfer` writes the effective
  value into the config at setup, so it is part of the job identity (and unset equals
  the evaluated dataset named explicitly: one job).
- ``adapter``: how images of the evaluated dataset reach a purifier trained on others
  of another shape. ``resize``: channels replicated (grey -> RGB) or averaged (RGB ->
  grey), then a bilinear, antialiased resize to the purifier's resolution; the output
  goes back the same way. ``tile`` (MAEP): resize to the nearest multiple of the
  purifier's side, purify as tiles (MAEP's cross-resolution mode), resize back.
  ``auto``: ``tile`` for MAEP when the images are larger than its side, else
  ``resize``. ``none``: refuse a shape mismatch. Both maps are differentiable, so every
  gradient path stays exact through them. The adapter in use is a setup note, printed
  with the run and stored with the job.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from harness.core.registry import HarnessError

AdapterMode = Literal["auto", "resize", "none"]
TRAINED_ON_HELP = "dataset whose weights the purifier loads (None = the evaluated dataset; filled in at setup)"
ADAPTER_HELP = (
    "images of another shape than the purifier's: auto | resize (channels replicated/averaged, bilinear resize there "
    "and back) | none (refuse)"
)


def trained_on_field() -> Any:
    """The ``trained_on`` config field of a purifier."""
    return field(default=None, metadata={"help": TRAINED_ON_HELP})


def adapter_field(help_text: str = ADAPTER_HELP) -> Any:
    """The ``adapter`` config field of a purifier."""
    return field(default="auto", metadata={"help": help_text})


def _resize(x: torch.Tensor, hw: tuple[int, int], antialias: bool = True) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    return F.interpolate(x, size=tuple(hw), mode="bilinear", align_corners=False, antialias=antialias)


def _channels(x: torch.Tensor, c: int) -> torch.Tensor:
    if x.shape[1] == c:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, c, -1, -1)
    if c == 1:
        return x.mean(1, keepdim=True)
    raise HarnessError(f"adapter: cannot map {x.shape[1]}-channel images to {c} channels")


@dataclass(frozen=True)
class Adapter:
    """Maps images of ``data_shape`` to the purifier's ``inner_shape`` (C, H, W) and back.

    ``antialias``: the bilinear resize is antialiased (the default); off for a purifier
    whose authors resized without it (DiffPure's ImageNet 224 <-> 256, ``F.interpolate``
    with ``align_corners=False``).
    """

    data_shape: tuple[int, int, int]
    inner_shape: tuple[int, int, int]
    mode: str
    antialias: bool = True

    def to_purifier(self, x: torch.Tensor) -> torch.Tensor:
        """Data images -> purifier images."""
        return _resize(_channels(x, self.inner_shape[0]), self.inner_shape[1:], self.antialias)

    def from_purifier(self, x: torch.Tensor) -> torch.Tensor:
        """Purifier images -> data images."""
        return _channels(_resize(x, self.data_shape[1:], self.antialias), self.data_shape[0])

    def note(self, name: str, trained_on: str, dataset: str) -> str:
        """The setup note that says what the adapter does."""
        d, p = "x".join(map(str, self.data_shape)), "x".join(map(str, self.inner_shape))
        how = "tiles after a resize" if self.mode == "tile" else "a resize"
        chan = "" if self.data_shape[0] == self.inner_shape[0] else (
            ", channels replicated" if self.data_shape[0] == 1 else ", channels averaged")
        alias = "" if self.antialias else ", no antialiasing"
        return f"{name}: trained on '{trained_on}' ({p}); '{dataset}' images {d} -> {p} and back by {how} (bilinear{alias}{chan})"


class TransferMixin:
    """``trained_on`` and ``adapter`` for a purifier (see the module docstring); mixed into the defense class."""

    adapter: Adapter | None = None

    def training_dataset(self, ctx) -> str:
        """The dataset whose weights to load: ``trained_on``, else the evaluated one."""
        return self.config.trained_on or ctx.dataset

    def bind_transfer(
        self, ctx, inner_shape: tuple[int, int, int] | None, mode: str | None = None, antialias: bool = True
    ) -> None:
        """Choose the adapter from the purifier's image shape, add its setup note, and fill in ``trained_on``.

        ``inner_shape=None`` means the purifier takes the data's shape (nothing to adapt);
        ``mode`` overrides the configured adapter (a defense's resolved ``auto``);
        ``antialias`` goes to the :class:`Adapter`.
        """
        trained_on = self.training_dataset(ctx)
        data = tuple(int(v) for v in ctx.image_shape)
        inner = data if inner_shape is None else tuple(int(v) for v in inner_shape)
        mode = mode or self.config.adapter
        self.adapter = None
        if inner != data:
            if mode == "none":
                raise HarnessError(
                    f"{self.name}: the purifier (trained on '{trained_on}') takes {'x'.join(map(str, inner))} images but "
                    f"'{ctx.dataset}' has {'x'.join(map(str, data))} (adapter=none; use adapter=auto or resize)"
                )
            self.adapter = Adapter(data_shape=data, inner_shape=inner, mode="resize" if mode == "auto" else mode, antialias=antialias)
            self.setup_notes = list(self.setup_notes) + [self.adapter.note(self.name, trained_on, ctx.dataset)]
        if self.config.trained_on != trained_on:
            self.config = dataclasses.replace(self.config, trained_on=trained_on)

    def adapt_in(self, x: torch.Tensor) -> torch.Tensor:
        """Data images -> the purifier's (identity without an adapter)."""
        return x if self.adapter is None else self.adapter.to_purifier(x)

    def adapt_out(self, x: torch.Tensor) -> torch.Tensor:
        """The purifier's images -> data images (identity without an adapter)."""
        return x if self.adapter is None else self.adapter.from_purifier(x)
