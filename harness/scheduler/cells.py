"""Expanding a grid into cells and planning them: resolve each, mark done / skipped / pending.

What is skipped and what stops the grid:

- **skipped** (stored with the reason; the rest of the grid runs): a valid cell that
  cannot run. That is an :class:`~harness.evaluation.IncompatibleError` (the pair's
  declared capabilities exclude it: a gradient path the defense lacks, an attack without
  EOT on a stochastic defense, a shift that does not apply to the dataset) or a
  :class:`~harness.core.registry.MissingFileError` (a file or folder the cell needs is
  not on this machine: a defense's or classifier's weights, a checkpoint, a data folder).
- **an error** (:class:`GridError`, exit 2, before any job runs or anything is stored):
  every other problem, which is a mistake in the grid: an unknown name, an unknown or
  invalid ``set`` key or value, a budget out of range, a missing plugin file, a weights
  or data file that is there but unreadable. The message names the file and the line
  (for a ``set`` value, the line of the key that makes the cell fail).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Iterator

from harness.core.registry import HarnessError, MissingFileError
from harness.evaluation import IncompatibleError, ResolvedJob, RunConfig, resolve
from harness.evaluation.batch import adv_cache_key
from harness.evaluation.resolve import plan_without_files, sharing_networks
from harness.scheduler.gridfile import GridError, GridSpec
from harness.store import Store, dumps

#: The errors that mean "valid, but cannot run here": the cell is recorded as skipped.
SKIPPED_ERRORS = (IncompatibleError, MissingFileError)


@dataclass
class Cell:
    """One grid cell: its run configuration, the resolved job and its id, and its state (with a reason when skipped or failed)."""

    cfg: RunConfig
    job: ResolvedJob | None = None
    job_id: str = ""
    state: str = "pending"  # pending | done | skipped | failed | ran
    reason: str | None = None
    #: the overrides this cell's axis entries add to the grid-wide ``set`` (shown in the label: two cells of one
    #: threat with different ``set`` values must not read the same)
    axis_overrides: tuple[tuple[str, str], ...] = ()
    #: a cell skipped for a missing file: a stand-in job without data, classifier or weights, for its cost
    #: (:func:`harness.evaluation.resolve.plan_without_files`); None otherwise
    estimate: ResolvedJob | None = None
    #: the key of the defense-independent adversarial examples its first batch would reuse
    #: (:func:`harness.evaluation.batch.adv_cache_key`), None when it has none
    adv_key: str | None = None
    #: whether the grid lists several data seeds (then the label names the cell's)
    several_data_seeds: bool = False

    def label(self) -> str:
        c = self.cfg
        extra = f" [{', '.join(f'{k}={v}' for k, v in self.axis_overrides)}]" if self.axis_overrides else ""
        data = f" x data_seed {c.data_seed}" if self.several_data_seeds else ""
        return f"{c.defense} x {c.threat} x {c.dataset} x {c.classifier or 'default'}{data} x seed {c.seed}{extra}"

    def light(self) -> Cell:
        """This cell without its resolved job (what a grid keeps of each cell: no network, no data)."""
        return dataclasses.replace(self, job=None, estimate=None)


def _n_examples(spec: GridSpec, d, t, ds) -> int | None:
    """A cell's subset size: the defense's (per threat, then for all), the threat's, the dataset's, the grid's."""
    return dict(d.n_by_threat).get(t.name) or d.n_examples or t.n_examples or ds.n_examples or spec.n_examples


def _expand(spec: GridSpec) -> Iterator[tuple[RunConfig, tuple[str, ...]]]:
    """Every cell's RunConfig, with where in the file each of its overrides was written (lazily, in grid order)."""
    for ds in spec.datasets:
        clfs = [c for c in spec.classifiers if c.datasets is None or ds.name in c.datasets] if spec.classifiers else [None]
        if spec.classifiers and not clfs:
            clfs = [None]
        for clf in clfs:
            for d in spec.defenses:
                if d.datasets is not None and ds.name not in d.datasets:
                    continue
                if d.classifiers is not None and (clf.name if clf else None) not in d.classifiers:
                    continue
                for t in spec.threats:
                    if d.threats is not None and t.name not in d.threats:
                        continue
                    over = spec.overrides + ds.overrides + (clf.overrides if clf else ()) + d.overrides + t.overrides
                    where = spec.set_where + ds.set_where + (clf.set_where if clf else ()) + d.set_where + t.set_where
                    for data_seed in spec.data_seeds:
                        for seed in spec.seeds:
                            yield RunConfig(
                                defense=d.name, threat=t.name, dataset=ds.name,
                                classifier=clf.name if clf else None, weights=clf.weights if clf else None,
                                model_dir=clf.model_dir if clf else None, data_dir=ds.data_dir,
                                n_examples=_n_examples(spec, d, t, ds), seed=seed, data_seed=data_seed,
                                overrides=over, plugins=spec.plugins,
                            ), where


def expand(spec: GridSpec) -> list[RunConfig]:
    """The RunConfig of every cell: the product of the axes, with the overrides of every level."""
    return [cfg for cfg, _ in _expand(spec)]


