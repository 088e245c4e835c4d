"""The guided-diffusion UNet (defenses.networks.guided_diffusion) against the reference fixtures, and its use by the purifiers.

The fixtures (``$HARNESS_SHARED/fixtures/guided_diffusion``, see its README) describe
OpenAI's 256x256 unconditional model as DiffPure builds it: every state_dict key, the
module tree and the per-block shapes and dtypes in DiffPure's fp16 mode (checked here on
the meta device: no 2 GB allocation), and two reduced models with seeded weights and the
reference code's outputs in float32, float64 and its CPU fp16 path, input gradients, and
DiffPure's own reverse-SDE quantities and a 10-step purification with its Brownian
increments. Tolerances are the README's measured spreads (section 5): float32 within
1e-5 of both references, float64 within 1e-12, fp16 within 1.5x the reference fp16
path's own distance to float64.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import defenses  # noqa: F401  (registers the defenses)
from defenses import _diffusion as D
from defenses.coup import COUP
from defenses.diffpure import DiffPure, DiffPureDDPM
from defenses.networks import guided_diffusion as G
from harness.core.defense import GradientPath, SetupContext
from harness.core.env import sha256_file
from harness.core.registry import HarnessError, MissingFileError

SMALL = ("uncond32_small", "uncond64_small")


@pytest.fixture(scope="module")
def fx(shared_dir) -> Path:
    if shared_dir is None:
        pytest.skip("HARNESS_SHARED is not set (CI sets it): the guided-diffusion reference fixtures are unavailable")
    path = shared_dir / "fixtures" / "guided_diffusion"
    assert path.is_dir(), f"HARNESS_SHARED={shared_dir} is set but fixtures/guided_diffusion is missing there"
    return path


def _json(fx: Path, name: str) -> dict:
    return json.loads((fx / name).read_text())


def small_config(fx: Path, stem: str) -> G.GuidedDiffusionConfig:
    return G.GuidedDiffusionConfig.from_flags(_json(fx, f"{stem}.config.json")["create_model_arguments"])


def small_net(fx: Path, stem: str = "uncond32_small", dtype: torch.dtype = torch.float32) -> G.GuidedDiffusionUNet:
    net = G.GuidedDiffusionUNet(small_config(fx, stem)).to(dtype)
    net.load_state_dict(torch.load(fx / f"{stem}.pt", weights_only=True), strict=True)
    return net.eval()


def io(fx: Path, stem: str) -> dict:
    return torch.load(fx / f"{stem}.io.pt", weights_only=True)


def maxabs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# --------------------------------------------------------------------------- full size (meta device)
def full_meta(fp16: bool = False) -> G.GuidedDiffusionUNet:
    with torch.device("meta"):
        net = G.GuidedDiffusionUNet(G.UNCOND_256)
    return net.convert_to_fp16() if fp16 else net


def test_the_preset_is_diffpures_imagenet_model(fx):
    doc = _json(fx, "uncond256.config.json")
    assert G.GuidedDiffusionConfig.from_flags(doc["create_model_arguments"]) == G.UNCOND_256
    # the same from DiffPure's configs/imagenet.yml over model_and_diffusion_defaults()
    merged = {**doc["model_and_diffusion_defaults"], **doc["diffpure_configs_imagenet_yml"]["model"]}
    flags = {k: merged[k] for k in doc["create_model_arguments"]}
    assert G.GuidedDiffusionConfig.from_flags(flags, base=G.GuidedDiffusionConfig(image_size=64)) == G.UNCOND_256
    ctor = doc["unet_model_constructor_arguments"]
    for k in ("image_size", "in_channels", "model_channels", "out_channels", "num_res_blocks", "dropout", "conv_resample",
              "num_heads", "num_head_channels", "use_scale_shift_norm", "resblock_updown", "use_new_attention_order"):
        assert getattr(G.UNCOND_256, k) == ctor[k], k
    assert G.UNCOND_256.attention_resolutions == tuple(ctor["attention_resolutions"])
    assert G.UNCOND_256.channel_mult == tuple(ctor["channel_mult"])
    with pytest.raises(HarnessError, match="class_cond"):
        G.GuidedDiffusionConfig.from_flags({"class_cond": True})
    with pytest.raises(HarnessError, match="unknown model flag"):
        G.GuidedDiffusionConfig.from_flags({"num_chanels": 8})
    with pytest.raises(HarnessError, match="no default channel_mult"):
        G.GuidedDiffusionConfig.from_flags({"image_size": 32, "channel_mult": ""})


def test_full_size_model_has_every_reference_key_shape_and_fp16_dtype(fx):
    ref = _json(fx, "uncond256.keys.json")
    net = full_meta()
    mine = [{"key": k, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."), "requires_grad": v.requires_grad}
            for k, v in net.state_dict(keep_vars=True).items()]
    assert mine == [{c: k[c] for c in ("key", "shape", "dtype", "requires_grad")} for k in ref["keys"]]  # in order
    assert all(k["kind"] == "parameter" for k in ref["keys"]) and not list(net.buffers())
    assert sum(p.numel() for p in net.parameters()) == ref["num_parameters_total"] == 552_814_086
    for top, n in ref["num_parameters_by_top_level_module"].items():
        assert sum(p.numel() for p in getattr(net, top).parameters()) == n, top
    half = {k: str(v.dtype).removeprefix("torch.") for k, v in net.convert_to_fp16().state_dict().items()}
    assert half == {k["key"]: k["dtype_after_convert_to_fp16"] for k in ref["keys"]}
    assert sum(v == "float16" for v in half.values()) == ref["convert_to_fp16"]["keys_by_dtype_after_conversion"]["float16"]


def _describe(name: str, mod: nn.Module) -> tuple:
    if type(mod).__module__.startswith("torch.nn") and not isinstance(mod, G.GroupNorm32):
        return type(mod).__name__, None if isinstance(mod, (nn.ModuleList, nn.Sequential)) else repr(mod)
    if isinstance(mod, G.GroupNorm32):
        return "GroupNorm32", f"GroupNorm32({mod.num_groups}, {mod.num_channels}, eps={mod.eps}, affine={mod.affine})"
    if isinstance(mod, G.ResBlock):
        skip = "identity" if isinstance(mod.skip_connection, nn.Identity) else "conv1x1"
        return "ResBlock", (mod.channels, mod.out_channels, mod.up, mod.down, mod.use_scale_shift_norm, skip)
    if isinstance(mod, G.AttentionBlock):
        return "AttentionBlock", (mod.channels, mod.num_heads, type(mod.attention).__name__)
    if isinstance(mod, (G.Upsample, G.Downsample)):
        return type(mod).__name__, (mod.channels, mod.out_channels, mod.use_conv)
    if isinstance(mod, G.QKVAttentionLegacy):
        return type(mod).__name__, mod.n_heads
    return type(mod).__name__, None


def _describe_ref(m: dict) -> tuple:
    cls, a = m["cls"], m["attrs"]
    if cls == "GroupNorm32":
        return cls, f"GroupNorm32({a['num_groups']}, {a['num_channels']}, eps={a['eps']}, affine={a['affine']})"
    if m["py_module"].startswith("torch.nn"):
        return cls, m["repr"]
    if cls == "ResBlock":
        skip = {"identity": "identity"}.get(a["skip_connection"], "conv1x1")
        return cls, (a["channels"], a["out_channels"], a["up"], a["down"], a["use_scale_shift_norm"], skip)
    if cls == "AttentionBlock":
        return cls, (a["channels"], a["num_heads"], a["attention_class"])
    if cls in ("Upsample", "Downsample"):
        return cls, (a["channels"], a["out_channels"], a["use_conv"])
    if cls == "QKVAttentionLegacy":
        return cls, a["n_heads"]
    return cls, None


@pytest.mark.parametrize("stem", ["uncond256", *SMALL])
def test_module_tree_matches_the_reference(fx, stem):
    """Names, classes, and every layer's hyperparameters (kernel, stride, padding, groups, heads, up/down, skip)."""
    if stem == "uncond256":
        net, modules = full_meta(), _json(fx, "uncond256.keys.json")["modules"]
    else:
        with torch.device("meta"):
            net = G.GuidedDiffusionUNet(small_config(fx, stem))
        modules = _json(fx, f"{stem}.config.json")["modules"]
    ref = {m["name"]: _describe_ref(m) for m in modules if m["name"]}
    mine = {k: _describe(k, m) for k, m in net.named_modules() if k}
    assert sorted(mine) == sorted(ref)
    for k in ref:
        assert mine[k] == ref[k], k


