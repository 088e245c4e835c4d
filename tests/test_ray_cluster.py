"""A grid on a real two-node Ray cluster on this machine (``ray.cluster_utils.Cluster`` with ``add_node``, as Ray's
own tests do), writing through the driver to a PostgreSQL store: jobs spread on both nodes, the node recorded in
each job, the second node's raylet SIGKILLed mid-grid and its jobs rerun on the head with nothing lost; a plugin
file a node lacks reaches it through the object store; a weights file a node lacks fails its job naming the file.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.evaluation import RunConfig, resolve
from harness.scheduler import load_grid, run_grid
from harness.scheduler.executors import RayExecutor, _localise_plugins
from harness.scheduler.reaper import descendants
from harness.store import Store
from tests.conftest import TOY_PLUGIN
from tests.test_grid import stored_rows

WEIGHTS = Path(__file__).resolve().parents[1] / "harness" / "weights"
GRID = f"""
n_examples: 32
seeds: [0, 1, 2, 3, 4, 5]
set: {{batch_size: 8}}
plugins: [{TOY_PLUGIN}]
defenses:
  - name: toy-slow  # about a second per batch (it sleeps): the kill lands mid-job
    set: {{delay: 0.05}}
threats:
  - name: bpda
    set: {{steps: 6}}
datasets: [digits]
"""


def test_a_node_lacking_a_plugin_file_gets_it_through_ray_with_the_same_identity(tmp_path):
    cfg = RunConfig(defense="toy-noise", threat="bpda", n_examples=8, plugins=(str(tmp_path / "gone" / "toy_defenses.py"),))
    local = _localise_plugins(cfg, {cfg.plugins[0]: Path(TOY_PLUGIN).read_bytes()})
    assert Path(local.plugins[0]).read_bytes() == Path(TOY_PLUGIN).read_bytes() and Path(local.plugins[0]).name == "toy_defenses.py"
    # resolved where only the node's copy exists (a fresh process: this one has the original loaded), the same job
    code = ("import dataclasses, sys; from harness.evaluation import RunConfig, resolve; "
            f"print(resolve(RunConfig(defense='toy-noise', threat='bpda', n_examples=8, plugins=({local.plugins[0]!r},))).job_id)")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True).stdout.split()[-1]
    assert there == resolve(dataclasses.replace(cfg, plugins=(TOY_PLUGIN,))).job_id


def _executing(raylet_pid: int) -> bool:
    """Whether a worker of this raylet is running a job now (Ray titles a busy worker after its task)."""
    for pid in descendants(raylet_pid):
        try:
            if b"_ray_job" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
        except OSError:
            continue
    return False


def test_a_grid_on_two_ray_nodes_spreads_survives_a_killed_raylet_and_loses_nothing(tmp_path, pg_url):
    if not Path("/proc/self/stat").is_file():
        pytest.skip("finding the second node's busy workers reads /proc (Linux)")
    from ray.cluster_utils import Cluster

    g = tmp_path / "g.yaml"
    g.write_text(GRID)
    reference_db = tmp_path / "reference.db"
    run_grid(load_grid(g), Store(str(reference_db)), log=lambda *_: None)  # the uninterrupted rows, local executor
    reference = stored_rows(str(reference_db))

    fast_failure = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500, "health_check_failure_threshold": 4}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False, "_system_config": fast_failure})
    proc = None
    try:
        second = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes(timeout=120)
        head_id, second_id = cluster.head_node.node_id, second.node_id
        raylet = second.all_processes["raylet"][0].process.pid

        # a weights file the node lacks: the job fails, its reason naming the file (and the node)
        clf = tmp_path / "w" / "digits-cnn.pt"
        clf.parent.mkdir()
        for suffix in (".pt", ".json"):
            shutil.copy(WEIGHTS / f"digits-cnn{suffix}", clf.with_suffix(suffix))
        missing = tmp_path / "missing.yaml"
        missing.write_text(f"n_examples: 8\ndefenses: [none]\nthreats: [preprocessor-blind]\ndatasets: [digits]\n"
                           f"classifiers:\n  - name: digits-cnn\n    weights: {clf}\n")
        spec = load_grid(missing)

        class NodeLacksIt(RayExecutor):
            """The driver resolves the job with the file; then it is gone, as on a node without it."""

            def run(self, tasks, url, on_event, start=None):
                def start_then_remove(t):
                    started = start(t)
                    clf.unlink()
                    return started

                return super().run(tasks, url, on_event, start=start_then_remove)

        summary = run_grid(spec, Store(pg_url), executor=NodeLacksIt(cluster.address, 0.0), log=lambda *_: None)
        assert summary.counts() == {"failed": 1}
        (failed,) = Store(pg_url, read_only=True).jobs(status="failed")
        assert str(clf) in failed.reason and "on Ray node" in failed.reason and "does not exist" in failed.reason

        proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "grid", str(g), "--db", pg_url, "--executor", "ray",
                                 "--address", cluster.address], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        deadline, killed = time.time() + 600, False
        while time.time() < deadline and proc.poll() is None and not killed:
            time.sleep(0.3)
            try:
                jobs = Store(pg_url, read_only=True).jobs()
            except Exception:  # the grid has not created its first job yet
                continue
            on_second = [j for j in jobs if j.status == "done" and (j.environment or {}).get("ray_node_id") == second_id]
            partial = [j for j in jobs if j.status == "running"]
            if on_second and partial and _executing(raylet):
                os.kill(raylet, signal.SIGKILL)  # the second node's raylet, mid-job: its workers die with it
                killed = True
        out, _ = proc.communicate(timeout=600)
        assert killed, f"the grid ended before the second node could be killed:\n{out[-3000:]}"
        assert proc.returncode == 0, out[-3000:]
        assert "lost    toy-slow" in out, out[-3000:]  # the driver saw the task lost and resubmitted it
        st = Store(pg_url, read_only=True)
        done = [j for j in st.jobs(status="done") if j.defense == "toy-slow"]
        assert len(done) == 6
        ran_on = {j.environment["ray_node_id"] for j in done}
        assert ran_on == {head_id, second_id}  # spread on both nodes, each job recording its node
        rerun = [j for j in done if len(j.environment["ray_nodes"]) > 1]
        assert rerun and all(j.environment["ray_nodes"][0] == second_id and j.environment["ray_node_id"] == head_id for j in rerun)
        assert all(j.environment["tf32_during_evaluation"] is False for j in done)
        rows = [r for r in stored_rows(pg_url) if r[0] in {j.id for j in done}]
        assert rows == reference  # nothing lost, nothing twice: the rows of an uninterrupted run
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        cluster.shutdown()
