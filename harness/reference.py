"""The generated reference pages of the manual (``docs/reference/*.md``), written from the registries.

``harness ls --format markdown --out docs/reference`` writes them; ``tests/test_docs.py``
fails when a committed page differs from what the command writes, so the tables of
defenses, attacks, shifts, threat templates, datasets, shipped weights and ``--set`` keys
cannot drift from the code. Each page is a function of the registered plugins (built-in
ones, plus any ``--plugin`` given) and of the files in ``harness/weights``.

- **NFE** per purification: ``nfe_per_call`` of the defense at its defaults, and at each
  dataset's defaults where the defense declares them (the ``DEFAULTS`` /
  ``DATASET_DEFAULTS`` convention of the diffusion purifiers and CMAP: a config field left
  ``None`` takes the dataset's value at setup).
- **Shipped weights** are the recipes ``NAME.json`` beside a ``NAME.pt`` in ``harness/weights``
  (in a git checkout, those committed). Each defense is set up on CPU for every registered dataset (a dummy
  classifier where it needs one); the shipped weights that its setup reads with ``torch.load``, or whose name or sha256 its identity
  holds, are the weights it loads. A defense that cannot be set up there (a missing file) shows ``–``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from pathlib import Path
from typing import Any, Callable

#: Page file name -> what it documents (the order of the reference index).
PAGES = {
    "defenses.md": "defenses: capabilities, gradient paths, NFE, shipped weights, options",
    "attacks.md": "attacks and suites: norms, EOT, options",
    "shifts.md": "input shifts and their options",
    "threats.md": "threat templates and their defaults per dataset family",
    "datasets.md": "datasets and classifiers",
    "weights.md": "the weights shipped in harness/weights",
    "set-keys.md": "every --set key",
    "schema.md": "the results store's tables and columns",
    "api.md": "the public Python API (harness.core, harness.evaluation, harness.store)",
}
#: ``harness ls WHAT`` -> the pages it writes with ``--format markdown``.
PAGES_OF = {"defenses": ["defenses.md"], "threats": ["threats.md"], "attacks": ["attacks.md"], "shifts": ["shifts.md"],
            "datasets": ["datasets.md"], "classifiers": ["datasets.md"]}
#: The packages whose public names (``__all__``) the API page renders.
API_PACKAGES = ("harness.core", "harness.evaluation", "harness.store")
COMMAND = "harness ls --format markdown --out docs/reference"


# --------------------------------------------------------------------------- formatting
def _esc(text: Any) -> str:
    """``text`` safe in a Markdown table cell (pipes, emphasis markers and HTML escaped, one line)."""
    s = " ".join(str(text).split())
    for a, b in (("\\", "\\\\"), ("|", "\\|"), ("*", "\\*"), ("<", "&lt;"), (">", "&gt;"), ("_", "\\_")):
        s = s.replace(a, b)
    return s


def _code(text: Any) -> str:
    s = str(text)
    return f"`` {s} ``" if "`" in s else f"`{s}`"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def _value(v: Any) -> str:
    """A default or setting for display: floats to 6 significant digits, sequences comma-joined."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (tuple, list, frozenset, set)):
        return ",".join(_value(x) for x in v) if v else "(empty)"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_value(x)}" for k, x in v.items()) if v else "(none)"
    return "None" if v is None else str(v)


def _type(t: Any) -> str:
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is typing.Literal:
        return " | ".join(_value(a) for a in args)
    if origin in (typing.Union, __import__("types").UnionType):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_type(a) for a in inner) + (" or None" if len(inner) < len(args) else "")
    if origin in (tuple, list):
        return f"list of {_type(args[0]) if args else 'str'}"
    return getattr(t, "__name__", str(t))


def _fields(cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) of a config dataclass's fields."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        out.append((f.name, _type(hints.get(f.name, f.type)), default, f.metadata.get("help", "")))
    return out


