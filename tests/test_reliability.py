"""Reliability: concurrent writers on a new store, one-line errors that leave the store alone,
read-only commands that never create a store, Ctrl-C and SIGKILL of a grid.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from sqlalchemy import text

from harness.cli import main
from harness.scheduler import load_grid, run_grid
from harness.store import Store
from harness.store.schema import ExampleRow
from tests.conftest import TOY_PLUGIN

CLI = [sys.executable, "-m", "harness.cli"]
WEIGHTS = Path(__file__).resolve().parents[1] / "harness" / "weights"


# --------------------------------------------------------------------------- concurrency
COMMON = ["--n-examples", "16", "--set", "batch_size=8", "--plugin", TOY_PLUGIN]
#: Eight runs started at once. The first six share the preprocessor-blind adversarial examples
#: (same attack and seed; scoring, draws, detection or max_forward differ) and the first two
#: are the same job, run by two processes at the same time.
JOBS = [
    ["--defense", "none", "--threat", "preprocessor-blind"],
    ["--defense", "none", "--threat", "preprocessor-blind"],
    ["--defense", "none", "--threat", "preprocessor-blind", "--set", "scoring=single"],
    ["--defense", "toy-noise", "--threat", "preprocessor-blind", "--set", "eval_draws=3"],
    ["--defense", "toy-noise", "--threat", "preprocessor-blind", "--set", "max_forward=16"],
    ["--defense", "toy-smooth", "--threat", "preprocessor-blind", "--set", "detect=true"],
    ["--defense", "toy-noise", "--threat", "bpda", "--set", "steps=1", "--set", "eot_samples=2"],
    ["--defense", "toy-smooth", "--threat", "bpda", "--set", "steps=1", "--seed", "1"],
]
EXAMPLE_COLUMNS = [c for c in ExampleRow.__table__.columns.keys() if c != "id"]


def stored_numbers(store: Store, job_id: str) -> tuple:
    """Everything a job's numbers are: per-example rows, metrics with intervals, curves."""
    examples = [tuple(getattr(r, c) for c in EXAMPLE_COLUMNS) for r in store.example_rows(job_id)]
    metrics = {k: (m.value, m.lower, m.upper, m.n) for k, m in store.metrics(job_id).items()}
    return examples, metrics, store.curves(job_id)


