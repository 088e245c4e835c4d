"""``harness merge``: stores from several machines into one, keyed by job identity.

Identical jobs kept once, conflicting ones refused naming both stores (nothing written),
sources never written, unfinished jobs never shadowing finished ones, and a round trip
SQLite -> PostgreSQL -> SQLite that keeps every row byte for byte.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
from pathlib import Path

import pytest

from harness.cli import main
from harness.store import Store
from harness.store.schema import Base
from tests.test_dashboard import fill_store
from tests.test_store import _example, _fields

#: Surrogate row numbers, local to each store (every other column is compared byte for byte).
SURROGATE = "id"


def dump(db: Path) -> dict[str, list[tuple]]:
    """Every table of a SQLite store as its raw stored values (JSON text, blobs, REAL, timestamps), sorted."""
    out = {}
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
        for name, table in Base.metadata.tables.items():
            cols = [c.name for c in table.columns if not (c.name == SURROGATE and name != "jobs")]
            out[name] = sorted(con.execute(f"select {', '.join(cols)} from {name}").fetchall(), key=repr)
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A store with fabricated jobs (samples, skips) and two real finished jobs (one with per-example image quality)."""
    db = tmp_path_factory.mktemp("src") / "a.db"
    fill_store(db)
    assert main(["run", "--n-examples", "8", "--db", str(db), "--no-progress"]) == 0
    assert main(["run", "--n-examples", "8", "--threat", "bpda", "--set", "steps=2", "--db", str(db), "--no-progress"]) == 0
    Store(str(db)).close()
    return db


def test_round_trip_sqlite_postgres_sqlite_keeps_every_row_byte_for_byte(source, pg_url, tmp_path, capsys):
    before = source.read_bytes()
    assert main(["merge", str(source), "--into", pg_url]) == 0
    back = tmp_path / "back.db"
    assert main(["merge", pg_url, "--into", str(back)]) == 0
    out = capsys.readouterr().out
    assert "harness:***@" in out and pg_url.split(":")[2].split("@")[0] not in out  # no password printed
    a, b = dump(source), dump(back)
    assert sum(len(v) for v in a.values()) > 100 and a["examples"] and a["samples"] and a["adv_cache"]
    for name in a:
        assert a[name] == b[name], name
    assert source.read_bytes() == before  # the source was never written
    # merging again changes nothing: every job is found identical
    assert main(["merge", str(source), pg_url, "--into", str(back)]) == 0
    assert "0 jobs copied" in capsys.readouterr().out and dump(back) == a


def _one_job(db: Path, job: str, linf: float, status: str = "done") -> None:
    st = Store(str(db))
    st.begin_job(job, **_fields())
    st.write_batch(job, 0, examples=[{**_example(0), "linf": linf}], curves={}, nfe={"adv_reused": int(linf * 10)}, seconds=linf)
    if status == "done":
        st.finish_job(job, metrics={"m": (1.0, None, None, 1)}, curves={}, timings={"total_s": linf}, nfe={}, environment={})
    st.close()


def test_identical_jobs_are_kept_once_and_a_conflict_names_both_stores(tmp_path, capsys):
    a, b, c, into = (tmp_path / f"{n}.db" for n in ("a", "b", "c", "into"))
    _one_job(a, "shared", 0.25)
    _one_job(a, "only-a", 0.5)
    _one_job(b, "shared", 0.25)  # the same numbers; its timings and cost counters differ
    _one_job(b, "only-b", 0.5, status="running")
    shutil.copy(a, c)
    _one_job(c, "shared-c", 0.1)
    assert main(["merge", str(a), str(b), "--into", str(into)]) == 0
    st = Store(str(into), read_only=True)
    assert {j.id: j.status for j in st.jobs()} == {"shared": "done", "only-a": "done", "only-b": "running"}
    assert st.done_batches("only-b") == {0}  # an unfinished job arrives with its batches: the target resumes it
    capsys.readouterr()

    # c holds 'shared' with other numbers: refused, naming c and the target, and nothing written
    con = sqlite3.connect(c)
    con.execute("update examples set linf = 0.2500001 where job_id = 'shared'")
    con.commit()
    con.close()
    before, source_before = into.read_bytes(), c.read_bytes()
    assert main(["merge", str(c), "--into", str(into)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "job shared has different stored numbers" in err
    assert str(c) in err and f"the target {into}" in err and "nothing was written" in err
    assert into.read_bytes() == before and c.read_bytes() == source_before
    assert "shared-c" not in {j.id for j in Store(str(into), read_only=True).jobs()}
    # between two sources of one merge: both named
    assert main(["merge", str(a), str(c), "--into", str(tmp_path / "fresh.db")]) == 2
    err = capsys.readouterr().err
    assert f"in {c} and in {a}" in err and not (tmp_path / "fresh.db").exists()
    # a source that is the target is refused
    assert main(["merge", str(into), "--into", str(into)]) == 2
    assert "is the target store itself" in capsys.readouterr().err
