"""The leaderboard page: ``streamlit run dashboard/app.py -- --db results.db``.

Usually started by ``harness dashboard [--db URL] [--port N]``. Read-only: SQLite is
opened with ``mode=ro`` and ``PRAGMA query_only``; the page never writes. Store reads
are cached with ``st.cache_data`` keyed on the store file's (and its WAL's) mtime and
size, so a reload after ``harness run`` shows the new jobs and nothing else re-queries.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import altair as alt
import pandas as pd
import streamlit as st
from sqlalchemy.exc import SQLAlchemyError

try:
    from dashboard import queries as Q
except ImportError:  # run from a checkout that is not installed: `streamlit run dashboard/app.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from dashboard import queries as Q

DB_ENV = "HARNESS_DASHBOARD_DB"
TOP_CHART_ROWS = 25  # bars per chart
TOP_SCATTER_ROWS = 100  # points in the clean-vs-robust scatter (Vega slows down with thousands of error bars)


def db_argument() -> str:
    """``-- --db X`` after the script, else $HARNESS_DASHBOARD_DB, $HARNESS_DB, results.db."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--db", default=None)
    args, _ = p.parse_known_args(sys.argv[1:])
    return args.db or os.environ.get(DB_ENV) or os.environ.get("HARNESS_DB") or "results.db"


# --------------------------------------------------------------------------- cached reads
@st.cache_resource(show_spinner=False)
def _engine(db: str):
    return Q.make_engine(db)


@st.cache_data(show_spinner=False, max_entries=8)
def _jobs(db: str, sig: tuple, rule: str) -> pd.DataFrame:
    return Q.load_jobs(_engine(db), rule)


@st.cache_data(show_spinner=False, max_entries=32)
def _board(db: str, sig: tuple, rule: str, filters: tuple) -> dict:
    """The filtered jobs, the leaderboard and everything derived from it (one cache entry)."""
    jobs = Q.apply_filters(_jobs(db, sig, rule), **dict(filters))
    lb = Q.leaderboard(jobs)
    return {
        "jobs": jobs, "lb": lb, "table": Q.display_table(lb), "csv": Q.to_csv(lb), "latex": Q.to_latex(lb),
        "mixed": Q.mixed_budgets(jobs), "cost": Q.cost_table(jobs, lb.head(TOP_CHART_ROWS)),
        "scatter": Q.scatter_data(lb.head(TOP_SCATTER_ROWS)), "per_threat": Q.per_threat_long(lb, top=TOP_CHART_ROWS),
        "labels": Q.row_labels(lb).tolist(),
    }


@st.cache_data(show_spinner=False, max_entries=64)
def _job(db: str, sig: tuple, job_id: str) -> dict:
    e = _engine(db)
    return {
        "detail": Q.job_detail(e, job_id),
        "metrics": Q.job_metrics(e, job_id),
        "curves": Q.job_curves(e, job_id),
        "examples": Q.job_examples(e, job_id),
        "samples": Q.job_samples(e, job_id),
    }


@st.cache_data(show_spinner=False, max_entries=64)
def _per_example_worst(db: str, sig: tuple, rule: str, jobs: pd.DataFrame) -> pd.DataFrame:
    return Q.per_example_worst(_engine(db), jobs, rule)


# --------------------------------------------------------------------------- charts
@st.cache_data(show_spinner=False, max_entries=8)
def _beside(db: str, sig: tuple, jobs: pd.DataFrame) -> dict:
    e = _engine(db)
    tm = Q.transfer_matrix(e, jobs)
    return {"shift": Q.shift_view(e, jobs), "transfer": tm, "pivot_robust": Q.transfer_pivot(tm, "robust"),
            "pivot_clean": Q.transfer_pivot(tm, "clean")}


def _accuracies(df: pd.DataFrame, col: str) -> list[str]:
    """'93.8 [80.0, 98.3]' per row of an accuracy column with ``_lo`` / ``_hi``."""
    return [Q.fmt_interval(a, lo, hi, None) for a, lo, hi in zip(df[col], df[f"{col}_lo"], df[f"{col}_hi"])]


