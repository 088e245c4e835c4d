"""Gradient paths: BPDA equals the classifier gradient at the purified input; the full
gradient of a deterministic purifier matches finite differences; masking is detectable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.core.defense import DEFENSES, GradientPath


def test_bpda_gradient_equals_classifier_gradient_at_purified_input(tiny_clf, images01, labels):
    d = DEFENSES.get("toy-noise").from_dict({})
    x = images01.clone().requires_grad_(True)
    g = torch.Generator().manual_seed(3)
    loss = F.cross_entropy(d.classify(x, tiny_clf, path=GradientPath.BPDA, generator=g), labels, reduction="sum")
    (grad_bpda,) = torch.autograd.grad(loss, x)

    pur = d.purify(images01, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    (grad_ref,) = torch.autograd.grad(F.cross_entropy(tiny_clf(pur), labels, reduction="sum"), pur)
    torch.testing.assert_close(grad_bpda, grad_ref)


def test_full_gradient_matches_finite_differences(tiny_clf, images01, labels):
    d = DEFENSES.get("toy-smooth").from_dict({"sharpness": 3.0}).double()
    clf = tiny_clf.double()
    x0 = images01.double()

    def f(x):
        return F.cross_entropy(d.classify(x, clf, path=GradientPath.FULL), labels, reduction="sum")

    x = x0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(f(x), x)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):  # directional derivatives along random directions
        v = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        h = 1e-6
        fd = (f(x0 + h * v) - f(x0 - h * v)) / (2 * h)
        assert abs(fd.item() - (grad * v).sum().item()) < 1e-6 * max(1.0, abs(fd.item()))


def test_gradient_masking_defense_has_zero_full_gradient(tiny_clf, images01, labels):
    d = DEFENSES.get("toy-quantize").from_dict({})
    x = images01.clone().requires_grad_(True)
    loss = F.cross_entropy(d.classify(x, tiny_clf, path=GradientPath.FULL), labels)
    (g_full,) = torch.autograd.grad(loss, x)
    assert torch.count_nonzero(g_full) == 0
    x = images01.clone().requires_grad_(True)
    loss = F.cross_entropy(d.classify(x, tiny_clf, path=GradientPath.BPDA), labels)
    (g_bpda,) = torch.autograd.grad(loss, x)
    assert torch.count_nonzero(g_bpda) > 0