@pytest.fixture(scope="module")
def solo_numbers(tmp_path_factory) -> list[tuple]:
    """Each job of JOBS alone in a SQLite store of its own (nothing to reuse): its stored numbers."""
    out = []
    for k, args in enumerate(JOBS):
        solo_db = tmp_path_factory.mktemp("solo") / f"solo{k}.db"
        assert main(["run", *args, *COMMON, "--db", str(solo_db), "--no-progress"]) == 0
        solo = Store(str(solo_db), read_only=True)
        out.append(stored_numbers(solo, solo.jobs()[0].id))
    return out


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_eight_processes_on_a_new_store_each_store_exactly_their_solo_rows(backend, tmp_path, request, solo_numbers, capsys):
    db = str(tmp_path / "new.db") if backend == "sqlite" else request.getfixturevalue("pg_url")  # a server store: a fresh database
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the solo runs use one thread too (conftest)
    procs = [
        subprocess.Popen(CLI + ["run", *args, *COMMON, "--db", db, "--json", "--no-progress"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for args in JOBS
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    ids = [json.loads(out)["job_id"] for out, _ in outs]
    assert ids[0] == ids[1] and len(set(ids)) == 7

    shared = Store(db, read_only=True)
    assert {j.id: j.status for j in shared.jobs()} == {i: "done" for i in ids}
    with shared.engine.connect() as con:  # one cached entry per batch of the shared attack, whoever wrote it first
        assert con.execute(text("select count(*) from adv_cache")).scalar() == 2
        assert con.execute(text("select count(*) from meta")).scalar() == 1
    for args, job_id, solo in zip(JOBS, ids, solo_numbers, strict=True):
        assert stored_numbers(shared, job_id) == solo, args
    capsys.readouterr()


# --------------------------------------------------------------------------- one-line errors, store untouched
@pytest.fixture(scope="module")
def finished_store(tmp_path_factory) -> Path:
    """A store holding one finished job."""
    db = tmp_path_factory.mktemp("finished") / "r.db"
    assert main(["run", "--n-examples", "8", "--db", str(db)]) == 0
    gc.collect()  # close the run's connections: SQLite folds its write-ahead log into the file, so a copy holds it all
    assert not db.with_name("r.db-wal").exists() and len(Store(str(db), read_only=True).jobs()) == 1
    return db


def _recipe(src: Path, dst: Path, kind: str) -> None:
    """Write a broken recipe beside a copy of shipped weights."""
    shutil.copy(src.with_suffix(".pt"), dst.with_suffix(".pt"))
    recipe = json.loads(src.with_suffix(".json").read_text())
    if kind == "corrupt":
        text = '{"sha256": '
    elif kind == "list":
        text = "[1, 2]"
    elif kind == "no-unet_config":
        recipe.pop("unet_config")
        text = json.dumps(recipe)
    else:  # unknown UNet argument
        recipe["unet_config"]["bogus"] = 1
        text = json.dumps(recipe)
    dst.with_suffix(".json").write_text(text)


RECIPE_NEEDLES = {
    "corrupt": "is not readable JSON", "list": "holds a JSON list, not an object",
    "no-unet_config": "unet_config is missing", "bogus": "unexpected keyword argument 'bogus'",
}
PROBES = [  # (arguments, what the one line says, a broken recipe to put in {w}: (shipped weights, how broken))
    (["run", "--set", "eps=1/0"], "eps='1/0' is not a valid float", None),
    (["run", "--set", "step_size=1/0"], "step_size='1/0' is not a valid float", None),
    (["run", "--data-seed", "-1"], "data_seed=-1 is out of range", None),
    (["run", "--data-seed", str(2**40)], f"data_seed={2**40} is out of range", None),
    (["run", "--device", "meta"], "device 'meta' is not supported", None),
    (["run", "--db", "::://"], "neither a file path nor a valid database URL", None),
    (["run", "--db", "nosuchdb://host/x"], "unknown database kind 'nosuchdb'", None),
    (["run", "--db", "postgresql://user:secret@localhost:1/db"], "postgresql://user:***@localhost:1/db", None),
    (["run", "--db", "{tmp}"], "is a folder", None),
    (["run", "--db", "{tmp}/text.db"], "is not a SQLite database", None),
    (["results", "--db", "{tmp}/missing.db"], "does not exist", None),
    (["show", "abc", "--db", "{tmp}/missing.db"], "does not exist", None),
    (["check", "{tmp}/t.csv", "--db", "{tmp}/missing.db"], "does not exist", None),
    (["results", "--db", "{tmp}/text.db"], "is not a SQLite database", None),
    *[(["run", "--defense", d, "--weights-dir", "{w}"], RECIPE_NEEDLES[kind], (stem, kind))
      for d, stem in (("diffpure", "digits-ddpm"), ("flowpure-pgd", "flowpure-pgd-digits")) for kind in RECIPE_NEEDLES],
    *[(["run", "--defense", "maep", "--weights-dir", "{w}"], RECIPE_NEEDLES[kind], ("maep-digits", kind))
      for kind in ("corrupt", "list")],
    (["run", "--weights", "{w}/digits-cnn.pt"], "classifier recipe", ("digits-cnn", "corrupt")),
    (["run", "--plugin", "{tmp}/exits.py"], "exits.py called sys.exit(3) while it was imported", None),
    (["run", "--weights", "{tmp}/legacy.pt"], "refused by torch.load(weights_only=True): it holds a pickled Python object", None),
]


@pytest.mark.parametrize("args,needle,recipe", PROBES, ids=[" ".join(a) + (f" ({r[1]} {r[0]})" if r else "")
                                                              for a, _, r in PROBES])
def test_bad_input_is_one_line_exit_2_and_touches_no_store(args, needle, recipe, tmp_path, finished_store, capsys):
    db = tmp_path / "r.db"
    shutil.copy(finished_store, db)
    (tmp_path / "text.db").write_text("not a database, but someone's notes\n" * 20)
    (tmp_path / "t.csv").write_text("defense,threat,dataset,classifier,metric,expected,tolerance\n")
    (tmp_path / "exits.py").write_text("import sys\nsys.exit(3)\n")  # a plugin written as a script
    torch.save(argparse.Namespace(a=1), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)  # a legacy pickle
    if recipe is not None:
        (tmp_path / "w").mkdir()
        _recipe(WEIGHTS / f"{recipe[0]}.pt", tmp_path / "w" / f"{recipe[0]}.pt", recipe[1])
    argv = [a.replace("{w}", str(tmp_path / "w")).replace("{tmp}", str(tmp_path)) for a in args]
    if argv[0] == "run":
        argv += ["--n-examples", "8"] + ([] if "--db" in argv else ["--db", str(db)])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert "Traceback" not in err and "secret" not in err
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == before  # no store changed, none created (no file at all)


@contextlib.contextmanager
def read_only_folder(folder: Path):
    """``folder`` read-only: by its mode for a normal user, by a read-only bind mount for root."""
    if os.geteuid() != 0:
        for p in [*folder.iterdir(), folder]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        try:
            yield folder
        finally:
            for p in [folder, *folder.iterdir()]:
                p.chmod(0o755 if p.is_dir() else 0o644)
        return
    mnt = folder.with_name(folder.name + "-ro")
    mnt.mkdir()
    if subprocess.run(["mount", "--bind", str(folder), str(mnt)], capture_output=True).returncode:
        pytest.skip("running as root without the right to mount: no read-only folder can be made here")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(mnt)], capture_output=True).returncode:
            pytest.skip("running as root without the right to remount read-only")
        yield mnt
    finally:
        gc.collect()  # close the connections of the stores opened there
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
            subprocess.run(["umount", "--lazy", str(mnt)], capture_output=True)  # detached now, gone once unused


def test_a_store_on_a_read_only_folder_is_read_and_never_written(tmp_path, finished_store, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    shutil.copy(finished_store, folder / "r.db")
    before = (folder / "r.db").read_bytes()
    with read_only_folder(folder) as ro:
        assert main(["run", "--n-examples", "8", "--seed", "1", "--db", str(ro / "r.db")]) == 2
        err = capsys.readouterr().err
        assert "cannot be written: the file or its folder is read-only" in err and err.count("\n") == 1
        assert main(["results", "--db", str(ro / "r.db"), "--format", "json"]) == 0
        assert len(json.loads(capsys.readouterr().out)) == 1
    assert (folder / "r.db").read_bytes() == before and sorted(p.name for p in folder.iterdir()) == ["r.db"]


# --------------------------------------------------------------------------- Ctrl-C and SIGKILL of a grid
SLOW = f"""
n_examples: 40
seeds: [0, 1]
set: {{batch_size: 8}}
plugins: [{TOY_PLUGIN}]
defenses:
  - name: toy-slow  # a slow job, so that the grid is caught mid-job
    set: {{delay: 0.05}}
threats:
  - name: bpda
    set: {{steps: 10}}
datasets: [digits]
"""


def wait_for_rows(db: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> int:
    """Poll until the store holds at least ``n`` example rows; return how many."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        try:
            with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
                have = con.execute("select count(*) from examples").fetchone()[0]
        except sqlite3.OperationalError:  # not created yet
            continue
        if have >= n:
            return have
    raise AssertionError(f"the grid stored fewer than {n} rows before {'exiting' if proc.poll() is not None else 'the timeout'}")


def test_ctrl_c_stops_a_grid_cleanly_and_keeps_every_finished_batch(tmp_path):
    g = tmp_path / "g.yaml"
    # one job of ten batches at 0.1 s per purification: when the poll below has seen two of
    # them, eight (about 20 s) are left, so even a loaded machine interrupts it mid-job
    g.write_text(SLOW.replace("seeds: [0, 1]", "seeds: [0]").replace("n_examples: 40", "n_examples: 80")
                 .replace("delay: 0.05", "delay: 0.1"))
    assert "delay: 0.1" in g.read_text() and "n_examples: 80" in g.read_text()
    db = tmp_path / "r.db"
    # the default SIGINT disposition in the child, whatever the test process inherited
    proc = subprocess.Popen(CLI + ["grid", str(g), "--db", str(db)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for_rows(db, 16, proc)  # two batches stored, eight to go
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: the grid and its workers
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip() == "interrupted: finished batches are stored; rerun the same command to resume"  # and nothing else
    with contextlib.closing(sqlite3.connect(db)) as con:
        kept = con.execute("select id, job_id, position from examples").fetchall()
    assert 16 <= len(kept) < 80 and len(kept) % 8 == 0  # whole batches only
    assert [j.status for j in Store(str(db), read_only=True).jobs()] == ["running"]  # resumable, not failed
    run_grid(load_grid(g), Store(str(db)), log=lambda *_: None)  # the same grid again
    with contextlib.closing(sqlite3.connect(db)) as con:
        final = con.execute("select id, job_id, position from examples").fetchall()
    assert set(kept) <= set(final) and len(final) == len({(j, p) for _, j, p in final}) == 80  # kept rows untouched, none twice
    assert [j.status for j in Store(str(db), read_only=True).jobs()] == ["done"]


def test_sigkill_of_a_ray_grid_driver_leaves_no_ray_process_running(tmp_path):
    pytest.importorskip("ray")
    if not Path("/proc/self/stat").is_file():
        pytest.skip("the reaper of a killed driver's Ray processes uses /proc (Linux)")
    from harness.scheduler.reaper import descendants, start_time

    g = tmp_path / "g.yaml"
    g.write_text(SLOW.replace("seeds: [0, 1]", "seeds: [0]"))
    db = tmp_path / "r.db"
    proc = subprocess.Popen(CLI + ["grid", str(g), "--db", str(db), "--executor", "ray", "--ray-cpus", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_rows(db, 8, proc)
        ray = {pid: t for pid, t in descendants(proc.pid).items()
               if b"reaper.py" not in Path(f"/proc/{pid}/cmdline").read_bytes()}
        names = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:90].decode() for pid in ray}
        assert any("raylet" in n for n in names.values()) and any("ray::" in n for n in names.values()), names
        os.kill(proc.pid, signal.SIGKILL)  # the driver alone, as the OOM killer or `kill -9 PID` would
        proc.wait(timeout=30)
        deadline = time.time() + 30
        while time.time() < deadline and any(start_time(pid) == t for pid, t in ray.items()):
            time.sleep(0.2)
        assert not [names[pid] for pid, t in ray.items() if start_time(pid) == t]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
