"""Read-only queries over the results store and the leaderboard built from them.

Pure SQLAlchemy + pandas (no Streamlit), shared by the page (:mod:`dashboard.app`),
the tests and ``bench/bench_dashboard.py``. Accuracies are fractions in [0, 1] as the
store keeps them; only the display helpers turn them into percentages.

The leaderboard has one row per (defense, classifier, dataset):

- ``robust:<threat>``: for each threat model, the lowest robust accuracy among the
  finished jobs of that row under that threat (the strongest known attack; several
  jobs differ by seed or budget), with its 95% Wilson interval, n, gradient path, EOT
  samples and evaluation draws, and ``jobs``: how many jobs the minimum is taken over.
- ``worst``: the minimum over every threat run (the headline; RobustBench's "best known
  robust accuracy"), with the interval, n and provenance of the job that gave it. The
  per-example minimum over threats (:func:`per_example_worst`, in the drill-down) can be
  lower still.
- ``clean``: the clean accuracy of the row's job with the most examples.
- ``non_adaptive_only``: no threat whose attack differentiates through the purifier
  (job column ``adaptive``) was run, so the headline is an upper bound at best.

Filter on norm and eps to compare like with like: :func:`mixed_budgets` says when a
filtered set mixes budgets within a dataset.

Shifted inputs and transferred purifiers are not attacks: jobs of the threats in
:data:`BESIDE_THREATS`, and any job whose inputs were shifted or whose purifier was
trained on another dataset (job columns ``shift`` and ``trained_on``), stay out of the
leaderboard and its worst case. They are shown beside it: :func:`shift_view` (accuracy
change per defense and shift, paired with the unshifted inputs, 95% Newcombe interval)
and :func:`transfer_matrix` (trained on x evaluated on, per defense).
"""

from __future__ import annotations

import math
import time
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
from sqlalchemy import String, and_, create_engine, event, inspect, literal, select, text, type_coerce
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from harness.evaluation.flags import format_flags
from harness.evaluation.stats import over_seeds, setting_key, wilson_interval
from harness.store import resolve_url
from harness.store.check import shift_label
from harness.store.codec import decode_images
from harness.store.schema import CurveRow, ExampleRow, Job, MetricRow, SampleRow
from harness.store.store import display_url, readonly_url, server_engine_args, sqlite_file, store_missing  # noqa: F401 (the page)

KEY = ["defense", "classifier", "dataset"]
#: Column order of the threat models the harness ships; others follow alphabetically.
THREAT_ORDER = ("preprocessor-blind", "bpda", "adaptive")
#: Threats shown beside the leaderboard, never inside its worst case (a shift and a transfer are not attacks).
BESIDE_THREATS = ("color-shift", "cross-dataset")
#: The paired metrics of a color-shift / cross-dataset job (value, 95% interval, n).
CHANGE_METRICS = ("clean_accuracy_change", "robust_accuracy_change", "clean_accuracy_classifier_change",
                  "robust_accuracy_classifier_change", "clean_accuracy_unshifted", "robust_accuracy_unshifted")
#: Scoring rules over the R evaluation draws; "headline" = the rule the threat spec names.
RULES = ("headline", "worst", "majority", "single")
FILTERS = ("dataset", "classifier", "norm", "eps", "threat")

JOB_COLUMNS = [
    "job_id", "status", "reason", "defense", "threat", "dataset", "classifier", "seed", "n_examples", "norm", "eps",
    "gradient_path", "eot_samples", "eval_draws", "stochastic", "adaptive", "finished_at",
    "total_s", "per_example_s", "classifier_images", "purifier_nfe_images",
    "clean", "clean_lo", "clean_hi", "clean_n", "robust", "robust_lo", "robust_hi", "robust_n", "shift", "trained_on", "flags",
    "data_seed", "setting", "beside",
]
#: What load_jobs selects: JOB_COLUMNS up to data_seed, then the two configuration parts ``setting`` is derived from.
_SELECTED = JOB_COLUMNS[:JOB_COLUMNS.index("setting")] + ["defense_config", "threat_spec"]

EMPTY_HELP = """\
**No finished jobs in `{db}` yet.** Produce results with the harness, then reload this page:

```bash
harness run --defense none --threat preprocessor-blind --db {db}
harness run --defense none --threat adaptive --db {db}
harness dashboard --db {db}
```

`harness ls` lists the defenses and threat models; every finished job appears here.
"""


# --------------------------------------------------------------------------- connection
def make_engine(db: str | None) -> Engine:
    """A read-only engine: SQLite opened with ``mode=ro`` and ``PRAGMA query_only``; PostgreSQL with read-only
    transactions (``default_transaction_read_only``, enforced by the server).
    """
    url = readonly_url(db)
    if not url.startswith("sqlite"):
        return create_engine(url, **server_engine_args(url, read_only=True))
    # NullPool: a fresh connection per query (cheap for SQLite) always sees the current
    # file, even when the store is replaced on disk while the page is open
    engine = create_engine(url, connect_args={"timeout": 30}, poolclass=NullPool)

    @event.listens_for(engine, "connect")
    def _ro(dbapi_conn, _record):
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA query_only=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    return engine


