"""``harness report``: the leaderboard as Markdown, from a results store or from a committed table.

The numbers are the dashboard's (:mod:`dashboard.queries`): the same jobs frame
(:func:`dashboard.queries.load_jobs`), the same leaderboard (one row per defense, classifier
and dataset; per threat the lowest robust accuracy among its finished jobs; the worst case
over threats decides the order) and the same marks. This module only lays them out.

Two sources give that jobs frame:

- a **store** (:func:`jobs_from_store`: a SQLite path or a SQLAlchemy URL, opened read-only):
  every number with its 95% Wilson interval, gradient path, EOT samples, R, flags, cost and
  the commit each job ran at;
- a **table** (:func:`jobs_from_table`), one of two CSV formats:

  - the **summary** this command writes (``harness report --db DB --format csv``): one row per
    finished job with every field the Markdown shows, so ``--table`` renders exactly what
    ``--db`` renders (tests/test_report.py checks the round trip). This is what a grid's
    committed summary (``tables/<grid>.csv``) should be.
  - the **accuracy table** of ``harness check`` (``tables/smoke.csv``: ``metric`` and ``expected``
    rows, written by ``python -m harness.store.tables``): point values only. It holds no
    interval, path, EOT, flag or cost, and the page says so instead of inventing them (with an
    ``n_examples`` column, the intervals are Wilson intervals of ``round(value * n)`` of n).

``--brief`` is the short form the README embeds: the leaderboard tables alone. ``--insert``
rewrites, in an existing file, only the block between ``<!-- BEGIN harness report ARGS -->``
and ``<!-- END harness report -->`` whose ARGS are this command's, so the README's
headline table is this command's output and ``tests/test_readme.py`` checks that it is.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dashboard import queries as q
from harness.core.registry import HarnessError
from harness.evaluation.stats import wilson_interval

#: The summary table's columns (``--format csv``), in order.
SUMMARY_COLUMNS = [
    "defense", "classifier", "dataset", "threat", "shift", "trained_on", "seed", "data_seed", "setting", "n_examples", "norm", "eps",
    "clean", "clean_lo", "clean_hi", "clean_n", "robust", "robust_lo", "robust_hi", "robust_n",
    "robust_single", "robust_majority", "robust_worst", "scoring",
    "gradient_path", "eot_samples", "eval_draws", "stochastic", "adaptive", "attacks", "steps", "apgd_steps", "attack_options",
    "flags", "per_example_s", "nfe_per_example", "classifier_per_example",
    "robust_change", "robust_change_lo", "robust_change_hi", "clean_change", "clean_change_lo", "clean_change_hi",
    "beside", "status", "reason", "job_id", "git_sha",
]
_NUMERIC = ["eps", "clean", "clean_lo", "clean_hi", "robust", "robust_lo", "robust_hi", "robust_single", "robust_majority",
            "robust_worst", "per_example_s", "nfe_per_example", "classifier_per_example", "robust_change", "robust_change_lo",
            "robust_change_hi", "clean_change", "clean_change_lo", "clean_change_hi"]
_INTEGER = ["seed", "data_seed", "n_examples", "clean_n", "robust_n", "eot_samples", "eval_draws", "steps", "apgd_steps"]
_BOOL = ["stochastic", "adaptive", "beside"]
#: The accuracy table of ``harness check``: key columns (beside defense, threat, dataset, classifier) it may have.
_CHECK_KEYS = ["shift", "trained_on", "seed", "norm", "eps", "n_examples"]

BEGIN = "<!-- BEGIN harness report {args} -->"
END = "<!-- END harness report -->"


@dataclass
class Source:
    """Where a report's numbers come from, and what that source holds."""

    kind: str  # "store" | "summary" | "accuracy table"
    label: str  # the --db or --table argument as given
    #: whether the source holds intervals, paths, EOT, flags and cost (an accuracy table does not)
    provenance: bool
    detail: str = ""  # e.g. the table's sha256 prefix
    skipped: list[tuple[str, str, str, str]] = field(default_factory=list)  # (defense, threat, dataset, reason)


