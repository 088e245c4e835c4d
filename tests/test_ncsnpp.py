"""The score-SDE NCSN++ (defenses.networks.ncsnpp) against the reference fixtures, and its use by the purifiers.

The fixtures (``$HARNESS_SHARED/fixtures/ncsnpp``, see its README) describe the
reference networks as data: every state_dict key of the full-size DDPM++ (DiffPure's
``checkpoint_8.pth``) and of the consistency-model NCSN++, their module trees, and
reduced models with seeded weights and outputs of the reference code. Full-size models
are built on the meta device (no 400 MB allocation). Reduced outputs are compared in
float32 on one thread within 1e-4 (the reference reruns bit-exactly; this
implementation differs in summation order only) and in float64 within 1e-10.
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
from defenses._consistency import ConsistencyFunction
from defenses.networks import layers as L
from defenses.networks.ncsnpp import (
    CM_CIFAR10,
    DDPMPP_DEEP_CONTINUOUS,
    NCSNpp,
    NCSNppConfig,
    load_cm_ncsnpp,
    load_score_sde_checkpoint,
)
from harness.core.defense import SetupContext
from harness.core.env import sha256_file
from harness.core.registry import HarnessError, MissingFileError
from tests.tolerance import assert_close_scaled
from threat_models.specs import canonical_float

# name -> (fixture stem of the full-size model, reduced stem, config flavour, preset)
MODELS = {
    "ddpmpp": ("ddpmpp_deep_continuous", "ddpmpp_small", "score_sde", DDPMPP_DEEP_CONTINUOUS),
    "cm": ("cm_ncsnpp", "cm_ncsnpp_small", "cm", CM_CIFAR10),
}


@pytest.fixture(scope="module")
def fx(shared_dir) -> Path:
    if shared_dir is None:
        pytest.skip("HARNESS_SHARED is not set (CI sets it): the NCSN++ reference fixtures are unavailable")
    path = shared_dir / "fixtures" / "ncsnpp"
    assert path.is_dir(), f"HARNESS_SHARED={shared_dir} is set but fixtures/ncsnpp is missing there"
    return path


def _json(fx: Path, name: str) -> dict:
    return json.loads((fx / name).read_text())


def small_config(fx: Path, name: str) -> NCSNppConfig:
    _, stem, flavour, _ = MODELS[name]
    return NCSNppConfig.from_reference(_json(fx, f"{stem}.config.json")["config"], flavour=flavour)


def small_net(fx: Path, name: str) -> NCSNpp:
    net = NCSNpp(small_config(fx, name))
    net.load_state_dict(torch.load(fx / f"{MODELS[name][1]}.pt", weights_only=True), strict=True)
    return net.eval()


def io(fx: Path, name: str) -> dict:
    return torch.load(fx / f"{MODELS[name][1]}.io.pt", weights_only=True)


def net_inputs(fx: Path, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored network call: ``model(x, t*999)`` (DDPM++) or ``model(c_in x, 0.25 log t)`` (CM)."""
    d = io(fx, name)
    return (d["x"], d["labels"]) if name == "ddpmpp" else (d["net_in_x"], d["net_in_time_cond"])


# --------------------------------------------------------------------------- full-size structure (meta device)
@pytest.mark.parametrize("name", list(MODELS))
def test_full_size_model_has_the_reference_keys_shapes_dtypes_and_order(fx, name):
    stem, _, flavour, preset = MODELS[name]
    cfg = NCSNppConfig.from_reference(_json(fx, f"{stem}.config.json")["config"], flavour=flavour)
    assert cfg == preset  # the built-in preset is the reference config
    with torch.device("meta"):
        net = NCSNpp(cfg)
    ref = _json(fx, f"{stem}.keys.json")
    mine = [
        {"key": k, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."),
         "kind": "parameter" if isinstance(v, nn.Parameter) else "buffer", "requires_grad": v.requires_grad}
        for k, v in net.state_dict(keep_vars=True).items()
    ]
    want = [{c: k[c] for c in ("key", "shape", "dtype", "kind", "requires_grad")} for k in ref["keys"]]
    assert mine == want  # every key, in state_dict order
    assert sum(p.numel() for p in net.parameters()) == ref["num_parameters_total"]
    assert len(net.all_modules) == ref["num_modules_in_all_modules"]
    # an EMA's shadow_params are zipped with the trainable parameters in this order
    ema = ref["ema_shadow_params"]["ema_param_keys"] if name == "ddpmpp" else ref["ema_param_keys_requires_grad_order"]
    assert [k for k, p in net.named_parameters() if p.requires_grad] == ema


