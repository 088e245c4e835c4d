"""Regression checks of stored results against an accuracy table (``harness check``).

A table is a CSV with the columns ``defense, threat, dataset, classifier, metric,
expected, tolerance``; optional columns ``seed``, ``norm``, ``eps``, ``n_examples``,
``shift`` (:func:`shift_label`, e.g. ``brightness:severity=3``) and ``trained_on`` (the
purifier's training dataset) narrow the match. ``tolerance`` is an absolute difference; left empty, the stored
result's own 95% interval is the tolerance (the expected value must lie inside it). A
row with no matching finished job fails, as does a result outside its tolerance.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from harness.core.registry import HarnessError
from harness.store import Store

REQUIRED = ("defense", "threat", "dataset", "classifier", "metric", "expected", "tolerance")
OPTIONAL = ("seed", "norm", "eps", "n_examples", "shift", "trained_on")


def shift_label(config: dict | None) -> str:
    """A job's input shift as ``name`` or ``name:key=value,...`` (from its stored configuration)."""
    shift = (config or {}).get("shift") or {}
    opts = ",".join(f"{k}={v}" for k, v in sorted((shift.get("config") or {}).items()))
    return f"{shift.get('name', 'none')}:{opts}" if opts else str(shift.get("name", "none"))


def trained_on(config: dict | None) -> str:
    """The dataset a job's purifier was trained on ('' for defenses without the option)."""
    return str(((config or {}).get("defense_config") or {}).get("trained_on") or "")


def job_value(job, column: str):
    """A job's value of a table column (the jobs row, or its configuration for shift / trained_on)."""
    if column == "shift":
        return shift_label(job.config)
    if column == "trained_on":
        return trained_on(job.config)
    return getattr(job, column)


@dataclass
class CheckRow:
    """One accuracy-table row (match key, metric, expected value, tolerance) and the result of checking it."""

    key: dict
    metric: str
    expected: float
    tolerance: float | None
    stored: float | None = None
    lower: float | None = None
    upper: float | None = None
    job_id: str | None = None
    ok: bool = False
    note: str = ""
    flags: list | None = None  # the matched job's flags (harness.evaluation.flags)
    cell: str = ""  # defense x threat x dataset x classifier x seed of the matched job


def _float(value: str, what: str, line: int, path: str) -> float | None:
    if value is None or value.strip() == "":
        return None
    try:
        v = float(value)
    except ValueError:
        raise HarnessError(f"{path}: line {line}: {what}={value!r} is not a number") from None
    if math.isnan(v):
        raise HarnessError(f"{path}: line {line}: {what} is NaN")
    return v


def load_table(path: str | Path) -> list[CheckRow]:
    """Read an accuracy table CSV into rows; a one-line error for a missing file, column or number."""
    p = Path(path)
    if not p.is_file():
        raise HarnessError(f"accuracy table {path} does not exist")
    rows = []
    with p.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise HarnessError(f"{path}: missing column(s) {', '.join(missing)} (need {', '.join(REQUIRED)})")
        for i, r in enumerate(reader, start=2):
            exp = _float(r["expected"], "expected", i, str(path))
            if exp is None:
                raise HarnessError(f"{path}: line {i}: expected is empty")
            tol = _float(r["tolerance"], "tolerance", i, str(path))
            key = {c: r[c].strip() for c in ("defense", "threat", "dataset", "classifier")}
            for c in OPTIONAL:
                if c in r and r[c] is not None and r[c].strip() != "":
                    key[c] = r[c].strip()
            rows.append(CheckRow(key=key, metric=r["metric"].strip(), expected=exp, tolerance=tol))
    return rows


def _matches(job, key: dict) -> bool:
    for c, v in key.items():
        have = job_value(job, c)
        if c in ("eps",):
            if have is None or abs(float(have) - float(v)) > 1e-9:
                return False
        elif c in ("seed", "n_examples"):
            if int(have) != int(v):
                return False
        elif str(have) != v:
            return False
    return True


def check(table: str | Path | list[CheckRow], store: Store) -> list[CheckRow]:
    """Compare every row of ``table`` (a CSV path or its :func:`load_table` rows) with the store."""
    rows = table if isinstance(table, list) else load_table(table)
    jobs = store.jobs(status="done")
    for row in rows:
        found = [j for j in jobs if _matches(j, row.key)]
        if not found:
            row.note = "no finished job matches"
            continue
        job = max(found, key=lambda j: j.finished_at or j.created_at)
        if len(found) > 1:
            row.note = f"{len(found)} jobs match; latest used"
        m = store.metrics(job.id).get(row.metric)
        row.job_id = job.id[:12]
        row.flags = job.flags
        row.cell = f"{job.defense} x {job.threat} x {job.dataset} x {job.classifier} x seed {job.seed}"
        if m is None:
            row.note = f"job has no metric '{row.metric}'"
            continue
        row.stored, row.lower, row.upper = m.value, m.lower, m.upper
        if row.tolerance is not None:
            row.ok = abs(m.value - row.expected) <= row.tolerance + 1e-12
        elif m.lower is not None and m.upper is not None:
            row.ok = m.lower - 1e-12 <= row.expected <= m.upper + 1e-12
        else:
            row.ok = abs(m.value - row.expected) <= 1e-9
            row.note = row.note or "no interval stored: exact match required"
    return rows


def flagged_cells(rows: list[CheckRow]) -> list[str]:
    """One line per matched job that carries flags (``harness check --fail-on-flags``), each job once."""
    out: dict[str, str] = {}
    for r in rows:
        if r.job_id and r.flags and r.job_id not in out:
            details = "; ".join(f"{f['flag']}: {f['detail']}" if isinstance(f, dict) else str(f) for f in r.flags)
            out[r.job_id] = f"{r.job_id}  {r.cell}  {details}"
    return list(out.values())


def format_rows(rows: list[CheckRow]) -> str:
    """The checked rows as a plain-text table (ok/FAIL, key, expected, stored, difference, tolerance, job, note)."""
    import pandas as pd

    def f(v):
        return "-" if v is None else f"{v:.4f}"

    data = []
    for r in rows:
        data.append(
            {
                "ok": "ok" if r.ok else "FAIL",
                **{k: r.key[k] for k in ("defense", "threat", "dataset", "classifier")},
                "metric": r.metric,
                "expected": f(r.expected),
                "stored": f(r.stored),
                "diff": "-" if r.stored is None else f"{r.stored - r.expected:+.4f}",
                "tolerance": f"±{r.tolerance:.4f}" if r.tolerance is not None
                else (f"[{f(r.lower)}, {f(r.upper)}]" if r.lower is not None else "-"),
                "job": r.job_id or "-",
                "note": r.note,
            }
        )
    return pd.DataFrame(data).to_string(index=False) if data else "(empty table)"
