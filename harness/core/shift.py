"""The shift contract: registered transforms of the clean inputs, applied before any attack.

A threat spec may name an input shift (``--set shift=NAME``; ``none`` by default): a
transform of the clean images that keeps their labels (color shift, corruptions). The
engine applies it to every batch before scoring and attacking, so each number of the
cell is on shifted inputs, and the perturbation budget is measured from the shifted
image. A shift is deterministic given the :class:`ShiftContext` (a generator seeded
from the job seed and the batch), declares which images it can handle
(:meth:`Shift.check`), and keeps its options in a frozen ``Config``
(``--set shift.<field>=value``, or the bare field name).

:meth:`Shift.apply` returns the shifted batch, or ``(batch, info)`` where ``info`` maps
names to per-example lists (for example the index of the target image a color transfer
used); ``info`` is stored with the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from harness.core.config import build_config, plugin_identity
from harness.core.registry import Registry, class_registrar


@dataclass(frozen=True)
class ShiftConfig:
    """Base of every shift's options."""


@dataclass
class ShiftContext:
    """What a shift may use for one batch.

    Attributes:
        generator: seeded from (job seed, batch), on the batch's device.
        positions: (B,) positions of the batch's examples in the evaluation subset.
        subset_x: all evaluation images of the job (CPU tensor), e.g. colour-transfer targets.
        subset_y: their labels.
        dataset: registry name of the dataset.
        seed: the job seed, for per-example draws that must not depend on the batching
            (e.g. a colour-transfer pairing keyed by the example's position).
        subset_indices: dataset index of every evaluation image (position -> index), or None.
    """

    generator: torch.Generator
    positions: np.ndarray
    subset_x: torch.Tensor
    subset_y: torch.Tensor
    dataset: str
    seed: int = 0
    subset_indices: np.ndarray | None = None


class Shift:
    """Base class of every input shift. See the module docstring for the contract."""

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    Config: ClassVar[type] = ShiftConfig
    description: ClassVar[str] = ""

    def __init__(self, config: ShiftConfig | None = None):
        self.config = config if config is not None else self.Config()

    @classmethod
    def from_options(cls, options: dict[str, Any] | None = None) -> "Shift":
        """Build from plain option values (coerced and checked against ``Config``)."""
        return cls(build_config(cls.Config, options or {}, owner=f"shift '{cls.name}'"))

    def check(self, image_shape: tuple[int, int, int]) -> str | None:
        """Why this shift cannot run on images of ``image_shape`` (None if it can)."""
        return None

    def apply(self, x: torch.Tensor, y: torch.Tensor, *, context: ShiftContext):
        """The shifted batch (float32 NCHW in [0, 1]), or ``(batch, info)``."""
        raise NotImplementedError(f"shift '{self.name}' must implement apply()")

    def identity(self) -> dict[str, Any]:
        """What of this shift enters a job's identity hash (name, version, config, source)."""
        return plugin_identity(self, Shift)


SHIFTS: Registry[type[Shift]] = Registry("shift")


register_shift = class_registrar(SHIFTS, Shift, "shift")
