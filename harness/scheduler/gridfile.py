"""Grid files: a YAML file naming the axes of a grid, parsed and validated with line numbers.

A grid file::

    name: smoke
    n_examples: 32                 # default for every cell (a dataset entry may override)
    seeds: [0]                     # attack/purification seeds (one cell each)
    data_seed: 0                   # which evaluation subset; or data_seeds: [0, 1, 2] (one cell each)
    set: {batch_size: 32}          # overrides applied to every cell (threat or defense keys)
    plugins: [path/to/my_defense.py]
    defenses:
      - none
      - name: diffpure
        set: {t_star: 0.1}         # per-axis overrides
      - name: maep
        set: {trained_on: mnist5k}
        threats: [cross-dataset]   # optional: only with these threats / on these datasets / before
        datasets: [digits]         # these classifiers
        classifiers: [digits-cnn]
      - name: cmap
        n_examples: {adaptive: 8}  # optional: this defense's subset size, one for all its threats or per threat
    threats:
      - preprocessor-blind
      - name: adaptive
        set: {steps: 20}
        n_examples: 16             # optional: this protocol's subset size (before the dataset's and the grid's)
    datasets:
      - digits
      - name: cifar10
        data_dir: /data/cifar10.npz
        n_examples: 64
    classifiers:                   # optional: default is each dataset's shipped classifier
      - name: resnet20
        weights: /models/resnet20-12fca82f.th
        datasets: [cifar10]

The cells are the product defenses x threats x datasets x classifiers x data seeds x seeds. A mistake
in the file (a key or name that does not exist, a duplicated key, an invalid ``set``
value, a missing plugin file, bytes that are not UTF-8) stops the grid before any job
runs, with one line naming the file, the line and the key. A valid cell that cannot run
is stored as ``skipped`` with the reason (see :mod:`harness.scheduler.cells` for the
rule). Only the parent process writes to the store: workers (one process per device,
or Ray tasks) stream each finished batch back, and the parent writes it at once, so a
killed grid loses at most the batches in flight and a rerun continues mid-job.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from harness.core.registry import HarnessError, suggest
from harness.data import MAX_DATA_SEED

TOP_KEYS = {
    "name", "n_examples", "seeds", "seed", "data_seed", "data_seeds", "set", "plugins", "defenses", "threats", "datasets", "classifiers",
}
#: Keys a grid file might plausibly hold that the harness does not read: an error, never silence.
UNSUPPORTED_KEYS = {
    "device": "devices are chosen on the command line: harness grid FILE --devices cuda:0,cuda:1",
}
AXIS_KEYS = {
    "defenses": {"name", "set", "threats", "datasets", "classifiers", "n_examples"},
    "threats": {"name", "set", "n_examples"},
    "datasets": {"name", "set", "data_dir", "n_examples"},
    "classifiers": {"name", "weights", "model_dir", "datasets", "set"},
}


class GridError(HarnessError):
    """A mistake in a grid file (the message names the file and line); the grid stops before any job runs."""


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line of every mapping key (for error messages)."""


def _construct_mapping(loader, node, deep=False):
    mapping = {}
    lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if not isinstance(key, (str, int, float, bool)) or key is None:
            raise GridError(f"line {line}: mapping keys must be names")
        if key in mapping:  # YAML keeps the last silently; a grid never means that
            raise GridError(f"line {line}: duplicate key '{key}' (first given on line {lines[key]})")
        mapping[key] = loader.construct_object(value_node, deep=True)
        lines[key] = line
    out = _Map(mapping)
    out.lines = lines
    out.line = node.start_mark.line + 1
    return out


def _construct_sequence(loader, node, deep=False):
    out = _Seq(loader.construct_object(child, deep=True) for child in node.value)
    out.lines = [child.start_mark.line + 1 for child in node.value]
    out.line = node.start_mark.line + 1
    return out


class _Map(dict):
    lines: dict
    line: int


class _Seq(list):
    lines: list
    line: int


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


@dataclass(frozen=True)
class AxisEntry:
    """One entry of an axis. ``where`` is its place in the file (``FILE: line N``) and
    ``set_where`` the place of each of its ``overrides``, for error messages.
    """

    name: str
    overrides: tuple[tuple[str, str], ...] = ()
    data_dir: str | None = None
    n_examples: int | None = None
    #: a defense's subset size per threat name (``n_examples: {adaptive: 8}``; an integer applies to every threat)
    n_by_threat: tuple[tuple[str, int], ...] = ()
    weights: str | None = None
    model_dir: str | None = None
    datasets: tuple[str, ...] | None = None
    threats: tuple[str, ...] | None = None
    classifiers: tuple[str, ...] | None = None
    where: str = ""
    set_where: tuple[str, ...] = ()


