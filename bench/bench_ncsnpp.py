"""Time and peak memory of one full-gradient DiffPure step through the full-size DDPM++; prints one JSON object.

The network is :class:`defenses.networks.ncsnpp.NCSNpp` with the DDPM++ deep continuous
config of DiffPure's ``checkpoint_8.pth`` (106.6 M parameters), randomly initialised (the
cost does not depend on the weights). One step is what an adaptive attack pays per
gradient: purify a batch along the ``full`` path (forward noising, then N Euler-Maruyama
steps over [1e-5, t*], each a ``torch.utils.checkpoint`` segment with ``--checkpoint``),
a scalar loss, and the backward pass to the input.

Memory (after an untimed warm-up step): on CUDA ``torch.cuda.max_memory_allocated``
above the memory allocated before the step (the weights and the input); on CPU the
growth of the resident set during the step (``ru_maxrss`` minus the RSS just before it), in a process
started with glibc's ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors leave the
resident set (torch's CPU allocator is invisible to ``tracemalloc``), as in
``bench/bench_diffusion.py``.

Usage::

    python bench/bench_ncsnpp.py --steps 100 --batch 8 --device cuda
    python bench/bench_ncsnpp.py --steps 2 --batch 1 --nf 32 --num-res-blocks 1    # a CPU smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_diffusion import _rss_mb  # noqa: E402  (the same RSS probe as the UNet benchmark)

_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def build(args):
    """DiffPure over a random full-size DDPM++ (or one with --nf / --num-res-blocks), on ``args.device``, and an input batch."""
    import defenses  # noqa: F401
    from defenses import _diffusion as D
    from defenses.diffpure import DiffPure
    from defenses.networks.ncsnpp import DDPMPP_DEEP_CONTINUOUS, NCSNpp
    from harness.core.defense import SetupContext

    cfg = DDPMPP_DEEP_CONTINUOUS
    if args.nf or args.num_res_blocks:
        cfg = dataclasses.replace(cfg, nf=args.nf or cfg.nf, num_res_blocks=args.num_res_blocks or cfg.num_res_blocks)
    torch.manual_seed(0)
    net = NCSNpp(cfg)
    dt = (args.t_star - D.T_END) / args.steps
    d = DiffPure.from_dict({"t_star": args.t_star, "dt": dt, "checkpoint": args.checkpoint}).use_backbone(net)
    dev = torch.device(args.device)
    d.setup(SetupContext(classifier=None, dataset="bench", image_shape=(3, 32, 32), num_classes=10, device=dev))
    assert d.nfe_per_call == args.steps, (d.nfe_per_call, args.steps)
    x = torch.rand(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(dev)
    return d.eval(), x, cfg, sum(p.numel() for p in net.parameters())


def full_gradient_step(d, x: torch.Tensor, warmup: bool) -> tuple[float, float, str, str]:
    """One full-gradient step of defense ``d`` on ``x`` (after an untimed one with ``warmup``).

    Returns:
        (seconds, peak MiB above the pre-step level, device name, how the memory was measured).
    """
    dev = x.device
    g = torch.Generator(device=dev)

    def step():
        xx = x.clone().requires_grad_(True)
        out = d.purify_along(xx, "full", generator=g.manual_seed(0))
        (grad,) = torch.autograd.grad(out.square().sum(), xx)
        return grad

    if dev.type == "cuda":
        if warmup:
            step()  # cuDNN autotuning and the caching allocator's first growth
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        grad = step()
        torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        device = torch.cuda.get_device_name(dev)
        memory = "cuda max_memory_allocated above the pre-step allocation"
    else:
        if warmup:
            step()  # lazily loaded kernels and thread pools stay resident: count them before, not in, the step
        before = _rss_mb()
        t0 = time.perf_counter()
        grad = step()
        secs = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before  # ru_maxrss is KiB on Linux
        device = "cpu"
        memory = "RSS growth during the step (ru_maxrss - RSS before), large blocks mmap'd"
    assert torch.isfinite(grad).all()
    return secs, peak, device, memory


def measure(args) -> dict:
    """One full-gradient step: seconds and peak memory (MiB) above the pre-step level."""
    d, x, cfg, n_params = build(args)
    secs, peak, device, memory = full_gradient_step(d, x, args.warmup)
    full = (cfg.nf, cfg.num_res_blocks) == (128, 8)
    return {
        "model": f"NCSN++ nf={cfg.nf} num_res_blocks={cfg.num_res_blocks}" + (" (DDPM++ deep continuous)" if full else "")
        + ", random init",
        "parameters": n_params, "device": device, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "batch": args.batch, "steps": args.steps, "t_star": args.t_star, "checkpoint": args.checkpoint, "path": "full",
        "grad_step_s": round(secs, 3), "s_per_image_step": round(secs / (args.batch * args.steps), 5),
        "peak_mem_mb": round(peak, 1), "peak_mem_mb_per_image": round(peak / args.batch, 2), "memory": memory,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100, help="Euler-Maruyama steps over [1e-5, t*] (100 = DiffPure at t*=0.1)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--t-star", type=float, default=0.1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--checkpoint", action=argparse.BooleanOptionalAction, default=True, help="checkpoint every solver step")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True, help="one untimed step first")
    p.add_argument("--nf", type=int, default=None, help="smaller network for a smoke run (default: 128, the checkpoint's)")
    p.add_argument("--num-res-blocks", type=int, default=None, help="smaller network for a smoke run (default: 8)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1:
        p.error("--steps and --batch must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.device(args.device).type == "cpu" and not args.child:
        # ru_maxrss is a process-lifetime peak, and glibc keeps freed pages: measure in a fresh process
        cmd = [sys.executable, __file__, "--child", *(argv if argv is not None else sys.argv[1:])]
        print(subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, **_MALLOC_ENV}).stdout.strip())
        return 0
    print(json.dumps(measure(args), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
