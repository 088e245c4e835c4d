"""Evaluating one job: resolve what the user asked for, run it batch by batch, aggregate.

- :mod:`~harness.evaluation.resolve`: ``RunConfig`` -> ``ResolvedJob`` (data, models, spec, identity).
- :mod:`~harness.evaluation.plan`: the attack plan (suites expanded, paths, compatibility).
- :mod:`~harness.evaluation.forward`: the defended forward pass and per-batch generators.
- :mod:`~harness.evaluation.batch`: one batch in named steps.
- :mod:`~harness.evaluation.aggregate`: job metrics from the stored rows.
- :mod:`~harness.evaluation.flags`: flags on weak numbers (not_converged, zero_gradients, ...).
- :mod:`~harness.evaluation.lifecycle`: begin / write / finish / fail, shared by run and grid.
- :mod:`~harness.evaluation.quality`, :mod:`~harness.evaluation.stats`: PSNR/SSIM; intervals and tests.

The Python API::

    from harness.evaluation import RunConfig, resolve, run_job
    from harness.store import Store

    out = run_job(resolve(RunConfig(defense="none", threat="adaptive")), Store("results.db"))
"""

from harness.evaluation.lifecycle import JobOutcome, JobWriter, evaluate, iter_batches, run_job
from harness.evaluation.plan import IncompatibleError
from harness.evaluation.resolve import ResolvedJob, RunConfig, parse_set, resolve

__all__ = [
    "IncompatibleError", "JobOutcome", "JobWriter", "ResolvedJob", "RunConfig", "evaluate", "iter_batches",
    "parse_set", "resolve", "run_job",
]
