"""A user-written input shift loaded as a plugin: darken every image by a factor."""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.core import Shift, ShiftConfig, register_shift


@dataclass(frozen=True)
class DarkenConfig(ShiftConfig):
    factor: float = field(default=0.5, metadata={"help": "multiply every pixel by this (0 < factor <= 1)"})

    def __post_init__(self):
        if not 0 < self.factor <= 1:
            raise ValueError(f"factor={self.factor} must be in (0, 1]")


@register_shift("toy-darken")
class ToyDarken(Shift):
    """x -> factor * x (labels kept)."""

    description = "multiply every pixel by factor (a user plugin)"
    Config = DarkenConfig

    def apply(self, x, y, *, context):
        return x * self.config.factor