def test_full_size_blocks_in_diffpures_fp16_mode_have_the_reference_shapes_and_dtypes(fx):
    """A 256x256 forward on the meta device after convert_to_fp16: every block's output shape and dtype."""
    ref = _json(fx, "uncond256.keys.json")["blocks_for_a_256x256_input_in_diffpure_fp16_mode"]
    net = full_meta(fp16=True)
    seen = {}
    mods = dict(net.named_modules())
    hooks = [mods[b["name"]].register_forward_hook(lambda m, a, o, n=b["name"]: seen.__setitem__(n, (list(o.shape), o.dtype)))
             for b in ref]
    out = net(torch.empty(1, 3, 256, 256, device="meta"), torch.zeros(1, dtype=torch.long, device="meta"))
    for h in hooks:
        h.remove()
    assert out.shape == (1, 6, 256, 256) and out.dtype == torch.float32
    for b in ref:
        assert seen[b["name"]] == (b["out_shape"], getattr(torch, b["out_dtype_fp16_mode"])), b["name"]


# --------------------------------------------------------------------------- reduced models vs the reference
@pytest.mark.parametrize("stem", SMALL)
def test_reduced_model_reproduces_the_float32_and_float64_references(fx, stem, one_thread):
    state = torch.load(fx / f"{stem}.pt", weights_only=True)
    ref_keys = _json(fx, f"{stem}.config.json")["keys"]
    fresh = G.GuidedDiffusionUNet(small_config(fx, stem))
    assert list(state) == list(fresh.state_dict()) == [k["key"] for k in ref_keys]
    # the zero-initialised layers (zero_module) and the GroupNorm biases, as the reference constructs them
    assert [k for k, v in fresh.state_dict().items() if not v.any()] == [k["key"] for k in ref_keys if k["zero_at_init"]]
    result = fresh.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    net, net64, d = fresh.eval(), small_net(fx, stem, torch.float64), io(fx, stem)
    for i in range(d["num_cases"]):
        x, t = d[f"x{i}"], d[f"t{i}"]
        with torch.no_grad():
            out, out64 = net(x, t), net64(x.double(), t)
            emb = G.timestep_embedding(t, net.config.model_channels)
            temb = net.time_embed(emb)
        assert out.dtype == torch.float32 and out.shape == d[f"out{i}_float32"].shape
        assert maxabs(out, d[f"out{i}_float32"]) < 1e-5 and maxabs(out, d[f"out{i}_float64"]) < 1e-5
        assert out64.dtype == torch.float64 and maxabs(out64, d[f"out{i}_float64"]) < 1e-12
        assert torch.equal(emb, d[f"timestep_embedding{i}"])  # cos first, exponent over half, raw step index
        assert maxabs(temb, d[f"time_embed{i}"]) < 1e-6
        with torch.no_grad():  # float and integer timesteps give the same output (the embedding takes .float())
            assert torch.equal(net(x, t.float()), out)


