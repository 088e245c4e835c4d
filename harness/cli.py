"""``harness``: a thin command-line shell over the Python API (:mod:`harness.engine`).

Subcommands:
  run       evaluate one (defense, threat, dataset, classifier, seed) cell and store it
  ls        list registered defenses, threats, datasets, classifiers
  results   print the stored results (table, csv or json)
  show      one job in full: configuration, identity, metrics, curve, environment
  grid      run a YAML grid (local worker processes or Ray), skipping stored cells
  check     compare stored results with an accuracy table; non-zero exit on regressions
  dashboard the Streamlit leaderboard over a store (read-only)
  train     train the models the harness ships (``harness train classifier ...``)

Bad input exits with status 2 and a one-line ``error: ...`` on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from harness.registry import HarnessError


def _fmt_spec(s: dict) -> str:
    attacks = "+".join(s["attacks"])
    parts = [f"{s['norm']} eps={s['eps']:.4g}", attacks]
    if "pgd" in s["attacks"]:
        parts.append(f"pgd {s['steps']} steps x {s['step_size']:.4g}, {s['restarts']} restart(s), random_start={s['random_start']}, loss={s['loss']}")
    if any(a.startswith(("apgd", "autoattack")) for a in s["attacks"]):
        parts.append(f"apgd {s['apgd_steps']} steps")
    return "; ".join(parts)


def _print_plan(job, out) -> None:
    s = job.summary()
    spec = s["threat_spec"]
    print(
        f"job {job.job_id[:12]}  defense={s['defense']} ({'stochastic' if s['stochastic'] else 'deterministic'})  "
        f"threat={s['threat']}  dataset={s['dataset']} (n={s['n_examples']}, data_seed={job.cfg.data_seed})  classifier={s['classifier']}",
        file=out,
    )
    print(f"  attack: {_fmt_spec(spec)}", file=out)
    print(
        f"  gradient path: {s['gradient_path']}{''.join(f' (then {p} on the survivors)' for p in s['also_paths'])}  EOT samples/gradient: {s['eot_samples']}  evaluation draws: {s['eval_draws']}  "
        f"headline rule: {spec['scoring']}  seed: {job.cfg.seed}",
        file=out,
    )
    if s["defense_config"]:
        print("  defense config: " + ", ".join(f"{k}={v}" for k, v in s["defense_config"].items()), file=out)
    for note in s["notes"]:
        print(f"  note: {note}", file=out)


def _pct(v):
    return "-" if v is None else f"{100 * v:.2f}%"


def cmd_run(args) -> int:
    from harness.engine import RunConfig, parse_set, resolve, run_job
    from harness.store import Store

    cfg = RunConfig(
        defense=args.defense, threat=args.threat, dataset=args.dataset, classifier=args.classifier,
        weights=args.weights, model_dir=args.model_dir, data_dir=args.data_dir, weights_dir=args.weights_dir,
        n_examples=args.n_examples, seed=args.seed, data_seed=args.data_seed, device=args.device,
        overrides=parse_set(args.set), plugins=tuple(args.plugin or ()),
    )
    job = resolve(cfg)
    info_out = sys.stderr if args.json else sys.stdout
    _print_plan(job, info_out)
    if args.dry_run:
        if args.json:
            print(json.dumps({"job_id": job.job_id, "status": "planned", **job.summary()}, default=str))
        return 0
    store = Store(args.db)
    outcome = run_job(job, store, force=args.force, progress=not args.no_progress and sys.stderr.isatty())
    if args.json:
        print(json.dumps(outcome.as_json(), default=str))
        return 0
    m = outcome.metrics
    tag = " (stored result reused; --force to recompute)" if outcome.reused else ""
    print(f"done{tag}: {outcome.job_id[:12]} in {store.url}")
    rows = [("clean accuracy", "clean_accuracy"), ("robust accuracy", "robust_accuracy")]
    for label, key in rows:
        v = m.get(key)
        if v:
            print(f"  {label:<16} {_pct(v['value'])}  [95% CI {_pct(v['lower'])}, {_pct(v['upper'])}]  n={v['n']}")
    draws = outcome.summary["eval_draws"]
    if draws > 1:
        print(
            "  robust by rule   single-draw {}  majority-of-{} {}  worst-of-{} {}".format(
                _pct(m["robust_accuracy_single"]["value"]), draws, _pct(m["robust_accuracy_majority"]["value"]), draws,
                _pct(m["robust_accuracy_worst"]["value"]),
            )
        )
    per_attack = [k for k in m if k.startswith("robust_accuracy_") and k.split("robust_accuracy_")[1] not in ("single", "majority", "worst")]
    if len(per_attack) > 1:
        print("  per attack       " + "  ".join(f"{k[16:]} {_pct(m[k]['value'])}" for k in per_attack))
    if "psnr_clean" in m:
        print(f"  image quality    purified vs clean: PSNR {m['psnr_clean']['value']:.2f} dB, SSIM {m['ssim_clean']['value']:.3f} (clean input); "
              f"PSNR {m['psnr_adv']['value']:.2f} dB, SSIM {m['ssim_adv']['value']:.3f} (adversarial input)")
    if "detection_auc" in m:
        print(f"  detection AUC    {m['detection_auc']['value']:.4f}")
    t = outcome.timings
    if t:
        print(f"  time             {t.get('total_s', 0):.1f} s ({t.get('per_example_s', 0):.3f} s/example)")
    return 0


def cmd_ls(args) -> int:
    from harness.plugins import load_builtin, load_plugin

    load_builtin()
    for p in args.plugin or ():
        load_plugin(p)
    what = args.what
    if what in ("defenses", "all"):
        from harness.types import DEFENSES

        print("defenses:")
        for name, cls in DEFENSES.items():
            c = cls.capabilities()
            doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            print(
                f"  {name:<16} {'stochastic' if c['stochastic'] else 'deterministic':<13} paths={','.join(c['gradient_paths'])}"
                + (f" requires={','.join(c['requires'])}" if c["requires"] else "")
                + (" detection" if c["has_detection_score"] else "")
                + (f"  {doc}" if doc else "")
            )
    if what in ("threats", "all"):
        from threat_models.specs import THREATS

        print("threats:")
        for name, tm in THREATS.items():
            print(f"  {name:<20} {tm.description}")
            for fam in ("cifar", "digits"):
                print(f"      {fam:<7} {_fmt_spec(tm.resolve(fam).to_dict())}; path={tm.resolve(fam).gradient_path}, "
                      f"eot={tm.resolve(fam).eot_samples}, draws={tm.resolve(fam).eval_draws}")
    if what in ("datasets", "all"):
        from harness.data import DATASETS

        print("datasets:")
        for name, info in DATASETS.items():
            print(f"  {name:<10} {info.num_classes} classes, {'x'.join(map(str, info.image_shape))}, default n={info.default_n}"
                  f"{', needs --data-dir' if info.needs_data_dir else ''}  {info.description}")
    if what in ("classifiers", "all"):
        from harness.classifiers import CLASSIFIERS

        print("classifiers:")
        for name, entry in CLASSIFIERS.items():
            desc = getattr(entry, "description", "")
            print(f"  {name:<14} {desc}")
    return 0


def cmd_results(args) -> int:
    import pandas as pd

    from harness.store import Store

    store = Store(args.db, read_only=True)
    rows = store.results_table(status=None if args.all else "done")
    if args.format == "json":
        print(json.dumps(rows, default=str))
        return 0
    if not rows:
        print(f"no results in {store.url}; run e.g. `harness run --defense none --threat preprocessor-blind`")
        return 0
    df = pd.DataFrame(rows)
    if args.format == "csv":
        df.to_csv(sys.stdout, index=False)
        return 0
    show = df.copy()
    for c in ("psnr_clean", "psnr_adv"):
        if c in show:
            show[c] = show[c].map(lambda v: "-" if v is None or v != v else f"{v:.1f}")
    for c in ("ssim_clean", "ssim_adv"):
        if c in show:
            show[c] = show[c].map(lambda v: "-" if v is None or v != v else f"{v:.3f}")
    for c in ("clean", "robust", "robust_lo", "robust_hi", "robust_single", "robust_majority", "robust_worst"):
        if c in show:
            show[c] = show[c].map(lambda v: "-" if v is None or v != v else f"{100 * v:.1f}")
    show["eps"] = show["eps"].map(lambda v: "-" if v is None or v != v else f"{v:.4g}")
    if "seconds" in show:
        show["seconds"] = show["seconds"].map(lambda v: "-" if v is None or v != v else f"{v:.1f}")
    print(show.to_string(index=False))
    return 0


def cmd_show(args) -> int:
    from sqlalchemy import select

    from harness.store import Job, Store

    store = Store(args.db, read_only=True)
    with store.session() as s:
        matches = list(s.scalars(select(Job).where(Job.id.like(f"{args.job_id}%"))))
    if not matches:
        raise HarnessError(f"no job with id starting '{args.job_id}' in {store.url}")
    if len(matches) > 1:
        raise HarnessError(f"job id prefix '{args.job_id}' is ambiguous ({len(matches)} jobs)")
    j = matches[0]
    out = {
        "job_id": j.id, "status": j.status, "reason": j.reason, "config": j.config, "identity": j.identity,
        "metrics": {k: {"value": m.value, "lower": m.lower, "upper": m.upper, "n": m.n} for k, m in store.metrics(j.id).items()},
        "curves": store.curves(j.id), "timings": j.timings, "nfe": j.nfe, "environment": j.environment,
    }
    print(json.dumps(out, indent=2, default=str))
    return 0


def cmd_grid(args) -> int:
    from harness.grid import load_grid, run_grid
    from harness.store import Store

    spec = load_grid(args.file)
    store = Store(args.db)
    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else ["cpu"]
    print(f"grid {spec.name}: {len(spec.defenses)} defenses x {len(spec.threats)} threats x {len(spec.datasets)} datasets "
          f"x {max(1, len(spec.classifiers))} classifiers x {len(spec.seeds)} seeds -> {store.url}")
    summary = run_grid(
        spec, store, executor=args.executor, devices=devices, address=args.address, ray_cpus=args.ray_cpus,
        force=args.force, dry_run=args.dry_run,
    )
    if args.dry_run:
        for c in summary.cells:
            state = {"pending": "run", "done": "done", "skipped": "skip", "duplicate": "dup"}.get(c.state, c.state)
            extra = f"  ({c.reason})" if c.reason else ""
            print(f"  {state:<5} {c.job_id[:12]}  {c.label()}{extra}")
    counts = summary.counts()
    print("summary: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 1 if counts.get("failed") else 0


def cmd_check(args) -> int:
    from harness.check import check, format_rows
    from harness.store import Store

    rows = check(args.table, Store(args.db, read_only=True))
    print(format_rows(rows))
    bad = [r for r in rows if not r.ok]
    print(f"{len(rows) - len(bad)}/{len(rows)} within tolerance")
    return 1 if bad else 0


def cmd_train(args) -> int:
    return args.trainer.run(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harness", description="Benchmark harness for adversarial purification defenses.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="evaluate one cell and store it")
    r.add_argument("--defense", default="none", help="defense name (harness ls defenses)")
    r.add_argument("--threat", default="preprocessor-blind", help="threat model name (harness ls threats)")
    r.add_argument("--dataset", default="digits", help="dataset name (default: digits, embedded)")
    r.add_argument("--classifier", default=None, help="classifier name (default: the dataset's shipped CNN)")
    r.add_argument("--weights", default=None, help="classifier weights file (resnet20/32/44/56, or to override a shipped CNN)")
    r.add_argument("--model-dir", default=None, help="RobustBench model folder (for rb:<Name> classifiers)")
    r.add_argument("--data-dir", default=None, help="CIFAR folder (torchvision format) or .npz")
    r.add_argument("--weights-dir", default=None, help="folder with defense checkpoints")
    r.add_argument("--n-examples", type=int, default=None, help="evaluation subset size (default: per dataset)")
    r.add_argument("--seed", type=int, default=0, help="attack and purification randomness")
    r.add_argument("--data-seed", type=int, default=0, help="which evaluation subset is drawn")
    r.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    r.add_argument("--db", default=None, help="results store: path or SQLAlchemy URL (default $HARNESS_DB or results.db)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a threat or defense option (repeatable)")
    r.add_argument("--plugin", action="append", metavar="FILE_OR_MODULE", help="import a defense plugin (repeatable)")
    r.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    r.add_argument("--force", action="store_true", help="recompute even if the store has this job")
    r.add_argument("--dry-run", action="store_true", help="resolve and print the plan, run nothing")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_run)

    ls = sub.add_parser("ls", help="list registered plugins")
    ls.add_argument("what", nargs="?", default="all", choices=["defenses", "threats", "datasets", "classifiers", "all"])
    ls.add_argument("--plugin", action="append", metavar="FILE_OR_MODULE")
    ls.set_defaults(func=cmd_ls)

    res = sub.add_parser("results", help="print stored results")
    res.add_argument("--db", default=None)
    res.add_argument("--format", default="table", choices=["table", "csv", "json"])
    res.add_argument("--all", action="store_true", help="include running, failed and skipped jobs")
    res.set_defaults(func=cmd_results)

    sh = sub.add_parser("show", help="one job in full (JSON)")
    sh.add_argument("job_id", help="job id or a unique prefix")
    sh.add_argument("--db", default=None)
    sh.set_defaults(func=cmd_show)

    g = sub.add_parser("grid", help="run a YAML grid of cells (resumable)")
    g.add_argument("file", help="grid YAML file")
    g.add_argument("--db", default=None)
    g.add_argument("--executor", default="local", choices=["local", "ray"])
    g.add_argument("--devices", default="cpu", help="comma-separated: cpu or cuda:0,cuda:1 (one worker each)")
    g.add_argument("--address", default=None, help="Ray cluster address (e.g. auto); default: start a local Ray")
    g.add_argument("--ray-cpus", type=int, default=None, help="CPUs of a locally started Ray instance")
    g.add_argument("--dry-run", action="store_true", help="list what would run and what is already done")
    g.add_argument("--force", action="store_true", help="recompute cells already in the store")
    g.set_defaults(func=cmd_grid)

    ck = sub.add_parser("check", help="compare stored results with an accuracy table (CSV)")
    ck.add_argument("table", help="CSV: defense,threat,dataset,classifier,metric,expected,tolerance")
    ck.add_argument("--db", default=None)
    ck.set_defaults(func=cmd_check)

    from dashboard.cli import add_dashboard_parser

    add_dashboard_parser(sub)

    from harness.trainers import load_trainers

    tr = sub.add_parser("train", help="train a model the harness ships")
    trs = tr.add_subparsers(dest="kind", required=True)
    for name, trainer in load_trainers().items():
        tp = trs.add_parser(name, help=trainer.help)
        trainer.add_arguments(tp)
        tp.set_defaults(func=cmd_train, trainer=trainer)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished batches are stored; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
