"""Encodings the store and the job identity share: canonical JSON, image and array blobs."""

from __future__ import annotations

import io
import json
import math
from typing import Any

import numpy as np


def canonical(obj: Any) -> Any:
    """``obj`` with every float rounded to 12 significant digits (recursively).

    Applied to a job's identity before hashing, so that spellings of one number
    (``1/5``, ``0.2``, a step size recomputed as ``0.05000000000000001``) give one job.
    """
    if isinstance(obj, bool) or obj is None:
        return obj
    if isinstance(obj, float):
        return float(f"{obj:.12g}") if math.isfinite(obj) else obj
    if isinstance(obj, dict):
        return {k: canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    return obj


def dumps(obj: Any) -> str:
    """Canonical JSON (sorted keys, no whitespace) used for identity hashing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def encode_images(**arrays: np.ndarray) -> bytes:
    """Named arrays -> one compressed npz blob."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def decode_images(blob: bytes) -> dict[str, np.ndarray]:
    """The inverse of :func:`encode_images` (no pickles are loaded)."""
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def pack_adv(entry: dict) -> bytes:
    """A cached adversarial-example entry (attack -> x_adv, margin, curve) -> blob."""
    arrays, meta = {}, {}
    for attack, v in entry.items():
        arrays[f"{attack}/x_adv"] = np.asarray(v["x_adv"], dtype=np.float32)
        arrays[f"{attack}/margin"] = np.asarray(v["margin"], dtype=np.float32)
        meta[attack] = list(v["curve"])
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    return encode_images(**arrays)


def unpack_adv(blob: bytes) -> dict:
    """The inverse of :func:`pack_adv`."""
    arrays = decode_images(blob)
    meta = json.loads(arrays.pop("__meta__").tobytes().decode())
    return {a: {"x_adv": arrays[f"{a}/x_adv"], "margin": arrays[f"{a}/margin"], "curve": meta[a]} for a in meta}