def _describe(mod: nn.Module) -> tuple:
    """A module as the fixture's module tree records it: torch modules by repr, reference blocks by their attributes."""
    if type(mod).__module__.startswith("torch.nn"):
        return type(mod).__name__, None if isinstance(mod, nn.ModuleList) else repr(mod)
    if isinstance(mod, L.ResnetBlockBigGANpp):
        a = dict(up=mod.up, down=mod.down, fir=mod.fir, fir_kernel=list(mod.fir_taps), skip_rescale=mod.skip_rescale,
                 in_ch=mod.in_ch, out_ch=mod.out_ch)
        return "ResnetBlockBigGANpp", a
    if isinstance(mod, L.AttnBlockpp):
        return "AttnBlockpp", {"skip_rescale": mod.skip_rescale}
    if isinstance(mod, L.Downsample):
        out_ch = mod.Conv2d_0.weight.shape[0]
        return "Downsample", dict(fir=mod.fir, fir_kernel=list(mod.fir_taps), with_conv=mod.with_conv, out_ch=out_ch)
    if isinstance(mod, L.FIRConv2d):
        taps = list(mod.fir_taps)
        return "Conv2d", dict(up=mod.up, down=mod.down, kernel=mod.kernel, resample_kernel=taps, use_bias=mod.bias is not None)
    return type(mod).__name__, None


def _describe_ref(m: dict) -> tuple:
    if m["py_module"].startswith("torch.nn"):
        return m["cls"], m["repr"]
    attrs = m.get("attrs")
    return m["cls"], ({k: attrs[k] for k in sorted(attrs)} if attrs else None)


@pytest.mark.parametrize("name", list(MODELS))
def test_full_size_module_tree_matches_the_reference(fx, name):
    """Names, classes and hyperparameters (kernel, stride, padding, groups, eps, dropout, up/down, FIR) of every module."""
    stem, _, _, preset = MODELS[name]
    with torch.device("meta"):
        net = NCSNpp(preset)
    ref = {m["name"]: _describe_ref(m) for m in _json(fx, f"{stem}.keys.json")["modules"]}
    mine = {k: _describe(m) for k, m in net.named_modules() if k}
    assert sorted(mine) == sorted(ref)
    for k in ref:
        cls, attrs = mine[k]
        if isinstance(attrs, dict):
            attrs = {a: attrs[a] for a in sorted(attrs)}
        assert (cls, attrs) == ref[k], k


# --------------------------------------------------------------------------- reduced models vs reference outputs
@pytest.mark.parametrize("name", list(MODELS))
def test_reduced_model_loads_strictly_and_reproduces_the_reference_output(fx, name, one_thread):
    state = torch.load(fx / f"{MODELS[name][1]}.pt", weights_only=True)
    fresh = NCSNpp(small_config(fx, name))
    # the buffer as the reference builds it: float64, equal up to the last bit of numpy's exp (versions differ there)
    torch.testing.assert_close(fresh.sigmas, state["sigmas"], rtol=1e-15, atol=0)
    result = fresh.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    net, d = fresh.eval(), io(fx, name)
    x, tc = net_inputs(fx, name)
    with torch.no_grad():
        out = net(x, tc)
    assert out.dtype == torch.float32 and out.shape == d["out"].shape
    err = (out - d["out"]).abs().max().item()
    assert err < 1e-4, err
    net64 = net.double()
    with torch.no_grad():
        out64 = net64(x.double(), tc.double() if name == "cm" else tc)  # DDPM++ labels: float32, as the reference feeds them
    assert out64.dtype == torch.float64
    assert (out64 - d["out_float64"]).abs().max().item() < 1e-10


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_calls_every_module_in_reference_order_with_reference_statistics(fx, name, one_thread):
    """The stored call trace: module index, class and output shape per call, and the output's mean/std/min/max."""
    net, d = small_net(fx, name), io(fx, name)
    calls = []
    hooks = [m.register_forward_hook(lambda mod, args, out, i=i: calls.append((i, out.detach())))
             for i, m in enumerate(net.all_modules)]
    with torch.no_grad():
        net(*net_inputs(fx, name))
    for h in hooks:
        h.remove()
    assert [i for i, _ in calls] == d["trace_module_index"].tolist()
    assert [list(o.shape) for _, o in calls] == d["trace_output_shape"]
    ref_cls = d["trace_module_class"]
    assert [_describe(net.all_modules[i])[0] for i, _ in calls] == ref_cls
    stats = torch.tensor([[o.mean(), o.std(), o.abs().mean(), o.min(), o.max()] for o in (o.double() for _, o in calls)],
                         dtype=torch.float64)
    torch.testing.assert_close(stats, d["trace_output_stats_mean_std_absmean_min_max"], atol=1e-4, rtol=1e-5)


def test_time_embeddings_match_the_reference(fx):
    d = io(fx, "ddpmpp")
    net = small_net(fx, "ddpmpp")
    emb = L.positional_embedding(d["labels"], net.config.nf)
    assert_close_scaled(emb, d["temb_sinusoidal"])
    with torch.no_grad():
        temb = net.all_modules[1](net.act(net.all_modules[0](emb)))
    assert_close_scaled(temb, d["temb"])

    d = io(fx, "cm")
    net = small_net(fx, "cm")
    with torch.no_grad():
        feats = net.all_modules[0](d["net_in_time_cond"])
        temb = net.all_modules[2](net.act(net.all_modules[1](feats)))
    assert_close_scaled(feats, d["fourier_features"])
    assert_close_scaled(temb, d["temb"])