@dataclass(frozen=True)
class GridSpec:
    """A parsed grid file; the ``*where`` fields say where each part was written (error messages)."""

    name: str
    defenses: tuple[AxisEntry, ...]
    threats: tuple[AxisEntry, ...]
    datasets: tuple[AxisEntry, ...]
    classifiers: tuple[AxisEntry, ...] = ()
    seeds: tuple[int, ...] = (0,)
    data_seed: int = 0  # the first of data_seeds
    n_examples: int | None = None
    overrides: tuple[tuple[str, str], ...] = ()
    plugins: tuple[str, ...] = ()
    path: str = ""
    set_where: tuple[str, ...] = ()
    plugins_where: tuple[str, ...] = ()
    #: which evaluation subsets (``data_seeds: [0, 1, 2]``; a single ``data_seed`` is one of them)
    data_seeds: tuple[int, ...] = (0,)


def _where(path: str, m: Any, key: Any = None) -> str:
    line = None
    if isinstance(m, _Map):
        line = m.lines.get(key, m.line) if key is not None else m.line
    elif isinstance(m, _Seq):
        line = m.lines[key] if isinstance(key, int) and key < len(m.lines) else m.line
    return f"{path}: line {line}" if line else path


def _overrides(value: Any, where: str, path: str) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """A ``set`` mapping -> ((key, value) pairs, where each pair was written)."""
    if value is None:
        return (), ()
    if not isinstance(value, dict):
        raise GridError(f"{where}: 'set' must be a mapping of key: value")
    out, wheres = [], []
    for k, v in value.items():
        if isinstance(v, (list, tuple)):
            v = ",".join(map(str, v))
        out.append((str(k), str(v)))
        wheres.append(_where(path, value, k))
    return tuple(out), tuple(wheres)