def _changes(df: pd.DataFrame, metric: str) -> list[str]:
    """'+1.2 [-3.4, +5.6]' (points) per row of a paired-change metric."""
    return ["-" if pd.isna(v) else f"{v * 100:+.1f} [{lo * 100:+.1f}, {hi * 100:+.1f}]"
            for v, lo, hi in zip(df[metric], df[f"{metric}:lo"], df[f"{metric}:hi"])]


def beside_section(db: str, sig: tuple, jobs: pd.DataFrame) -> None:
    """Colour shift and cross-dataset transfer, beside the leaderboard (never in its worst case)."""
    b = _beside(db, sig, jobs)
    if b["shift"].empty and b["transfer"].empty:
        return
    st.subheader("Beside the leaderboard: colour shift and cross-dataset transfer")
    st.caption(
        "Not attacks, so not in the worst case above. Each change is paired: the same examples with the same attack seeds, "
        "shifted minus unshifted (or: purifier trained on another dataset minus the one trained on this), in points, with a "
        "95% Newcombe interval for paired proportions. The classifier columns are the undefended classifier's change on the "
        "same inputs: whether the purifier or the classifier loses the accuracy."
    )
    t1, t2 = st.tabs(["Colour shift", "Cross-dataset matrix"])
    with t1:
        sv = b["shift"]
        if sv.empty:
            st.info("No finished colour-shift job matches the filters.")
        else:
            show = pd.DataFrame({
                "defense": sv["defense"], "dataset": sv["dataset"], "shift": sv["shift"], "n": sv["n_examples"],
                "clean %": _accuracies(sv, "clean"),
                "Δ clean (pts)": _changes(sv, "clean_accuracy_change"),
                "robust %": _accuracies(sv, "robust"),
                "Δ robust (pts)": _changes(sv, "robust_accuracy_change"),
                "classifier Δ clean": _changes(sv, "clean_accuracy_classifier_change"),
                "classifier Δ robust": _changes(sv, "robust_accuracy_classifier_change"),
            })
            st.dataframe(show, hide_index=True, height=min(38 + 35 * len(show), 420), key="shift_view")
    with t2:
        if b["transfer"].empty:
            st.info("No finished cross-dataset job matches the filters.")
        else:
            st.markdown("**Robust accuracy %** (paired change from the purifier trained on the evaluated dataset [95% CI])")
            st.dataframe(b["pivot_robust"], hide_index=True, key="transfer_robust")
            st.markdown("**Clean accuracy %**")
            st.dataframe(b["pivot_clean"], hide_index=True, key="transfer_clean")


def _color(field: str, n: int, title: str | None = None, sort=None) -> alt.Color:
    legend = alt.Legend(title=title or field, orient="right") if n <= 20 else None
    return alt.Color(f"{field}:N", legend=legend, sort=sort, scale=alt.Scale(scheme="tableau10" if n <= 10 else "category20"))


def scatter_chart(sd: pd.DataFrame) -> alt.LayerChart | None:
    """Clean vs worst-case robust accuracy, one point per leaderboard row with 95% interval bars on both axes (None when empty)."""
    if sd.empty:
        return None
    n_def = sd["defense"].nunique()
    color = _color("defense", n_def)
    base = alt.Chart(sd)
    x = alt.X("clean:Q", title="clean accuracy (%)", scale=alt.Scale(zero=False, nice=True))
    y = alt.Y("worst:Q", title="worst-case robust accuracy (%)", scale=alt.Scale(domain=[0, 100]))
    tooltip = ["row:N", alt.Tooltip("clean:Q", format=".1f"), alt.Tooltip("worst:Q", format=".1f"), "worst_threat:N", "evaluation:N"]
    xerr = base.mark_rule(opacity=0.8, strokeWidth=2).encode(
        x=alt.X("clean_lo:Q", title="clean accuracy (%)"), x2="clean_hi:Q", y="worst:Q", color=color,
    )
    yerr = base.mark_rule(opacity=0.8, strokeWidth=2).encode(
        x="clean:Q", y=alt.Y("worst_lo:Q", title="worst-case robust accuracy (%)"), y2="worst_hi:Q", color=color,
    )
    pts = base.mark_point(filled=True, size=90).encode(
        x=x, y=y, color=color, tooltip=tooltip,
        shape=alt.Shape("evaluation:N", title="evaluated by",
                        scale=alt.Scale(domain=["adaptive", "non-adaptive only"], range=["circle", "triangle-up"])),
    )
    layers = [xerr, yerr, pts]
    if len(sd) <= 15:
        layers.append(base.mark_text(align="left", dx=8, dy=-8, fontSize=11).encode(x="clean:Q", y="worst:Q", text="row:N"))
    return alt.layer(*layers).properties(height=380)


