"""CMAP (defenses/cmap.py), its consistency model and the consistency-disruption attack."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DModel

from defenses._consistency import ConsistencyFunction, karras_grid, load_consistency, one_step_samples
from defenses.cmap import CMAP, _moment_loss
from harness import evaluation as E
from harness.core import ATTACKS, AttackRandomness, Budget, GradientPath
from harness.core.env import WEIGHTS_DIR
from harness.evaluation.forward import DefendedForward
from threat_models.specs import ThreatSpec

TINY_UNET = dict(
    sample_size=8, in_channels=1, out_channels=1, block_out_channels=[8, 8], down_block_types=["DownBlock2D"] * 2,
    up_block_types=["UpBlock2D"] * 2, layers_per_block=1, norm_num_groups=4, add_attention=False,
)


def tiny_cm(dtype=torch.float32) -> ConsistencyFunction:
    torch.manual_seed(0)
    return ConsistencyFunction(UNet2DModel(**TINY_UNET).to(dtype), time_input="log", time_scale=1000.0).eval()


def tiny_cmap(**cfg) -> CMAP:
    base = {"n_latents": 3, "steps": 4, "lr": 0.05}
    base.update(cfg)
    return CMAP.from_dict(base).use_model(tiny_cm())


@pytest.fixture
def clf():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()


def test_parameterisation_and_grid():
    fn = tiny_cm()
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(fn(x, fn.t_min), x)  # f(x, t_min) = x: the boundary condition
    g = karras_grid(18)
    assert g[0].item() == pytest.approx(0.002) and g[-1].item() == pytest.approx(80.0) and (g[1:] > g[:-1]).all()


def test_purification_loss_falls_over_the_adam_steps(images01):
    d = tiny_cmap(steps=25)
    g = torch.Generator().manual_seed(0)
    z0 = d.initial_latents(images01, g)
    z = z0.clone()
    m, v = torch.zeros_like(z), torch.zeros_like(z)
    losses = [d.latent_loss(z, images01)[0].mean().item()]
    for k in range(1, 26):
        z, m, v = d.adam_step(z, m, v, k, images01, differentiable=False)
        losses.append(d.latent_loss(z, images01)[0].mean().item())
    assert losses[-1] < losses[0] - 0.05
    assert min(losses[10:]) <= losses[0]


def test_written_out_adam_is_torch_adam(images01):
    # in float64: in float32 the two updates agree only to the gradients' rounding, which Adam's m / sqrt(v)
    # amplifies where a gradient is near 0 (2.1e-6 on one element of 1152 on one CPU, 1.2e-6 on another)
    d = tiny_cmap(steps=5, lr=0.03).to(torch.float64)
    images01 = images01.double()
    z = d.initial_latents(images01, torch.Generator().manual_seed(3))
    ref = z.clone().requires_grad_(True)
    opt = torch.optim.Adam([ref], lr=0.03)
    m, v = torch.zeros_like(z), torch.zeros_like(z)
    for k in range(1, 6):
        z, m, v = d.adam_step(z, m, v, k, images01, differentiable=False)
        opt.zero_grad()
        d.latent_loss(ref, images01)[0].sum().backward()
        opt.step()
    assert z.dtype == torch.float64
    torch.testing.assert_close(z, ref.detach(), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("moments", ["per-dimension", "scalar"])
def test_moment_term_pulls_mean_to_0_and_variance_to_1(moments):
    g = torch.Generator().manual_seed(0)
    z = (2.0 + 3.0 * torch.randn(2, 8, 1, 4, 4, generator=g)).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=0.1)
    first = _moment_loss(z.detach(), moments).sum().item()
    for _ in range(600):
        opt.zero_grad()
        _moment_loss(z, moments).sum().backward()
        opt.step()
    assert _moment_loss(z.detach(), moments).sum().item() < 1e-4 * first
    flat = z.detach().reshape(2, 8, -1)
    if moments == "per-dimension":  # every dimension's mean and variance across the 8 latents
        assert flat.mean(1).abs().max() < 0.1 and (flat.var(1) - 1).abs().max() < 0.1
    else:  # one mean and variance per image
        assert flat.reshape(2, -1).mean(1).abs().max() < 0.01 and (flat.reshape(2, -1).var(1) - 1).abs().max() < 0.01


def test_voting_over_copies_of_one_image_is_its_prediction(clf):
    d = tiny_cmap()
    img = torch.rand(5, 1, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    votes = d.vote_logits(img.expand(5, 4, 1, 8, 8), clf)
    assert torch.equal(votes.argmax(1), clf(img[:, 0]).argmax(1))
    assert torch.equal(votes.max(1).values.floor(), torch.full((5,), 4.0))  # unanimous


def test_same_generator_same_vote_and_fresh_latents_per_call(clf, images01):
    d = tiny_cmap()
    a = d.classify(images01, clf, generator=torch.Generator().manual_seed(5))
    b = d.classify(images01, clf, generator=torch.Generator().manual_seed(5))
    c = d.classify(images01, clf, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)


def test_full_unrolled_gradient_matches_finite_differences():
    torch.manual_seed(1)
    clf64 = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).double()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    for checkpoint in (False, True):
        d = CMAP.from_dict({"n_latents": 2, "steps": 3, "lr": 0.05, "checkpoint": checkpoint}).use_model(
            ConsistencyFunction(tiny_cm().net.double(), time_input="log", time_scale=1000.0)).double()

        def f(x):
            return d.classify(x, clf64, path=GradientPath.FULL, generator=torch.Generator().manual_seed(7))[:, 3].sum()

        (g,) = torch.autograd.grad(f(x), x)
        for idx in [(0, 0, 3, 4), (1, 0, 5, 2), (0, 0, 0, 7)]:
            e = torch.zeros_like(x)
            e[idx] = 1e-5
            fd = (f(x + e) - f(x - e)).item() / 2e-5
            assert g[idx].item() == pytest.approx(fd, rel=1e-4, abs=1e-9), (checkpoint, idx)


def test_bpda_and_surrogate_paths_have_finite_gradients(clf, images01):
    d = tiny_cmap()
    for path in (GradientPath.BPDA, GradientPath.SURROGATE):
        x = images01.clone().requires_grad_(True)
        d.classify(x, clf, path=path, generator=torch.Generator().manual_seed(0)).sum().backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0, path


def test_consistency_disruption_candidates_stay_in_the_ball(clf, images01):
    d = tiny_cmap(steps=3)
    labels = clf(images01).argmax(1)
    spec = ThreatSpec(name="cd", eps=0.1, attacks=("consistency-disruption",),
                      attack_options=("consistency-disruption.steps=4", "consistency-disruption.eval_every=2"))
    attack = ATTACKS.get("consistency-disruption").from_options(spec, spec.options_for_attack("consistency-disruption"))
    model = DefendedForward(d, clf, GradientPath.FULL, torch.Generator().manual_seed(0))
    ticks = []
    res = attack.run(model, images01, labels, Budget("linf", 0.1), AttackRandomness(None, 0), ticks.append)
    assert (res.x_adv - images01).abs().max() <= 0.1 + 1e-6 and res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    assert len(res.curve) == 2 and res.curve[0] >= res.curve[1] and sum(ticks) == attack.ticks()
    # the margins are the full defense's vote on the returned candidates (> 0: a broken example)
    assert res.margin.shape == (6,) and int((res.margin > 0).sum()) == 6 - res.curve[-1]


def test_consistency_disruption_is_refused_without_a_latent_generator():
    from tests.conftest import TOY_PLUGIN

    with pytest.raises(E.IncompatibleError, match="needs latent_generator, which defense 'toy-smooth' does not provide"):
        E.resolve(E.RunConfig(defense="toy-smooth", threat="consistency-disruption", n_examples=8, plugins=(TOY_PLUGIN,)))


def test_adaptive_plan_is_full_then_surrogate_then_bpda():
    job = E.resolve(E.RunConfig(defense="cmap", threat="adaptive", n_examples=4))
    assert job.path is GradientPath.FULL and [p.value for p in job.also_paths] == ["surrogate", "bpda"]
    assert any("cmap: n_latents=4" in n for n in job.notes)
    assert job.identity["defense"]["config"]["steps"] == 40 and job.identity["defense"]["consistency_model"]


def test_shipped_digits_consistency_model_makes_digits():
    """One-step samples of the shipped model: the shipped classifier labels them confidently, all ten classes."""
    from harness.classifiers import load_classifier

    fn, source = load_consistency(WEIGHTS_DIR / "digits-cm.pt")
    x = one_step_samples(fn, 400, (1, 8, 8), torch.Generator().manual_seed(11))
    with torch.no_grad():
        p = torch.softmax(load_classifier("digits-cnn", dataset="digits").module(x), 1)
    conf, label = p.max(1)
    assert conf.mean() > 0.8 and (conf > 0.9).float().mean() > 0.6
    assert set(label.tolist()) == set(range(10))
    assert source["sha256"] and source["consistency"]["time_input"] == "ddpm-index"
