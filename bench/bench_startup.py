"""Start-up cost of the embedded default job; prints one JSON object.

    python bench/bench_startup.py [--repeats 3]

Measured in fresh interpreters (the median of ``--repeats``), all with
``OMP_NUM_THREADS=1``:

- ``python_s``: an empty interpreter (the floor);
- ``import_torch_s``: ``import torch`` alone (what every run pays);
- ``run_help_s``: ``harness run --help`` (the CLI without torch);
- ``dry_run_s``: ``harness run --defense none --threat preprocessor-blind --dry-run``:
  the CLI, every import a run needs, and the resolution of the job (data, classifier,
  plugins, identity), i.e. the whole start-up of ``make run`` before its first batch;
- ``resolve_s``: ``resolve()`` of that job inside a process that has already imported the
  harness (so it is the resolution alone);
- ``importtime_top``: the largest cumulative entries of ``python -X importtime`` for the
  dry run, in seconds, and ``heavy_modules_imported``: which of scikit-learn, scipy,
  pandas, ray, streamlit, robustbench, diffusers the dry run imported (should be none).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
HEAVY = ("sklearn", "scipy", "pandas", "ray", "streamlit", "robustbench", "diffusers")
DRY = ["-m", "harness.cli", "run", "--defense", "none", "--threat", "preprocessor-blind", "--dry-run"]

_RESOLVE = """
import time, json, sys
from harness.evaluation import RunConfig, resolve
import harness.cli.run
t0 = time.perf_counter()
resolve(RunConfig(defense="none", threat="preprocessor-blind", dataset="digits"))
t1 = time.perf_counter()
print(json.dumps({"resolve_s": t1 - t0}))
"""


def _wall(args: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, *args], check=True, capture_output=True, env=ENV, cwd=ROOT)
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times), 3)


def _importtime(top: int) -> tuple[dict[str, float], list[str]]:
    code = ("import runpy, sys, json\nsys.argv = ['harness'] + " + json.dumps(DRY[2:]) + "\n"
            "try:\n    runpy.run_module('harness.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})), file=sys.stderr)")
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", code], check=True, capture_output=True, text=True,
                         env=ENV, cwd=ROOT).stderr.splitlines()
    mods = set(json.loads(err[-1]))
    rows = []
    for line in err:
        if line.startswith("import time:") and "|" in line:
            _, cum, name = line.split("|")
            if cum.strip().isdigit():
                rows.append((int(cum) / 1e6, name.rstrip()))
    rows.sort(reverse=True)
    return {n.strip(): round(s, 3) for s, n in rows[:top]}, sorted(mods & set(HEAVY))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--top", type=int, default=8, help="importtime entries to print")
    a = p.parse_args(argv)
    resolve_s = []
    for _ in range(a.repeats):
        out = subprocess.run([sys.executable, "-c", _RESOLVE], check=True, capture_output=True, text=True, env=ENV, cwd=ROOT)
        resolve_s.append(json.loads(out.stdout.strip().splitlines()[-1])["resolve_s"])
    top, heavy = _importtime(a.top)
    report = {
        "python_s": _wall(["-c", "pass"], a.repeats),
        "import_torch_s": _wall(["-c", "import torch"], a.repeats),
        "run_help_s": _wall(["-m", "harness.cli", "run", "--help"], a.repeats),
        "dry_run_s": _wall(DRY, a.repeats),
        "resolve_s": round(statistics.median(resolve_s), 3),
        "heavy_modules_imported": heavy,
        "importtime_top": top,
        "repeats": a.repeats,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    report["dry_run_minus_torch_s"] = round(report["dry_run_s"] - report["import_torch_s"], 3)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