@pytest.mark.parametrize("stem", SMALL)
def test_every_block_output_has_the_reference_statistics(fx, stem, one_thread):
    net, d = small_net(fx, stem), io(fx, stem)
    mods = dict(net.named_modules())
    for i in range(d["num_cases"]):
        outs = []
        hooks = [mods[n].register_forward_hook(lambda m, a, o: outs.append(o.detach().double())) for n in d["trace_names"]]
        with torch.no_grad():
            net(d[f"x{i}"], d[f"t{i}"])
        for h in hooks:
            h.remove()
        assert [list(o.shape) for o in outs] == d["trace_shapes"]
        stats = torch.stack([torch.stack([o.mean(), o.std(), o.abs().mean(), o.min(), o.max()]) for o in outs])
        torch.testing.assert_close(stats, d[f"trace{i}_stats_float64"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("stem", SMALL)
def test_fp16_mode_matches_the_reference_fp16_path_within_its_spread(fx, stem, one_thread):
    """DiffPure's mode: torso convolutions in float16; GroupNorm, softmax, embeddings and head in float32."""
    cfg = dataclasses.replace(small_config(fx, stem), use_fp16=True)
    net = G.GuidedDiffusionUNet(cfg)
    net.load_state_dict(torch.load(fx / f"{stem}.pt", weights_only=True), strict=True)
    net.convert_to_fp16().eval()
    dtypes = {k: v.dtype for k, v in net.state_dict().items()}
    half = {k for k, v in dtypes.items() if v == torch.float16}
    assert half and all(k.startswith(("input_blocks", "middle_block", "output_blocks")) for k in half)
    assert all(dtypes[k] == torch.float32 for k in dtypes if k.startswith(("time_embed", "out.")) or ".norm." in k
               or "emb_layers" in k or "layers.0." in k)
    assert net.dtype == torch.float16
    d, f32 = io(fx, stem), small_net(fx, stem)
    for i in range(d["num_cases"]):
        with torch.no_grad():
            out, ref32 = net(d[f"x{i}"], d[f"t{i}"]), f32(d[f"x{i}"], d[f"t{i}"])
        assert out.dtype == torch.float32
        spread = maxabs(d[f"out{i}_float16_cpu"], d[f"out{i}_float64"])  # the reference's own fp16 error (2e-3 .. 4e-3)
        assert maxabs(out, d[f"out{i}_float64"]) < 1.5 * spread
        assert maxabs(out, d[f"out{i}_float16_cpu"]) < 1.5 * spread
        assert maxabs(out, ref32) > 1e-4  # it does compute in half precision


def test_input_gradients_match_the_reference_with_frozen_parameters(fx, one_thread):
    """The reference's attention checkpoint cannot differentiate to the input with frozen parameters; this network can."""
    d = io(fx, "uncond32_small")
    for frozen in (True, False):
        net = small_net(fx).requires_grad_(not frozen)
        for i in range(d["num_cases"]):
            x = d[f"x{i}"].clone().requires_grad_(True)
            (grad,) = torch.autograd.grad((net(x, d[f"t{i}"]) * d[f"grad_cotangent{i}"]).sum(), x)
            # README: float32 vs float64 gradients differ by up to 2.9e-5 (max |grad| ~ 4.8)
            assert maxabs(grad, d[f"grad{i}_float64"]) < 1e-4 and maxabs(grad, d[f"grad{i}_float32"]) < 1e-4
    assert all(p.grad is None for p in net.parameters())


def test_buffers_and_dtype_follow_the_module():
    """GPU readiness without a GPU: a meta forward mixes in no host tensor, in float32 and in fp16 mode."""
    cfg = G.GuidedDiffusionConfig(image_size=16, model_channels=32, num_res_blocks=1, channel_mult=(1, 2),
                                  attention_resolutions=(2,), num_head_channels=16, use_fp16=False)
    with torch.device("meta"):
        net = G.GuidedDiffusionUNet(cfg)
    assert net(torch.empty(2, 3, 16, 16, device="meta"), torch.empty(2, device="meta")).device.type == "meta"
    # resblock_updown False and the new attention order build and run too (the reduced fixtures cover neither)
    torch.manual_seed(0)
    other = G.GuidedDiffusionUNet(dataclasses.replace(cfg, resblock_updown=False, use_new_attention_order=True))
    assert isinstance(other.input_blocks[2][0], G.Downsample) and isinstance(other.output_blocks[1][-1], G.Upsample)
    assert other(torch.rand(1, 3, 16, 16), torch.tensor([3])).shape == (1, 6, 16, 16)


# --------------------------------------------------------------------------- DiffPure's call convention
def diffpure_fx(fx: Path) -> dict:
    return torch.load(fx / "uncond32_small.diffpure.pt", weights_only=True)


def test_reverse_sde_timestep_eps_score_drift_and_diffusion_are_diffpures(fx, one_thread):
    """At t = 0.15 and 0.0421: UNet step floor(1000 t) (int64), eps = channels 0-2, score with the continuous alpha_bar."""
    dp, net = diffpure_fx(fx), small_net(fx)
    eps_net = D.EpsNet(net)
    for b, t in enumerate(dp["rev_t"].tolist()):
        x = dp["rev_x"][b : b + 1]
        steps = G.GuidedDiffusionUNet.vp_timesteps(t, x)
        assert steps.dtype == torch.int64 and steps.tolist() == [dp["rev_model_timesteps"][b].item()]
        with torch.no_grad():
            assert maxabs(net(x, steps), dp["rev_model_out"][b : b + 1]) < 1e-5
            sde = D.ReverseVPSDE(eps_net, (3, 32, 32), t_start=t, n_steps=1)
            per_time = sde.drift(0.0, x) / sde.h  # beta/2 x + beta score = minus DiffPure's reverse drift
        beta = D.beta_t(t)
        assert maxabs(per_time, -dp["rev_drift"][b : b + 1]) < 1e-4
        assert maxabs((per_time - 0.5 * beta * x) / beta, dp["rev_score"][b : b + 1]) < 1e-4
        assert math.sqrt(beta) == pytest.approx(dp["rev_diffusion"][b].item(), rel=1e-6)


def test_ten_step_purification_replays_diffpures_torchsde_solve(fx, one_thread):
    """Its tau grid, its Brownian increments: the same 10 UNet timesteps and the same output (float32 spread)."""
    dp, net = diffpure_fx(fx), small_net(fx)
    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 5e-6)):  # DiffPure's float32 schedule; the harness's float64
        a = D.discrete_alpha_bar(dtype)[D.timestep_index(0.01) - 1]  # --t 10: the discrete alpha_bar at index 9
        x_init = a.sqrt() * dp["purify_t10_x0"] + (1 - a).sqrt() * dp["purify_t10_noise"]
        assert maxabs(x_init, dp["purify_t10_x_init"]) < tol, dtype
    times = (1 - dp["purify_t10_tprime_grid"]).tolist()  # t = 1 - tau, exact in float32
    sde = D.ReverseVPSDE(D.EpsNet(net), (3, 32, 32), times[0], 10, times[-1], times=times)
    increments = dp["purify_t10_brownian_increments"]
    noise = [increments[k] / math.sqrt(sde.step_size(k)) for k in range(10)]  # standard normal: W_k / sqrt(dt_k)
    seen = []
    hook = net.register_forward_pre_hook(lambda m, args: seen.append(args[1].tolist()))
    with torch.no_grad():
        out = D.integrate_em(sde, dp["purify_t10_x_init"], noise, checkpoint=False)
    hook.remove()
    # torchsde's first call is a shape check at tau_0; the 10 steps are the rest
    assert seen == [[s, s] for s in dp["purify_t10_model_timesteps"][1:].tolist()]
    assert maxabs(out, dp["purify_t10_out"]) < 1e-5 and maxabs(out, dp["purify_t10_replay_out"]) < 1e-5
    # the checkpointed autograd path of the defenses computes the same values
    x = dp["purify_t10_x_init"].clone().requires_grad_(True)
    assert torch.equal(D.integrate_em(sde, x, noise, checkpoint=True).detach(), out)


