"""Grids: expand a YAML file into jobs, skip what is stored, run the rest on workers.

A grid file::

    name: smoke
    n_examples: 32                 # default for every cell (a dataset entry may override)
    seeds: [0]                     # attack/purification seeds (one cell each)
    data_seed: 0
    set: {batch_size: 32}          # overrides applied to every cell (threat or defense keys)
    plugins: [path/to/my_defense.py]
    defenses:
      - none
      - name: diffpure
        set: {t_star: 0.1}         # per-axis overrides
    threats:
      - preprocessor-blind
      - name: adaptive
        set: {steps: 20}
    datasets:
      - digits
      - name: cifar10
        data_dir: /data/cifar10.npz
        n_examples: 64
    classifiers:                   # optional: default is each dataset's shipped classifier
      - name: resnet20
        weights: /models/resnet20-12fca82f.th
        datasets: [cifar10]

The cells are the product defenses x threats x datasets x classifiers x seeds. A cell
that cannot run (an incompatible pair, missing weights) is stored as ``skipped`` with the
reason. Only the parent process writes to the store: workers (one process per device,
or Ray tasks) stream each finished batch back, and the parent writes it at once, so a
killed grid loses at most the batches in flight and a rerun continues mid-job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import queue
import signal
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

from harness.engine import IncompatibleError, ResolvedJob, RunConfig, _job_fields, finish, iter_batches, resolve
from harness.registry import HarnessError, suggest
from harness.store import Store, dumps

TOP_KEYS = {"name", "n_examples", "seeds", "seed", "data_seed", "data_seeds", "set", "plugins", "defenses", "threats", "datasets", "classifiers", "device"}
AXIS_KEYS = {
    "defenses": {"name", "set"},
    "threats": {"name", "set"},
    "datasets": {"name", "set", "data_dir", "n_examples"},
    "classifiers": {"name", "weights", "model_dir", "datasets", "set"},
}


class GridError(HarnessError):
    pass


# --------------------------------------------------------------------------- parsing
class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line of every mapping key (for error messages)."""


def _construct_mapping(loader, node, deep=False):
    mapping = {}
    lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, (str, int, float, bool)) or key is None:
            raise GridError(f"line {key_node.start_mark.line + 1}: mapping keys must be names")
        mapping[key] = loader.construct_object(value_node, deep=True)
        lines[key] = key_node.start_mark.line + 1
    out = _Map(mapping)
    out.lines = lines
    out.line = node.start_mark.line + 1
    return out


class _Map(dict):
    lines: dict
    line: int


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


@dataclass(frozen=True)
class AxisEntry:
    name: str
    overrides: tuple[tuple[str, str], ...] = ()
    data_dir: str | None = None
    n_examples: int | None = None
    weights: str | None = None
    model_dir: str | None = None
    datasets: tuple[str, ...] | None = None


@dataclass(frozen=True)
class GridSpec:
    name: str
    defenses: tuple[AxisEntry, ...]
    threats: tuple[AxisEntry, ...]
    datasets: tuple[AxisEntry, ...]
    classifiers: tuple[AxisEntry, ...] = ()
    seeds: tuple[int, ...] = (0,)
    data_seed: int = 0
    n_examples: int | None = None
    overrides: tuple[tuple[str, str], ...] = ()
    plugins: tuple[str, ...] = ()


def _where(path: str, m: Any, key: str | None = None) -> str:
    line = None
    if isinstance(m, _Map):
        line = m.lines.get(key, m.line) if key is not None else m.line
    return f"{path}: line {line}" if line else path


