"""``harness report``: the Markdown leaderboard says exactly what the store holds, from a store or from a table."""

from __future__ import annotations

import re

import pytest

from harness.cli import main
from harness.evaluation import RunConfig, resolve, run_job
from harness.store import Store
from harness.store import tables as accuracy_tables

#: Cheap real jobs with the shipped digits models: two defenses under two threats, and a colour-shift cell beside them.
CELLS = (("none", "preprocessor-blind"), ("none", "adaptive"), ("maep", "preprocessor-blind"), ("maep", "adaptive"),
         ("none", "color-shift"))
CHEAP = (("steps", "2"), ("apgd_steps", "2"), ("square.n_queries", "5"))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    db = str(tmp_path_factory.mktemp("report") / "r.db")
    st = Store(db)
    for defense, threat in CELLS:
        run_job(resolve(RunConfig(defense=defense, threat=threat, dataset="digits", n_examples=16, overrides=CHEAP)), st,
                progress=False)
    st.engine.dispose()
    return db


def _report(capsys, *args) -> str:
    code = main(["report", *args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def _rows(md: str, first: str) -> list[list[str]]:
    """The body rows of the Markdown table whose header starts with ``| first |``, cells stripped."""
    lines = md.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first} |"))
    rows = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip("|").split(" | ")])
    return rows[:1] + rows[2:]  # header, then the body without the rule


def _pct(v) -> str:
    return f"{100 * v:.1f}"


def _stored(db: str) -> dict[tuple[str, str], dict]:
    st = Store(db, read_only=True)
    return {(j.defense, j.threat): st.metrics(j.id) for j in st.jobs(status="done")}


def test_report_numbers_are_the_stored_numbers(store, capsys):
    md = _report(capsys, "--db", store, "--dataset", "digits")
    stored = _stored(store)
    head, *body = _rows(md, "#")
    assert head[:5] == ["#", "defense", "classifier", "clean", "worst case"]
    threats = head[5:-1]
    assert threats == ["preprocessor-blind", "adaptive"] and head[-1] == "s / example"  # color-shift is beside, not a column
    seen = set()
    worsts = []
    for row in body:
        defense = row[1].strip("`")
        for t, cell in zip(threats, row[5:-1]):
            m = stored[(defense, t)]["robust_accuracy"]
            assert cell.startswith(f"{_pct(m.value)} [{_pct(m.lower)}, {_pct(m.upper)}]"), (defense, t, cell)
            seen.add((defense, t))
        robust = [stored[(defense, t)]["robust_accuracy"] for t in threats]
        low = min(robust, key=lambda m: m.value)
        assert row[4].startswith(f"**{_pct(low.value)}** [{_pct(low.lower)}, {_pct(low.upper)}]"), row[4]
        clean = stored[(defense, "preprocessor-blind")]["clean_accuracy"]  # same n in every job: the latest's clean
        assert row[3].endswith("]") and row[3].split(" [")[0] in {_pct(stored[(defense, t)]["clean_accuracy"].value) for t in threats}
        assert clean.value > 0
        worsts.append(low.value)
    assert seen == {c for c in CELLS if c[1] != "color-shift"}
    assert worsts == sorted(worsts, reverse=True)  # sorted by the worst case
    assert "\n### Settings and provenance of each cell" in md and "full+bpda, EOT 1" in md
    settings = _rows(md, "defense | classifier | threat | n")
    assert {(r[0].strip("`"), r[2]) for r in settings[1:]} == seen and all(r[3] == "16" for r in settings[1:])
    shift = _rows(md, "defense | classifier | threat | shift")[1]
    change = stored[("none", "color-shift")]["robust_accuracy_change"]
    assert shift[2] == "color-shift" and shift[-1].startswith(f"{100 * change.value:+.1f}")
    sha = Store(store, read_only=True).jobs(status="done")[0].environment.get("git_sha")
    if sha:
        assert f"`{sha[:12]}`" in md  # the commit the jobs ran at


def test_summary_csv_renders_exactly_what_the_store_renders(store, tmp_path, capsys):
    summary = tmp_path / "summary.csv"
    _report(capsys, "--db", store, "--format", "csv", "--out", str(summary))
    from_store = _report(capsys, "--db", store)
    from_table = _report(capsys, "--table", str(summary))
    tables = lambda md: [ln for ln in md.splitlines() if ln.startswith("|")]  # the source line differs, nothing else
    assert tables(from_table) == tables(from_store)
    assert from_table.count("\n") == from_store.count("\n")


def test_an_accuracy_table_renders_its_point_values_and_says_so(store, tmp_path, capsys):
    accuracy_tables.main(["--db", store])
    table = tmp_path / "acc.csv"
    table.write_text(capsys.readouterr().out)
    md = _report(capsys, "--table", str(table))
    assert "point values only" in md and "[" not in "".join(r[5] for r in _rows(md, "#")[1:])
    stored = _stored(store)
    for row in _rows(md, "#")[1:]:
        defense = row[1].strip("`")
        assert row[5] == _pct(stored[(defense, "preprocessor-blind")]["robust_accuracy"].value)
        assert row[6] == _pct(stored[(defense, "adaptive")]["robust_accuracy"].value)
        assert "†" not in " ".join(row)  # the table does not know which cells were adaptive: no mark is made up


def test_insert_replaces_only_its_own_block(store, tmp_path, capsys):
    page = tmp_path / "README.md"
    other = "<!-- BEGIN harness report --db other.db --brief -->\nkept\n<!-- END harness report -->\n"
    page.write_text(f"# title\n\n<!-- BEGIN harness report --db {store} --brief -->\nold\n<!-- END harness report -->\n\n{other}")
    assert main(["report", "--db", store, "--brief", "--out", str(page), "--insert"]) == 0
    text = page.read_text()
    assert text.startswith("# title\n") and "old" not in text and text.endswith(other)
    assert re.search(r"\*\*digits\*\*\n\n\| # \| defense", text)
    capsys.readouterr()
    assert main(["report", "--db", store, "--out", str(page), "--insert"]) == 2  # no block with these arguments
    assert "no block" in capsys.readouterr().err


@pytest.mark.parametrize("args,needle", [
    (["--dataset", "cifar10"], "has no jobs of dataset cifar10 (it has: digits)"),
    (["--format", "csv", "--table", "tables/smoke.csv"], "give --db"),
])
def test_bad_input_is_one_line(store, args, needle, capsys):
    argv = ["report", *args] if "--table" in args else ["report", "--db", store, *args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_a_missing_store_is_an_error_and_is_not_created(tmp_path, capsys):
    db = tmp_path / "none.db"
    assert main(["report", "--db", str(db)]) == 2
    assert "does not exist" in capsys.readouterr().err and not db.exists()


def test_the_brief_board_shows_the_colour_shift_beside_the_threats(store, capsys):
    md = _report(capsys, "--db", store, "--brief")
    rows = _rows(md, "#")
    col = rows[0].index("color-shift (paired change)")
    stored = _stored(store)[("none", "color-shift")]
    by_defense = {r[1].strip("`"): r for r in rows[1:]}
    want = f"{_pct(stored['robust_accuracy'].value)} ({100 * stored['robust_accuracy_change'].value:+.1f})"
    assert by_defense["none"][col] == want
    assert by_defense["maep"][col] == "–"  # no shifted cell was run for it
    worst = rows[0].index("worst case")
    assert "color-shift" not in by_defense["none"][worst]  # beside the threats, never the worst case