def test_the_150_step_schedule_against_diffpures(fx):
    """DiffPure's float32 tau grid gives 149, 148, 148, ..., 1; the harness's uniform grid 150, 149, ..., 1.

    They agree from the third step on (docs/imagenet.md).
    """
    dp = diffpure_fx(fx)
    x = torch.zeros(1, 3, 4, 4)
    times = (1 - dp["purify_t150_tprime_grid"]).tolist()
    theirs = dp["purify_t150_model_timesteps"].tolist()
    assert [G.GuidedDiffusionUNet.vp_timesteps(t, x).item() for t in times[:-1]] == theirs[1:]
    d = DiffPure.from_dict({"t_star": 0.15, "dt": 1e-3})
    assert d.nfe_per_call == 150
    sde = D.ReverseVPSDE(None, (3, 4, 4), 0.15, d.nfe_per_call)
    ours = [G.GuidedDiffusionUNet.vp_timesteps(sde.time(k), x).item() for k in range(150)]
    assert ours == list(range(150, 0, -1))
    assert ours[2:] == theirs[3:] and ours[:2] == [150, 149] and theirs[1:3] == [149, 148]


def test_ddpm_path_gets_float_steps_and_the_eps_channels(fx, one_thread):
    """SpacedDiffusion's call (float32 step index) and x0 from channels 0-2, clipped as p_mean_variance does."""
    dp, net = diffpure_fx(fx), small_net(fx)
    x, t = dp["ddpm_x"], dp["ddpm_t"]
    with torch.no_grad():
        eps = D.EpsNet(net)(x, dp["ddpm_model_timesteps"])
    assert eps.shape == x.shape
    a = D.discrete_alpha_bar()[t].view(-1, 1, 1, 1)
    x0 = ((x.double() - (1 - a).sqrt() * eps.double()) / a.sqrt()).clamp(-1, 1)
    assert maxabs(x0, dp["ddpm_pred_xstart"]) < 1e-4


