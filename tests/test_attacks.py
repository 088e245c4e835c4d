"""Attack engine invariants on tiny models: eps-ball, [0,1], EOT batching, scoring rules."""

from __future__ import annotations

import pytest
import torch

from harness.core.defense import DEFENSES, GradientPath
from threat_models import attacks as A


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.8)])
@pytest.mark.parametrize("rand_start", [True, False])
def test_pgd_stays_in_ball_and_range(tiny_clf, images01, labels, norm, eps, rand_start):
    res = A.pgd(
        tiny_clf, images01, labels, norm=norm, eps=eps, steps=10, step_size=eps / 3, rand_start=rand_start,
        restarts=2, generator=torch.Generator().manual_seed(0),
    )
    d = (res.x_adv - images01).flatten(1)
    if norm == "linf":
        assert d.abs().max() <= eps + 1e-6
    else:
        assert d.norm(dim=1).max() <= eps + 1e-5
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    assert len(res.curve) == 11
    # the curve is of the best-so-far iterate: robust counts never increase
    assert all(a >= b for a, b in zip(res.curve, res.curve[1:]))


def test_pgd_lowers_accuracy_and_margin_is_consistent(tiny_clf, images01, labels):
    res = A.pgd(tiny_clf, images01, labels, norm="linf", eps=0.3, steps=20, step_size=0.05, rand_start=False)
    with torch.no_grad():
        m = A.margin(tiny_clf(res.x_adv), labels)
    torch.testing.assert_close(m, res.margin)
    clean_correct = (tiny_clf(images01).argmax(1) == labels).sum()
    assert (m <= 0).sum() <= clean_correct
    assert res.curve[-1] == int((m <= 0).sum())


def test_eot_batched_matches_averaged_gradients(tiny_clf, images01, labels):
    """K EOT samples stacked along the batch give the mean of K single-sample gradients."""
    d = DEFENSES.get("toy-noise").from_dict({})

    def model_with(gen):
        return lambda x: d.classify(x, tiny_clf, path=GradientPath.FULL, generator=gen)

    K = 4
    _, _, g_batched = A.eot_forward(
        model_with(torch.Generator().manual_seed(5)), images01, labels, eot=K, reduce="loss", loss="ce", max_batch=10_000, need_grad=True
    )
    # the same noise drawn one sample at a time: the generator stream must line up
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn((K,) + images01.shape, generator=gen)
    acc = torch.zeros_like(images01)
    for k in range(K):
        x = images01.clone().requires_grad_(True)
        out = tiny_clf(A_blur(x + d.config.sigma * noise[k]).clamp(0, 1))
        loss = torch.nn.functional.cross_entropy(out, labels, reduction="sum") / K
        acc += torch.autograd.grad(loss, x)[0]
    torch.testing.assert_close(g_batched, acc, rtol=1e-4, atol=1e-6)
    # chunking (max_batch smaller than K*B) draws the same stream in the same order
    _, _, g_chunked = A.eot_forward(
        model_with(torch.Generator().manual_seed(5)), images01, labels, eot=K, reduce="loss", loss="ce", max_batch=len(labels), need_grad=True
    )
    torch.testing.assert_close(g_chunked, g_batched, rtol=1e-4, atol=1e-6)


def A_blur(x):
    import sys

    # the toy plugin is loaded under its own module name, as `--plugin` loads it
    return sys.modules[DEFENSES.get("toy-noise").__module__]._blur(x)


def test_logit_averaging_eot_reduce(tiny_clf, images01, labels):
    logits, m, g = A.eot_forward(tiny_clf, images01, labels, eot=3, reduce="logits", loss="ce", max_batch=6, need_grad=True)
    x = images01.clone().requires_grad_(True)
    ref = torch.autograd.grad(torch.nn.functional.cross_entropy(tiny_clf(x), labels, reduction="sum"), x)[0]
    torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(logits, tiny_clf(images01).detach())


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_from_pyautoattack_stays_in_ball(tiny_clf, images01, labels, loss):
    res = A.apgd(tiny_clf, images01, labels, loss=loss, norm="linf", eps=0.1, steps=10, eot=1, seed=0)
    assert (res.x_adv - images01).abs().max() <= 0.1 + 1e-6
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1


def test_apgd_with_eot_on_stochastic_model(tiny_clf, images01, labels):
    d = DEFENSES.get("toy-noise").from_dict({})
    gen = torch.Generator().manual_seed(0)
    res = A.apgd(lambda x: d.classify(x, tiny_clf, generator=gen), images01, labels, loss="ce", norm="l2", eps=0.5, steps=5, eot=3, seed=0)
    assert (res.x_adv - images01).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5


def test_score_draws_rules():
    preds = torch.tensor([[1, 1, 1], [1, 2, 1], [2, 1, 2], [1, 2, 3]])
    y = torch.tensor([1, 1, 1, 1])
    s = A.score_draws(preds, y)
    assert s["single"].tolist() == [True, True, False, True]
    assert s["majority"].tolist() == [True, True, False, False]  # a 1-1-1 tie is not a majority
    assert s["worst"].tolist() == [True, False, False, False]


def test_predict_draws_uses_independent_noise(tiny_clf, images01):
    d = DEFENSES.get("toy-noise").from_dict({"sigma": 2.0})
    gen = torch.Generator().manual_seed(0)
    p = A.predict_draws(lambda x: d.classify(x, tiny_clf, generator=gen), images01, draws=8)
    assert p.shape == (6, 8)
    assert (p != p[:, :1]).any()  # with large noise, draws disagree somewhere


def test_projection_l2_and_linf():
    x = torch.full((2, 1, 4, 4), 0.5)
    far = x + torch.ones_like(x)
    p = A.project(far, x, "l2", 1.0)
    assert torch.allclose((p - x).flatten(1).norm(dim=1), torch.tensor([0.5 * 4, 0.5 * 4])) or (p - x).flatten(1).norm(dim=1).max() <= 1.0 + 1e-6
    p = A.project(far, x, "linf", 0.1)
    assert torch.allclose(p, x + 0.1)


def test_pgd_with_per_example_budgets(tiny_clf, images01, labels):
    eps = torch.tensor([0.0, 0.02, 0.05, 0.1, 0.2, 0.3])
    res = A.pgd(tiny_clf, images01, labels, norm="linf", eps=eps, steps=5, step_size=eps / 4, rand_start=True,
                generator=torch.Generator().manual_seed(0))
    per = (res.x_adv - images01).flatten(1).abs().max(1).values
    assert (per <= eps + 1e-6).all()