def _overrides(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise GridError(f"{where}: 'set' must be a mapping of key: value")
    out = []
    for k, v in value.items():
        if isinstance(v, (list, tuple)):
            v = ",".join(map(str, v))
        out.append((str(k), str(v)))
    return tuple(out)


def _axis(doc: _Map, axis: str, path: str, required: bool) -> tuple[AxisEntry, ...]:
    if axis not in doc:
        if required:
            raise GridError(f"{_where(path, doc)}: missing required key '{axis}'")
        return ()
    items = doc[axis]
    if not isinstance(items, list) or not items:
        raise GridError(f"{_where(path, doc, axis)}: '{axis}' must be a non-empty list")
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(AxisEntry(name=item))
            continue
        if not isinstance(item, dict) or "name" not in item:
            raise GridError(f"{_where(path, doc, axis)}: each entry of '{axis}' is a name or a mapping with 'name'")
        for k in item:
            if k not in AXIS_KEYS[axis]:
                raise GridError(f"{_where(path, item, k)}: unknown key '{k}' in {axis}{suggest(str(k), sorted(AXIS_KEYS[axis]))}")
        w = _where(path, item)
        n = item.get("n_examples")
        if n is not None and (not isinstance(n, int) or n < 1):
            raise GridError(f"{_where(path, item, 'n_examples')}: n_examples must be a positive integer")
        ds = item.get("datasets")
        if ds is not None and not (isinstance(ds, list) and all(isinstance(d, str) for d in ds)):
            raise GridError(f"{_where(path, item, 'datasets')}: 'datasets' must be a list of dataset names")
        out.append(
            AxisEntry(
                name=str(item["name"]), overrides=_overrides(item.get("set"), w), data_dir=item.get("data_dir"),
                n_examples=n, weights=item.get("weights"), model_dir=item.get("model_dir"),
                datasets=tuple(ds) if ds is not None else None,
            )
        )
    return tuple(out)


def _int_list(doc: _Map, key: str, path: str) -> tuple[int, ...]:
    v = doc[key]
    vals = v if isinstance(v, list) else [v]
    if not vals or not all(isinstance(i, int) and not isinstance(i, bool) for i in vals):
        raise GridError(f"{_where(path, doc, key)}: '{key}' must be an integer or a list of integers")
    return tuple(vals)


def load_grid(path: str | Path) -> GridSpec:
    """Parse and validate a grid file; errors name the key and its line."""
    p = Path(path)
    if not p.is_file():
        raise GridError(f"grid file {path} does not exist")
    try:
        doc = yaml.load(p.read_text(), Loader=_LineLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        raise GridError(f"{path}: {line}invalid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if not isinstance(doc, _Map):
        raise GridError(f"{path}: a grid file is a mapping with defenses, threats and datasets")
    for k in doc:
        if k not in TOP_KEYS:
            raise GridError(f"{_where(str(path), doc, k)}: unknown key '{k}'{suggest(str(k), sorted(TOP_KEYS))}")
    sp = str(path)
    seeds = _int_list(doc, "seeds", sp) if "seeds" in doc else (_int_list(doc, "seed", sp) if "seed" in doc else (0,))
    data_seed = _int_list(doc, "data_seed", sp)[0] if "data_seed" in doc else 0
    n = doc.get("n_examples")
    if n is not None and (not isinstance(n, int) or n < 1):
        raise GridError(f"{_where(sp, doc, 'n_examples')}: n_examples must be a positive integer")
    plugins = doc.get("plugins") or []
    if not isinstance(plugins, list):
        raise GridError(f"{_where(sp, doc, 'plugins')}: 'plugins' must be a list of files or modules")
    base = p.parent
    plugins = tuple(str((base / pl).resolve()) if str(pl).endswith(".py") and not Path(pl).is_absolute() else str(pl) for pl in plugins)
    return GridSpec(
        name=str(doc.get("name", p.stem)),
        defenses=_axis(doc, "defenses", sp, True),
        threats=_axis(doc, "threats", sp, True),
        datasets=_axis(doc, "datasets", sp, True),
        classifiers=_axis(doc, "classifiers", sp, False),
        seeds=seeds,
        data_seed=data_seed,
        n_examples=n,
        overrides=_overrides(doc.get("set"), _where(sp, doc, "set")),
        plugins=plugins,
    )


# --------------------------------------------------------------------------- expansion
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
                for t in spec.threats:
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


# --------------------------------------------------------------------------- workers
def _die_with_parent() -> None:
    """Linux: make a worker die when the grid process dies (even by SIGKILL)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _worker_main(device: str, tasks, results, threads: int | None, store_url: str) -> None:
    _die_with_parent()
    import torch

    if threads:
        torch.set_num_threads(threads)
    reader = Store(store_url, read_only=True)  # workers only read (the adversarial-example cache)
    while True:
        item = tasks.get()
        if item is None:
            return
        job_id, cfg, skip = item
        try:
            job = resolve(dataclasses.replace(cfg, device=device))
            if job.job_id != job_id:
                raise HarnessError(f"job identity differs on worker {device} ({job.job_id[:12]} != {job_id[:12]}): package versions?")
            for b, payload in iter_batches(job, set(skip), adv_lookup=reader.get_adv):
                results.put(("batch", job_id, b, payload))
            results.put(("done", job_id, None, None))
        except BaseException as exc:  # report, then keep serving other jobs
            msg = str(exc) if isinstance(exc, HarnessError) else f"{type(exc).__name__}: {exc}"
            results.put(("error", job_id, None, msg + ("" if isinstance(exc, HarnessError) else "\n" + traceback.format_exc(limit=3))))


class LocalExecutor:
    """One worker process per device in ``devices``; the parent writes every row."""

    def __init__(self, devices: list[str], threads: int | None = None):
        self.devices = devices
        self.threads = threads

    def run(self, cells: list[Cell], store: Store, on_event) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # CUDA-safe, and no inherited sqlite connections
        tasks, results = ctx.Queue(), ctx.Queue()
        threads = self.threads or max(1, (os.cpu_count() or 1) // max(1, len(self.devices)))
        procs = [ctx.Process(target=_worker_main, args=(d, tasks, results, threads, store.url), daemon=True) for d in self.devices]
        for p in procs:
            p.start()
        pending = 0
        for c in cells:
            tasks.put((c.job_id, c.cfg, sorted(store.done_batches(c.job_id))))
            pending += 1
        for _ in procs:
            tasks.put(None)
        try:
            while pending:
                try:
                    kind, job_id, b, payload = results.get(timeout=5)
                except queue.Empty:
                    if not any(p.is_alive() for p in procs):
                        raise HarnessError("all grid workers died") from None
                    continue
                on_event(kind, job_id, b, payload)
                if kind in ("done", "error"):
                    pending -= 1
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
                p.join(timeout=5)


class RayExecutor:
    """Every job is a Ray task that requests its device; batches stream back to the driver.

    Uses Ray's streaming generators, so each batch reaches the driver (which alone
    writes to the store) as soon as the task yields it.
    """

    def __init__(self, address: str | None, gpus_per_job: float, num_cpus: int | None = None):
        self.address, self.gpus_per_job, self.num_cpus = address, gpus_per_job, num_cpus

    def run(self, cells: list[Cell], store: Store, on_event) -> None:
        try:
            import ray
        except ImportError:
            raise HarnessError("--executor ray needs Ray: pip install 'ray==2.60.0'") from None
        started = False
        if not ray.is_initialized():
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "ignore_reinit_error": True}
            if self.address:
                kw["address"] = self.address
            elif self.num_cpus:
                kw["num_cpus"] = self.num_cpus
            # workers import the harness from the same source tree as the driver
            root = str(Path(__file__).resolve().parent.parent)
            kw["runtime_env"] = {"env_vars": {"PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}}
            ray.init(**kw)
            started = True
        try:
            task = ray.remote(num_returns="streaming")(_ray_job)
            gens = {}
            for c in cells:
                opts = {"num_gpus": self.gpus_per_job, "num_cpus": 1}
                ref = task.options(**opts).remote(c.job_id, c.cfg, sorted(store.done_batches(c.job_id)), store.url, self.gpus_per_job > 0)
                gens[ref] = c.job_id
            while gens:
                ready, _ = ray.wait(list(gens), num_returns=1, timeout=10)
                for gen in ready:
                    job_id = gens[gen]
                    try:
                        ref = next(gen)
                    except StopIteration:
                        del gens[gen]
                        on_event("done", job_id, None, None)
                        continue
                    try:
                        b, payload = ray.get(ref)
                    except Exception as exc:  # the task raised
                        del gens[gen]
                        cause = getattr(exc, "cause", None) or exc
                        on_event("error", job_id, None, str(cause).splitlines()[0] if str(cause) else type(cause).__name__)
                        continue
                    on_event("batch", job_id, b, payload)
        finally:
            if started:
                ray.shutdown()


def _ray_job(job_id: str, cfg: RunConfig, skip: list[int], store_url: str, gpu: bool) -> Iterator[tuple[int, dict]]:
    device = "cuda" if gpu else "cpu"
    job = resolve(dataclasses.replace(cfg, device=device))
    if job.job_id != job_id:
        raise HarnessError(f"job identity differs on the Ray worker ({job.job_id[:12]} != {job_id[:12]}): package versions?")
    # the adversarial-example cache is read where the SQLite file is visible (same machine
    # or a shared filesystem); elsewhere the worker computes them itself
    path = store_url.split("sqlite:///", 1)[1] if store_url.startswith("sqlite:///") else None
    reader = Store(store_url, read_only=True) if path and Path(path).is_file() else None
    for b, payload in iter_batches(job, set(skip), adv_lookup=reader.get_adv if reader else None):
        yield b, payload


# --------------------------------------------------------------------------- the grid
@dataclass
class GridSummary:
    cells: list[Cell] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.cells:
            out[c.state] = out.get(c.state, 0) + 1
        return out


def run_grid(
    spec: GridSpec,
    store: Store,
    *,
    executor: str = "local",
    devices: list[str] | None = None,
    address: str | None = None,
    ray_cpus: int | None = None,
    force: bool = False,
    dry_run: bool = False,
    log=print,
) -> GridSummary:
    cells = plan(spec, store, force=force)
    summary = GridSummary(cells)
    if dry_run:
        return summary
    for c in cells:
        if c.state == "skipped":
            store.record_skip(
                c.job_id, c.reason or "", defense=c.cfg.defense, threat=c.cfg.threat, dataset=c.cfg.dataset,
                classifier=c.cfg.classifier or "default", seed=c.cfg.seed, n_examples=c.cfg.n_examples or 0,
                identity={"run_config": dataclasses.asdict(c.cfg)}, config={"run_config": dataclasses.asdict(c.cfg)},
            )
    todo = [c for c in cells if c.state == "pending"]
    if force:
        for c in todo:
            store.reset_job(c.job_id)
    by_id = {c.job_id: c for c in todo}
    started = {c.job_id: time.perf_counter() for c in todo}
    resumed = {}
    for c in todo:
        resumed[c.job_id] = len(store.done_batches(c.job_id))
        store.begin_job(c.job_id, **_job_fields(c.job))

    def on_event(kind: str, job_id: str, b: int | None, payload: Any) -> None:
        cell = by_id[job_id]
        if kind == "batch":
            store.write_batch(job_id, b, **payload)
        elif kind == "done":
            try:
                finish(cell.job, store, run_s=time.perf_counter() - started[job_id], resumed=resumed[job_id])
                cell.state = "ran"
                m = store.metrics(job_id)
                log(f"  done    {cell.label()}: clean {m['clean_accuracy'].value:.3f} robust {m['robust_accuracy'].value:.3f}")
            except HarnessError as exc:
                cell.state, cell.reason = "failed", str(exc)
                store.fail_job(job_id, str(exc))
                log(f"  FAILED  {cell.label()}: {exc}")
        else:
            cell.state, cell.reason = "failed", payload
            store.fail_job(job_id, payload)
            log(f"  FAILED  {cell.label()}: {str(payload).splitlines()[0]}")

    if todo:
        if executor == "local":
            LocalExecutor(devices or ["cpu"]).run(todo, store, on_event)
        elif executor == "ray":
            gpu = any(d.startswith("cuda") for d in (devices or []))
            RayExecutor(address, 1.0 if gpu else 0.0, ray_cpus).run(todo, store, on_event)
        else:
            raise HarnessError(f"unknown executor '{executor}'{suggest(executor, ['local', 'ray'])} (local or ray)")
    return summary
