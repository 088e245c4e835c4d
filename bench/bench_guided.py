"""Peak memory of DiffPure's full gradient through the guided-diffusion UNet at 15 and 150 solver steps; prints JSON.

The purifier is ``diffpure`` with ``backbone=guided-diffusion`` as on ImageNet: t* = 0.15,
images resized to the UNet's side and back (224 -> 256 at full size; 56 -> 64 with the
reduced model, the same ratio), the ``full`` gradient path (autograd through every
Euler-Maruyama step with the noise fixed), checkpointed (one checkpoint per step below
32 steps, ceil(sqrt(N)) segments from 32 on: ``defenses._diffusion.checkpointed_steps``).
One measurement is one gradient step (purify, a scalar loss, the backward pass to the
input), after an untimed warm-up, as in ``bench/bench_ncsnpp.py`` (whose probe it uses):
on CPU each step count runs in a fresh process and the memory is the growth of the
resident set; on CUDA ``max_memory_allocated`` above the pre-step allocation.

The claim it checks: memory stays flat in the number of solver steps, so DiffPure's 150
steps at 256x256 cost about what 15 do; ``ratio`` is peak(150) / peak(15).

- ``--model small64`` (the CPU default): the reduced 64x64 configuration of
  ``shared/fixtures/guided_diffusion`` (1.6 M parameters), randomly initialised;
- ``--model full`` (the CUDA default): OpenAI's 256x256 unconditional model
  (552.8 M parameters, randomly initialised: the cost does not depend on the weights),
  in DiffPure's fp16 mode unless ``--no-fp16``.

Usage::

    python bench/bench_guided.py                       # CPU, reduced model, 15 and 150 steps
    python bench/bench_guided.py --device cuda         # GPU, the full model, batch 1
    python bench/bench_guided.py --device cuda --batch 4 --steps 15,150
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_ncsnpp import _MALLOC_ENV, full_gradient_step  # noqa: E402  (the same probe as the NCSN++ bench)

#: The reduced 64x64 model of the fixtures (uncond64_small.config.json), as a GuidedDiffusionConfig.
SMALL64 = dict(image_size=64, model_channels=32, num_res_blocks=2, channel_mult=(1, 1, 1, 2), attention_resolutions=(4, 8),
               num_head_channels=16, use_fp16=False)


def build(args, steps: int):
    """DiffPure over a random guided-diffusion UNet on ``args.device`` and an input batch at the data's size."""
    import defenses  # noqa: F401
    from defenses import _diffusion as D
    from defenses.diffpure import DiffPure
    from defenses.networks.guided_diffusion import UNCOND_256, GuidedDiffusionUNet
    from harness.core.defense import SetupContext

    cfg = UNCOND_256 if args.model == "full" else dataclasses.replace(UNCOND_256, **SMALL64)
    cfg = dataclasses.replace(cfg, use_fp16=args.fp16 if args.fp16 is not None else cfg.use_fp16)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    net = GuidedDiffusionUNet(cfg)
    if cfg.use_fp16:
        net.convert_to_fp16()
    side = cfg.image_size * 7 // 8  # 224 for 256, 56 for 64: DiffPure's resize ratio
    dt = (args.t_star - D.T_END) / steps
    d = DiffPure.from_dict({"t_star": args.t_star, "dt": dt, "checkpoint": True}).use_backbone(net)
    d.setup(SetupContext(classifier=None, dataset="imagenet", image_shape=(3, side, side), num_classes=1000, device=dev))
    assert d.nfe_per_call == steps, (d.nfe_per_call, steps)
    x = torch.rand(args.batch, 3, side, side, generator=torch.Generator().manual_seed(1)).to(dev)
    return d.eval(), x, cfg, sum(p.numel() for p in net.parameters())


def measure(args, steps: int) -> dict:
    """One full-gradient step at ``steps`` solver steps: seconds and peak memory (MiB)."""
    d, x, cfg, n_params = build(args, steps)
    secs, peak, device, memory = full_gradient_step(d, x, args.warmup)
    return {"steps": steps, "grad_step_s": round(secs, 3), "peak_mem_mb": round(peak, 1), "device": device, "memory": memory,
            "model": f"guided-diffusion {args.model} ({cfg.image_size}x{cfg.image_size}, {n_params} parameters, "
                     f"{'fp16' if cfg.use_fp16 else 'float32'}), random init", "data_side": x.shape[-1]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", choices=["small64", "full"], default=None, help="default: small64 on cpu, full on cuda")
    p.add_argument("--steps", default="15,150", help="comma-separated solver step counts (the first is the ratio's base)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--t-star", type=float, default=0.15, help="DiffPure's ImageNet t*")
    p.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=None, help="default: the model's (full: fp16)")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True, help="one untimed step first")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.model = args.model or ("full" if torch.device(args.device).type == "cuda" else "small64")
    steps = [int(s) for s in args.steps.split(",") if s.strip()]
    if not steps or min(steps) < 1 or args.batch < 1:
        p.error("--steps and --batch must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child is not None:
        print(json.dumps(measure(args, args.child)))
        return 0
    rows = []
    for n in steps:
        if torch.device(args.device).type == "cpu":
            # ru_maxrss is a process-lifetime peak and glibc keeps freed pages: one fresh process per step count
            own = [a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--child")]
            cmd = [sys.executable, __file__, *own, "--child", str(n)]
            res = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, **_MALLOC_ENV})
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        else:
            rows.append(measure(args, n))
    base = rows[0]["peak_mem_mb"]
    out = {"model": rows[0]["model"], "device": rows[0]["device"], "torch": torch.__version__, "batch": args.batch,
           "t_star": args.t_star, "path": "full, checkpointed", "memory": rows[0]["memory"],
           "runs": [{k: r[k] for k in ("steps", "grad_step_s", "peak_mem_mb")} for r in rows],
           "ratio": {f"{r['steps']}/{rows[0]['steps']}": round(r["peak_mem_mb"] / base, 3) if base > 0 else None for r in rows[1:]}}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