def _first_line(doc: str | None) -> str:
    doc = (doc or "").strip()
    return doc.splitlines()[0] if doc else ""


def _header(title: str, what: str) -> list[str]:
    return [f"<!-- Generated by `{COMMAND}` from the registries; do not edit by hand: rerun the command. -->", "",
            f"# {title}", "", what, ""]


def _datasets() -> list[tuple[str, Any]]:
    from harness.data import DATASETS

    return list(DATASETS.items())


# --------------------------------------------------------------------------- defenses
def _dataset_fill(cls: type, dataset: str | None) -> dict[str, Any]:
    """The config values setup would fill for ``dataset`` (None: the paper's ``DEFAULTS``) into ``None`` fields."""
    defaults = getattr(cls, "DEFAULTS", {}) or {}
    per = (getattr(cls, "DATASET_DEFAULTS", {}) or {}).get(dataset, {}) if dataset else {}
    base = cls.Config()
    return {k: per.get(k, v) for k, v in defaults.items() if getattr(base, k, 0) is None}


def _nfe(cls: type, dataset: str | None) -> int | None:
    try:
        return int(cls.from_dict(_dataset_fill(cls, dataset)).nfe_per_call)
    except Exception:  # a defense whose config cannot be built without setup: its class value
        return getattr(cls, "nfe_per_call", None)