def per_threat_chart(pl: pd.DataFrame, threats: list[str]) -> alt.LayerChart | None:
    """Grouped bars of robust accuracy per leaderboard row and threat, with 95% interval rules (None when empty)."""
    if pl.empty:
        return None
    order = list(dict.fromkeys(pl.sort_values("rank")["row"]))
    x = alt.X("row:N", sort=order, title=None, axis=alt.Axis(labelAngle=-25, labelLimit=220))
    color = alt.Color("threat:N", sort=threats, title="threat model", scale=alt.Scale(scheme="tableau10"))
    base = alt.Chart(pl)
    bars = base.mark_bar().encode(
        x=x, xOffset=alt.XOffset("threat:N", sort=threats),
        y=alt.Y("robust:Q", title="robust accuracy (%)", scale=alt.Scale(domain=[0, 100])),
        color=color, tooltip=["row:N", "threat:N", alt.Tooltip("robust:Q", format=".1f"), alt.Tooltip("lo:Q", format=".1f"),
                              alt.Tooltip("hi:Q", format=".1f"), "n:Q", "path:N", "eot:Q"],
    )
    err = base.mark_rule(color="black").encode(x=x, xOffset=alt.XOffset("threat:N", sort=threats), y="lo:Q", y2="hi:Q")
    return alt.layer(bars, err).properties(height=360)


def cost_charts(cost: pd.DataFrame) -> tuple[alt.Chart, alt.Chart] | None:
    """Bar charts of purifier NFEs (symlog) and seconds per example by defense and threat (None when empty)."""
    if cost.empty:
        return None
    tt = ["defense:N", "threat:N", alt.Tooltip("nfe_per_example:Q", format=",.0f"), alt.Tooltip("classifier_per_example:Q", format=",.0f"),
          alt.Tooltip("seconds_per_example:Q", format=".4f"), "jobs:Q"]
    x = alt.X("defense:N", title=None, axis=alt.Axis(labelAngle=-25))
    color = alt.Color("threat:N", sort=Q.threat_order(cost["threat"]), title="threat model", scale=alt.Scale(scheme="tableau10"))
    base = alt.Chart(cost).encode(x=x, xOffset="threat:N", color=color, tooltip=tt)
    nfe = base.mark_bar().encode(y=alt.Y("nfe_per_example:Q", title="purifier NFEs per example", scale=alt.Scale(type="symlog")))
    sec = base.mark_bar().encode(y=alt.Y("seconds_per_example:Q", title="seconds per example"))
    return nfe.properties(height=300), sec.properties(height=300)


def curve_chart(curves: pd.DataFrame) -> alt.Chart:
    """The convergence curves: robust accuracy (%) after each attack iteration, one line per attack."""
    d = curves.assign(accuracy=curves["accuracy"] * 100)
    return (
        alt.Chart(d)
        .mark_line(point=True)
        .encode(
            x=alt.X("iteration:Q", title="attack iteration (0 = starting point)", axis=alt.Axis(tickMinStep=1, format="d")),
            y=alt.Y("accuracy:Q", title="robust accuracy (%)", scale=alt.Scale(domain=[0, 100])),
            color=alt.Color("attack:N", title="attack"),
            tooltip=["attack:N", "iteration:Q", alt.Tooltip("accuracy:Q", format=".2f"), "n:Q"],
        )
        .properties(height=320)
    )


# --------------------------------------------------------------------------- sections
def sidebar(jobs: pd.DataFrame) -> tuple:
    """The sidebar's filter multiselects; returns the ((filter, selected values), ...) tuple (empty = all)."""
    opts = Q.filter_options(jobs)
    st.sidebar.header("Filters")
    st.sidebar.caption("Empty = all. Compare like with like: pick one norm and eps per dataset.")
    labels = {"dataset": "Dataset", "classifier": "Classifier", "norm": "Norm", "eps": "Eps (budget)", "threat": "Threat model"}
    selected = []
    for f in Q.FILTERS:
        fmt = Q.fmt_eps if f == "eps" else str
        v = st.sidebar.multiselect(labels[f], opts[f], default=[], format_func=fmt, key=f"f_{f}", placeholder="all")
        selected.append((f, tuple(v)))
    return tuple(selected)


