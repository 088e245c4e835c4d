"""``harness grid``: run a YAML grid of cells (local worker processes or Ray), skipping stored ones."""

from __future__ import annotations


def cmd_grid(args) -> int:
    """``harness grid``: plan the grid file's cells against the store and run them (or, with --dry-run, list the plan);
    returns 1 if a cell failed, else 0.
    """
    from harness.core.registry import HarnessError
    from harness.scheduler import GridSummary, load_grid, plan, run_grid
    from harness.scheduler.cells import iter_plan
    from harness.store import Store, resolve_url
    from harness.store.store import display_url, open_existing

    spec = load_grid(args.file)
    if args.calibrate and not args.dry_run:
        raise HarnessError("--calibrate goes with --dry-run")
    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else ["cpu"]
    data = f"x {len(spec.data_seeds)} data seeds " if len(spec.data_seeds) > 1 else ""
    print(f"grid {spec.name}: {len(spec.defenses)} defenses x {len(spec.threats)} threats x {len(spec.datasets)} datasets "
          f"x {max(1, len(spec.classifiers))} classifiers {data}x {len(spec.seeds)} seeds -> {display_url(resolve_url(args.db))}")
    # planning only reads the store (when there is one): a mistake in the grid creates or changes nothing
    reader = open_existing(args.db)
    if args.dry_run:  # each cell printed as it is planned, its resolved job dropped after
        summary = GridSummary(print_dry_run(iter_plan(spec, reader, force=args.force, with_jobs=True),
                                            devices[0] if args.calibrate else None))
    else:
        cells = plan(spec, reader, force=args.force, with_jobs=False)
        store = Store(args.db)
        try:
            summary = run_grid(spec, store, executor=args.executor, devices=devices, address=args.address,
                               ray_cpus=args.ray_cpus, threads=args.threads, force=args.force, cells=cells)
        finally:
            store.close()
    counts = summary.counts()
    print("summary: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 1 if counts.get("failed") else 0


def _calibration_key(job) -> str:
    from harness.store import dumps

    paths = sorted({pa.path.value for pa in job.plan.attacks})
    return dumps([job.identity["defense"], job.identity["classifier"], job.cfg.dataset, paths, job.spec.batch_size,
                  job.spec.max_forward, len(job.subset.y)])


def budget(job) -> str:
    """`` (linf eps=0.2, t*=0.1)``: a planned job's norm and budget, and its defense's t* when it has one ('' without a job)."""
    if job is None:
        return ""
    t_star = getattr(getattr(job.defense, "config", None), "t_star", None)
    return f"  ({job.spec.norm} eps={job.spec.eps:.4g}" + (f", t*={t_star:g}" if isinstance(t_star, (int, float)) else "") + ")"


def print_dry_run(cells, calibrate_on: str | None) -> list:
    """Every cell's state and, for the cells that would run, their network evaluations; the totals.
    ``cells``: any iterable of planned cells with their jobs; returns them without their jobs.

    ``calibrate_on``: a device on which a few network calls per distinct (defense,
    classifier, dataset, paths) are timed, to estimate each cell's network time and the
    grid's device-hours.
    """
    from harness.cli.run import fmt_cost
    from harness.evaluation.cost import calibrate, estimate_nfe, estimate_seconds

    totals = {"cells": 0, "purifier_nfe_images": 0, "classifier_images": 0, "seconds": 0.0}
    missing = {"cells": 0, "purifier_nfe_images": 0, "classifier_images": 0}
    bounded = False
    cache: dict[str, object] = {}
    kept = []
    for c in cells:
        kept.append(c.light())
        state = {"pending": "run", "done": "done", "skipped": "skip", "duplicate": "dup"}.get(c.state, c.state)
        extra = f"  ({c.reason})" if c.reason else ""
        print(f"  {state:<5} {c.job_id[:12]}  {c.label()}{budget(c.job or c.estimate)}{extra}")
        if c.state == "skipped" and c.estimate is not None:  # a missing file: what the cell costs once it is there
            cost = estimate_nfe(c.estimate)
            for k in ("purifier_nfe_images", "classifier_images"):
                missing[k] += cost[k]
            missing["cells"] += 1
            bounded |= not cost["exact"]
            print(f"        nfe once its files are there: {fmt_cost(cost)}")
            continue
        if c.state != "pending" or c.job is None:
            continue
        cost = estimate_nfe(c.job)
        totals["cells"] += 1
        totals["purifier_nfe_images"] += cost["purifier_nfe_images"]
        totals["classifier_images"] += cost["classifier_images"]
        bounded |= not cost["exact"]
        line = f"        nfe: {fmt_cost(cost)}"
        if calibrate_on is not None:
            key = _calibration_key(c.job)
            if key not in cache:
                cache[key] = calibrate(c.job, calibrate_on)
            secs = estimate_seconds(cost, cache[key])
            totals["seconds"] += secs
            line += f"; ~{secs:.1f} s on {calibrate_on}"
        print(line)
    bound = "at most " if bounded else ""
    total = (f"total to run: {totals['cells']} cells, {bound}{totals['purifier_nfe_images']} purifier NFE-images, "
             f"{bound}{totals['classifier_images']} classifier images")
    if calibrate_on is not None:
        total += (f"; estimated network time {totals['seconds'] / 3600:.3f} device-hours on {calibrate_on} "
                  f"({len(cache)} calibration(s))")
    print(total)
    if missing["cells"]:
        print(f"skipped for missing files: {missing['cells']} cells, {bound}{missing['purifier_nfe_images']} purifier "
              f"NFE-images, {bound}{missing['classifier_images']} classifier images once the files are there"
              + ("; not calibrated (no network to time)" if calibrate_on is not None else ""))
    return kept


def add_parser(sub) -> None:
    """Register ``harness grid``."""
    g = sub.add_parser("grid", help="run a YAML grid of cells (resumable)")
    g.add_argument("file", help="grid YAML file")
    g.add_argument("--db", default=None)
    g.add_argument("--executor", default="local", choices=["local", "ray"])
    g.add_argument("--devices", default="cpu", help="comma-separated: cpu or cuda:0,cuda:1 (one worker each)")
    g.add_argument("--address", default=None, help="Ray cluster address (e.g. auto); default: start a local Ray")
    g.add_argument("--ray-cpus", type=int, default=None, help="CPUs of a locally started Ray instance")
    g.add_argument("--threads", type=int, default=None,
                   help="torch threads per worker (default: CPU cores / workers locally, 1 per Ray task; 1 is faster on a loaded machine)")
    g.add_argument("--dry-run", action="store_true",
                   help="list what would run and what is already done, with each cell's network evaluations and the total")
    g.add_argument("--calibrate", action="store_true",
                   help="with --dry-run: time a few network calls on the first of --devices and estimate device-hours")
    g.add_argument("--force", action="store_true", help="recompute cells already in the store (old rows kept until each finishes)")
    g.set_defaults(func=cmd_grid)
