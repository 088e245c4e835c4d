"""``harness run``: evaluate one cell, print its plan and numbers, store it."""

from __future__ import annotations

import json
import sys


def fmt_spec(s: dict) -> str:
    """One line describing a resolved threat spec's budget and attacks."""
    parts = [f"{s['norm']} eps={s['eps']:.4g}", "+".join(s["attacks"])]
    if s.get("shift", "none") != "none":
        parts.insert(0, f"shift {s['shift']}" + (f" ({', '.join(s['shift_options'])})" if s.get("shift_options") else ""))
    if any(a.split("@")[0] == "pgd" for a in s["attacks"]):
        parts.append(
            f"pgd {s['steps']} steps x {s['step_size']:.4g}, {s['restarts']} restart(s), "
            f"random_start={s['random_start']}, loss={s['loss']}"
        )
    if any(a.split("@")[0].startswith(("apgd", "autoattack", "fab")) for a in s["attacks"]):
        parts.append(f"apgd/fab {s['apgd_steps']} steps")
    if s.get("attack_options"):
        parts.append("options " + ", ".join(s["attack_options"]))
    return "; ".join(parts)


def print_plan(job, out) -> None:
    """The resolved plan every run prints before it starts."""
    s = job.summary()
    spec = s["threat_spec"]
    print(
        f"job {job.job_id[:12]}  defense={s['defense']} ({'stochastic' if s['stochastic'] else 'deterministic'})  "
        f"threat={s['threat']}  dataset={s['dataset']} (n={s['n_examples']}, data_seed={job.cfg.data_seed})  "
        f"classifier={s['classifier']}",
        file=out,
    )
    print(f"  attack: {fmt_spec(spec)}", file=out)
    print(f"  plan: {', '.join(s['attacks'])}", file=out)
    also = "".join(f" (then {p} on the survivors)" for p in s["also_paths"])
    print(
        f"  gradient path: {s['gradient_path']}{also}  EOT samples/gradient: {s['eot_samples']}  "
        f"evaluation draws: {s['eval_draws']}  headline rule: {spec['scoring']}  seed: {job.cfg.seed}",
        file=out,
    )
    if s["defense_config"]:
        print("  defense config: " + ", ".join(f"{k}={v}" for k, v in s["defense_config"].items()), file=out)
    for note in s["notes"]:
        print(f"  note: {note}", file=out)


def fmt_cost(cost: dict) -> str:
    """One line of network evaluations: purifications, purifier NFE, classifier images."""
    bound = "" if cost["exact"] else "at most "
    ref = f" + {cost['reference_purifications']} reference" if cost.get("reference_purifications") else ""
    ref += f" + {cost['flag_purifications']} flag-check" if cost.get("flag_purifications") else ""
    return (f"{bound}{cost['attack_purifications']} attack + {cost['eval_purifications']} scoring{ref} purifications "
            f"x {cost['nfe_per_purification']} NFE = {cost['purifier_nfe_images']} purifier NFE-images; "
            f"{cost['classifier_images']} classifier images")


def print_cost(cost: dict, cal, out) -> None:
    """The cost lines of ``--dry-run`` (and the time estimate of ``--calibrate``)."""
    from harness.evaluation.cost import estimate_seconds

    print(f"  network evaluations: {fmt_cost(cost)}", file=out)
    for a in cost["attacks"]:
        print(f"    {a['label']}: {a['model_images']} model images (EOT {a['eot']}, {a['path']}), "
              f"{a['eval_purifications']} scoring purifications", file=out)
    if not cost["exact"]:
        print(f"    ({cost['note']})", file=out)
    if cal is not None:
        secs = estimate_seconds(cost, cal)
        print(f"  estimated network time on {cal.device}: {secs:.1f} s ({secs / 3600:.4f} device-hours; calibrated on "
              f"{cal.batch} images: {1e3 * cal.defended_s:.3f} ms per defended forward image)", file=out)


def _pct(v):
    return "-" if v is None else f"{100 * v:.2f}%"