def leaderboard_section(b: dict) -> None:
    """The leaderboard table with its legend and mixed-budget warnings."""
    lb = b["lb"]
    st.subheader("Leaderboard")
    st.caption(
        "One row per (defense, classifier, dataset), sorted by the worst case over every threat model run. "
        "Cells: accuracy % [95% Wilson interval] n=examples · gradient path, EOT samples per gradient, R evaluation draws. "
        "A threat cell is the minimum over its jobs (seeds, budgets). † non-adaptive attack (the gradient ignores or "
        "approximates the purifier). ⚠ the row was evaluated by non-adaptive threats only: its robust accuracy is an upper "
        "bound at best. "
        "🚩 the cell's job is flagged (not_converged, zero_gradients, randomness_detected, autoattack: see the drill-down)."
    )
    for ds, budgets in b["mixed"].items():
        st.warning(f"Dataset {ds}: the filtered jobs mix budgets ({', '.join(budgets)}); filter norm and eps to compare like with like.")
    if lb.empty:
        st.info("No job matches the filters.")
        return
    table = b["table"]
    cfg = {
        "Worst-case robust %": st.column_config.ProgressColumn("Worst-case robust %", min_value=0, max_value=100, format="%.1f",
                                                              help="headline: minimum over every threat model run"),
        "Jobs": st.column_config.NumberColumn("Jobs", help="finished jobs behind the row"),
    }
    st.dataframe(table, hide_index=True, column_config=cfg, height=min(38 + 35 * len(table), 560), key="leaderboard")
    n_nonad = int(lb["non_adaptive_only"].sum())
    st.caption(f"{len(lb)} rows · {int(lb['n_jobs'].sum())} finished jobs"
               + (f" · ⚠ {n_nonad} row(s) evaluated by non-adaptive threats only" if n_nonad else ""))
    c1, c2, _ = st.columns([1, 1, 4])
    c1.download_button("Download CSV", b["csv"], file_name="leaderboard.csv", mime="text/csv", key="dl_csv", on_click="ignore")
    c2.download_button("Download LaTeX", b["latex"], file_name="leaderboard.tex", mime="text/x-tex", key="dl_tex", on_click="ignore")
    with st.expander("LaTeX table"):
        lines = b["latex"].splitlines()
        if len(lines) > 60:
            lines = lines[:50] + [f"% ... {len(lines) - 56} more rows: download the file for all of them"] + lines[-6:]
        st.code("\n".join(lines), language="latex")


def charts_section(b: dict) -> None:
    """The chart tabs: clean vs worst-case robust, robust accuracy per threat, and cost per example."""
    lb = b["lb"]
    st.subheader("Charts")
    t1, t2, t3 = st.tabs(["Clean vs worst-case robust", "Robust accuracy per threat", "Cost per example"])
    with t1:
        ch = scatter_chart(b["scatter"])
        if ch is None:
            st.info("No row has both a clean and a robust accuracy yet.")
        else:
            st.altair_chart(ch, width="stretch")
            more = f" The first {TOP_SCATTER_ROWS} of {len(lb)} rows are shown: filter to see others." if len(lb) > TOP_SCATTER_ROWS else ""
            st.caption("One point per leaderboard row; bars are 95% Wilson intervals on both axes. "
                       "Triangles: non-adaptive threats only." + more)
    with t2:
        ch = per_threat_chart(b["per_threat"], Q.lb_threats(lb))
        if ch is None:
            st.info("No robust accuracy to plot.")
        else:
            st.altair_chart(ch, width="stretch")
            more = f" (first {TOP_CHART_ROWS} of {len(lb)} rows)" if len(lb) > TOP_CHART_ROWS else ""
            st.caption(f"Robust accuracy per threat model with 95% intervals{more}.")
    with t3:
        cost = b["cost"]
        chs = cost_charts(cost)
        if chs is None:
            st.info("No finished job to cost.")
        else:
            a, c = st.columns(2)
            a.altair_chart(chs[0], width="stretch")
            c.altair_chart(chs[1], width="stretch")
            st.caption("Median over the jobs of each (defense, threat): purifier network evaluations (attack + evaluation draws) "
                       "and wall-clock seconds per evaluated example.")
            st.dataframe(cost, hide_index=True, height=min(38 + 35 * len(cost), 300))