# --------------------------------------------------------------------------- sources
def jobs_from_store(db: str | None) -> tuple[pd.DataFrame, Source]:
    """Every job of the store ``db`` (read-only) as :func:`dashboard.queries.load_jobs` reads it, with its
    scoring-rule variants, settings, paired changes and commit (:data:`SUMMARY_COLUMNS`).
    """
    if q.store_missing(db):
        raise HarnessError(f"store {db} does not exist (produce one with `harness run` or `harness grid`)")
    engine = q.make_engine(db)
    try:
        jobs = q.load_jobs(engine)
        if not jobs.empty:
            for rule in ("single", "majority", "worst"):
                jobs[f"robust_{rule}"] = jobs["job_id"].map(q.load_jobs(engine, rule).set_index("job_id")["robust"])
            ids = jobs["job_id"].tolist()
            jobs = jobs.join(q.job_settings(engine, ids), on="job_id")
            ch = q.change_metrics(engine, ids)
            for m in ("robust", "clean"):
                for suffix, col in (("", ""), (":lo", "_lo"), (":hi", "_hi")):
                    jobs[f"{m}_change{col}"] = jobs["job_id"].map(ch[f"{m}_accuracy_change{suffix}"])
    except Exception as exc:  # a file that is not a store, a server that refuses: one line
        if isinstance(exc, HarnessError):
            raise
        raise HarnessError(f"cannot read store {q.display_url(db)}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    finally:
        engine.dispose()
    skipped = [(r.defense, r.threat, r.dataset, str(r.reason or "")) for r in jobs.itertuples() if r.status == "skipped"]
    return _complete(jobs), Source("store", q.display_url(db), True, skipped=skipped)


def jobs_from_table(path: str | Path) -> tuple[pd.DataFrame, Source]:
    """The jobs frame of a committed CSV: a summary (``--format csv``) or a ``harness check`` accuracy table."""
    p = Path(path)
    if not p.is_file():
        raise HarnessError(f"table {path} does not exist")
    text = p.read_text()
    detail = "sha256 " + hashlib.sha256(text.encode()).hexdigest()[:12]
    try:
        raw = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise HarnessError(f"table {path} is not a CSV table: {str(exc).splitlines()[0]}") from exc
    need = {"defense", "threat", "dataset", "classifier"}
    if not need <= set(raw.columns):
        raise HarnessError(f"table {path} lacks the columns {', '.join(sorted(need - set(raw.columns)))}")
    if {"metric", "expected"} <= set(raw.columns):
        return _complete(_from_accuracy_table(raw)), Source("accuracy table", str(path), False, detail)
    if "robust" not in raw.columns:
        raise HarnessError(f"table {path} is neither a `harness report --format csv` summary (no 'robust' column) "
                           "nor a `harness check` accuracy table (no 'metric' and 'expected' columns)")
    jobs = raw.replace({"": None})
    skipped = [(r.defense, r.threat, r.dataset, str(r.reason or "")) for r in jobs.itertuples()
               if getattr(r, "status", "done") == "skipped"]
    return _complete(jobs), Source("summary", str(path), True, detail, skipped=skipped)


def _from_accuracy_table(raw: pd.DataFrame) -> pd.DataFrame:
    """One job per key of a ``harness check`` table: its clean, robust and paired-change values."""
    keys = ["defense", "threat", "dataset", "classifier"] + [k for k in _CHECK_KEYS if k in raw.columns]
    wide = raw.pivot_table(index=keys, columns="metric", values="expected", aggfunc="first").reset_index()
    wide.columns.name = None
    names = {"clean_accuracy": "clean", "robust_accuracy": "robust", "robust_accuracy_change": "robust_change",
             "clean_accuracy_change": "clean_change"}
    for metric, col in names.items():
        wide[col] = pd.to_numeric(wide[metric], errors="coerce") if metric in wide else np.nan
    if "n_examples" in wide:  # n known: the Wilson interval of the stored count
        n = pd.to_numeric(wide["n_examples"], errors="coerce")
        for m in ("clean", "robust"):
            lo_hi = [wilson_interval(int(round(v * k)), int(k)) if pd.notna(v) and pd.notna(k) and k > 0 else (np.nan, np.nan)
                     for v, k in zip(wide[m], n)]
            wide[f"{m}_lo"], wide[f"{m}_hi"] = [a for a, _ in lo_hi], [b for _, b in lo_hi]
            wide[f"{m}_n"] = n
    wide["status"] = "done"
    return wide.replace({"": None})


def _complete(jobs: pd.DataFrame) -> pd.DataFrame:
    """``jobs`` with every :data:`SUMMARY_COLUMNS` column, typed, and ``beside`` as the dashboard derives it."""
    jobs = jobs.copy()
    for col in SUMMARY_COLUMNS + ["finished_at"]:
        if col not in jobs:
            jobs[col] = None
    for col in _NUMERIC:
        jobs[col] = pd.to_numeric(jobs[col], errors="coerce").astype("float64")
    for col in _INTEGER:
        jobs[col] = pd.to_numeric(jobs[col], errors="coerce").round().astype("Int64")
    for col in ("stochastic", "adaptive"):
        jobs[col] = jobs[col].map(_as_bool)
    jobs["shift"] = jobs["shift"].fillna("none")
    jobs["status"] = jobs["status"].fillna("done")
    jobs["flags"] = jobs["flags"].map(lambda f: f if isinstance(f, str) else "")
    jobs["beside"] = jobs["threat"].isin(q.BESIDE_THREATS) | (jobs["shift"] != "none") | (
        jobs["trained_on"].notna() & (jobs["trained_on"] != jobs["dataset"]))
    return jobs


def _as_bool(v):
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "1", "false", "0"):
        return v.strip().lower() in ("true", "1")
    return None


