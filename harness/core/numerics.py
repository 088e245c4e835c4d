"""Small tensor checks shared by the engine and the attacks, and the float32 precision of an evaluation."""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is finite (no NaN, no inf).

    Exactly ``torch.isfinite(t).all()``, but cheaper on the hot path of an attack (one
    reduction instead of isfinite's comparisons, a boolean tensor and ``all``): a NaN or an
    inf anywhere makes the sum non-finite, and only when the sum is non-finite (which an
    overflow of finite values can also cause) is the element-wise check run.
    """
    if t.numel() == 0 or math.isfinite(float(t.detach().sum())):
        return True
    return bool(torch.isfinite(t).all())


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """Plain float32 matrix products and convolutions on CUDA while inside (TF32 off), restored afterwards.

    Every evaluation runs inside (:func:`harness.evaluation.lifecycle.iter_batches`), so a
    number never depends on whether the process enabled TF32 (PyTorch's default leaves it
    off for matmul and on for cuDNN convolutions), and the job's environment records it
    (``tf32_during_evaluation: false``). On a CPU the flags do nothing.
    """
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old[0], old[1]
        torch.set_float32_matmul_precision(old[2])