def _job_label(r) -> str:
    eps = Q.fmt_eps(r.eps)
    acc = "" if pd.isna(r.robust) else f" · robust {100 * r.robust:.1f}%"
    return f"{r.threat} · {r.norm or '-'} {eps} · seed {r.seed} · {r.status}{acc} · {str(r.job_id)[:12]}"


def drilldown_section(db: str, sig: tuple, b: dict) -> None:
    """Pick a leaderboard row and one of its jobs: per-example worst case over its threats, then the job's curves,
    metrics and cost, configuration, environment, per-example rows and image gallery.
    """
    lb, jobs, labels = b["lb"], b["jobs"], b["labels"]
    st.subheader("Job drill-down")
    if lb.empty:
        return
    c1, c2 = st.columns([2, 3])
    i = c1.selectbox("Leaderboard row", range(len(lb)), format_func=lambda k: labels[k], key="row_pick")
    row = lb.iloc[i if i is not None else 0]
    rj = jobs[(jobs["defense"] == row["defense"]) & (jobs["classifier"] == row["classifier"]) & (jobs["dataset"] == row["dataset"])]
    order = {t: k for k, t in enumerate(Q.threat_order(rj["threat"]))}
    rj = rj.assign(_o=rj["threat"].map(order)).sort_values(["_o", "robust"], na_position="last")
    pw = _per_example_worst(db, sig, st.session_state.get("rule", "headline"), rj.drop(columns=["_o"]))
    if not pw.empty:
        st.markdown("**Per-example worst case over the threats run** (an example counts only if every threat's job kept it robust; "
                    "same examples, same budget and seed). It can be lower than the leaderboard's minimum over threats.")
        show = pd.DataFrame({
            "budget": [f"{n} {Q.fmt_eps(e)}" for n, e in zip(pw["norm"], pw["eps"])], "seed": pw["seed"], "threats": pw["threats"],
            "n": pw["n"],
            "per-example worst (95% CI)": [
                Q.fmt_interval(a, lo, hi, n) for a, lo, hi, n in zip(pw["robust"], pw["robust_lo"], pw["robust_hi"], pw["n"])
            ],
            "lowest single threat": [f"{100 * v:.1f}%" for v in pw["min_of_threats"]],
        })
        st.dataframe(show, hide_index=True)
    ids = rj["job_id"].tolist()
    lab = {r.job_id: _job_label(r) for r in rj.itertuples()}
    default = ids.index(row["worst:job"]) if isinstance(row.get("worst:job"), str) and row["worst:job"] in ids else 0
    job_id = c2.selectbox("Job", ids, index=default, format_func=lambda k: lab[k], key="job_pick")
    if job_id is None:
        return
    data = _job(db, sig, job_id)
    d = data["detail"]
    if d is None:
        st.warning(f"job {job_id} is no longer in the store")
        return
    st.markdown(
        f"**{d['defense']}** under **{d['threat']}** on {d['dataset']} / {d['classifier']} · status **{d['status']}** · "
        f"gradient path `{d['gradient_path']}` · EOT {d['eot_samples']} · R {d['eval_draws']} · "
        f"{'adaptive' if d['adaptive'] else 'non-adaptive †'} · {'stochastic' if d['stochastic'] else 'deterministic'}"
    )
    if d.get("reason"):
        st.error(f"{d['status']}: {d['reason']}")
    flags_block(d.get("flags"))
    compare_block(db, sig, jobs, d)
    tabs = st.tabs(["Convergence", "Metrics & cost", "Configuration", "Environment", "Per-example", "Gallery"])
    with tabs[0]:
        if data["curves"].empty:
            st.info("This job stored no convergence curve (only PGD records robust accuracy per iteration).")
        else:
            st.altair_chart(curve_chart(data["curves"]), width="stretch")
            st.caption("Examples the attack has not yet broken after each iteration, as the attacker sees them (EOT-averaged "
                       "logits, best iterate so far). The stored robust accuracy re-scores the final examples with R fresh purifications.")
    with tabs[1]:
        m = data["metrics"]
        if not m.empty:
            show = m.copy()
            frac = ~show["name"].isin(["mean_linf", "mean_l2", "detection_auc"])
            show["value"] = [f"{100 * v:.2f}%" if f else f"{v:.4g}" for v, f in zip(show["value"], frac)]
            show["95% CI"] = [
                f"[{100 * lo:.2f}, {100 * hi:.2f}]" if (f and lo is not None and not pd.isna(lo)) else ""
                for lo, hi, f in zip(m["lower"], m["upper"], frac)
            ]
            st.dataframe(show[["name", "value", "95% CI", "n"]], hide_index=True)
        t, nfe = d.get("timings") or {}, d.get("nfe") or {}
        n = max(int(d.get("n_examples") or 1), 1)
        cols = st.columns(4)
        cols[0].metric("seconds total", f"{t.get('total_s', float('nan')):.2f}")
        cols[1].metric("seconds / example", f"{t.get('per_example_s', float('nan')):.4f}")
        cols[2].metric("purifier NFEs / example", f"{nfe.get('purifier_nfe_images', 0) / n:,.0f}")
        cols[3].metric("classifier images / example", f"{nfe.get('classifier_images', 0) / n:,.0f}")
        st.json({"timings": t, "nfe": nfe}, expanded=False)
    with tabs[2]:
        st.markdown("Identity hash (sha256 of everything that can change the number):")
        st.code(d["id"], language=None)
        st.markdown("Configuration")
        st.json(d.get("config") or {}, expanded=2)
        st.markdown("Identity")
        st.json(d.get("identity") or {}, expanded=1)
    with tabs[3]:
        st.json(d.get("environment") or {}, expanded=2)
        st.caption(f"created {d.get('created_at')} · finished {d.get('finished_at')}")
    with tabs[4]:
        ex = data["examples"]
        if ex.empty:
            st.info("No per-example rows stored for this job.")
        else:
            st.dataframe(Q.examples_for_display(ex), hide_index=True, height=min(38 + 35 * len(ex), 420))
    with tabs[5]:
        gallery(data)