# --------------------------------------------------------------------------- the summary table
def to_summary_csv(jobs: pd.DataFrame) -> str:
    """The finished and skipped jobs as the summary table (:data:`SUMMARY_COLUMNS`), sorted."""
    d = jobs[jobs["status"].isin(["done", "skipped"])]
    d = d.sort_values(["dataset", "defense", "classifier", "threat", "shift", "trained_on", "seed", "job_id"],
                      na_position="first", kind="mergesort")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(SUMMARY_COLUMNS)
    for row in d[SUMMARY_COLUMNS].itertuples(index=False):
        w.writerow([_csv_value(v) for v in row])
    return buf.getvalue()


def _csv_value(v) -> str:
    if v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v)):
        return ""
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.6g}"
    return str(v)


# --------------------------------------------------------------------------- Markdown
def _pct(v) -> str:
    return "–" if v is None or pd.isna(v) else f"{100 * float(v):.1f}"


def _interval(acc, lo, hi) -> str:
    if acc is None or pd.isna(acc):
        return "–"
    if lo is None or pd.isna(lo) or hi is None or pd.isna(hi):
        return _pct(acc)
    return f"{_pct(acc)} [{_pct(lo)}, {_pct(hi)}]"


def _change(v, lo, hi) -> str:
    if v is None or pd.isna(v):
        return "–"
    s = f"{100 * float(v):+.1f}"
    return s if lo is None or pd.isna(lo) else f"{s} [{100 * float(lo):+.1f}, {100 * float(hi):+.1f}]"


def _num(v, fmt: str = "{:.3g}") -> str:
    return "–" if v is None or pd.isna(v) else fmt.format(float(v))


def _cell(v) -> str:
    """A value safe inside a Markdown table cell."""
    return str(v).replace("|", "\\|").replace("\n", " ")


