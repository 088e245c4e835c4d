"""``harness ls``: list registered defenses, threats, attacks, shifts, datasets and classifiers.

``--format markdown`` writes the manual's reference pages instead (:mod:`harness.reference`):
``harness ls --format markdown --out docs/reference``.
"""

from __future__ import annotations

from harness.cli.run import fmt_spec

WHAT = ("defenses", "threats", "attacks", "shifts", "datasets", "classifiers", "all")


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if (doc or "").strip() else ""


def _defenses() -> None:
    from harness.core.defense import DEFENSES

    print("defenses:")
    for name, cls in DEFENSES.items():
        c = cls.capabilities()
        print(
            f"  {name:<16} {'stochastic' if c['stochastic'] else 'deterministic':<13} paths={','.join(c['gradient_paths'])}"
            + (f" requires={','.join(c['requires'])}" if c["requires"] else "")
            + (f" provides={','.join(c['provides'])}" if c["provides"] else "")
            + (" detection" if c["has_detection_score"] else "")
            + (f"  {_first_line(cls.__doc__)}" if cls.__doc__ else "")
        )


def _threats() -> None:
    from threat_models.specs import THREATS

    print("threats:")
    for name, tm in THREATS.items():
        print(f"  {name:<20} {tm.description}")
        for fam in ("cifar", "digits"):
            spec = tm.resolve(fam)
            print(f"      {fam:<7} {fmt_spec(spec.to_dict())}; path={spec.gradient_path}, eot={spec.eot_samples}, draws={spec.eval_draws}")


def _attacks() -> None:
    from harness.core.attack import ATTACKS, SUITES
    from harness.core.config import config_fields

    print("attacks:")
    for name, cls in ATTACKS.items():
        c = cls.capabilities()
        opts = config_fields(cls.Config)
        print(
            f"  {name:<10} norms={','.join(c['norms'])} eot={c['eot']} "
            f"{'gradients' if c['needs_gradients'] else 'gradient-free'}"
            + (" minimum-norm" if c["minimum_norm"] else "")
            + (f" requires={','.join(c['requires'])}" if c["requires"] else "")
            + f"  {cls.description or _first_line(cls.__doc__)}"
        )
        if opts:
            print("      options: " + ", ".join(f"{name}.{k}" for k in opts))
    print("attack suites:")
    for name, suite in SUITES.items():
        members = ",".join(suite.deterministic)
        if suite.stochastic is not None and suite.stochastic != suite.deterministic:
            members = f"deterministic: {members}; stochastic: {','.join(suite.stochastic)}"
        print(f"  {name:<20} {members}  {suite.description}")


def _shifts() -> None:
    from harness.core.config import config_fields
    from harness.core.shift import SHIFTS

    print("shifts:")
    for name, cls in SHIFTS.items():
        opts = config_fields(cls.Config)
        print(f"  {name:<12} {cls.description or _first_line(cls.__doc__)}" + (f"  options: {', '.join(opts)}" if opts else ""))


def _datasets() -> None:
    from harness.data import DATASETS

    print("datasets:")
    for name, info in DATASETS.items():
        print(
            f"  {name:<10} {info.num_classes} classes, {'x'.join(map(str, info.image_shape))}, default n={info.default_n}"
            f"{', needs --data-dir' if info.needs_data_dir else ''}  {info.description}"
        )


def _classifiers() -> None:
    from harness.classifiers import CLASSIFIERS

    print("classifiers:")
    for name, entry in CLASSIFIERS.items():
        print(f"  {name:<14} {getattr(entry, 'description', '')}")


def _markdown(args) -> int:
    """``--format markdown``: the reference pages (harness/reference.py), to ``--out DIR`` or stdout."""
    from pathlib import Path

    from harness.core.registry import HarnessError
    from harness.reference import pages

    out = pages(args.what)
    if not args.out:
        print("\n".join(out.values()), end="")
        return 0
    folder = Path(args.out)
    if not folder.is_dir():
        raise HarnessError(f"--out {folder}: no such folder")
    for name, text in out.items():
        (folder / name).write_text(text)
        print(f"wrote {folder / name}")
    return 0


def cmd_ls(args) -> int:
    """``harness ls``: list the registered plugins of one kind, or of all kinds."""
    from harness.core.plugins import load_builtin, load_plugin

    load_builtin()
    for p in args.plugin or ():
        load_plugin(p)
    if args.format == "markdown":
        return _markdown(args)
    for what, fn in (("defenses", _defenses), ("threats", _threats), ("attacks", _attacks), ("shifts", _shifts),
                     ("datasets", _datasets), ("classifiers", _classifiers)):
        if args.what in (what, "all"):
            fn()
    return 0


def add_parser(sub) -> None:
    """Register ``harness ls``."""
    ls = sub.add_parser("ls", help="list registered plugins")
    ls.add_argument("what", nargs="?", default="all", choices=list(WHAT))
    ls.add_argument("--plugin", action="append", metavar="FILE_OR_MODULE")
    ls.add_argument("--format", default="text", choices=["text", "markdown"],
                    help="markdown: the manual's reference pages (docs/reference/*.md; `all` also writes set-keys, weights, api)")
    ls.add_argument("--out", default=None, metavar="DIR", help="with --format markdown: write the pages into DIR (default: stdout)")
    ls.set_defaults(func=cmd_ls)