def check_names(spec: GridSpec) -> None:
    """Load the grid's plugins and look up every name it gives; GridError with the line otherwise."""
    from harness.classifiers import classifier_entry
    from harness.core.defense import DEFENSES
    from harness.core.plugins import load_builtin, load_plugin
    from harness.data import DATASETS
    from threat_models.specs import THREATS

    load_builtin()
    for plugin, where in zip(spec.plugins, spec.plugins_where, strict=True):
        try:
            load_plugin(plugin)
        except HarnessError as exc:
            raise GridError(f"{where}: {exc}") from None
    lookups = {"defenses": DEFENSES.get, "threats": THREATS.get, "datasets": DATASETS.get, "classifiers": classifier_entry}
    for axis, get in lookups.items():
        for entry in getattr(spec, axis):
            _check_name(entry.name, get, f"{entry.where}: {axis}")
    for clf in spec.classifiers:
        for ds in clf.datasets or ():
            _check_name(ds, DATASETS.get, f"{clf.where}: classifiers: datasets")
    listed = {c.name for c in spec.classifiers}
    for d in spec.defenses:
        for c in d.classifiers or ():
            if c not in listed:
                raise GridError(f"{d.where}: defenses: classifiers: '{c}' is not in the grid's classifiers ({', '.join(sorted(listed))})")


def _check_name(name: str, get, where: str) -> None:
    try:
        get(name)
    except HarnessError as exc:
        hint = ""
        if len(name.split()) > 1 and all(_known(part, get) for part in name.split()):
            hint = "; it reads as one name: put each entry on its own '- ' line at the same indentation"
        raise GridError(f"{where}: {exc}{hint}") from None


def _known(name: str, get) -> bool:
    try:
        get(name)
    except HarnessError:
        return False
    return True


def _culprit(cfg: RunConfig, origins: tuple[str, ...], message: str) -> str | None:
    """Where the ``set`` pair that makes a cell fail was written: the shortest prefix of the
    cell's overrides whose resolution fails with the same message (None: no ``set`` pair).
    """

    def fails(n: int) -> bool:
        try:
            resolve(dataclasses.replace(cfg, overrides=cfg.overrides[:n], device="cpu"))
        except HarnessError as exc:
            return str(exc) == message
        return False

    if fails(0):
        return None
    return next((origins[n - 1] for n in range(1, len(origins) + 1) if fails(n)), None)


def cell_key(cfg: RunConfig) -> str:
    """Id of a cell that could not be resolved (no job identity exists for it)."""
    return "skip-" + hashlib.sha256(dumps(dataclasses.asdict(cfg)).encode()).hexdigest()[:59]


def _plan_cell(spec: GridSpec, done: set[str], cfg: RunConfig, origins: tuple[str, ...], force: bool) -> Cell:
    """Resolve one cell (on the CPU) and mark it pending, skipped or done (``done``: the store's finished job ids)."""
    cell = Cell(cfg=cfg, axis_overrides=cfg.overrides[len(spec.overrides):], several_data_seeds=len(spec.data_seeds) > 1)
    try:
        cell.job = resolve(dataclasses.replace(cfg, device="cpu"))
        cell.job_id = cell.job.job_id
        cell.adv_key = adv_cache_key(cell.job, 0)
    except SKIPPED_ERRORS as exc:
        cell.state, cell.reason, cell.job_id = "skipped", str(exc), cell_key(cfg)
        if isinstance(exc, MissingFileError):
            try:
                cell.estimate = plan_without_files(dataclasses.replace(cfg, device="cpu"))
            except HarnessError:
                cell.estimate = None  # the cost needs what is missing (e.g. a checkpoint's own architecture)
    except HarnessError as exc:
        raise GridError(f"{_culprit(cfg, origins, str(exc)) or spec.path}: {exc} (cell {cell.label()})") from None
    if cell.state == "pending" and cell.job_id in done and not force:
        cell.state = "done"
    return cell


def iter_plan(spec: GridSpec, store: Store | None, *, force: bool = False, with_jobs: bool = False) -> Iterator[Cell]:
    """Resolve the cells one at a time (on the CPU) and yield each marked done / skipped / pending / duplicate.

    Lazy: a cell's resolved job (its networks and data) lives only while the cell is
    planned, and the cell is yielded without it (:meth:`Cell.light`) unless ``with_jobs``
    (a dry run prints each cell's cost from it, then drops it). Networks are built once
    per distinct network for the whole plan (:func:`sharing_networks`) and released when
    it ends, so a grid of 100,000 cells holds no more networks than a grid of 10, and per
    cell only its configuration, id and state. ``store`` None plans against an empty
    store. Identical cells listed twice (e.g. a default classifier named explicitly) run
    once: the later ones are ``duplicate``.

    Raises:
        GridError: a mistake in the grid (see the module docstring), when the cell that shows it is reached.
    """
    check_names(spec)
    done = store.job_ids(status="done") if store is not None else set()  # one query, not one per cell
    first: dict[str, str] = {}  # job id -> the label of the first pending cell with it
    with sharing_networks():  # one copy of each network for all cells
        for cfg, origins in _expand(spec):
            c = _plan_cell(spec, done, cfg, origins, force)
            if c.state == "pending" and c.job_id in first:
                c.state, c.reason = "duplicate", f"same job as {first[c.job_id]}"
            elif c.state == "pending":
                first[c.job_id] = c.label()
            yield c if with_jobs else c.light()


def plan(spec: GridSpec, store: Store | None, *, force: bool = False, with_jobs: bool = True) -> list[Cell]:
    """Every cell of :func:`iter_plan`, as a list (with their resolved jobs unless ``with_jobs`` is False).

    ``store`` None plans against an empty store (a dry run on a store that does not exist).

    Raises:
        GridError: a mistake in the grid (see the module docstring), before anything runs.
    """
    return list(iter_plan(spec, store, force=force, with_jobs=with_jobs))
