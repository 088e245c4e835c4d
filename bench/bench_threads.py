"""Torch threads and the OpenMP wait policy beside a busy process: why a cell slowed ninefold on a shared CPU.

    python bench/bench_threads.py                 # every combination, quiet and beside one busy process
    python bench/bench_threads.py --seconds 3 --threads 1,2 --policies active,passive

The workload is what dominates the harness's CPU time: forward and backward passes of a
small convolutional UNet-like network on a batch of 32x32 images (many short parallel
regions, as the diffusion purifiers' steps are). Each combination of torch threads and
``OMP_WAIT_POLICY`` runs in a fresh interpreter (OpenMP reads the policy once, when it
starts), first alone, then beside one busy single-threaded process (a Python loop), and
prints seconds per pass and the slowdown. PyTorch's CPU wheels use GNU OpenMP: with the
policy unset or ``active``, a thread that reaches a barrier first spins, so when one of
the threads has lost its core to another process, every parallel region waits for it to
be scheduled again while its partners burn the remaining core spinning; with ``passive``
the waiting threads sleep and the slowdown follows the load.

The numbers are only as quiet as the machine: the script prints the one-minute load
average before each measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def workload(seconds: float) -> dict:
    """Passes of a small conv net (forward and backward) for about ``seconds``; seconds per pass."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.SiLU(), nn.Conv2d(64, 64, 3, padding=1), nn.SiLU(),
        nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.SiLU(), nn.Conv2d(128, 128, 3, padding=1), nn.SiLU(),
        nn.ConvTranspose2d(128, 64, 4, stride=2, padding=1), nn.SiLU(), nn.Conv2d(64, 3, 3, padding=1),
    )
    x = torch.rand(8, 3, 32, 32, requires_grad=True)
    for _ in range(3):  # warm-up
        net(x).square().mean().backward()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        net(x).square().mean().backward()
        n += 1
    return {"threads": torch.get_num_threads(), "s_per_pass": (time.perf_counter() - t0) / n, "passes": n}


def measure(threads: int, policy: str, seconds: float, busy: bool) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if policy == "unset":
        env.pop("OMP_WAIT_POLICY", None)
    else:
        env["OMP_WAIT_POLICY"] = policy.upper()
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        time.sleep(0.5 if busy else 0)
        load = os.getloadavg()[0]
        out = subprocess.run([sys.executable, __file__, "--child", str(seconds)], env=env, capture_output=True, text=True,
                             check=True).stdout
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    return {**json.loads(out.strip().splitlines()[-1]), "policy": policy, "busy": busy, "load_1min": round(load, 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default=f"1,{os.cpu_count() or 1}")
    p.add_argument("--policies", default="unset,passive")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--child", type=float, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child is not None:
        print(json.dumps(workload(a.child)))
        return 0
    for t in sorted({int(x) for x in a.threads.split(",")}):
        for policy in a.policies.split(","):
            quiet = measure(t, policy, a.seconds, busy=False)
            loaded = measure(t, policy, a.seconds, busy=True)
            print(json.dumps({"threads": t, "OMP_WAIT_POLICY": policy, "quiet_s": round(quiet["s_per_pass"], 4),
                              "beside_busy_s": round(loaded["s_per_pass"], 4),
                              "slowdown": round(loaded["s_per_pass"] / quiet["s_per_pass"], 2),
                              "load_1min": [quiet["load_1min"], loaded["load_1min"]]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