# --------------------------------------------------------------------------- the checkpoint loader
def save_checkpoint(fx: Path, path: Path, *, sidecar: bool = True, perturb: float = 0.0, fp16: bool = False) -> Path:
    """The reduced 32x32 weights saved as OpenAI saves a model (a plain state_dict), with its flags beside it."""
    state = torch.load(fx / "uncond32_small.pt", weights_only=True)
    if perturb:
        state["out.2.bias"] = state["out.2.bias"] + perturb
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    if sidecar:
        flags = {**_json(fx, "uncond32_small.config.json")["create_model_arguments"], "use_fp16": fp16}
        path.with_suffix(".json").write_text(json.dumps({"create_model_arguments": flags}))
    return path


def test_loader_checks_every_key_and_shape_and_loads_the_weights(fx, tmp_path, one_thread):
    ckpt = save_checkpoint(fx, tmp_path / "uncond32.pt")
    net, source = G.load_guided_diffusion(ckpt)
    assert not net.training and net.config == small_config(fx, "uncond32_small") and net.dtype == torch.float32
    assert all(isinstance(p, nn.Parameter) and p.device.type == "cpu" for p in net.parameters())  # nothing left on meta
    d = io(fx, "uncond32_small")
    with torch.no_grad():
        assert maxabs(net(d["x0"], d["t0"]), d["out0_float32"]) < 1e-5
    ident = source["identity"]
    assert source["kind"] == "guided-diffusion" and source["sha256"] == ident["file_sha256"] == sha256_file(ckpt)
    assert ident["architecture_file"] == "uncond32.json" and set(ident["code"]) == {"guided_diffusion.py"}
    # DiffPure's mode from the flags: load in float32, then the torso in float16
    ckpt16 = save_checkpoint(fx, tmp_path / "fp16" / "uncond32.pt", fp16=True)
    net16, src16 = G.load_guided_diffusion(ckpt16)
    assert net16.dtype == torch.float16 and src16["identity"]["config"]["use_fp16"] is True
    # a bare flag object beside the file overrides DiffPure's ImageNet values
    ckpt.with_suffix(".json").write_text(json.dumps({"use_fp16": False}))
    assert G.architecture_beside(ckpt) == (dataclasses.replace(G.UNCOND_256, use_fp16=False), "uncond32.json")