def flags_block(flags) -> None:
    """The job's flags on weak numbers (harness.evaluation.flags), one line each."""
    if flags is None:
        st.caption("Flags: not computed (the job was stored before flags existed).")
    elif flags:
        st.warning("🚩 **Flags** (why this number may be too high)\n\n"
                   + "\n".join(f"- `{f.get('flag')}`: {f.get('detail', '')}" for f in flags if isinstance(f, dict)))


@st.cache_data(show_spinner=False, max_entries=64)
def _compare(db: str, sig: tuple, job_a: str, job_b: str) -> dict:
    return Q.compare_jobs(_engine(db), job_a, job_b)


def compare_block(db: str, sig: tuple, jobs: pd.DataFrame, d: dict) -> None:
    """A paired comparison of this job with another finished job of the same dataset (exact McNemar)."""
    others = jobs[(jobs["status"] == "done") & (jobs["dataset"] == d["dataset"]) & (jobs["job_id"] != d["id"])]
    if others.empty:
        return
    lab = {r.job_id: f"{r.defense} · {_job_label(r)}" for r in others.itertuples()}
    other = st.selectbox("Paired comparison with another job of this dataset (same examples; exact McNemar)",
                         [None, *others["job_id"].tolist()], format_func=lambda k: "—" if k is None else lab[k],
                         key="compare_pick")
    if other is None:
        return
    c = _compare(db, sig, d["id"], other)
    if not c["n_shared"]:
        st.info("The two jobs share no examples (no common dataset index).")
        return
    rows = []
    for kind in ("robust", "clean"):
        r, t = c[kind], c[kind]["table"]
        lo, hi = r["difference_ci95"]
        rows.append({
            "": kind, "A (this job) %": f"{100 * r['accuracy_first']:.1f}", "B %": f"{100 * r['accuracy_second']:.1f}",
            "B - A (pts, 95% CI)": f"{100 * r['difference']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]",
            "both right": t["both"], "A only": t["first_only"], "B only": t["second_only"], "neither": t["neither"],
            "McNemar p (exact)": f"{r['p_value']:.4g}",
        })
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="compare_table")
    st.caption(f"{c['n_shared']} shared examples, each job under its own headline scoring rule. The p-value is the exact "
               "two-sided binomial test on the discordant examples (A only vs B only); `harness compare` prints the same.")