def print_outcome(outcome, url: str) -> None:
    """The human-readable result of a run."""
    m = outcome.metrics
    tag = " (stored result reused; --force to recompute)" if outcome.reused else ""
    print(f"done{tag}: {outcome.job_id[:12]} in {url}")
    for label, key in (("clean accuracy", "clean_accuracy"), ("robust accuracy", "robust_accuracy")):
        v = m.get(key)
        if v:
            print(f"  {label:<16} {_pct(v['value'])}  [95% CI {_pct(v['lower'])}, {_pct(v['upper'])}]  n={v['n']}")
    draws = outcome.summary["eval_draws"]
    if draws > 1:
        print(
            f"  robust by rule   single-draw {_pct(m['robust_accuracy_single']['value'])}  "
            f"majority-of-{draws} {_pct(m['robust_accuracy_majority']['value'])}  "
            f"worst-of-{draws} {_pct(m['robust_accuracy_worst']['value'])}"
        )
    labels = outcome.summary["attacks"]
    if len(labels) > 1:
        print("  per attack       "
              + "  ".join(f"{a} {_pct(m[f'robust_accuracy_{a}']['value'])}" for a in labels if f"robust_accuracy_{a}" in m))
    if "psnr_clean" in m:
        print(
            f"  image quality    purified vs clean: PSNR {m['psnr_clean']['value']:.2f} dB, SSIM {m['ssim_clean']['value']:.3f} "
            f"(clean input); PSNR {m['psnr_adv']['value']:.2f} dB, SSIM {m['ssim_adv']['value']:.3f} (adversarial input)"
        )
    if "detection_auc" in m:
        print(f"  detection AUC    {m['detection_auc']['value']:.4f}")
    t = outcome.timings
    if t:
        print(f"  time             {t.get('total_s', 0):.1f} s ({t.get('per_example_s', 0):.3f} s/example)")
    for f in outcome.flags or []:  # harness.evaluation.flags
        print(f"  flag             {f['flag']}: {f['detail']}")


def cmd_run(args) -> int:
    """``harness run``: resolve one job, print its plan, and run and store it (with --dry-run, only estimate its cost)."""
    from harness.evaluation import RunConfig, parse_set, resolve, run_job
    from harness.store import Store

    cfg = RunConfig(
        defense=args.defense, threat=args.threat, dataset=args.dataset, classifier=args.classifier,
        weights=args.weights, model_dir=args.model_dir, data_dir=args.data_dir, weights_dir=args.weights_dir,
        n_examples=args.n_examples, seed=args.seed, data_seed=args.data_seed, device=args.device,
        overrides=parse_set(args.set), plugins=tuple(args.plugin or ()),
    )
    job = resolve(cfg)
    print_plan(job, sys.stderr if args.json else sys.stdout)
    if args.dry_run:
        from harness.evaluation.cost import calibrate, estimate_nfe, estimate_seconds

        cost = estimate_nfe(job)
        extra: dict = {"cost": cost}
        cal = None
        if args.calibrate:
            cal = calibrate(job)
            extra["calibration"] = cal.as_dict()
            extra["estimated_network_s"] = estimate_seconds(cost, cal)
        print_cost(cost, cal, sys.stderr if args.json else sys.stdout)
        if args.json:
            print(json.dumps({"job_id": job.job_id, "status": "planned", **job.summary(), **extra}, default=str))
        return 0
    if args.calibrate:
        from harness.core.registry import HarnessError

        raise HarnessError("--calibrate goes with --dry-run")
    store = Store(args.db)
    if store.get_job(job.job_id) is None or store.get_job(job.job_id).status != "done" or args.force:
        from harness.evaluation.cost import large_plan_note

        note = large_plan_note(job, args.device)  # before a long run starts: what it will cost
        if note:
            print(f"  {note}", file=sys.stderr if args.json else sys.stdout, flush=True)
    outcome = run_job(job, store, force=args.force, progress=not args.no_progress and sys.stderr.isatty())
    if args.json:
        print(json.dumps(outcome.as_json(), default=str))
    else:
        print_outcome(outcome, store.shown_url)
    store.close()  # SQLite folds its write-ahead log into the file (the run froze the collector: nothing else would)
    return 0


def add_parser(sub) -> None:
    """Register ``harness run``."""
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
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a threat, defense, attack (ATTACK.KEY) or shift option")
    r.add_argument("--plugin", action="append", metavar="FILE_OR_MODULE", help="import a plugin: defenses, attacks, shifts (repeatable)")
    r.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    r.add_argument("--force", action="store_true", help="recompute even if the store has this job")
    r.add_argument("--dry-run", action="store_true",
                   help="resolve and print the plan and its network evaluations (NFE), run nothing")
    r.add_argument("--calibrate", action="store_true",
                   help="with --dry-run: time a few network calls on --device and estimate the run's network time")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_run)