def _axis(doc: _Map, axis: str, path: str, required: bool) -> tuple[AxisEntry, ...]:
    if axis not in doc:
        if required:
            raise GridError(f"{_where(path, doc)}: missing required key '{axis}'")
        return ()
    items = doc[axis]
    if not isinstance(items, list) or not items:
        raise GridError(f"{_where(path, doc, axis)}: '{axis}' must be a non-empty list")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            out.append(AxisEntry(name=item, where=_where(path, items, i)))
            continue
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise GridError(f"{_where(path, items, i)}: each entry of '{axis}' is a name or a mapping with 'name'")
        for k in item:
            if k not in AXIS_KEYS[axis]:
                raise GridError(f"{_where(path, item, k)}: unknown key '{k}' in {axis}{suggest(str(k), sorted(AXIS_KEYS[axis]))}")
        w = _where(path, item)
        n, n_by = item.get("n_examples"), ()
        if axis == "defenses" and isinstance(n, dict):
            n_by = tuple((str(k), v) for k, v in n.items())
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for _, v in n_by):
                raise GridError(f"{_where(path, item, 'n_examples')}: n_examples must be a positive integer or a mapping of "
                                "threat name: positive integer")
            n = None
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise GridError(f"{_where(path, item, 'n_examples')}: n_examples must be a positive integer")
        ds, ts, cs = item.get("datasets"), item.get("threats"), item.get("classifiers") if axis == "defenses" else None
        for key, names in (("datasets", ds), ("threats", ts), ("classifiers", cs)):
            if names is not None and not (isinstance(names, list) and all(isinstance(d, str) for d in names)):
                raise GridError(f"{_where(path, item, key)}: '{key}' must be a list of {key[:-1]} names")
        for k in ("data_dir", "weights", "model_dir"):
            if item.get(k) is not None and not isinstance(item[k], str):
                raise GridError(f"{_where(path, item, k)}: '{k}' must be a path")
        overrides, set_where = _overrides(item.get("set"), w, path)
        out.append(
            AxisEntry(
                name=item["name"], overrides=overrides, data_dir=item.get("data_dir"),
                n_examples=n, n_by_threat=n_by, weights=item.get("weights"), model_dir=item.get("model_dir"),
                datasets=tuple(ds) if ds is not None else None, threats=tuple(ts) if ts is not None else None,
                classifiers=tuple(cs) if cs is not None else None, where=_where(path, item, "name"), set_where=set_where,
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
        raw = p.read_bytes()
        text = raw.decode("utf-8")
    except OSError as exc:
        raise GridError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise GridError(f"{path}: line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the file as UTF-8") from None
    try:
        doc = yaml.load(text, Loader=_LineLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        raise GridError(f"{path}: {line}invalid YAML ({getattr(exc, 'problem', None) or exc})") from None
    except GridError as exc:  # raised while building a mapping: add the file
        raise GridError(f"{path}: {exc}") from None
    if not isinstance(doc, _Map):
        raise GridError(f"{path}: a grid file is a mapping with defenses, threats and datasets")
    for k in doc:
        if k in UNSUPPORTED_KEYS:
            raise GridError(f"{_where(str(path), doc, k)}: '{k}' is not supported in a grid file: {UNSUPPORTED_KEYS[k]}")
        if k not in TOP_KEYS:
            raise GridError(f"{_where(str(path), doc, k)}: unknown key '{k}'{suggest(str(k), sorted(TOP_KEYS))}")
    sp = str(path)
    if "seeds" in doc and "seed" in doc:
        raise GridError(f"{_where(sp, doc, 'seed')}: give 'seeds' or 'seed', not both")
    seeds = _int_list(doc, "seeds", sp) if "seeds" in doc else (_int_list(doc, "seed", sp) if "seed" in doc else (0,))
    if "data_seeds" in doc and "data_seed" in doc:
        raise GridError(f"{_where(sp, doc, 'data_seed')}: give 'data_seeds' or 'data_seed', not both")
    data_key = "data_seeds" if "data_seeds" in doc else "data_seed"
    data_seeds = _int_list(doc, data_key, sp) if data_key in doc else (0,)
    if data_key == "data_seed" and isinstance(doc.get("data_seed"), list):
        raise GridError(f"{_where(sp, doc, 'data_seed')}: data_seed must be one integer in 0..{MAX_DATA_SEED} "
                        "(several subsets: data_seeds: [0, 1, 2])")
    bad = [d for d in data_seeds if not 0 <= d <= MAX_DATA_SEED]
    if bad and data_key == "data_seed":
        raise GridError(f"{_where(sp, doc, 'data_seed')}: data_seed must be one integer in 0..{MAX_DATA_SEED}")
    if bad:
        raise GridError(f"{_where(sp, doc, data_key)}: {data_key} must be integers in 0..{MAX_DATA_SEED} (got {bad[0]})")
    if len(set(data_seeds)) != len(data_seeds):
        raise GridError(f"{_where(sp, doc, data_key)}: {data_key} lists a seed twice")
    n = doc.get("n_examples")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise GridError(f"{_where(sp, doc, 'n_examples')}: n_examples must be a positive integer")
    plugins = doc.get("plugins") or []
    if not isinstance(plugins, list) or not all(isinstance(pl, str) for pl in plugins):
        raise GridError(f"{_where(sp, doc, 'plugins')}: 'plugins' must be a list of files or modules")
    base = p.parent
    plugins_where = tuple(f"{_where(sp, plugins, i)}: plugins" for i in range(len(plugins)))
    plugins = tuple(str((base / pl).resolve()) if str(pl).endswith(".py") and not Path(pl).is_absolute() else str(pl) for pl in plugins)
    overrides, set_where = _overrides(doc.get("set"), _where(sp, doc, "set"), sp)
    defenses, threats = _axis(doc, "defenses", sp, True), _axis(doc, "threats", sp, True)
    names = {t.name for t in threats}
    for d in defenses:
        for t, _ in d.n_by_threat:
            if t not in names:
                raise GridError(f"{d.where}: n_examples names threat '{t}', which is not in the grid's threats"
                                f"{suggest(t, sorted(names))}")
    return GridSpec(
        name=str(doc.get("name", p.stem)),
        defenses=defenses,
        threats=threats,
        datasets=_axis(doc, "datasets", sp, True),
        classifiers=_axis(doc, "classifiers", sp, False),
        seeds=seeds,
        data_seed=data_seeds[0],
        data_seeds=data_seeds,
        n_examples=n,
        overrides=overrides,
        plugins=plugins,
        path=sp,
        set_where=set_where,
        plugins_where=plugins_where,
    )