def test_a_file_of_another_architecture_is_refused_with_one_line_naming_the_first_mismatch(fx, tmp_path):
    ckpt = save_checkpoint(fx, tmp_path / "256x256_diffusion_uncond.pt", sidecar=False)  # DiffPure's architecture by default
    with pytest.raises(HarnessError) as err:
        G.load_guided_diffusion(ckpt)
    msg = str(err.value)
    assert "\n" not in msg and "first missing key 'input_blocks.6.0.in_layers.0.weight'" in msg
    assert "256x256_diffusion_uncond.json" in msg and "image_size 256" in msg
    state = torch.load(fx / "uncond32_small.pt", weights_only=True)
    state["out.2.weight"] = state["out.2.weight"][:3]  # a 3-channel head (learn_sigma False)
    torch.save(state, ckpt)
    with pytest.raises(HarnessError, match=r"first shape mismatch 'out.2.weight': file \(3, 32, 3, 3\), network \(6, 32, 3, 3\)"):
        G.load_guided_diffusion(ckpt, small_config(fx, "uncond32_small"))
    state = torch.load(fx / "uncond32_small.pt", weights_only=True)
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, ckpt)
    with pytest.raises(HarnessError, match="first unexpected key 'extra.weight'"):
        G.load_guided_diffusion(ckpt, small_config(fx, "uncond32_small"))
    torch.save({"model": [1, 2]}, ckpt)
    with pytest.raises(HarnessError, match="not a state_dict"):
        G.load_guided_diffusion(ckpt)
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(HarnessError, match="cannot load checkpoint"):
        G.load_guided_diffusion(ckpt)
    with pytest.raises(HarnessError, match="is a folder"):
        G.load_guided_diffusion(tmp_path)
    ckpt.with_suffix(".json").write_text("[1]")
    with pytest.raises(HarnessError, match="not a guided-diffusion architecture"):
        G.architecture_beside(ckpt)
    with pytest.raises(MissingFileError) as err:
        G.load_guided_diffusion(tmp_path / "nope" / "256x256_diffusion_uncond.pt")
    assert "\n" not in str(err.value) and G.CHECKPOINT_URL in str(err.value)