def _tracked(folder: Path) -> set[str] | None:
    """The file names git tracks in ``folder`` (None outside a git checkout): in a checkout, "shipped" means
    committed, so a training writing new weights there does not change the pages until they are committed.
    """
    import subprocess

    try:
        proc = subprocess.run(["git", "-C", str(folder), "ls-files", "-z", "--", "."], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    return {Path(p).name for p in proc.stdout.decode().split("\0") if p}


def shipped_weights() -> list[tuple[str, dict, str]]:
    """The shipped weights: (name, recipe, sha256 of the .pt) of every ``NAME.json`` beside a ``NAME.pt`` in ``harness/weights``."""
    from harness.core.env import WEIGHTS_DIR

    tracked = _tracked(Path(WEIGHTS_DIR))
    out = []
    for js in sorted(Path(WEIGHTS_DIR).glob("*.json")):
        pt = js.with_suffix(".pt")
        if not pt.is_file() or (tracked is not None and not {js.name, pt.name} <= tracked):
            continue
        try:
            recipe = json.loads(js.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(recipe, dict):
            out.append((js.stem, recipe, hashlib.sha256(pt.read_bytes()).hexdigest()))
    return out


def _weights_of(cls: type, datasets: list[tuple[str, Any]], weights: list[tuple[str, dict, str]]) -> dict[str, list[str]]:
    """Dataset -> the shipped weights the defense loads there (set up on CPU; see the module docstring)."""
    import torch

    from harness.core.defense import SetupContext
    from harness.core.registry import HarnessError

    from harness.core.env import WEIGHTS_DIR

    out: dict[str, list[str]] = {}
    real_load = torch.load
    for name, info in datasets:
        loaded: set[str] = set()

        def load(f, *args, **kwargs):  # which checkpoint files setup reads (the contract: torch.load(..., weights_only=True))
            if isinstance(f, (str, Path)):
                p = Path(f).resolve()
                if p.parent == Path(WEIGHTS_DIR).resolve():
                    loaded.add(p.stem)
            return real_load(f, *args, **kwargs)

        torch.load = load
        try:
            d = cls()
            d.setup(SetupContext(classifier=torch.nn.Flatten(), dataset=name, image_shape=tuple(info.image_shape),
                                 num_classes=info.num_classes))
        except HarnessError:
            continue
        finally:
            torch.load = real_load
        ident = json.dumps(d.identity(), default=str)
        found = [w for w, recipe, sha in weights if w in loaded or f'"{w}"' in ident or sha in ident
                 or (isinstance(recipe.get("sha256"), str) and recipe["sha256"] in ident)]
        if found:
            out[name] = found
    return out


def _option_default(cls: type, name: str, default: Any, datasets: list[tuple[str, Any]]) -> str:
    """A defense option's default; a ``None`` the datasets fill reads ``None: paper V; digits V, ...``."""
    defaults = getattr(cls, "DEFAULTS", {}) or {}
    if default is not None or name not in defaults:
        return _code(_value(default))
    per = getattr(cls, "DATASET_DEFAULTS", {}) or {}
    parts = [f"paper {_value(defaults[name])}"] + [f"{ds} {_value(per[ds][name])}" for ds, _ in datasets
                                                    if name in per.get(ds, {})]
    return "`None`: " + "; ".join(parts)


def defenses_page() -> str:
    """``docs/reference/defenses.md``."""
    from harness.core.defense import DEFENSES

    datasets = _datasets()
    weights = shipped_weights()
    lines = _header("Defenses", "Every registered defense, with what it declares (`harness ls defenses`). Gradient paths "
                    "`classifier` and `bpda` exist for every defense. NFE: network evaluations of the generative model per "
                    "purified image, at the paper's defaults and at each dataset's (a `--set` of the solver steps changes "
                    "it). Shipped weights: the files of `harness/weights` the defense loads on each dataset "
                    "([weights](weights.md)); `–` where nothing is shipped.")
    rows, details = [], []
    for name, cls in DEFENSES.items():
        c = cls.capabilities()
        nfe = {ds: _nfe(cls, ds) for ds, _ in datasets}
        paper = _nfe(cls, None)
        per = [f"{ds} {v}" for ds, v in nfe.items() if v != paper]
        shipped = _weights_of(cls, datasets, weights)
        extra = [f"requires {', '.join(c['requires'])}"] if c["requires"] else []
        extra += [f"provides {', '.join(c['provides'])}"] if c["provides"] else []
        extra += ["detection score"] if c["has_detection_score"] else []
        rows.append([
            _code(name), _esc(_first_line(cls.__doc__)), "stochastic" if c["stochastic"] else "deterministic",
            ", ".join(c["gradient_paths"]), str(paper) + (f" ({'; '.join(per)})" if per else ""),
            "; ".join(f"{ds}: {', '.join(_code(w) for w in ws)}" for ds, ws in shipped.items()) or "–",
            _esc(", ".join(extra)) or "–",
        ])
        details += ["", f"## `{name}`", "", _esc(_first_line(cls.__doc__)), ""]
        facts = [f"source: `{Path(__import__('inspect').getfile(cls)).name}` (version {c['version']})",
                 f"strongest path: `{cls.strongest_path().value}`"]
        if getattr(cls, "also_attack_through", ()):
            facts.append("`gradient_path=auto` also attacks through " + ", ".join(f"`{p.value}`" for p in cls.also_attack_through))
        if cls.default_examples:
            facts.append("examples when `--n-examples` is not given: "
                         + ", ".join(f"{k} {v}" for k, v in sorted(cls.default_examples.items())))
        details += [f"- {f}" for f in facts]
        opts = _fields(cls.Config)
        if opts:
            details += ["", *_table(["option", "type", "default", "help"],
                                    [[_code(n), _esc(t), _option_default(cls, n, d, datasets), _esc(h)] for n, t, d, h in opts])]
        else:
            details += ["", "No options."]
    lines += _table(["defense", "method", "randomness", "gradient paths", "NFE", "shipped weights", "declares"], rows)
    return "\n".join(lines + details) + "\n"


# --------------------------------------------------------------------------- attacks, shifts
def attacks_page() -> str:
    """``docs/reference/attacks.md``."""
    from harness.core.attack import ATTACKS, SUITES

    lines = _header("Attacks", "Every registered attack (`harness ls attacks`). EOT: how it treats a stochastic defense "
                    "(`batched`: EOT samples stacked along the batch; `looped`: its library's loop; `none`: it refuses a "
                    "stochastic model). Options are set as `--set ATTACK.KEY=VALUE` ([set keys](set-keys.md)).")
    rows, details = [], []
    for name, cls in ATTACKS.items():
        c = cls.capabilities()
        kind = ["gradients" if c["needs_gradients"] else "gradient-free"] + (["minimum-norm"] if c["minimum_norm"] else [])
        rows.append([_code(name), _esc(cls.description or _first_line(cls.__doc__)), ", ".join(c["norms"]), c["eot"],
                     ", ".join(kind), ", ".join(c["requires"]) or "–", str(c["cost_level"] or "by path")])
        opts = _fields(cls.Config)
        if opts:
            details += ["", f"## `{name}` options", "", *_table(
                ["option", "type", "default", "help"],
                [[_code(f"{name}.{n}"), _esc(t), _code(_value(d)), _esc(h)] for n, t, d, h in opts])]
    lines += _table(["attack", "what", "norms", "EOT", "kind", "requires", "cost level"], rows)
    lines += ["", "## Suites", "", "Compositions of registered attacks; a suite may pick its members by whether the attacked "
              "model is stochastic.", ""]
    srows = []
    for name, s in SUITES.items():
        sto = s.stochastic if s.stochastic is not None else s.deterministic
        srows.append([_code(name), _esc(s.description), ", ".join(s.deterministic) or "(none)", ", ".join(sto) or "(none)"])
    lines += _table(["suite", "what", "deterministic model", "stochastic model"], srows)
    return "\n".join(lines + details) + "\n"


def shifts_page() -> str:
    """``docs/reference/shifts.md``."""
    from harness.core.shift import SHIFTS

    lines = _header("Shifts", "Every registered input shift (`harness ls shifts`), applied to the clean inputs before the "
                    "attacks (`--set shift=NAME`); options as `--set KEY=VALUE` or `--set shift.KEY=VALUE`.")
    rows = []
    for name, cls in SHIFTS.items():
        opts = _fields(cls.Config)
        rows.append([_code(name), _esc(cls.description or _first_line(cls.__doc__)),
                     "<br>".join(f"{_code(n)} ({_esc(t)}, default {_code(_value(d))}): {_esc(h)}" for n, t, d, h in opts) or "–"])
    return "\n".join(lines + _table(["shift", "what", "options"], rows)) + "\n"


# --------------------------------------------------------------------------- threats
def threats_page() -> str:
    """``docs/reference/threats.md``: every template resolved for every dataset family."""
    from threat_models.specs import THREATS, spec_fields

    families = list(dict.fromkeys(info.family for _, info in _datasets()))
    of = {fam: [n for n, info in _datasets() if info.family == fam] for fam in families}
    lines = _header("Threat models", "Every registered threat template (`harness ls threats`), resolved for each dataset "
                    "family: the spec a job of that family runs unless `--set` changes it "
                    f"(families: {'; '.join(f'`{f}`: ' + ', '.join(of[f]) for f in families)}). "
                    "Bold: the value differs between families. `--set norm=l2` switches to the family's l2 budget "
                    "(row `l2 eps`) with step eps/4.")
    fields = [f for f in spec_fields() if f not in ("version",)]
    for name, tm in THREATS.items():
        specs = {fam: tm.resolve(fam).to_dict() for fam in families}
        lines += [f"## `{name}`", "", _esc(tm.description), "", f"Version {specs[families[0]].get('version', '1')}.", ""]
        rows = []
        for f in fields:
            vals = [_value(specs[fam].get(f)) for fam in families]
            bold = len(set(vals)) > 1
            rows.append([_code(f)] + [f"**{_esc(v)}**" if bold else _esc(v) for v in vals])
        if tm.l2_eps:
            rows.append(["l2 eps"] + [_value(tm.l2_eps.get(fam, 0.5)) for fam in families])
        lines += _table(["field"] + [f"`{fam}`" for fam in families], rows) + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- datasets, classifiers, weights
def datasets_page() -> str:
    """``docs/reference/datasets.md``."""
    from harness.classifiers import CLASSIFIERS

    lines = _header("Datasets and classifiers", "Every registered dataset and classifier (`harness ls datasets`, "
                    "`harness ls classifiers`).")
    lines += _table(["dataset", "family", "classes", "image", "default n", "data", "what"], [
        [_code(n), _code(i.family), str(i.num_classes), "x".join(map(str, i.image_shape)), str(i.default_n),
         "`--data-dir`" if i.needs_data_dir else "bundled", _esc(i.description)] for n, i in _datasets()])
    lines += ["", "## Classifiers", ""]
    lines += _table(["classifier", "what"], [[_code(n), _esc(getattr(e, "description", ""))] for n, e in CLASSIFIERS.items()])
    return "\n".join(lines) + "\n"


def weights_page() -> str:
    """``docs/reference/weights.md``: the recipes of ``harness/weights``."""
    lines = _header("Shipped weights", "The models in `harness/weights` (each `NAME.pt` with its recipe `NAME.json`): "
                    "what the defenses and classifiers load when no `--weights`, `--weights-dir` or `model_path` says "
                    "otherwise. The recipe records how it was trained; its command reproduces it.")
    rows = []
    for name, r, sha in shipped_weights():
        what = r.get("kind") or r.get("arch") or r.get("method") or ""
        if isinstance(what, dict):
            what = ", ".join(f"{k} {_value(v)}" for k, v in what.items())
        acc = r.get("clean_test_accuracy")
        rows.append([_code(name), _code(r.get("dataset", "?")), _esc(what), _value(r.get("params", "?")),
                     f"{100 * acc:.2f}%" if isinstance(acc, (int, float)) else "–", _code(sha[:16]),
                     _code(r["command"]) if r.get("command") else "–"])
    lines += _table(["weights", "dataset", "what", "parameters", "clean test accuracy", "sha256 (.pt)", "trained by"], rows)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- --set keys
def set_keys_page() -> str:
    """``docs/reference/set-keys.md``: every key ``--set`` accepts, by owner."""
    from harness.core.attack import ATTACKS
    from harness.core.defense import DEFENSES
    from harness.core.shift import SHIFTS
    from threat_models.specs import ThreatSpec

    lines = _header("`--set` keys", "`--set KEY=VALUE` (repeatable; a grid's `set:` takes the same keys) goes to the threat "
                    "spec, the defense's config or the shift's options, wherever KEY exists; `threat.KEY`, `defense.KEY` "
                    "and `shift.KEY` disambiguate, and `ATTACK.KEY` sets an attack's own option. Values are type-checked; "
                    "floats accept fractions (`eps=8/255`). An unknown or ambiguous key is a one-line error.")
    lines += ["## Threat spec", ""]
    lines += _table(["key", "type", "default", "help"], [[_code(n), _esc(t), _code(_value(d)), _esc(h)]
                                                       for n, t, d, h in _fields(ThreatSpec) if n not in ("name", "version")])
    lines += ["", "The defaults are the spec's; each threat template sets its own per dataset family ([threats](threats.md)).",
              "", "## Defense options", ""]
    rows = [[_code(n), _code(name), _esc(t), _option_default(cls, n, d, _datasets()), _esc(h)]
            for name, cls in DEFENSES.items() for n, t, d, h in _fields(cls.Config)]
    lines += _table(["key", "defense", "type", "default", "help"], rows)
    lines += ["", "## Attack options (`ATTACK.KEY`)", ""]
    rows = [[_code(f"{name}.{n}"), _esc(t), _code(_value(d)), _esc(h)]
            for name, cls in ATTACKS.items() for n, t, d, h in _fields(cls.Config)]
    lines += _table(["key", "type", "default", "help"], rows)
    lines += ["", "## Shift options (with `shift=NAME`)", ""]
    rows = [[_code(n), _code(name), _esc(t), _code(_value(d)), _esc(h)]
            for name, cls in SHIFTS.items() for n, t, d, h in _fields(cls.Config)]
    lines += _table(["key", "shift", "type", "default", "help"], rows)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- store schema
def schema_page() -> str:
    """``docs/reference/schema.md``: the store's tables and columns, from :mod:`harness.store.schema`."""
    from harness.store.schema import SCHEMA_VERSION, Base

    lines = _header("Results store schema", f"The tables of a results store (`harness/store/schema.py`, schema version "
                    f"{SCHEMA_VERSION}), as SQLAlchemy creates them; fractions are in [0, 1]. Columns added after stores "
                    "existed are added to an older store by `harness/store/migrate.py` ([the results store](../store.md)).")
    for mapper in sorted(Base.registry.mappers, key=lambda m: list(Base.metadata.sorted_tables).index(m.local_table)):
        table, cls = mapper.local_table, mapper.class_
        lines += [f"## `{table.name}`", "", _esc(" ".join((cls.__doc__ or "").split())), ""]
        rows = []
        for col in table.columns:
            keys = (["primary key"] if col.primary_key else []) + [f"-> {fk.target_fullname}" for fk in col.foreign_keys]
            keys += ["indexed"] if col.index else []
            rows.append([_code(col.name), _code(str(col.type)), "yes" if col.nullable else "no", _esc(", ".join(keys)) or "–"])
        uniq = [", ".join(c.name for c in con.columns) for con in table.constraints
                if type(con).__name__ == "UniqueConstraint"]
        lines += _table(["column", "type", "nullable", "key"], rows)
        lines += ([""] + [f"Unique: ({u})." for u in uniq] if uniq else []) + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- API
def api_page() -> str:
    """``docs/reference/api.md``: mkdocstrings directives for every public name of :data:`API_PACKAGES`."""
    import importlib

    lines = _header("Python API", "The public names of the three packages a plugin or a script imports: "
                    "`harness.core` (the plugin contracts: the one import path of a plugin file), "
                    "`harness.evaluation` (running a job) and `harness.store` (the results store). "
                    "Rendered from their docstrings.")
    for pkg_name in API_PACKAGES:
        pkg = importlib.import_module(pkg_name)
        module_of = getattr(pkg, "_module", None)  # harness.core's lazy exports name their module without importing it
        lines += [f"## `{pkg_name}`", "", f"::: {pkg_name}", "    options:", "      members: false", "      show_root_heading: false", ""]
        for name in sorted(pkg.__all__, key=lambda n: (n.upper() != n, n.lower())):
            if module_of is not None:
                module = module_of(name)
            else:
                module = getattr(getattr(pkg, name), "__module__", pkg_name)
            lines += [f"::: {module}.{name}", ""]
    return "\n".join(lines)


def index_page() -> str:
    """``docs/reference/index.md``."""
    lines = _header("Reference", f"Pages generated from the code by `{COMMAND}` (a test fails when a committed page differs "
                    "from what the command writes):")
    lines += [f"- [{p[:-3]}]({p}): {what}" for p, what in PAGES.items()]
    return "\n".join(lines) + "\n"


BUILDERS: dict[str, Callable[[], str]] = {
    "index.md": index_page, "defenses.md": defenses_page, "attacks.md": attacks_page, "shifts.md": shifts_page,
    "threats.md": threats_page, "datasets.md": datasets_page, "weights.md": weights_page, "set-keys.md": set_keys_page,
    "schema.md": schema_page,
    "api.md": api_page,
}


def pages(what: str = "all") -> dict[str, str]:
    """File name -> Markdown of the reference pages of ``harness ls WHAT`` (``all``: every page and the index)."""
    names = list(BUILDERS) if what == "all" else PAGES_OF[what]
    return {n: BUILDERS[n]() for n in names}
