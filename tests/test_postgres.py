"""The results store on a real PostgreSQL server (tests/pgserver.py starts a throwaway one).

The same schema, identities and rows as SQLite; race-free schema creation by many first
writers; a read-only role for readers enforced by the server; one-line errors for a server
that is down or refuses the login (never the password, nothing written); the dashboard and
``harness report`` reading it. The concurrent runs and the SIGKILLed grid on a server store
are tests/test_reliability.py and tests/test_grid.py, parametrised over both stores.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
from sqlalchemy import func, inspect, select, text
from sqlalchemy.exc import SQLAlchemyError

from dashboard import queries as Q
from harness.cli import main
from harness.core.registry import HarnessError
from harness.store import Store
from harness.store.schema import Base, MetaRow
from tests.test_dashboard import fill_store
from tests.test_store import _example, _fields


def test_round_trip_schema_and_types_match_sqlite(pg_url, tmp_path):
    stores = {"sqlite": Store(str(tmp_path / "r.db")), "postgresql": Store(pg_url)}
    read = {}
    for kind, st in stores.items():
        st.begin_job("j1", **_fields(eps=0.1 + 0.2, identity={"eps": 1 / 3, "nested": {"k": [1, 2.5]}}))
        st.write_batch("j1", 0, examples=[_example(0), _example(1, ok=False)], curves={"pgd": [2, 1]}, nfe={"x": 3}, seconds=0.5)
        st.write_batch("j1", 0, examples=[_example(0)], curves={}, nfe={}, seconds=0.1)  # a batch written twice is kept once
        st.finish_job("j1", metrics={"robust_accuracy": (0.5, 0.1, 0.9, 2)}, curves={"pgd": [(1.0, 2), (0.5, 2)]},
                      timings={"total_s": 1.0}, nfe={"x": 3}, environment={"device": "cpu"})
        job = st.get_job("j1")
        read[kind] = (job.identity, job.eps, [(r.position, r.adv_preds, r.linf, r.robust_worst) for r in st.example_rows("j1")],
                      st.curves("j1"), {k: (m.value, m.lower, m.upper, m.n) for k, m in st.metrics("j1").items()})
        assert job.created_at.utcoffset() is None or job.created_at.utcoffset().total_seconds() == 0
    assert read["sqlite"] == read["postgresql"]
    tables = set(inspect(stores["postgresql"].engine).get_table_names())
    assert tables == set(Base.metadata.tables)
    assert Store(pg_url, read_only=True).find_jobs("j")[0].id == "j1"


def test_many_first_writers_create_the_schema_once(pg_url):
    code = "import sys; from harness.store import Store; Store(sys.argv[1]).close()"
    procs = [subprocess.Popen([sys.executable, "-c", code, pg_url], stderr=subprocess.PIPE, text=True) for _ in range(6)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    st = Store(pg_url, read_only=True)
    with st.session() as s:
        assert s.scalar(select(func.count()).select_from(MetaRow)) == 1


def test_readers_cannot_write_the_server_store(pg_url):
    Store(pg_url).begin_job("j", **_fields())
    with pytest.raises(HarnessError, match="was opened read-only"):
        Store(pg_url, read_only=True).begin_job("k", **_fields())
    engine = Q.make_engine(pg_url)  # the dashboard's engine: the server refuses its writes
    with pytest.raises(SQLAlchemyError, match="read-only transaction"):
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM jobs"))
    assert [j.id for j in Store(pg_url, read_only=True).jobs()] == ["j"]


@pytest.mark.parametrize("case", ["wrong password", "server down", "no such database"])
def test_a_server_that_refuses_is_one_line_without_the_password(case, pg_server, pg_url, capsys):
    name = pg_url.rsplit("/", 1)[1]
    url = {"wrong password": pg_server.url(name, password="not-the-secret"),
           "server down": f"postgresql+psycopg://harness:not-the-secret@127.0.0.1:{pg_server.port + 1 if pg_server.port < 65535 else 1}/x",
           "no such database": pg_server.url("no_such_database").replace(pg_server.password, "not-the-secret")}[case]
    for argv in (["run", "--n-examples", "8", "--db", url], ["results", "--db", url], ["report", "--db", url]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "not-the-secret" not in err, err
        assert "harness:***@127.0.0.1" in err or case == "no such database", err
    assert not inspect(Store(pg_url).engine).has_table("examples") or not Store(pg_url, read_only=True).jobs()  # nothing written


def test_the_dashboard_and_report_read_a_server_store_as_they_read_sqlite(pg_url, tmp_path, monkeypatch, capsys):
    fill_store(tmp_path / "r.db")
    fill_store(pg_url)
    sqlite_engine, pg_engine = Q.make_engine(str(tmp_path / "r.db")), Q.make_engine(pg_url)
    a, b = Q.load_jobs(sqlite_engine), Q.load_jobs(pg_engine)
    cols = [c for c in a.columns if c != "finished_at"]
    by_id = lambda df: df.sort_values("job_id")[cols].reset_index(drop=True)
    pd.testing.assert_frame_equal(by_id(a), by_id(b))
    pd.testing.assert_frame_equal(Q.leaderboard(a).drop(columns=[c for c in Q.leaderboard(a) if "job" in c]),
                                  Q.leaderboard(b).drop(columns=[c for c in Q.leaderboard(b) if "job" in c]))
    ids = sorted(a["job_id"])[:2]
    assert Q.compare_jobs(sqlite_engine, *ids) == Q.compare_jobs(pg_engine, *ids)
    sig = Q.store_signature(pg_url, pg_engine)
    assert sig[2] == str(len(a)) and Q.store_signature(pg_url, pg_engine) == sig
    # harness report: the same page (the store's name aside), and no password in it
    assert main(["report", "--db", str(tmp_path / "r.db")]) == 0
    page_sqlite = capsys.readouterr().out
    assert main(["report", "--db", pg_url]) == 0
    page_pg = capsys.readouterr().out
    assert "harness:***@" in page_pg and pg_url.split(":")[2].split("@")[0] not in page_pg
    strip = lambda page: "\n".join(line for line in page.splitlines() if "Generated by" not in line and "From store" not in line)
    assert strip(page_sqlite) == strip(page_pg)
    # the page itself, through Streamlit's AppTest
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("HARNESS_DASHBOARD_DB", pg_url)
    monkeypatch.setenv("STREAMLIT_BROWSER_GATHER_USAGE_STATS", "false")
    at = AppTest.from_file(str(Q.__file__).replace("queries.py", "app.py"), default_timeout=120).run()
    assert not at.exception, at.exception
    table = next(df.value for df in at.dataframe if "Defense" in df.value.columns)
    assert {"none", "toy-noise", "toy-quantize"} <= set(table["Defense"]) and len(table) == 5
    assert not any(pg_url.split("@")[0].split(":")[-1] in c.value for c in at.caption)  # the password is never shown


def test_show_compare_check_and_migrations_on_a_server_store(pg_url, tmp_path, capsys):
    fill_store(pg_url)
    ids = sorted(j.id for j in Store(pg_url, read_only=True).jobs(status="done"))
    assert main(["show", ids[0][:12], "--db", pg_url]) == 0
    assert json.loads(capsys.readouterr().out)["job_id"] == ids[0]
    a, b = (j for j in Store(pg_url, read_only=True).jobs(status="done") if j.dataset == "digits" and j.threat == "adaptive")
    assert main(["compare", a.id, b.id, "--db", pg_url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_shared"] == 20
    table = tmp_path / "t.csv"
    m = Store(pg_url, read_only=True).metrics(a.id)["robust_accuracy"]
    table.write_text("defense,threat,dataset,classifier,metric,expected,tolerance\n"
                     f"{a.defense},{a.threat},{a.dataset},{a.classifier},robust_accuracy,{m.value},\n")
    assert main(["check", str(table), "--db", pg_url]) == 0
    assert "1/1 within tolerance" in capsys.readouterr().out
    # an older store (before the flags column): a reader reads it as None, the next writer adds the column
    with Store(pg_url).engine.begin() as conn:
        conn.execute(text("ALTER TABLE jobs DROP COLUMN flags"))
    assert all(j.flags is None for j in Store(pg_url, read_only=True).jobs())
    Store(pg_url).close()
    assert "flags" in {c["name"] for c in inspect(Store(pg_url, read_only=True).engine).get_columns("jobs")}