def test_score_sde_variant_takes_the_log_of_the_fourier_time(fx, one_thread):
    """score_sde_pytorch's NCSN++ on the CM weights, called with exp(cond_t), equals the CM port called with cond_t."""
    d = io(fx, "cm")
    net = NCSNpp(dataclasses.replace(small_config(fx, "cm"), fourier_log_time=True)).eval()
    net.load_state_dict(torch.load(fx / "cm_ncsnpp_small.pt", weights_only=True), strict=True)
    with torch.no_grad():
        out = net(d["net_in_x"], d["score_sde_pytorch_time_cond"])
    assert (out - d["out_score_sde_pytorch_ncsnpp"]).abs().max().item() < 1e-4


def test_consistency_function_matches_the_reference_parameterisation(fx, one_thread):
    d = io(fx, "cm")
    f = ConsistencyFunction(small_net(fx, "cm"))
    c_in, c_skip, c_out = f.coefficients(d["t"])
    for mine, key in ((c_in, "c_in"), (c_skip, "c_skip"), (c_out, "c_out")):
        torch.testing.assert_close(mine, d[key], atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(d["x"] * c_in[:, None, None, None], d["net_in_x"], atol=1e-6, rtol=0)
    with torch.no_grad():
        out = f(d["x"], d["t"])
    assert (out - d["consistency_fn_out"]).abs().max().item() < 1e-4


def test_epsnet_and_the_reverse_sde_form_the_reference_score(fx, one_thread):
    """The samplers' convention on the DDPM++: eps = net(x, 999 t), score = -eps / std(t) (score_sde get_score_fn, VPSDE)."""
    d = io(fx, "ddpmpp")
    eps_net = D.EpsNet(small_net(fx, "ddpmpp"))
    with torch.no_grad():
        eps = eps_net(d["x"], (D.NUM_TIMESTEPS - 1) * d["t"])
        assert (eps - d["out"]).abs().max().item() < 1e-4
        for b, t in enumerate(d["t"].tolist()):
            std = math.sqrt(1.0 - D.continuous_alpha_bar(t))
            assert std == pytest.approx(d["std"][b].item(), rel=1e-6)
            # ReverseVPSDE's drift at step 0 is h [beta/2 x + beta score]: recover its score
            sde = D.ReverseVPSDE(eps_net, (3, 32, 32), t_start=t, n_steps=1)
            x = d["x"][b : b + 1]
            score = (sde.drift(0.0, x) / sde.h - 0.5 * D.beta_t(t) * x) / D.beta_t(t)
            assert (score - d["score"][b : b + 1]).abs().max().item() < 1e-4 / std


# --------------------------------------------------------------------------- layers
def _upfirdn_loop(x, k, up, down, p0, p1):
    """upfirdn2d by its definition, one output pixel at a time (float64)."""
    n, c, h, w = x.shape
    z = torch.zeros(n, c, h * up, w * up, dtype=x.dtype)
    z[..., ::up, ::up] = x
    z = F.pad(z, (p0, p1, p0, p1))
    kh = k.shape[0]
    out = torch.zeros(n, c, z.shape[-2] - kh + 1, z.shape[-1] - kh + 1, dtype=x.dtype)
    for i in range(out.shape[-2]):
        for j in range(out.shape[-1]):
            out[..., i, j] = (z[..., i : i + kh, j : j + kh] * k.flip(0, 1)).sum((-1, -2))
    return out[..., ::down, ::down]


def test_fir_resampling_ops():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    kk = torch.rand(4, 4, dtype=torch.float64)  # asymmetric: a correlation would differ from the convolution
    for up, down, p0, p1 in ((2, 1, 2, 1), (1, 2, 1, 1), (1, 1, 2, 2), (2, 2, 1, 2), (1, 1, -1, 1)):
        want = _upfirdn_loop(x, kk, up, down, p0, p1)
        torch.testing.assert_close(L.upfirdn2d(x, kk, up, down, (p0, p1)), want, rtol=0, atol=1e-12)
    k = L.fir_kernel_2d([1, 3, 3, 1]).double()
    assert k.sum().item() == 1.0 and torch.equal(k, k.T)
    ones = torch.ones(1, 1, 8, 8, dtype=torch.float64)
    assert torch.equal(L.upsample_2d(ones, k)[..., 1:-1, 1:-1], torch.ones(1, 1, 14, 14, dtype=torch.float64))  # mean kept inside
    assert torch.equal(L.downsample_2d(ones, k)[..., 1:-1, 1:-1], torch.ones(1, 1, 2, 2, dtype=torch.float64))
    # the fused conv ops equal their unfused definitions away from the border (they pad once, not twice)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    up_fused, up_plain = L.upsample_conv_2d(x, w, k), F.conv2d(L.upsample_2d(x, k), w, padding=1)
    dn_fused, dn_plain = L.conv_downsample_2d(x, w, k), L.downsample_2d(F.conv2d(x, w, padding=1), k)
    assert up_fused.shape == (2, 5, 16, 16) and dn_fused.shape == (2, 5, 4, 4)
    torch.testing.assert_close(up_fused[..., 1:-1, 1:-1], up_plain[..., 1:-1, 1:-1], rtol=0, atol=1e-12)
    torch.testing.assert_close(dn_fused[..., 1:-1, 1:-1], dn_plain[..., 1:-1, 1:-1], rtol=0, atol=1e-12)
    assert torch.equal(L.naive_upsample_2d(x), F.interpolate(x, scale_factor=2, mode="nearest"))
    torch.testing.assert_close(L.naive_downsample_2d(x), F.avg_pool2d(x, 2), rtol=0, atol=1e-15)


TINY = dict(image_size=8, nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)


@pytest.mark.parametrize("fir", [False, True])
@pytest.mark.parametrize("progressive", ["none", "output_skip", "residual"])
@pytest.mark.parametrize(
    "progressive_input,combine", [("none", "sum"), ("input_skip", "sum"), ("input_skip", "cat"), ("residual", "sum")]
)
def test_progressive_variants_use_every_module_and_parameter(fir, progressive, progressive_input, combine):
    """Variants no fixture covers: the forward consumes the whole module list and every trainable parameter gets a gradient."""
    torch.manual_seed(0)
    cfg = NCSNppConfig(**TINY, fir=fir, progressive=progressive, progressive_input=progressive_input, progressive_combine=combine,
                       embedding_type="fourier" if fir else "positional", fourier_log_time=False)
    net = NCSNpp(cfg)
    x = torch.randn(2, 3, 8, 8)
    out = net(x, torch.tensor([0.3, 0.7]) if fir else torch.tensor([10.0, 500.0]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().sum().backward()
    dead = [k for k, p in net.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not dead
    if progressive_input == "residual":
        assert any(k.endswith("Conv2d_0.weight" if fir else "Conv_0.weight") and "all_modules" in k for k in net.state_dict())


def test_unsupported_config_values_are_one_line_errors():
    with pytest.raises(HarnessError, match="resblock_type='ddpm'"):
        NCSNppConfig(resblock_type="ddpm")
    with pytest.raises(HarnessError, match="progressive_input"):
        NCSNppConfig(progressive_input="output_skip")
    with pytest.raises(HarnessError, match="divisible"):
        NCSNppConfig(image_size=12)


def test_buffers_move_with_the_module_and_the_forward_stays_on_its_device():
    """GPU readiness without a GPU: on the meta device any host tensor mixed into the forward raises."""
    with torch.device("meta"):
        net = NCSNpp(CM_CIFAR10)
    net.to("meta")
    assert all(t.device.type == "meta" for t in list(net.parameters()) + list(net.buffers()))
    assert any(k.endswith("fir_kernel") for k, _ in net.named_buffers())  # registered (moved by .to), not persistent:
    assert not any(k.endswith("fir_kernel") for k in net.state_dict())
    x, t = torch.empty(2, 3, 32, 32, device="meta"), torch.empty(2, device="meta")
    assert net(x, t).device.type == "meta"
    with torch.device("meta"):
        ddpm = NCSNpp(DDPMPP_DEEP_CONTINUOUS)
    ddpm.to("meta")
    assert ddpm(x, torch.empty(2, device="meta")).shape == (2, 3, 32, 32)
    net64 = NCSNpp(NCSNppConfig(**TINY, fir=True)).double()
    assert all(b.dtype == torch.float64 for b in net64.buffers())


# --------------------------------------------------------------------------- checkpoints
def save_score_sde_checkpoint(fx: Path, path: Path, *, perturb: float = 0.0, sidecar: bool = True) -> dict:
    """Write ``path`` as score_sde_pytorch's save_checkpoint does, from the reduced DDPM++ fixture.

    ``model``: DataParallel keys (``module.`` + key) holding *other* weights (the raw
    training weights, which DiffPure ignores); ``ema``: the fixture weights as
    ``shadow_params`` in parameter order; ``optimizer``: an Adam state over the
    parameters; ``step``. ``perturb`` shifts one EMA tensor. Beside it, with
    ``sidecar``, the reduced config as ``<stem>.json``.
    """
    net = small_net(fx, "ddpmpp")
    shadow = [p.detach().clone() for p in net.parameters() if p.requires_grad]
    shadow[5].add_(perturb)
    raw = {f"module.{k}": (v * 0.5 if v.dtype == torch.float32 else v) for k, v in net.state_dict().items()}
    opt = torch.optim.Adam(net.parameters(), lr=2e-4)
    net(torch.zeros(1, 3, 32, 32), torch.tensor([1.0])).sum().backward()
    opt.step()
    torch.save({"optimizer": opt.state_dict(), "model": raw, "ema": {"decay": 0.9999, "num_updates": 7, "shadow_params": shadow},
                "step": 400000}, path)
    if sidecar:
        path.with_suffix(".json").write_text((fx / "ddpmpp_small.config.json").read_text())
    return {"shadow": shadow}


def test_score_sde_checkpoint_loads_the_ema_weights(fx, tmp_path, one_thread):
    ckpt = tmp_path / "checkpoint_8.pth"
    save_score_sde_checkpoint(fx, ckpt)
    net, source = load_score_sde_checkpoint(ckpt)
    assert not net.training and net.config == small_config(fx, "ddpmpp")
    d = io(fx, "ddpmpp")
    with torch.no_grad():
        assert (net(d["x"], d["labels"]) - d["out"]).abs().max().item() < 1e-4  # the EMA, not the 'model' entry
    ident = source["identity"]
    assert source["sha256"] == ident["file_sha256"] == sha256_file(ckpt)
    assert ident["weights"] == "ema" and ident["step"] == 400000 and ident["ema_num_updates"] == 7
    assert ident["architecture_file"] == "checkpoint_8.json" and set(ident["code"]) == {"ncsnpp.py", "layers.py"}
    # a plain state_dict with DataParallel prefixes (or under 'model' alone) loads strictly to the same network
    state = {f"module.{k}": v for k, v in small_net(fx, "ddpmpp").state_dict().items()}
    for i, obj in enumerate((state, {"model": state})):
        f = tmp_path / f"plain{i}.pth"
        torch.save(obj, f)
        net2, src2 = load_score_sde_checkpoint(f, small_config(fx, "ddpmpp"))
        assert src2["identity"]["weights"] == "state_dict"
        for k, v in net.named_parameters():
            assert torch.equal(net2.state_dict()[k], v), k


def test_ema_checkpoint_takes_the_fixed_fourier_frequencies_from_its_model_entry(fx, tmp_path, one_thread):
    """A Fourier-embedding NCSN++ saved by score_sde: its EMA skips the frozen W, which comes from 'model' (restore_checkpoint)."""
    net = small_net(fx, "cm")
    shadow = [p.detach().clone() for p in net.parameters() if p.requires_grad]
    ckpt = tmp_path / "ve.pth"
    model = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save({"model": model, "ema": {"shadow_params": shadow}, "step": 1}, ckpt)
    loaded, _ = load_score_sde_checkpoint(ckpt, small_config(fx, "cm"))
    d = io(fx, "cm")
    with torch.no_grad():
        assert (loaded(d["net_in_x"], d["net_in_time_cond"]) - d["out"]).abs().max().item() < 1e-4
    torch.save({"ema": {"shadow_params": shadow}}, ckpt)
    with pytest.raises(HarnessError, match="all_modules.0.W"):
        load_score_sde_checkpoint(ckpt, small_config(fx, "cm"))


def test_checkpoint_of_another_architecture_is_refused_with_one_line(fx, tmp_path):
    ckpt = tmp_path / "ckpt.pth"
    save_score_sde_checkpoint(fx, ckpt, sidecar=False)  # reduced weights, default (full-size) architecture
    with pytest.raises(HarnessError) as err:
        load_score_sde_checkpoint(ckpt)
    msg = str(err.value)
    assert "\n" not in msg and "369" not in msg and "368 shadow parameters" in msg and "956" in msg and "ckpt.json" in msg
    state = torch.load(ckpt, weights_only=True)
    state["ema"]["shadow_params"][3] = state["ema"]["shadow_params"][3][:1]
    torch.save(state, ckpt)
    with pytest.raises(HarnessError, match="shadow parameter 3 is"):
        load_score_sde_checkpoint(ckpt, small_config(fx, "ddpmpp"))
    torch.save({"weights": [1, 2]}, ckpt)
    with pytest.raises(HarnessError, match="holds"):
        load_score_sde_checkpoint(ckpt, small_config(fx, "ddpmpp"))
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(HarnessError, match="cannot load checkpoint"):
        load_score_sde_checkpoint(ckpt)
    with pytest.raises(HarnessError, match="is a folder"):
        load_score_sde_checkpoint(tmp_path)
    with pytest.raises(HarnessError) as err:
        load_score_sde_checkpoint(tmp_path / "nope" / "checkpoint_8.pth")
    assert "\n" not in str(err.value) and "16_-Ahc6ImZV5ClUc0vM5Iivf8OJ1VSif" in str(err.value)


def test_cm_loader_on_a_converted_state_dict(fx, tmp_path, one_thread):
    src = torch.load(fx / "cm_ncsnpp_small.pt", weights_only=True)
    f = tmp_path / "cd_lpips.pth"
    torch.save(src, f)
    with pytest.raises(HarnessError, match="does not fit"):  # the full-size CM architecture by default
        load_cm_ncsnpp(f)
    f.with_suffix(".json").write_text((fx / "cm_ncsnpp_small.config.json").read_text())
    net, source = load_cm_ncsnpp(f)
    assert source["kind"] == "cm-ncsnpp" and net.config == small_config(fx, "cm")
    assert torch.equal(net.all_modules[0].W, src["all_modules.0.W"])  # the fixed Fourier frequencies come from the file
    d = io(fx, "cm")
    with torch.no_grad():
        assert (ConsistencyFunction(net)(d["x"], d["t"]) - d["consistency_fn_out"]).abs().max().item() < 1e-4
    torch.save({"ema": {"shadow_params": list(src.values())}}, f)
    with pytest.raises(HarnessError, match="not a state_dict"):
        load_cm_ncsnpp(f)


# --------------------------------------------------------------------------- the purifiers with an NCSN++ backbone
def _cifar_ctx(weights_dir=None, classifier=None):
    return SetupContext(classifier=classifier, dataset="cifar10", image_shape=(3, 32, 32), num_classes=10,
                        weights_dir=weights_dir)


def _clf():
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))


FAST = {"diffpure": {"t_star": 0.02, "dt": 0.01}, "coup": {"t_star": 0.02, "dt": 0.01},
        "diffpure-ddpm": {"max_timestep": 20, "denoising_steps": 2, "surrogate_steps": 1}}


@pytest.mark.parametrize("cls", [DiffPure, DiffPureDDPM, COUP])
def test_purifiers_accept_a_score_sde_checkpoint(fx, tmp_path, cls):
    ckpt = tmp_path / "checkpoint_8.pth"
    save_score_sde_checkpoint(fx, ckpt)
    d = cls.from_dict({**FAST[cls.name], "model_path": str(ckpt), "backbone": "ncsnpp"})
    d.setup(_cifar_ctx(classifier=_clf()))
    ident = d.identity()
    assert ident["config"]["backbone"] == "ncsnpp"
    assert ident["backbone_source"]["file_sha256"] == sha256_file(ckpt) and ident["backbone_source"]["weights"] == "ema"
    for k, v in small_net(fx, "ddpmpp").named_parameters():  # the EMA weights, not the 'model' entry
        assert torch.equal(d.eps_net.net.get_parameter(k), v), k
    x = torch.rand(2, 3, 32, 32)
    out = d.purify(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.isfinite(out).all() and 0 <= out.min() and out.max() <= 1
    dd = io(fx, "ddpmpp")
    with torch.no_grad():
        assert (d.eps_net(dd["x"], dd["labels"]) - dd["out"]).abs().max().item() < 1e-4


def test_identity_changes_with_any_weight_and_with_the_backbone_choice(fx, tmp_path):
    idents = []
    for i, perturb in enumerate((0.0, 1e-3)):
        ckpt = tmp_path / f"c{i}" / "checkpoint_8.pth"
        ckpt.parent.mkdir()
        save_score_sde_checkpoint(fx, ckpt, perturb=perturb)
        d = DiffPure.from_dict({**FAST["diffpure"], "model_path": str(ckpt), "backbone": "ncsnpp"})
        d.setup(_cifar_ctx())
        idents.append(d.identity())
    assert idents[0]["backbone"] != idents[1]["backbone"]
    assert idents[0]["backbone_source"]["file_sha256"] != idents[1]["backbone_source"]["file_sha256"]
    assert idents[0]["config"] == idents[1]["config"] | {"model_path": idents[0]["config"]["model_path"]}
    assert DiffPure.from_dict({}).identity()["config"]["backbone"] == "unet2d"  # the default: what the harness did before
    with pytest.raises(HarnessError, match="backbone='resnet' is not one of unet2d, ncsnpp"):
        DiffPure.from_dict({"backbone": "resnet"})


def test_ncsnpp_is_found_in_the_weights_dir_and_missing_files_are_one_line_errors(fx, tmp_path, monkeypatch):
    (tmp_path / "w" / "score_sde").mkdir(parents=True)
    save_score_sde_checkpoint(fx, tmp_path / "w" / "score_sde" / "checkpoint_8.pth")
    d = COUP.from_dict({**FAST["coup"], "backbone": "ncsnpp"})
    d.setup(_cifar_ctx(tmp_path / "w", _clf()))
    assert d.backbone_source["name"] == "checkpoint_8.pth"
    with pytest.raises(HarnessError, match="takes 3x32x32 images but 'digits' has 1x8x8"):
        DiffPure.from_dict({"backbone": "ncsnpp", "adapter": "none",
                            "model_path": str(tmp_path / "w" / "score_sde" / "checkpoint_8.pth")}).setup(
            SetupContext(classifier=None, dataset="digits", image_shape=(1, 8, 8), num_classes=10))
    # nothing in the weights dir: the message names the place and the source
    with pytest.raises(HarnessError) as err:
        DiffPure.from_dict({"backbone": "ncsnpp"}).setup(_cifar_ctx(tmp_path / "empty"))
    msg = str(err.value)
    assert "\n" not in msg and f"{tmp_path / 'empty'}/score_sde/checkpoint_8.pth" in msg
    assert "16_-Ahc6ImZV5ClUc0vM5Iivf8OJ1VSif" in msg
    # a model_path naming nothing fails when the defense is built (before data and classifier are loaded)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(HarnessError) as err:
        DiffPure.from_dict({"backbone": "ncsnpp", "model_path": "pretrained/score_sde/checkpoint_8.pth"})
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "pretrained/score_sde/checkpoint_8.pth") in msg and "DiffPure README" in msg


def test_harness_run_drives_diffpure_and_coup_with_a_score_sde_checkpoint(fx, shared_dir, tmp_path, capsys):
    """``harness run`` end to end on real CIFAR-10 images and the shared ResNet-20, one solver step."""
    from harness.cli import main

    ckpt = tmp_path / "checkpoint_8.pth"
    save_score_sde_checkpoint(fx, ckpt)
    db = str(tmp_path / "r.db")
    common = ["--threat", "preprocessor-blind", "--dataset", "cifar10",
              "--data-dir", str(shared_dir / "data" / "cifar10_test_first1017.npz"), "--classifier", "resnet20",
              "--weights", str(shared_dir / "models" / "resnet20-12fca82f.th"), "--n-examples", "4",
              "--set", f"model_path={ckpt}", "--set", "backbone=ncsnpp", "--set", "steps=1", "--set", "eval_draws=1",
              "--set", "t_star=0.01", "--set", "dt=0.01", "--db", db, "--json"]
    for name in ("diffpure", "coup"):
        code = main(["run", "--defense", name, *common])
        cap = capsys.readouterr()
        assert code == 0, cap.err
        out = json.loads(cap.out)
        assert out["status"] == "done" and out["defense"] == name and out["n_examples"] == 4
        assert main(["show", out["job_id"], "--db", db]) == 0
        shown = json.loads(capsys.readouterr().out)
        ident = shown["identity"]["defense"]
        assert ident["config"]["backbone"] == "ncsnpp" and ident["config"]["model_path"] == str(ckpt)
        assert ident["backbone_source"]["file_sha256"] == sha256_file(ckpt)
        assert shown["nfe"]["nfe_per_purification"] == 1


# --------------------------------------------------------------------------- the paper grid and the published table
REPO = Path(__file__).resolve().parents[1]
PAPER_GRID, ADAPTIVE_GRID, PUBLISHED = (REPO / "grids" / "paper-cifar10.yaml", REPO / "grids" / "paper-cifar10-adaptive.yaml",
                                        REPO / "tables" / "published.csv")


def grid_cells(path: Path) -> list[dict]:
    """Every cell of a grid file the harness accepts, resolved as far as it goes without data, classifier or weights."""
    from harness.core.config import build_config
    from harness.core.defense import DEFENSES
    from harness.core.plugins import load_builtin
    from harness.data import DATASETS
    from harness.evaluation.plan import IncompatibleError, build_plan
    from harness.evaluation.resolve import _default_n, split_overrides
    from harness.scheduler import load_grid
    from harness.scheduler.cells import expand
    from threat_models.specs import THREATS

    load_builtin()
    cells = []
    for cfg in expand(load_grid(path)):
        cls, info = DEFENSES.get(cfg.defense), DATASETS.get(cfg.dataset)
        routed = split_overrides(cfg.overrides, cls)
        spec = THREATS.get(cfg.threat).resolve(info.family, routed.threat_values())
        try:
            plan = build_plan(cls, spec)
        except IncompatibleError:
            continue  # refused pairs (AutoAttack-standard against a stochastic purifier) are listed as skipped
        n = cfg.n_examples or _default_n(cls, plan, info)[0] or info.default_n
        cells.append({"cfg": cfg, "spec": spec, "plan": plan, "n": n,
                      "defense": build_config(cls.Config, routed.defense, owner=cfg.defense)})
    return cells


def _matches(row: dict, cell: dict) -> bool:
    c = cell["cfg"]
    return ((row["defense"], row["threat"], row["dataset"], row["classifier"], row["norm"]) ==
            (c.defense, c.threat, c.dataset, c.classifier, cell["spec"].norm)
            and abs(float(row["eps"]) - cell["spec"].eps) < 1e-9 and int(row["n_examples"]) == cell["n"])


def test_published_rows_name_exactly_one_paper_grid_cell_run_as_the_papers_did():
    import csv

    from harness.store.check import load_table
    from threat_models.scoring import RULES

    load_table(PUBLISHED)  # the `harness check` format
    rows = [r for r in csv.DictReader(PUBLISHED.open()) if r["dataset"] == "cifar10"]  # ImageNet's: tests/test_imagenet.py
    paper, adaptive = grid_cells(PAPER_GRID), grid_cells(ADAPTIVE_GRID)
    assert {c["n"] for c in paper} == {512} and {c["cfg"].data_seed for c in paper} == {0}
    assert len(paper) == 10 and len(adaptive) == 4
    for row in rows:
        assert row["metric"] in {f"{m}_accuracy_{r}" for m in ("clean", "robust") for r in RULES}
        found = [c for c in paper if _matches(row, c)]
        assert len(found) == 1, row
        assert not [c for c in adaptive if _matches(row, c)], row  # `harness check` would take the latest of several
        cell = found[0]
        d, spec = cell["defense"], cell["spec"]
        assert d.backbone == "ncsnpp" and d.model_path.endswith("checkpoint_8.pth")
        assert d.t_star == {"linf": 0.1, "l2": 0.075}[spec.norm]
        assert spec.eps == {"linf": canonical_float(8 / 255), "l2": 0.5}[spec.norm]
        if row["threat"] == "adaptive":  # AutoAttack-rand through the adjoint, as published; COUP's official adjoint
            assert spec.attacks == ("autoattack-rand",) and cell["plan"].main_path.value == "adjoint"
            assert not cell["plan"].also_paths
            assert [p.label for p in cell["plan"].attacks] == ["apgd-ce", "apgd-dlr"]
            assert spec.eot_samples == 20 and spec.apgd_steps == 100
            if row["defense"] == "coup":
                assert d.detach_guidance is True
        if row["threat"] == "bpda":
            assert (spec.steps, spec.eot_samples, spec.eot_reduce, spec.random_start) == (50, 15, "logits", False)
    for c in adaptive:  # the harness's own: exact gradient, then BPDA, on 64 images
        assert c["plan"].main_path.value == "full" and [p.value for p in c["plan"].also_paths] == ["bpda"] and c["n"] == 64
        assert c["defense"].t_star == {"linf": 0.1, "l2": 0.075}[c["spec"].norm]
        # the papers' budgets, written out (CIFAR's defaults are a CPU budget for the shipped small purifiers)
        spec = c["spec"]
        assert (spec.steps, spec.eot_samples, spec.apgd_steps) == (200, 20, 100)
        assert {"square.n_queries=5000", "diffhammer.n_iter=50"} <= set(spec.attack_options)
    assert all(c["defense"].dt == 0.001 for c in paper + adaptive)  # DiffPure's 100 solver steps at t* = 0.1


def test_paper_grid_dry_run_names_the_missing_checkpoint_and_where_to_get_it(tmp_path, monkeypatch, capsys):
    """Offline and with nothing supplied: every cell is listed, skipped with a one-line reason naming the file."""
    from harness.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["grid", str(PAPER_GRID), "--dry-run", "--db", str(tmp_path / "dry.db")]) == 0
    out = capsys.readouterr().out.splitlines()
    lines = [ln for ln in out if ln.startswith("  ") and not ln.lstrip().startswith("nfe")]
    assert len(lines) == 14 and all(ln.split()[0] == "skip" for ln in lines)
    # a cell skipped for its missing checkpoint still says what it will cost (a refused one does not)
    assert sum(ln.lstrip().startswith("nfe once its files are there:") for ln in out) == 10
    reasons = [ln.split("]  (", 1)[-1] for ln in lines]  # after the label and its axis overrides (which name the file too)
    missing = [r for r in reasons if "checkpoint_8.pth" in r]
    refused = [r for r in reasons if "autoattack-standard" in r]
    assert len(missing) == 10 and len(refused) == 4
    want = str(tmp_path / "pretrained" / "score_sde" / "checkpoint_8.pth")
    assert all(want in ln and "16_-Ahc6ImZV5ClUc0vM5Iivf8OJ1VSif" in ln and "DiffPure README" in ln for ln in missing)


def test_cmap_runs_on_a_cd_lpips_ncsnpp_file(fx, tmp_path, one_thread):
    """CMAP with backbone=ncsnpp: the user's converted CD-LPIPS state_dict is its consistency model on CIFAR-10."""
    from defenses.cmap import CMAP

    f = tmp_path / "cd_lpips.pth"
    torch.save(torch.load(fx / "cm_ncsnpp_small.pt", weights_only=True), f)
    f.with_suffix(".json").write_text((fx / "cm_ncsnpp_small.config.json").read_text())
    cfg = small_config(fx, "cm")
    shape = (cfg.num_channels, cfg.image_size, cfg.image_size)
    ctx = SetupContext(classifier=None, dataset="cifar10", image_shape=shape, num_classes=10)
    d = CMAP.from_dict({"backbone": "ncsnpp", "model_path": str(f), "n_latents": 2, "steps": 2})
    d.setup(ctx)
    assert d.source["kind"] == "cm-ncsnpp" and d.identity()["consistency_model"] == d.source["sha256"]
    z = torch.randn(1, 2, *shape, generator=torch.Generator().manual_seed(0))
    want = (ConsistencyFunction(small_net(fx, "cm")).generate(z.flatten(0, 1)) + 1) / 2
    with torch.no_grad():
        torch.testing.assert_close(d.images(z).flatten(0, 1), want.clamp(0, 1), atol=1e-5, rtol=0)
        out = d.purify(torch.rand(3, *shape, generator=torch.Generator().manual_seed(1)), generator=torch.Generator().manual_seed(2))
    assert out.shape == (3, *shape) and 0 <= out.min() and out.max() <= 1

    with pytest.raises(MissingFileError, match="model_path"):
        CMAP.from_dict({"backbone": "ncsnpp"}).setup(ctx)
    with pytest.raises(HarnessError, match="takes"):
        CMAP.from_dict({"backbone": "ncsnpp", "model_path": str(f)}).setup(
            SetupContext(classifier=None, dataset="digits", image_shape=(1, 8, 8), num_classes=10))
