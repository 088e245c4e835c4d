"""``harness compare JOB_A JOB_B``: a paired comparison of two jobs on the examples they share.

Per shared example (same dataset, same dataset index) the outcomes of both jobs under
each job's headline scoring rule, robust and clean: the 2x2 table, both accuracies on
the shared examples, the difference B - A with its 95% Newcombe interval and the exact
McNemar p-value (two-sided binomial test on the discordant pairs;
:func:`harness.evaluation.stats.paired_comparison`), computed by
:func:`harness.store.paired.compare_stored`, which the dashboard's drill-down uses too.
"""

from __future__ import annotations

import json

from harness.core.registry import HarnessError


def find_job(store, prefix: str):
    """The one job whose id starts with ``prefix`` (a one-line error when none or several do)."""
    matches = store.find_jobs(prefix)
    if not matches:
        raise HarnessError(f"no job with id starting '{prefix}' in {store.shown_url}")
    if len(matches) > 1:
        raise HarnessError(f"job id prefix '{prefix}' is ambiguous ({len(matches)} jobs)")
    return matches[0]


def describe(job) -> str:
    """``defense x threat x dataset x classifier x seed`` of a stored job."""
    return f"{job.defense} x {job.threat} x {job.dataset} x {job.classifier} x seed {job.seed} (n={job.n_examples})"


def headline_rule(job) -> str:
    """The scoring rule a stored job's threat spec names (``worst`` when it names none)."""
    from harness.store.paired import headline_rule as rule

    return rule(job.config)


def compare_jobs(store, a, b) -> dict:
    """The paired comparison of stored jobs ``a`` and ``b`` (:func:`harness.store.paired.compare_stored`, which the
    dashboard uses too) as a JSON-able dict, with both jobs described.
    """
    from harness.store.paired import compare_stored

    for j in (a, b):
        if j.status != "done":
            raise HarnessError(f"job {j.id[:12]} is {j.status}, not done: nothing to compare")
    if a.dataset != b.dataset:
        raise HarnessError(f"jobs {a.id[:12]} ({a.dataset}) and {b.id[:12]} ({b.dataset}) share no examples: different datasets")
    paired = compare_stored(store.engine, a.id, b.id)
    if not paired["n_shared"]:
        raise HarnessError(f"jobs {a.id[:12]} and {b.id[:12]} share no examples (no common dataset index)")
    return {"job_a": a.id, "job_b": b.id, "a": describe(a), "b": describe(b), **paired}


def format_comparison(c: dict) -> str:
    """The text ``harness compare`` prints."""
    rules = c["rule_a"] if c["rule_a"] == c["rule_b"] else f"A {c['rule_a']}, B {c['rule_b']}"
    lines = [f"A  {c['job_a'][:12]}  {c['a']}", f"B  {c['job_b'][:12]}  {c['b']}",
             f"{c['n_shared']} shared examples (same dataset indices); scoring rule: {rules}"]
    for kind in ("robust", "clean"):
        r, t = c[kind], c[kind]["table"]
        lo, hi = r["difference_ci95"]
        lines += [
            "",
            f"{kind:<10}{'B right':>10}{'B wrong':>10}",
            f"{'  A right':<10}{t['both']:>10}{t['first_only']:>10}",
            f"{'  A wrong':<10}{t['second_only']:>10}{t['neither']:>10}",
            (f"  accuracy A {100 * r['accuracy_first']:.1f}%, B {100 * r['accuracy_second']:.1f}%; "
             f"B - A {100 * r['difference']:+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}] (95% Newcombe)"),
            f"  exact McNemar p = {r['p_value']:.4g} ({t['first_only']} right only under A, {t['second_only']} only under B)",
        ]
    return "\n".join(lines)


def cmd_compare(args) -> int:
    """``harness compare``: print the paired comparison of two jobs (as JSON with --json)."""
    from harness.store import Store

    store = Store(args.db, read_only=True)
    c = compare_jobs(store, find_job(store, args.job_a), find_job(store, args.job_b))
    print(json.dumps(c, indent=2) if args.json else format_comparison(c))
    return 0


def add_parser(sub) -> None:
    """Register ``harness compare``."""
    cp = sub.add_parser("compare", help="paired comparison of two jobs on their shared examples (exact McNemar)")
    cp.add_argument("job_a", help="job id or a unique prefix")
    cp.add_argument("job_b", help="job id or a unique prefix")
    cp.add_argument("--db", default=None)
    cp.add_argument("--json", action="store_true", help="one JSON object")
    cp.set_defaults(func=cmd_compare)