def _table(head: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    align = align or "l" * len(head)
    rule = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(head) + " |", "| " + " | ".join(rule) + " |"] + ["| " + " | ".join(_cell(c) for c in r) + " |"
                                                                              for r in rows]


def _marks(lb: pd.DataFrame, prefix: str, i: int, source: Source) -> str:
    """`` †`` (non-adaptive) and `` 🚩 names`` (flags) for the leaderboard cell ``prefix`` of row ``i``."""
    if not source.provenance:
        return ""
    s = ""
    ad = lb.at[i, prefix + ":adaptive"] if prefix + ":adaptive" in lb else None
    if prefix != "worst" and ad is not None and not pd.isna(ad) and not bool(ad):
        s += " †"
    return s + q.flag_mark(lb.at[i, prefix + ":flags"])


#: The brief board's column beside the threats (the full page has the whole table beside the board)
SHIFT_COLUMN = "color-shift (paired change)"


def _shift_cells(jobs: pd.DataFrame) -> dict[tuple, str]:
    """Per (defense, classifier, dataset): robust accuracy on colour-shifted inputs, the lowest over the shifts run,
    with its paired change from the unshifted inputs, e.g. ``6.2 (-6.2)``; purifiers trained on another dataset left out.
    """
    d = jobs[(jobs["status"] == "done") & (jobs["threat"] == "color-shift") & jobs["robust"].notna()]
    d = d[d["trained_on"].isna() | (d["trained_on"] == d["dataset"])]
    out = {}
    for key, g in d.groupby(q.KEY, sort=False):
        r = g.sort_values(["robust", "robust_n"], ascending=[True, False], na_position="last").iloc[0]
        out[key] = _pct(r["robust"]) + ("" if pd.isna(r["robust_change"]) else f" ({100 * float(r['robust_change']):+.1f})")
    return out


def _board(lb: pd.DataFrame, jobs: pd.DataFrame, source: Source, brief: bool) -> list[str]:
    threats = q.lb_threats(lb)
    head = ["#", "defense", "classifier", "clean", "worst case"] + threats
    align = "rlllr" + "r" * len(threats)
    shifted = _shift_cells(jobs) if brief else {}
    if shifted:
        head.append(SHIFT_COLUMN)
        align += "r"
    cost = source.provenance and not brief
    if cost:
        head.append("s / example")
        align += "r"
    rows = []
    for i in lb.index:
        worst = _interval(lb.at[i, "worst"], lb.at[i, "worst:lo"], lb.at[i, "worst:hi"])
        if not pd.isna(lb.at[i, "worst"]):
            worst = f"**{worst.split(' [')[0]}**" + (f" [{worst.split(' [', 1)[1]}" if " [" in worst else "")
            worst += f" {lb.at[i, 'worst:threat']}" + _marks(lb, "worst", i, source)
            if source.provenance and bool(lb.at[i, "non_adaptive_only"]):
                worst = "⚠ " + worst
        cells = [str(len(rows) + 1), f"`{lb.at[i, 'defense']}`", lb.at[i, "classifier"],
                 _interval(lb.at[i, "clean"], lb.at[i, "clean:lo"], lb.at[i, "clean:hi"]), worst]
        for t in threats:
            p = f"robust:{t}"
            acc = lb.at[i, p]
            if pd.isna(acc):
                cells.append("–")
                continue
            s = _interval(acc, lb.at[i, p + ":lo"], lb.at[i, p + ":hi"])
            prov = q.fmt_provenance(lb.at[i, p + ":path"], lb.at[i, p + ":eot"], lb.at[i, p + ":draws"])
            if prov and not brief:
                s += f"<br>{prov}"
            seeds = q.fmt_seeds(lb.at[i, p + ":mean"], lb.at[i, p + ":sd"], lb.at[i, p + ":seeds"])  # mean ± sd over seeds
            cells.append(s + _marks(lb, p, i, source) + (f"<br>{seeds[3:]}" if seeds else ""))
        if shifted:
            cells.append(shifted.get(tuple(lb.loc[i, q.KEY]), "–"))
        if cost:
            ids = [lb.at[i, f"robust:{t}:job"] for t in threats if not pd.isna(lb.at[i, f"robust:{t}"])]
            sec = jobs.set_index("job_id").loc[[j for j in ids if isinstance(j, str)], "per_example_s"] if ids else []
            cells.append(_num(float(np.nansum(sec)) if len(sec) and not np.all(pd.isna(sec)) else None))
        rows.append(cells)
    return _table(head, rows, align)


