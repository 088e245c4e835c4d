"""Expanding a grid into cells and planning them: resolve each, mark done / skipped / pending."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

from harness.core.registry import HarnessError
from harness.evaluation import IncompatibleError, ResolvedJob, RunConfig, resolve
from harness.scheduler.gridfile import GridSpec
from harness.store import Store, dumps

@dataclass
class Cell:
    cfg: RunConfig
    job: ResolvedJob | None = None
    job_id: str = ""
    state: str = "pending"  # pending | done | skipped | failed | ran
    reason: str | None = None

    def label(self) -> str:
        c = self.cfg
        return f"{c.defense} x {c.threat} x {c.dataset} x {c.classifier or 'default'} x seed {c.seed}"


def expand(spec: GridSpec) -> list[RunConfig]:

    cfgs = []
    for ds in spec.datasets:
        clfs = [c for c in spec.classifiers if c.datasets is None or ds.name in c.datasets] if spec.classifiers else [None]
        if spec.classifiers and not clfs:
            clfs = [None]
        for clf in clfs:
            for d in spec.defenses:
                if d.datasets is not None and ds.name not in d.datasets:
                    continue
                for t in spec.threats:
                    if d.threats is not None and t.name not in d.threats:
                        continue
                    for seed in spec.seeds:
                        over = spec.overrides + ds.overrides + (clf.overrides if clf else ()) + d.overrides + t.overrides
                        cfgs.append(
                            RunConfig(
                                defense=d.name, threat=t.name, dataset=ds.name,
                                classifier=clf.name if clf else None, weights=clf.weights if clf else None,
                                model_dir=clf.model_dir if clf else None, data_dir=ds.data_dir,
                                n_examples=ds.n_examples or spec.n_examples, seed=seed, data_seed=spec.data_seed,
                                overrides=over, plugins=spec.plugins,
                            )
                        )
    return cfgs


def cell_key(cfg: RunConfig) -> str:
    """Id of a cell that could not be resolved (no job identity exists for it)."""
    return "skip-" + hashlib.sha256(dumps(dataclasses.asdict(cfg)).encode()).hexdigest()[:59]


def plan(spec: GridSpec, store: Store, *, force: bool = False) -> list[Cell]:
    """Resolve every cell (on the CPU), mark done / skipped / pending."""
    cells = []
    for cfg in expand(spec):
        cell = Cell(cfg=cfg)
        try:
            cell.job = resolve(dataclasses.replace(cfg, device="cpu"))
            cell.job_id = cell.job.job_id
        except IncompatibleError as exc:
            cell.state, cell.reason, cell.job_id = "skipped", str(exc), cell_key(cfg)
        except HarnessError as exc:
            cell.state, cell.reason, cell.job_id = "skipped", str(exc), cell_key(cfg)
        if cell.state == "pending":
            row = store.get_job(cell.job_id)
            if row is not None and row.status == "done" and not force:
                cell.state = "done"
        cells.append(cell)
    # identical cells listed twice (e.g. a default classifier named explicitly) run once
    seen: dict[str, Cell] = {}
    for c in cells:
        if c.state == "pending" and c.job_id in seen:
            c.state, c.reason = "duplicate", f"same job as {seen[c.job_id].label()}"
        elif c.state == "pending":
            seen[c.job_id] = c
    return cells