# --------------------------------------------------------------------------- the purifiers with backbone=guided-diffusion
#: A 28x28 RGB dataset in front of the 32x32 reduced model: the adapter's resize is exercised both ways, as 224 <-> 256.
SHAPE = (3, 28, 28)
FAST = {"diffpure": {"t_star": 0.02, "dt": 0.01}, "coup": {"t_star": 0.02, "dt": 0.01},
        "diffpure-ddpm": {"max_timestep": 20, "denoising_steps": 2, "surrogate_steps": 1}}


def _clf() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 28 * 28, 10)).eval()


def _ctx(weights_dir=None, dataset="imagenet") -> SetupContext:
    return SetupContext(classifier=_clf(), dataset=dataset, image_shape=SHAPE, num_classes=1000, weights_dir=weights_dir)


@pytest.mark.parametrize("cls", [DiffPure, DiffPureDDPM, COUP])
def test_purifiers_run_on_a_guided_diffusion_checkpoint_with_diffpures_resize(fx, tmp_path, cls, one_thread):
    ckpt = save_checkpoint(fx, tmp_path / "uncond32.pt")
    d = cls.from_dict({**FAST[cls.name], "model_path": str(ckpt), "backbone": "guided-diffusion"})
    d.setup(_ctx())
    ident = d.identity()
    assert ident["config"]["backbone"] == "guided-diffusion"
    assert ident["backbone_source"]["file_sha256"] == sha256_file(ckpt)
    assert ident["backbone_source"]["code"] == G.network_code_digest()
    # DiffPure's resize: bilinear, align_corners=False, no antialiasing, both ways
    assert d.adapter is not None and d.adapter.antialias is False and "no antialiasing" in " ".join(d.setup_notes)
    x = torch.rand(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    up = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.equal(d.adapt_in(x), up) and torch.equal(d.adapt_out(up), F.interpolate(up, size=(28, 28), mode="bilinear"))
    out = d.purify(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.isfinite(out).all() and 0 <= out.min() and out.max() <= 1
    # the full gradient reaches the input through the frozen network
    assert all(not p.requires_grad for p in d.parameters())
    xx = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(d.purify_along(xx, GradientPath.FULL, generator=torch.Generator().manual_seed(0)).sum(), xx)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_the_checkpoint_is_found_in_the_weights_dir_and_a_missing_one_is_named(fx, tmp_path, monkeypatch):
    name = "256x256_diffusion_uncond.pt"
    save_checkpoint(fx, tmp_path / "w" / "guided_diffusion" / name)
    d = DiffPure.from_dict({**FAST["diffpure"], "backbone": "guided-diffusion"})
    d.setup(_ctx(tmp_path / "w"))
    assert d.backbone_source["name"] == name
    with pytest.raises(MissingFileError) as err:
        DiffPure.from_dict({"backbone": "guided-diffusion"}).setup(_ctx(tmp_path / "empty"))
    msg = str(err.value)
    assert "\n" not in msg and f"{tmp_path / 'empty'}/guided_diffusion/{name}" in msg and G.CHECKPOINT_URL in msg
    # a model_path naming nothing fails when the defense is built (before data and classifier are loaded)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingFileError) as err:
        COUP.from_dict({"backbone": "guided-diffusion", "model_path": f"pretrained/guided_diffusion/{name}"})
    assert str(tmp_path / "pretrained" / "guided_diffusion" / name) in str(err.value) and G.CHECKPOINT_URL in str(err.value)
    with pytest.raises(HarnessError, match="no guided-diffusion checkpoint is known for dataset 'cifar10'"):
        DiffPure.from_dict({"backbone": "guided-diffusion"}).setup(_ctx(dataset="cifar10"))


def test_identity_changes_with_any_weight(fx, tmp_path):
    idents = []
    for i, perturb in enumerate((0.0, 1e-3)):
        ckpt = save_checkpoint(fx, tmp_path / f"c{i}" / "m.pt", perturb=perturb)
        d = DiffPure.from_dict({**FAST["diffpure"], "model_path": str(ckpt), "backbone": "guided-diffusion"})
        d.setup(_ctx())
        idents.append(d.identity())
    assert idents[0]["backbone"] != idents[1]["backbone"]
    assert idents[0]["backbone_source"]["file_sha256"] != idents[1]["backbone_source"]["file_sha256"]