def _settings(lb: pd.DataFrame, jobs: pd.DataFrame) -> list[str]:
    by_id = jobs.set_index("job_id")
    head = ["defense", "classifier", "threat", "n", "budget", "attacks", "steps (PGD / APGD)", "path", "EOT", "R", "scoring",
            "seed", "flags", "s / example", "NFE / example", "job", "commit"]
    rows = []
    for i in lb.index:
        for t in q.lb_threats(lb):
            jid = lb.at[i, f"robust:{t}:job"]
            if not isinstance(jid, str) or jid not in by_id.index:
                continue
            j = by_id.loc[jid]
            steps = f"{_num(j['steps'], '{:.0f}')} / {_num(j['apgd_steps'], '{:.0f}')}"
            attacks = str(j["attacks"] or "–") + (f" ({j['attack_options']})" if isinstance(j["attack_options"], str)
                                                   and j["attack_options"] else "")
            rows.append([f"`{lb.at[i, 'defense']}`", lb.at[i, "classifier"], t, _num(j["n_examples"], "{:.0f}"),
                         f"{j['norm'] or '?'} {q.fmt_eps(j['eps'])}", attacks, steps, j["gradient_path"] or "–",
                         _num(j["eot_samples"], "{:.0f}"), _num(j["eval_draws"], "{:.0f}"), j["scoring"] or "–",
                         _num(j["seed"], "{:.0f}"), j["flags"] or "–", _num(j["per_example_s"]), _num(j["nfe_per_example"]),
                         f"`{jid[:12]}`", f"`{str(j['git_sha'])[:12]}`" if isinstance(j["git_sha"], str) else "–"])
    return _table(head, rows, "lllrllllrrlrlrrll")


def _beside(jobs: pd.DataFrame, source: Source) -> list[str]:
    d = jobs[(jobs["status"] == "done") & jobs["beside"]]
    if d.empty:
        return []
    # trained on another dataset than the evaluated one (the purifier's own dataset reads '–')
    d = d.assign(transfer=[t if isinstance(t, str) and t != ds else "–" for t, ds in zip(d["trained_on"], d["dataset"])])
    d = d.sort_values(["threat", "shift", "transfer", "defense", "classifier"], kind="mergesort")
    head = ["defense", "classifier", "threat", "shift", "trained on", "clean", "robust", "robust change (paired)"]
    rows = [[f"`{r.defense}`", r.classifier, r.threat, r.shift, r.transfer, _interval(r.clean, r.clean_lo, r.clean_hi),
             _interval(r.robust, r.robust_lo, r.robust_hi), _change(r.robust_change, r.robust_change_lo, r.robust_change_hi)]
            for r in d.itertuples()]
    return _table(head, rows, "lllllrrr")


