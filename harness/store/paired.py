"""The paired comparison of two stored jobs, the one implementation ``harness compare`` and the dashboard share.

Per example both jobs ran (same dataset index), the outcomes of each job under its own
headline scoring rule, clean and robust, go to :func:`harness.evaluation.stats.paired_jobs`:
the 2x2 table, both accuracies on the shared examples, the difference B - A with its 95%
Newcombe interval and the exact McNemar p-value.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.engine import Engine

from harness.evaluation.stats import paired_jobs
from harness.store.schema import ExampleRow, Job

RULES = ("single", "majority", "worst")


def headline_rule(config: dict | None) -> str:
    """The scoring rule a stored job's threat spec names (``worst`` when it names none)."""
    return ((config or {}).get("threat_spec") or {}).get("scoring") or "worst"


def compare_stored(engine: Engine, job_a: str, job_b: str) -> dict:
    """``rule_a``, ``rule_b``, ``n_shared`` and, when they share examples, the ``robust`` and ``clean`` comparisons
    (:func:`harness.evaluation.stats.paired_comparison`) of the stored jobs ``job_a`` and ``job_b``.
    """
    j, e = Job.__table__, ExampleRow.__table__
    both = [job_a, job_b]
    with engine.connect() as conn:
        rules = {r.id: headline_rule(r.config) for r in conn.execute(select(j.c.id, j.c.config).where(j.c.id.in_(both)))}
        rows = conn.execute(select(e.c.job_id, e.c.dataset_index, *(e.c[f"clean_{r}"] for r in RULES),
                                   *(e.c[f"robust_{r}"] for r in RULES)).where(e.c.job_id.in_(both))).all()
    per: dict[str, dict[int, tuple[bool, bool]]] = {job_a: {}, job_b: {}}
    for jid, idx, *vals in rows:
        k = RULES.index(rules.get(jid, "worst"))
        per[jid][int(idx)] = (bool(vals[k]), bool(vals[len(RULES) + k]))
    return {"rule_a": rules.get(job_a, "worst"), "rule_b": rules.get(job_b, "worst"), **paired_jobs(per[job_a], per[job_b])}
