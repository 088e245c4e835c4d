"""Flags on weak numbers: warnings stored with every finished job (``jobs.flags``).

A flag does not change a number; it says why the number may be too high. The stored
value is a JSON list of small dicts ``{"flag": NAME, "detail": TEXT}`` (empty: nothing
flagged; NULL: a job finished before flags existed). The names:

- ``not_converged``: an attack's robust-accuracy curve still fell during its last 10% of
  iterations (at least the last one): more iterations would likely break more examples.
- ``zero_gradients``: some examples have an all-zero input gradient on the attack path
  at the clean input (margin loss, one gradient per batch): gradient masking, or a
  purifier that blocks autograd; gradient attacks learn nothing there.
- ``randomness_detected``: the defense is declared deterministic, but two purifications
  of the same clean inputs differ (no EOT, one evaluation draw: its number is too kind).
- ``non_adaptive_only``: no attack differentiated through the defense (every attack ran
  on the classifier alone or through BPDA): the number is not an adaptive evaluation.
  Never raised for a defense whose purifier is the identity (``identity_purifier``: the
  undefended baseline, where the classifier is the whole model).
- ``autoattack``: one of pyautoattack's own checks, e.g. ``apgd-dlr: there are 3 points
  with zero gradient! ...``, caught as a Python warning while the attack ran.

The per-batch evidence is computed by :func:`harness.evaluation.batch.flag_checks` and
kept in ``batches.extra["flags"]``; :func:`job_flags` turns it, the merged curves and
the plan into the job's list, so a resumed job is flagged as an uninterrupted one.
"""

from __future__ import annotations

import math
import re

from harness.core.defense import GradientPath
from harness.evaluation.resolve import ResolvedJob

#: Two purifications of one input that differ by more than this (max abs) are random (GPU kernels differ by ~1e-7).
RANDOMNESS_TOLERANCE = 1e-5

FLAG_NAMES = ("not_converged", "zero_gradients", "randomness_detected", "non_adaptive_only", "autoattack")

#: paths on which an attack's gradient goes through the purifier
THROUGH_DEFENSE = (GradientPath.FULL, GradientPath.ADJOINT, GradientPath.SURROGATE)


def not_converged(curves: dict[str, list[tuple[float, int]]]) -> list[dict]:
    """One flag per attack whose curve fell during its last 10% of iterations (at least one)."""
    out = []
    for label, pts in curves.items():
        iters = len(pts) - 1
        if iters < 1:
            continue
        k = max(1, math.ceil(0.1 * iters))
        before, last = float(pts[-1 - k][0]), float(pts[-1][0])
        if last < before - 1e-12:
            out.append({"flag": "not_converged", "detail": (
                f"{label}: robust accuracy still fell from {100 * before:.1f}% to {100 * last:.1f}% "
                f"in the last {k} of {iters} iterations")})
    return out


def adaptive_attacks(job: ResolvedJob) -> list[str]:
    """Labels of the planned attacks that differentiate through the defense."""
    return [pa.label for pa in job.plan.attacks
            if pa.attack.needs_gradients and (not pa.attack.uses_path or pa.path in THROUGH_DEFENSE)]


def job_flags(job: ResolvedJob, batches: list, curves: dict[str, list[tuple[float, int]]]) -> list[dict]:
    """The job's flags from its batches' evidence (``extra["flags"]``), its merged curves and its plan."""
    flags = not_converged(curves)
    evidence = [(getattr(b, "extra", None) or {}).get("flags") for b in batches]
    evidence = [e for e in evidence if e]
    zero = sum(e.get("zero_gradients", 0) for e in evidence)
    checked = sum(e["n"] for e in evidence if "zero_gradients" in e)
    if zero:
        path = next(e["gradient_path"] for e in evidence if "gradient_path" in e)
        flags.append({"flag": "zero_gradients", "detail": (
            f"{zero} of {checked} examples have an all-zero input gradient on the {path} path at the clean input")})
    diffs = [e["randomness"] for e in evidence if e.get("randomness") is not None]
    if diffs and max(diffs) > RANDOMNESS_TOLERANCE:
        flags.append({"flag": "randomness_detected", "detail": (
            f"defense '{job.defense.name}' is declared deterministic, but two purifications of the same clean inputs "
            f"differ (max abs difference {max(diffs):.3g})")})
    if not adaptive_attacks(job) and not type(job.defense).identity_purifier:
        paths = sorted({pa.path.value for pa in job.plan.attacks})
        flags.append({"flag": "non_adaptive_only", "detail": (
            f"no attack differentiated through the defense (attack paths: {', '.join(paths) or 'none'})")})
    seen: dict[str, int] = {}
    first: dict[str, str] = {}
    for e in evidence:
        for msg in e.get("autoattack", []):
            key = re.sub(r"\d+", "N", msg)
            seen[key] = seen.get(key, 0) + 1
            first.setdefault(key, msg)
    for key, count in seen.items():
        more = f" (in {count} of {len(evidence)} batches)" if count > 1 else ""
        flags.append({"flag": "autoattack", "detail": f"{first[key]}{more}"})
    return flags


def flag_names(flags: list | None) -> list[str]:
    """The distinct names of a stored flags value, in order (empty for NULL)."""
    return list(dict.fromkeys(f["flag"] if isinstance(f, dict) else str(f) for f in flags or []))


def format_flags(flags: list | None) -> str:
    """``name, name`` for a table cell ('' when nothing is flagged, '?' for a job stored before flags existed)."""
    if flags is None:
        return "?"
    return ",".join(flag_names(flags))