def _commits(jobs: pd.DataFrame) -> str:
    done = jobs[jobs["status"] == "done"]
    counts = done["git_sha"].dropna().astype(str).str.slice(0, 12).value_counts()
    if counts.empty:
        return ""
    parts = [f"`{sha}` ({n} job{'s' if n > 1 else ''})" for sha, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    return "; run at commit " + ", ".join(parts)


def render(jobs: pd.DataFrame, source: Source, args: str, datasets: list[str] | None = None, brief: bool = False) -> str:
    """The Markdown report of ``jobs`` (one section per dataset, each a leaderboard), produced by ``harness report ARGS``."""
    if datasets:
        missing = [d for d in datasets if d not in set(jobs["dataset"])]
        if missing:
            have = ", ".join(sorted(set(jobs["dataset"].dropna()))) or "none"
            raise HarnessError(f"{source.kind} {source.label} has no jobs of dataset {', '.join(missing)} (it has: {have})")
        jobs = jobs[jobs["dataset"].isin(datasets)]
    done = jobs[jobs["status"] == "done"]
    if done.empty:
        raise HarnessError(f"{source.kind} {source.label} has no finished jobs")
    names = sorted(set(done["dataset"]))
    what = f"{source.kind} `{source.label}`" + (f" ({source.detail})" if source.detail else "")
    out = [f"<!-- Generated by `harness report {args}`; do not edit by hand: rerun the command. -->"]
    if not brief:
        out += ["", f"# Leaderboard: {', '.join(names)}", ""]
    out.append(f"From {what}: {len(done)} finished jobs{_commits(jobs)}. Robust accuracy in % "
               + ("with its 95% Wilson interval, " if source.provenance else "")
               + "per threat model: the lowest over the cell's jobs; rows sorted by the worst case over threats.")
    if source.provenance:
        out.append(("" if brief else "Under each number: the gradient path, EOT samples per gradient and R evaluation draws. ")
                   + "† the cell's attacks do not differentiate through the purifier; ⚠ no threat of the row did; "
                   "🚩 the cell's job carries flags (`harness show JOB`).")
    else:
        out.append("This table holds point values only: the intervals, gradient paths, EOT, flags and cost are in the store "
                   "(`harness report --db STORE`).")
    if brief and (done["threat"] == "color-shift").any():
        out.append(f"*{SHIFT_COLUMN}*: robust accuracy on colour-shifted inputs (the lowest over the shifts run) and its "
                   "change from the unshifted inputs on the same examples, in points; beside the threats, not in the worst case.")
    for ds in names:
        sub = jobs[jobs["dataset"] == ds]
        lb = q.leaderboard(sub)
        lb = lb[lb["worst"].notna() | lb["clean"].notna()].reset_index(drop=True)
        out += ["", f"**{ds}**" if brief else f"## {ds}", ""]
        out += _board(lb, sub, source, brief)
        if brief:
            continue
        if source.provenance:
            out += ["", "### Settings and provenance of each cell", ""] + _settings(lb, sub)
        beside = _beside(sub, source)
        if beside:
            out += ["", "### Beside the leaderboard: shifted inputs and transferred purifiers", "",
                    "Not attacks, so not in the worst case: the change is paired with the unshifted inputs "
                    "(or the purifier trained on this dataset) on the same examples, in points.", ""] + beside
        skipped = sorted({s for s in source.skipped if s[2] == ds})
        if skipped:
            out += ["", "### Not run here", ""] + [f"- `{d}` x {t}: {_cell(r)}" for d, t, _, r in skipped]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- the README block
def insert_block(text: str, args: str, body: str) -> str:
    """``text`` with the block ``<!-- BEGIN harness report ARGS -->`` ... ``<!-- END harness report -->`` replaced by ``body``."""
    begin = BEGIN.format(args=args)
    pat = re.compile(re.escape(begin) + r"\n.*?" + re.escape(END), re.S)
    if not pat.search(text):
        raise HarnessError(f"no block `{begin}` ... `{END}` to replace: add those two lines where the table goes")
    return pat.sub(lambda _: f"{begin}\n{body}{END}", text, count=1)


def block(text: str, args: str) -> str | None:
    """The body of the block of ``args`` in ``text`` (None when there is none)."""
    m = re.search(re.escape(BEGIN.format(args=args)) + r"\n(.*?)" + re.escape(END), text, re.S)
    return m.group(1) if m else None