def store_signature(db: str | None, engine: Engine | None = None) -> tuple:
    """Cache key that changes whenever the store does: mtime and size of the SQLite file
    and of its WAL (writers append to the WAL first). A server database: the number of
    jobs and batches and the latest job start and finish (``engine``: the page's read-only
    engine; without one, or when the query fails, a 30 s bucket).
    """
    url = resolve_url(db)
    path = sqlite_file(url)
    if path is None:
        if engine is not None:
            try:
                with engine.connect() as conn:
                    row = conn.execute(text("SELECT (SELECT count(*) FROM jobs), (SELECT count(*) FROM batches), "
                                            "(SELECT max(created_at) FROM jobs), (SELECT max(finished_at) FROM jobs)")).one()
                return ("url", url, *(str(v) for v in row))
            except SQLAlchemyError:
                pass
        return ("url", url, int(time.time() // 30))
    sig: list[Any] = [str(path)]
    for f in (path, path.with_name(path.name + "-wal")):
        try:
            st = f.stat()
        except OSError:
            st = None
        # an empty WAL (a reader may create one) holds nothing: same as none
        sig += [st.st_mtime_ns, st.st_size] if st is not None and st.st_size > 0 else [None, None]
    return tuple(sig)


def _columns(engine: Engine, table: str) -> set[str]:
    """The columns a store's table has (an older store lacks those added since: harness.store.migrate)."""
    return {c["name"] for c in inspect(engine).get_columns(table)}


def has_jobs_table(engine: Engine) -> bool:
    """Whether the store has a ``jobs`` table."""
    return inspect(engine).has_table("jobs")


# --------------------------------------------------------------------------- jobs
def metric_names(rule: str = "headline") -> tuple[str, str]:
    """The (clean, robust) accuracy metric names under scoring ``rule`` (e.g. ``clean_accuracy_majority``)."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    suffix = "" if rule == "headline" else f"_{rule}"
    return f"clean_accuracy{suffix}", f"robust_accuracy{suffix}"


def empty_jobs() -> pd.DataFrame:
    """An empty jobs frame with every column of :func:`load_jobs`."""
    return pd.DataFrame({c: pd.Series(dtype="float64" if c in ("eps",) else "object") for c in JOB_COLUMNS})


def load_jobs(engine: Engine, rule: str = "headline") -> pd.DataFrame:
    """Every job (any status) with its clean and robust accuracy under ``rule`` and its
    cost, one row per job, in one SQL query (two joins on the metrics index).
    """
    if not has_jobs_table(engine):
        return empty_jobs()
    clean_name, robust_name = metric_names(rule)
    j = Job.__table__
    c = MetricRow.__table__.alias("c")
    r = MetricRow.__table__.alias("r")
    t, nf = j.c.timings, j.c.nfe
    stmt = (
        select(
            j.c.id, j.c.status, j.c.reason, j.c.defense, j.c.threat, j.c.dataset, j.c.classifier, j.c.seed,
            j.c.n_examples, j.c.norm, j.c.eps, j.c.gradient_path, j.c.eot_samples, j.c.eval_draws, j.c.stochastic,
            j.c.adaptive, type_coerce(j.c.finished_at, String),  # parsed below, vectorised
            t["total_s"].as_float(), t["per_example_s"].as_float(),
            nf["classifier_images"].as_float(), nf["purifier_nfe_images"].as_float(),
            c.c.value, c.c.lower, c.c.upper, c.c.n, r.c.value, r.c.lower, r.c.upper, r.c.n,
            j.c.config["shift"], j.c.config[("defense_config", "trained_on")].as_string(),
            j.c.flags if "flags" in _columns(engine, "jobs") else literal(None),  # a store older than flags lacks the column
            j.c.config["data_seed"].as_string(), j.c.config["defense_config"], j.c.config["threat_spec"],
        )
        .select_from(
            j.outerjoin(c, and_(c.c.job_id == j.c.id, c.c.name == clean_name)).outerjoin(
                r, and_(r.c.job_id == j.c.id, r.c.name == robust_name)
            )
        )
    )
    with engine.connect() as conn:
        rows = [tuple(r) for r in conn.execute(stmt)]  # plain tuples: pandas probes Row attributes slowly
    if not rows:
        return empty_jobs()
    df = pd.DataFrame.from_records(rows, columns=_SELECTED)  # "setting" and "beside" are derived below
    for col in ("eps", "total_s", "per_example_s", "classifier_images", "purifier_nfe_images",
                "clean", "clean_lo", "clean_hi", "robust", "robust_lo", "robust_hi"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    for col in ("clean_n", "robust_n", "n_examples", "eot_samples", "eval_draws", "seed"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
    df["adaptive"] = df["adaptive"].fillna(False).astype(bool)
    df["stochastic"] = df["stochastic"].fillna(False).astype(bool)
    n = df["n_examples"].astype("float64").where(lambda s: s > 0)
    df["nfe_per_example"] = df["purifier_nfe_images"] / n
    df["classifier_per_example"] = df["classifier_images"] / n
    df["finished_at"] = pd.to_datetime(df["finished_at"], errors="coerce", utc=True, format="ISO8601")
    df["shift"] = [shift_label({"shift": c}) for c in df["shift"]]  # the stored shift identity -> its label
    df["flags"] = [format_flags(f) for f in df["flags"]]  # "not_converged,zero_gradients", "" none, "?" stored before flags
    df["beside"] = df["threat"].isin(BESIDE_THREATS) | (df["shift"] != "none") | (
        df["trained_on"].notna() & (df["trained_on"] != df["dataset"]))
    df["data_seed"] = pd.to_numeric(df["data_seed"], errors="coerce").astype("Int64")  # NaN: stored before it was recorded
    setting = [setting_key(dc, ts) for dc, ts in zip(df.pop("defense_config"), df.pop("threat_spec"))]
    df.insert(df.columns.get_loc("beside"), "setting", setting)
    return df


def threat_order(threats: Iterable[str]) -> list[str]:
    """The distinct threat names, the known ones in THREAT_ORDER first, then the others sorted."""
    ts = {t for t in threats if isinstance(t, str)}
    return [t for t in THREAT_ORDER if t in ts] + sorted(ts - set(THREAT_ORDER))


def filter_options(jobs: pd.DataFrame) -> dict[str, list]:
    """The sorted distinct values of every filter column in ``jobs`` (threats in THREAT_ORDER)."""
    out: dict[str, list] = {}
    for f in FILTERS:
        vals = jobs[f].dropna().unique().tolist() if f in jobs else []
        if f == "threat":
            out[f] = threat_order(vals)
        elif f == "eps":
            out[f] = sorted({round(float(v), 10) for v in vals})
        else:
            out[f] = sorted(str(v) for v in vals)
    return out


def apply_filters(jobs: pd.DataFrame, **selected: Sequence | None) -> pd.DataFrame:
    """Keep jobs matching every non-empty selection (``dataset=[...]``, ``eps=[...]``...)."""
    mask = pd.Series(True, index=jobs.index)
    for f, values in selected.items():
        if f not in FILTERS:
            raise ValueError(f"unknown filter {f!r} (known: {', '.join(FILTERS)})")
        if not values:
            continue
        if f == "eps":
            col = jobs["eps"].to_numpy(dtype="float64")
            m = np.zeros(len(jobs), dtype=bool)
            for v in values:
                m |= np.isclose(col, float(v), rtol=1e-9, atol=1e-12)
            mask &= m
        else:
            mask &= jobs[f].isin(list(values))
    return jobs[mask]


def fmt_eps(eps: float | None) -> str:
    """A budget for display: ``8/255`` for a multiple of 1/255 up to 32/255, else 4 significant digits ('-' when missing)."""
    if eps is None or (isinstance(eps, float) and math.isnan(eps)):
        return "-"
    k = eps * 255
    if 0 < k <= 32.5 and abs(k - round(k)) < 1e-6:  # the usual CIFAR budgets: 1/255 ... 32/255
        return f"{int(round(k))}/255"
    return f"{eps:.4g}"


def mixed_budgets(jobs: pd.DataFrame) -> dict[str, list[str]]:
    """Datasets whose finished jobs mix several (norm, eps) budgets -> those budgets."""
    done = jobs[jobs["status"] == "done"]
    out: dict[str, list[str]] = {}
    if done.empty:
        return out
    b = done[["dataset", "norm", "eps"]].drop_duplicates()
    for ds, g in b.groupby("dataset"):
        if len(g) > 1:
            out[str(ds)] = [f"{nm} {fmt_eps(e)}" for nm, e in zip(g["norm"], g["eps"])]
    return out


# --------------------------------------------------------------------------- leaderboard
_CELL = {"robust": "", "robust_lo": ":lo", "robust_hi": ":hi", "robust_n": ":n", "gradient_path": ":path",
         "eot_samples": ":eot", "eval_draws": ":draws", "adaptive": ":adaptive", "jobs": ":jobs", "job_id": ":job",
         "flags": ":flags", "seeds_mean": ":mean", "seeds_sd": ":sd", "seeds_n": ":seeds"}


_SLIM = KEY + ["threat", "status", "reason", "job_id", "finished_at", "gradient_path", "eot_samples", "eval_draws", "adaptive",
               "clean", "clean_lo", "clean_hi", "clean_n", "robust", "robust_lo", "robust_hi", "robust_n", "flags"]


def leaderboard(jobs: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard (numeric, wide), sorted by worst-case robust accuracy (descending).

    Columns: defense, classifier, dataset; ``clean``, ``clean:lo``, ``clean:hi``,
    ``clean:n``, ``clean:job``; per threat ``robust:<t>`` with ``:lo :hi :n :path :eot
    :draws :adaptive :jobs :job :flags :note :mean :sd :seeds`` (note: why a cell is empty: skipped/failed; flags:
    the cell's job's flag names, harness.evaluation.flags; mean, sd, seeds: the mean, sample sd and number of the
    finished jobs of the cell's job's setting over attack and data seeds, harness.evaluation.stats.over_seeds);
    ``worst`` with ``:lo :hi :n :threat :path :eot :draws :job
    :flags``; ``adaptive_evaluated``,
    ``non_adaptive_only``, ``threats_run``, ``n_jobs``.
    """
    if "beside" in jobs:
        jobs = jobs[~jobs["beside"].astype(bool)]  # shifts and transfers are shown beside the board, not in it
    threats = threat_order(jobs["threat"].unique()) if len(jobs) else []
    spread = over_seeds(jobs) if len(jobs) else None  # mean and sd over the seeds of each cell's setting
    slim = jobs[[c for c in _SLIM if c in jobs]]
    if "flags" not in slim:
        slim = slim.assign(flags="")
    slim = slim.assign(**{c: (spread[c].reindex(slim.index) if spread is not None else np.nan)
                          for c in ("seeds_mean", "seeds_sd", "seeds_n")})
    out = slim[KEY].drop_duplicates().set_index(KEY)
    is_done = slim["status"] == "done"
    done = slim[is_done & slim["robust"].notna()]

    cl = slim[is_done & slim["clean"].notna()]
    cl = cl.sort_values(["clean_n", "finished_at"], ascending=[False, False], na_position="last").drop_duplicates(KEY)
    cl = cl.set_index(KEY)[["clean", "clean_lo", "clean_hi", "clean_n", "job_id"]]
    cl.columns = ["clean", "clean:lo", "clean:hi", "clean:n", "clean:job"]
    out = out.join(cl)

    # one cell per (row, threat): the job with the lowest robust accuracy (most examples on ties)
    cells = done.sort_values(["robust", "robust_n", "finished_at"], ascending=[True, False, False], na_position="last")
    cells = cells.drop_duplicates(KEY + ["threat"]).set_index(KEY + ["threat"])
    cells["jobs"] = done.groupby(KEY + ["threat"]).size()
    wide = cells[list(_CELL)].unstack("threat")
    wide.columns = [f"robust:{t}{_CELL[f]}" for f, t in wide.columns]
    un = slim[slim["status"].isin(["skipped", "failed"])].drop_duplicates(KEY + ["threat"], keep="last")
    notes = (un["status"].astype(str) + ": " + un["reason"].fillna("").astype(str).str.slice(0, 160)).to_frame("note")
    notes.index = pd.MultiIndex.from_frame(un[KEY + ["threat"]])
    notes = notes["note"].unstack("threat") if len(notes) else pd.DataFrame(index=out.index)
    notes.columns = [f"robust:{t}:note" for t in notes.columns]
    out = out.join(wide).join(notes)
    cols = ["clean", "clean:lo", "clean:hi", "clean:n", "clean:job"]
    for t in threats:
        for suffix in list(_CELL.values()) + [":note"]:
            c = f"robust:{t}{suffix}"
            if c not in out:
                out[c] = None
            cols.append(c)
        out.loc[out[f"robust:{t}"].notna(), f"robust:{t}:note"] = None  # a finished job supersedes a failed one
    out = out[cols]

    w = cells.reset_index().sort_values(["robust", "robust_n"], ascending=[True, False], na_position="last").drop_duplicates(KEY)
    w = w.set_index(KEY)[["robust", "robust_lo", "robust_hi", "robust_n", "threat", "gradient_path", "eot_samples", "eval_draws",
                          "job_id", "flags"]]
    w.columns = ["worst", "worst:lo", "worst:hi", "worst:n", "worst:threat", "worst:path", "worst:eot", "worst:draws",
                 "worst:job", "worst:flags"]
    out = out.join(w)

    g = done.groupby(KEY)
    out = out.join(g["adaptive"].any().rename("adaptive_evaluated")).join(g.size().rename("n_jobs"))
    out["adaptive_evaluated"] = out["adaptive_evaluated"].astype("boolean").fillna(False).astype(bool)
    out["n_jobs"] = out["n_jobs"].fillna(0).astype(int)
    out["non_adaptive_only"] = (out["n_jobs"] > 0) & ~out["adaptive_evaluated"]
    ran = [np.where(out[f"robust:{t}"].notna(), t, "") for t in threats]
    out["threats_run"] = [", ".join(x for x in r if x) for r in zip(*ran)] if threats else ""
    out = out.reset_index().sort_values(["worst", "clean", "defense"], ascending=[False, False, True], na_position="last")
    return out.reset_index(drop=True)


def lb_threats(lb: pd.DataFrame) -> list[str]:
    """The threat models that have a column in a leaderboard, in column order."""
    return [c.split(":", 1)[1] for c in lb.columns if c.startswith("robust:") and c.count(":") == 1]


def row_labels(lb: pd.DataFrame) -> pd.Series:
    """'defense' when the table has one (classifier, dataset), else 'defense · classifier · dataset'."""
    if lb.empty:
        return pd.Series([], dtype=object)
    if lb[["classifier", "dataset"]].drop_duplicates().shape[0] == 1:
        return lb["defense"].astype(str)
    return lb["defense"].astype(str) + " · " + lb["classifier"].astype(str) + " · " + lb["dataset"].astype(str)


def _pct(v) -> str:
    return f"{100 * v:.1f}"


def fmt_interval(acc, lo, hi, n) -> str:
    """``accuracy% [lo%, hi%] n=N`` (parts left out when missing; '' without an accuracy)."""
    if acc is None or pd.isna(acc):
        return ""
    s = _pct(acc)
    if lo is not None and not pd.isna(lo) and hi is not None and not pd.isna(hi):
        s += f" [{_pct(lo)}, {_pct(hi)}]"
    if n is not None and not pd.isna(n):
        s += f" n={int(n)}"
    return s


def fmt_provenance(path, eot, draws) -> str:
    """``gradient path, EOT k`` plus ``, R r`` when there are several evaluation draws ('' without a path)."""
    if path is None or pd.isna(path):
        return ""
    s = f"{path}, EOT {int(eot) if not pd.isna(eot) else '?'}"
    if draws is not None and not pd.isna(draws) and int(draws) > 1:
        s += f", R {int(draws)}"
    return s


def _col(lb: pd.DataFrame, name: str) -> list:
    return lb[name].tolist() if name in lb else [None] * len(lb)


def fmt_seeds(mean, sd, n) -> str:
    """`` · over 3 seeds 20.1 ± 1.5`` (mean ± sample sd in %) when a cell's setting ran with several seeds, else ''."""
    if n is None or pd.isna(n) or int(n) < 2 or mean is None or pd.isna(mean):
        return ""
    return f" · over {int(n)} seeds {_pct(mean)} ± {_pct(sd)}"


def flag_mark(flags) -> str:
    """`` 🚩 not_converged,zero_gradients`` for a cell whose job is flagged ('' when none; ``non_adaptive_only``
    is what ``†`` already says, and '?' marks a job stored before flags existed, which is not flagged).
    """
    if not isinstance(flags, str):
        return ""
    names = [f for f in flags.split(",") if f and f not in ("?", "non_adaptive_only")]
    return f" 🚩 {','.join(names)}" if names else ""


def display_table(lb: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard as the page shows it: one text cell per metric, each with its
    95% interval, n, gradient path and EOT samples (and R evaluation draws when > 1).

    ``†`` marks a non-adaptive cell (the attack ignores or approximates the purifier's
    gradient); ``⚠`` marks a row whose every threat was non-adaptive; ``🚩 name,...`` marks a
    cell whose job carries flags (:func:`flag_mark`; ``non_adaptive_only`` is left to ``†``).
    """
    threats = lb_threats(lb)
    out = pd.DataFrame(
        {
            "Defense": lb["defense"].astype(str).tolist(),
            "Classifier": lb["classifier"].astype(str).tolist(),
            "Dataset": lb["dataset"].astype(str).tolist(),
            "Worst-case robust %": (lb["worst"] * 100).round(2).tolist(),
        }
    )
    worst = []
    for acc, lo, hi, n, thr, path, eot, draws, nao, fl in zip(
        _col(lb, "worst"), _col(lb, "worst:lo"), _col(lb, "worst:hi"), _col(lb, "worst:n"), _col(lb, "worst:threat"),
        _col(lb, "worst:path"), _col(lb, "worst:eot"), _col(lb, "worst:draws"), _col(lb, "non_adaptive_only"),
        _col(lb, "worst:flags"),
    ):
        if acc is None or pd.isna(acc):
            worst.append("–")
            continue
        s = f"{fmt_interval(acc, lo, hi, n)} · {thr} ({fmt_provenance(path, eot, draws)}){flag_mark(fl)}"
        worst.append(("⚠ " + s) if nao else s)
    out["Worst case (95% CI, n, threat, path)"] = worst
    out["Clean (95% CI, n)"] = [
        fmt_interval(a, lo, hi, n) or "–"
        for a, lo, hi, n in zip(_col(lb, "clean"), _col(lb, "clean:lo"), _col(lb, "clean:hi"), _col(lb, "clean:n"))
    ]
    for t in threats:
        p = f"robust:{t}"
        cells = []
        for acc, lo, hi, n, path, eot, draws, ad, k, note, fl, mean, sd, ns in zip(
            _col(lb, p), _col(lb, p + ":lo"), _col(lb, p + ":hi"), _col(lb, p + ":n"), _col(lb, p + ":path"),
            _col(lb, p + ":eot"), _col(lb, p + ":draws"), _col(lb, p + ":adaptive"), _col(lb, p + ":jobs"), _col(lb, p + ":note"),
            _col(lb, p + ":flags"), _col(lb, p + ":mean"), _col(lb, p + ":sd"), _col(lb, p + ":seeds"),
        ):
            if acc is None or pd.isna(acc):
                cells.append(note if isinstance(note, str) and note else "–")
                continue
            s = f"{fmt_interval(acc, lo, hi, n)} · {fmt_provenance(path, eot, draws)}"
            if not (isinstance(ad, (bool, np.bool_)) and ad):
                s += " †"
            if k is not None and not pd.isna(k) and int(k) > 1:
                s += f" (min of {int(k)} jobs)"
            cells.append(s + flag_mark(fl) + fmt_seeds(mean, sd, ns))
        out[f"Robust: {t}"] = cells
    out["Evaluated by"] = [
        ("⚠ non-adaptive only: " + tr) if nao else tr for tr, nao in zip(_col(lb, "threats_run"), _col(lb, "non_adaptive_only"))
    ]
    out["Jobs"] = _col(lb, "n_jobs")
    return out


# --------------------------------------------------------------------------- export
def to_csv(lb: pd.DataFrame) -> str:
    """The filtered leaderboard, every numeric column (fractions in [0, 1]), as CSV."""
    return lb.to_csv(index=False, float_format="%.6g")


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
        "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def tex_escape(s: Any) -> str:
    """``s`` as text with LaTeX's special characters escaped."""
    return "".join(_TEX.get(ch, ch) for ch in str(s))


def _tex_cells(acc: pd.Series, lo: pd.Series, hi: pd.Series) -> list[str]:
    out = []
    for a, lw, h in zip(acc.tolist(), lo.tolist(), hi.tolist()):
        if a is None or pd.isna(a):
            out.append("--")
        elif lw is None or pd.isna(lw) or h is None or pd.isna(h):
            out.append(_pct(a))
        else:
            out.append(rf"{_pct(a)} {{\scriptsize [{_pct(lw)}, {_pct(h)}]}}")
    return out


def to_latex(lb: pd.DataFrame, caption: str | None = None) -> str:
    """The filtered leaderboard as a booktabs LaTeX table (accuracies in %, 95% Wilson
    intervals); a dagger marks rows evaluated by non-adaptive threats only.
    """
    threats = lb_threats(lb)
    head = ["Defense", "Classifier", "Dataset", "Clean"] + [tex_escape(t) for t in threats] + ["Worst case"]
    lines = [
        "% Generated by `harness dashboard`: robust accuracy (%) with 95% Wilson intervals.",
        "% Requires \\usepackage{booktabs}.",
        r"\begin{table}[t]",
        r"\centering",
        r"\begin{tabular}{lll" + "r" * (len(head) - 3) + "}",
        r"\toprule",
        " & ".join(head) + r" \\",
        r"\midrule",
    ]
    cols = [[tex_escape(v) for v in lb[k].tolist()] for k in KEY]
    cols.append(_tex_cells(lb["clean"], lb["clean:lo"], lb["clean:hi"]))
    for t in threats:
        cols.append(_tex_cells(lb[f"robust:{t}"], lb[f"robust:{t}:lo"], lb[f"robust:{t}:hi"]))
    dagger = lb["non_adaptive_only"].astype(bool).tolist()
    cols.append([c + (r"$^\dagger$" if d else "") for c, d in zip(_tex_cells(lb["worst"], lb["worst:lo"], lb["worst:hi"]), dagger)])
    lines += [" & ".join(row) + r" \\" for row in zip(*cols)]
    lines += [r"\bottomrule", r"\end{tabular}"]
    cap = caption or "Robust accuracy (\\%) with 95\\% Wilson intervals; worst case = minimum over the threat models run."
    if any(dagger):
        cap += r" $^\dagger$Evaluated by non-adaptive threats only."
    lines += [rf"\caption{{{cap}}}", r"\label{tab:leaderboard}", r"\end{table}", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- chart data
def scatter_data(lb: pd.DataFrame) -> pd.DataFrame:
    """Clean vs worst-case robust accuracy (%) per leaderboard row, with intervals."""
    d = lb[lb["worst"].notna() & lb["clean"].notna()] if len(lb) else lb
    labels = row_labels(lb).loc[d.index] if len(lb) else pd.Series([], dtype=object)
    return pd.DataFrame(
        {
            "row": labels.tolist(), "defense": d["defense"].tolist(), "dataset": d["dataset"].tolist(),
            "classifier": d["classifier"].tolist(),
            "clean": (d["clean"] * 100).tolist(), "clean_lo": (d["clean:lo"] * 100).tolist(), "clean_hi": (d["clean:hi"] * 100).tolist(),
            "worst": (d["worst"] * 100).tolist(), "worst_lo": (d["worst:lo"] * 100).tolist(), "worst_hi": (d["worst:hi"] * 100).tolist(),
            "worst_threat": d["worst:threat"].tolist(),
            "evaluation": np.where(d["non_adaptive_only"], "non-adaptive only", "adaptive").tolist(),
        }
    )


def per_threat_long(lb: pd.DataFrame, top: int | None = 25) -> pd.DataFrame:
    """Robust accuracy (%) per (leaderboard row, threat), long format, first ``top`` rows."""
    d = lb.head(top) if top else lb
    labels = row_labels(lb).loc[d.index] if len(lb) else pd.Series([], dtype=object)
    parts = []
    for t in lb_threats(lb):
        p = f"robust:{t}"
        part = pd.DataFrame(
            {
                "row": labels.tolist(), "rank": range(len(d)), "threat": t, "robust": (d[p] * 100).tolist(),
                "lo": (d[p + ":lo"] * 100).tolist(), "hi": (d[p + ":hi"] * 100).tolist(), "n": d[p + ":n"].tolist(),
                "path": d[p + ":path"].tolist(), "eot": d[p + ":eot"].tolist(),
            }
        )
        parts.append(part[part["robust"].notna()])
    if not parts:
        return pd.DataFrame(columns=["row", "rank", "threat", "robust", "lo", "hi", "n", "path", "eot"])
    return pd.concat(parts, ignore_index=True)


def cost_table(jobs: pd.DataFrame, rows: pd.DataFrame | None = None) -> pd.DataFrame:
    """Cost per example of finished jobs, median over the jobs of each (defense, threat):
    purifier NFEs (network evaluations of the purifier, attack + evaluation), classifier
    images and seconds. ``rows`` (a leaderboard) restricts it to those defenses.
    """
    done = jobs[jobs["status"] == "done"]
    if rows is not None:
        done = done[done["defense"].isin(rows["defense"])]
    if done.empty:
        return pd.DataFrame(columns=["defense", "threat", "nfe_per_example", "classifier_per_example", "seconds_per_example", "jobs"])
    g = done.groupby(["defense", "threat"])
    out = pd.DataFrame(
        {
            "nfe_per_example": g["nfe_per_example"].median(),
            "classifier_per_example": g["classifier_per_example"].median(),
            "seconds_per_example": g["per_example_s"].median(),
            "jobs": g.size(),
        }
    ).reset_index()
    return out


# --------------------------------------------------------------------------- one job
def per_example_worst(engine: Engine, jobs: pd.DataFrame, rule: str = "headline") -> pd.DataFrame:
    """The per-example worst case over the threats run for one leaderboard row.

    The leaderboard's ``worst`` is the minimum of the threats' accuracies. An example may
    survive one attack and fall to another, so the per-example minimum can be lower: an
    example counts as robust only if **every** finished job of the group kept it robust
    (each under ``rule``; "headline" = the job's own scoring rule). Jobs are grouped by
    (norm, eps, seed); only examples present in every job of a group (same dataset
    index) count. One row per group with at least two jobs: the threats, n, the
    per-example worst case with its 95% interval, and the lowest single job's accuracy
    on the same examples (``min_of_threats``) for comparison.
    """
    cols = ["norm", "eps", "seed", "threats", "jobs", "n", "robust", "robust_lo", "robust_hi", "min_of_threats"]
    done = jobs[jobs["status"] == "done"] if len(jobs) else jobs
    if done.empty:
        return pd.DataFrame(columns=cols)
    j, e = Job.__table__, ExampleRow.__table__
    out = []
    for (norm, eps, seed), g in done.groupby(["norm", "eps", "seed"], dropna=False):
        if len(g) < 2:
            continue
        ids = g["job_id"].tolist()
        with engine.connect() as conn:
            specs = {r.id: (r.config or {}).get("threat_spec", {}) for r in conn.execute(select(j.c.id, j.c.config).where(j.c.id.in_(ids)))}
            rows = conn.execute(
                select(e.c.job_id, e.c.dataset_index, e.c.robust_single, e.c.robust_majority, e.c.robust_worst).where(e.c.job_id.in_(ids))
            ).all()
        per_job: dict[str, dict[int, bool]] = {i: {} for i in ids}
        for jid, idx, single, majority, worst in rows:
            r = specs.get(jid, {}).get("scoring", "worst") if rule == "headline" else rule
            per_job[jid][int(idx)] = bool({"single": single, "majority": majority, "worst": worst}[r])
        common = set.intersection(*(set(v) for v in per_job.values()))
        if not common:
            continue
        n = len(common)
        k = sum(all(per_job[i][x] for i in ids) for x in common)
        lo, hi = wilson_interval(k, n)
        min_single = min(sum(per_job[i][x] for x in common) for i in ids) / n
        threats = ", ".join(threat_order(g["threat"].unique()))
        out.append((norm, eps, seed, threats, len(ids), n, k / n, lo, hi, min_single))
    return pd.DataFrame.from_records(out, columns=cols)


def job_settings(engine: Engine, ids: list[str]) -> pd.DataFrame:
    """What produced each of the jobs ``ids``, indexed by job id: ``attacks`` (the plan's labels, comma-joined),
    ``steps`` (PGD iterations), ``apgd_steps`` (APGD / FAB iterations), ``attack_options`` (``ATTACK.KEY=V``,
    comma-joined), ``scoring`` (the headline rule over the R draws) and ``git_sha`` (the harness commit it ran at).
    """
    j = Job.__table__
    rows = []
    if ids:
        with engine.connect() as conn:
            rows = conn.execute(select(j.c.id, j.c.config, j.c.environment).where(j.c.id.in_(list(ids)))).all()
    out = []
    for jid, config, env in rows:
        config, spec = config or {}, (config or {}).get("threat_spec") or {}
        out.append((jid, ",".join(config.get("attacks") or spec.get("attacks") or []), spec.get("steps"), spec.get("apgd_steps"),
                    ",".join(spec.get("attack_options") or []), spec.get("scoring"), (env or {}).get("git_sha")))
    df = pd.DataFrame.from_records(out, columns=["job_id", "attacks", "steps", "apgd_steps", "attack_options", "scoring", "git_sha"])
    for col in ("steps", "apgd_steps"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
    return df.set_index("job_id").reindex(pd.Index(list(ids), name="job_id"))


# --------------------------------------------------------------------------- beside the leaderboard
def change_metrics(engine: Engine, ids: list[str]) -> pd.DataFrame:
    """The paired metrics (:data:`CHANGE_METRICS`) of the jobs ``ids``, wide, indexed by job id: ``<metric>``,
    ``:lo``, ``:hi``, ``:n``.
    """
    m = MetricRow.__table__
    rows = []
    if ids:
        with engine.connect() as conn:
            rows = conn.execute(select(m.c.job_id, m.c.name, m.c.value, m.c.lower, m.c.upper, m.c.n)
                                .where(m.c.job_id.in_(ids), m.c.name.in_(CHANGE_METRICS))).all()
    long = pd.DataFrame.from_records(rows, columns=["job_id", "name", "value", "lo", "hi", "n"])
    out = pd.DataFrame(index=pd.Index(ids, name="job_id"))
    for name in CHANGE_METRICS:
        g = long[long["name"] == name].set_index("job_id")
        for col, suffix in (("value", ""), ("lo", ":lo"), ("hi", ":hi"), ("n", ":n")):
            out[name + suffix] = g[col].reindex(out.index).astype("float64")
    return out


_BESIDE_COLS = ["defense", "classifier", "dataset", "trained_on", "shift", "n_examples", "clean", "clean_lo", "clean_hi",
                "robust", "robust_lo", "robust_hi", "job_id"]


def _with_changes(engine: Engine, done: pd.DataFrame) -> pd.DataFrame:
    """The jobs' :data:`_BESIDE_COLS` joined with their paired metrics."""
    if done.empty:
        return pd.DataFrame(columns=_BESIDE_COLS + [f"{m}{s}" for m in CHANGE_METRICS for s in ("", ":lo", ":hi", ":n")])
    changes = change_metrics(engine, done["job_id"].tolist())
    return done[_BESIDE_COLS].merge(changes, left_on="job_id", right_index=True, how="left")


def shift_view(engine: Engine, jobs: pd.DataFrame) -> pd.DataFrame:
    """One row per finished job on shifted inputs: defense, dataset, shift, clean and robust accuracy on the
    shifted inputs, and the paired changes from the unshifted inputs (same examples, same attack seeds) of the
    defended model and of the undefended classifier, each ``<metric>`` with ``:lo``, ``:hi`` (95% Newcombe).
    """
    done = jobs[(jobs["status"] == "done") & (jobs["shift"] != "none")] if len(jobs) else jobs
    out = _with_changes(engine, done)
    return out.sort_values(["dataset", "shift", "robust_accuracy_change", "defense"], na_position="last").reset_index(drop=True)


def transfer_matrix(engine: Engine, jobs: pd.DataFrame) -> pd.DataFrame:
    """The cross-dataset cells, long: one row per (defense, trained_on, evaluated dataset), the latest finished
    ``cross-dataset`` job of each, with its clean and robust accuracy and the paired changes from the purifier
    trained on the evaluated dataset (zero on the diagonal). :func:`transfer_pivot` lays it out as a matrix.
    """
    done = jobs[(jobs["status"] == "done") & (jobs["threat"] == "cross-dataset")] if len(jobs) else jobs
    done = done.assign(trained_on=done["trained_on"].fillna("-"))
    done = done.sort_values("finished_at", ascending=False).drop_duplicates(["defense", "classifier", "trained_on", "dataset"])
    out = _with_changes(engine, done)
    return out.sort_values(["defense", "trained_on", "dataset"]).reset_index(drop=True)


def transfer_pivot(tm: pd.DataFrame, metric: str = "robust") -> pd.DataFrame:
    """Rows ``defense, trained on``, one column per evaluated dataset: '<accuracy> (<paired change> [95% CI])'."""
    if tm.empty:
        return pd.DataFrame(columns=["defense", "trained on"])
    ch = f"{metric}_accuracy_change"
    cell = [
        f"{_pct(a)} ({'+' if c >= 0 else ''}{c * 100:.1f} [{lo * 100:+.1f}, {hi * 100:+.1f}])" if pd.notna(c) else _pct(a)
        for a, c, lo, hi in zip(tm[metric], tm[ch], tm[f"{ch}:lo"], tm[f"{ch}:hi"])
    ]
    wide = tm.assign(cell=cell).pivot_table(index=["defense", "trained_on"], columns="dataset", values="cell", aggfunc="first")
    wide.columns.name = None
    return wide.reset_index().rename(columns={"trained_on": "trained on"})


def compare_jobs(engine: Engine, job_a: str, job_b: str) -> dict[str, Any]:
    """Paired comparison of two finished jobs on the examples they share (same dataset index), under each job's
    headline rule: ``n_shared`` and, for ``robust`` and ``clean``, :func:`harness.evaluation.stats.paired_comparison`
    (the 2x2 table, both accuracies, the Newcombe interval of B - A, the exact McNemar p-value); ``n_shared`` 0
    when they share no example. The same code as ``harness compare`` (:func:`harness.store.paired.compare_stored`).
    """
    from harness.store.paired import compare_stored

    out = compare_stored(engine, job_a, job_b)
    return {"job_a": job_a, "job_b": job_b, **{k: v for k, v in out.items() if k not in ("rule_a", "rule_b")}}


def job_detail(engine: Engine, job_id: str) -> dict[str, Any] | None:
    """The job's ``jobs`` row as a dict (``flags`` None in a store without the column), or None if no such job."""
    with engine.connect() as conn:
        j = Job.__table__
        have = _columns(engine, "jobs")
        row = conn.execute(select(*(c for c in j.c if c.name in have)).where(j.c.id == job_id)).mappings().first()
    return None if row is None else {"flags": None, **dict(row)}


def job_metrics(engine: Engine, job_id: str) -> pd.DataFrame:
    """The job's metrics (name, value, lower, upper, n), sorted by name."""
    m = MetricRow.__table__
    with engine.connect() as conn:
        rows = conn.execute(select(m.c.name, m.c.value, m.c.lower, m.c.upper, m.c.n).where(m.c.job_id == job_id).order_by(m.c.name)).all()
    return pd.DataFrame.from_records(rows, columns=["name", "value", "lower", "upper", "n"])


def job_curves(engine: Engine, job_id: str) -> pd.DataFrame:
    """The job's convergence curves (attack, iteration, accuracy, n), sorted by attack and iteration."""
    c = CurveRow.__table__
    with engine.connect() as conn:
        rows = conn.execute(
            select(c.c.attack, c.c.iteration, c.c.accuracy, c.c.n).where(c.c.job_id == job_id).order_by(c.c.attack, c.c.iteration)
        ).all()
    return pd.DataFrame.from_records(rows, columns=["attack", "iteration", "accuracy", "n"])


def job_examples(engine: Engine, job_id: str, limit: int | None = None) -> pd.DataFrame:
    """The job's per-example rows in position order (at most ``limit``), with the columns this store has."""
    e = ExampleRow.__table__
    have = {c["name"] for c in inspect(engine).get_columns("examples")}  # a store older than a column lacks it
    cols = [c for c in e.c if c.name not in ("id", "job_id") and c.name in have]
    stmt = select(*cols).where(e.c.job_id == job_id).order_by(e.c.position)
    if limit:
        stmt = stmt.limit(limit)
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    return pd.DataFrame.from_records(rows, columns=[c.name for c in cols])


def examples_for_display(ex: pd.DataFrame) -> pd.DataFrame:
    """Per-example rows with the R predictions as short strings (Arrow-friendly)."""
    if ex.empty:
        return ex
    d = ex.copy()
    d["clean_preds"] = [" ".join(map(str, p)) for p in d["clean_preds"]]
    d["adv_preds"] = ["; ".join(f"{a}: {' '.join(map(str, v))}" for a, v in p.items()) for p in d["adv_preds"]]
    return d


def job_samples(engine: Engine, job_id: str) -> list[tuple[int, dict[str, np.ndarray]]]:
    """The job's stored images as (position, {kind: uint8 CHW array}), in position order."""
    s = SampleRow.__table__
    with engine.connect() as conn:
        rows = conn.execute(select(s.c.position, s.c.images).where(s.c.job_id == job_id).order_by(s.c.position)).all()
    return [(int(p), decode_images(b)) for p, b in rows]


def majority(preds: Sequence[int]) -> int | None:
    """The most frequent prediction (the smallest on a tie), or None for no predictions."""
    if not preds:
        return None
    vals, counts = np.unique(np.asarray(preds), return_counts=True)
    return int(vals[counts.argmax()])


def to_display_image(chw: np.ndarray, size: int = 112) -> np.ndarray:
    """uint8 CHW (1 or 3 channels) -> HW or HWC uint8, upscaled by an integer factor
    (nearest neighbour) to about ``size`` pixels so 8x8 digits stay visible.
    """
    a = np.asarray(chw)
    if a.ndim == 3:
        a = a[0] if a.shape[0] == 1 else np.transpose(a[:3], (1, 2, 0))
    f = max(1, size // max(a.shape[0], 1))
    if f > 1:
        a = np.repeat(np.repeat(a, f, axis=0), f, axis=1)
    return np.ascontiguousarray(a.astype(np.uint8))


def perturbation_image(clean: np.ndarray, adv: np.ndarray, size: int = 112) -> tuple[np.ndarray, float]:
    """(adv - clean) mapped to [0, 255] around mid-grey, amplified to the largest
    change; returns the image and the l_inf of the change in [0, 1] units.
    """
    d = adv.astype(np.int16) - clean.astype(np.int16)
    m = int(np.abs(d).max())
    img = np.full(d.shape, 128, dtype=np.int16) if m == 0 else 128 + d * 127 // m
    return to_display_image(img.clip(0, 255).astype(np.uint8), size), m / 255.0