def gallery(data: dict) -> None:
    """Per stored sample: the clean, adversarial and purified images and the amplified perturbation, with labels and predictions."""
    samples, ex = data["samples"], data["examples"]
    if not samples:
        st.info("No images stored for this job.")
        return
    by_pos = {int(p): r for p, r in zip(ex["position"], ex.itertuples())} if not ex.empty else {}
    st.caption("Clean input, the adversarial example kept for it, one purification of it, and the perturbation "
               "(amplified to full contrast; grey = unchanged).")
    for pos, imgs in samples:
        e = by_pos.get(pos)
        clean, adv = imgs.get("clean"), imgs.get("adversarial")
        pur = imgs.get("purified")
        cols = st.columns([1, 1, 1, 1, 2])
        if clean is not None:
            cap = f"#{pos} clean" + (f" · label {e.label} · pred {Q.majority(e.clean_preds)}" if e is not None else "")
            cols[0].image(Q.to_display_image(clean), caption=cap, width=112)
        if adv is not None:
            cap = "adversarial"
            if e is not None and e.adv_preds:
                a = e.worst_attack or next(iter(e.adv_preds))
                cap += f" · {a} pred {Q.majority(e.adv_preds.get(a, []))}"
            cols[1].image(Q.to_display_image(adv), caption=cap, width=112)
        if pur is not None:
            cap = "purified"
            if e is not None:
                cap += " · robust ✓" if e.robust_worst else " · broken ✗"
            cols[2].image(Q.to_display_image(pur), caption=cap, width=112)
        if clean is not None and adv is not None:
            img, linf = Q.perturbation_image(clean, adv)
            linf = float(e.linf) if e is not None else linf
            cols[3].image(img, caption=f"perturbation (l∞ {linf:.3g})", width=112)


# --------------------------------------------------------------------------- page
def main() -> None:
    """Render the page: read the store (read-only), then the filters, leaderboard, charts and job drill-down."""
    t0 = time.perf_counter()
    st.set_page_config(page_title="Purification leaderboard", page_icon="🛡️", layout="wide")
    db = db_argument()
    st.title("Adversarial purification leaderboard")
    if Q.store_missing(db):
        st.info(Q.EMPTY_HELP.format(db=db))
        st.caption(f"The store `{db}` does not exist yet (the dashboard opens it read-only and never creates it).")
        return
    rule = st.sidebar.radio(
        "Scoring rule over the R evaluation draws", Q.RULES, index=0, key="rule", horizontal=True,
        help="headline = the rule each threat spec names (worst-of-R by default)",
    )
    sig = Q.store_signature(db, None if Q.sqlite_file(Q.resolve_url(db)) else _engine(db))
    shown = Q.display_url(db)  # a server URL without its password
    try:
        jobs_all = _jobs(db, sig, rule)
    except SQLAlchemyError as exc:
        st.error(f"Cannot read the results store `{shown}`: {str(exc).splitlines()[0]}")
        return
    counts = jobs_all["status"].value_counts().to_dict() if len(jobs_all) else {}
    st.caption(
        f"Store `{shown}` (opened read-only) · {len(jobs_all)} jobs: "
        + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        + (f" · last finished {jobs_all['finished_at'].max():%Y-%m-%d %H:%M} UTC" if counts.get("done") else "")
    )
    if not counts.get("done"):
        st.info(Q.EMPTY_HELP.format(db=shown))
        if len(jobs_all):
            st.dataframe(jobs_all[["job_id", "status", "reason", "defense", "threat", "dataset", "classifier"]], hide_index=True)
        return
    filters = sidebar(jobs_all)
    board = _board(db, sig, rule, filters)
    leaderboard_section(board)
    beside_section(db, sig, board["jobs"])
    charts_section(board)
    drilldown_section(db, sig, board)
    st.session_state["render_s"] = elapsed = time.perf_counter() - t0  # read by bench/bench_dashboard.py
    st.caption(f"Page computed in {elapsed:.2f} s (store reads cached until the store changes).")


main()
