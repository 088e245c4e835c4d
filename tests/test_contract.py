"""Contract tests over every registered defense (built-in and the toy plugin).

A new defense is tested here without new test code. Defenses whose setup needs
weights the test machine lacks must provide small defaults (``TINY`` below) or they fail.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from harness.core.defense import DEFENSES, Defense, GradientPath, SetupContext

#: Per-defense config overrides that make setup fast on a CPU (tiny networks, few steps).
TINY: dict[str, dict] = {}

#: Deliberately broken test plugins, checked by tests/test_engine.py and tests/test_flags.py instead.
BROKEN = {"toy-nan", "toy-range", "toy-nan-grad", "toy-hidden-noise"}


def _names():
    from harness.core.plugins import load_builtin, load_plugin
    from tests.conftest import TOY_PLUGIN

    load_builtin()
    load_plugin(TOY_PLUGIN)
    return [n for n in DEFENSES.names() if n not in BROKEN]


@pytest.fixture(params=_names())
def defense(request, tiny_clf) -> Defense:
    cls = DEFENSES.get(request.param)
    d = cls.from_dict(TINY.get(request.param, {}))
    d.setup(SetupContext(classifier=tiny_clf, dataset="digits", image_shape=(1, 8, 8), num_classes=10))
    d.eval()
    return d


def test_purify_preserves_shape_dtype_and_range(defense, images01):
    out = defense.purify(images01, generator=torch.Generator().manual_seed(0))
    assert out.shape == images01.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1


def test_same_generator_same_output(defense, images01):
    a = defense.purify(images01, generator=torch.Generator().manual_seed(1))
    b = defense.purify(images01, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)


def test_stochastic_flag_is_honest(defense, images01):
    a = defense.purify(images01, generator=torch.Generator().manual_seed(1))
    b = defense.purify(images01, generator=torch.Generator().manual_seed(2))
    assert (not torch.equal(a, b)) == defense.stochastic


@pytest.mark.parametrize("path", [p for p in GradientPath if p is not GradientPath.CLASSIFIER])
def test_declared_gradient_paths_give_finite_grads(defense, images01, tiny_clf, path):
    x = images01.clone().requires_grad_(True)
    if path not in defense.supported_paths():
        with pytest.raises(Exception, match="gradient path"):
            defense.purify_along(x, path, generator=torch.Generator().manual_seed(0))
        return
    logits = defense.classify(x, tiny_clf, path=path, generator=torch.Generator().manual_seed(0))
    logits.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all(), path


def test_bpda_backward_is_identity(defense, images01):
    x = images01.clone().requires_grad_(True)
    out = defense.purify_along(x, GradientPath.BPDA, generator=torch.Generator().manual_seed(0))
    out.mul(3.0).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 3.0))
    ref = defense.purify(images01, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.detach(), ref)


def test_config_round_trip_keeps_identity(defense, tiny_clf):
    """A defense rebuilt from its stored config and set up again has the same identity
    (identity is taken after setup, when weights hashes and dataset defaults are known).
    """
    again = type(defense).from_dict(dataclasses.asdict(defense.config))
    again.setup(SetupContext(classifier=tiny_clf, dataset="digits", image_shape=(1, 8, 8), num_classes=10))
    assert again.identity() == defense.identity()


def test_unknown_config_key_is_an_error(defense):
    with pytest.raises(Exception, match="no option 'definitely_not_an_option'"):
        type(defense).from_dict({"definitely_not_an_option": 1})


def test_declared_paths_are_implemented(defense, images01):
    """A declared adjoint/surrogate path overrides its method; a declared full path is
    connected to autograd (its output depends on the input through the graph).
    """
    cls = type(defense)
    for path, method in ((GradientPath.ADJOINT, "purify_adjoint"), (GradientPath.SURROGATE, "purify_surrogate")):
        overridden = getattr(cls, method) is not getattr(Defense, method)
        assert overridden == (path in cls.gradient_paths), (path, method)
    if GradientPath.FULL in cls.gradient_paths:
        out = defense.purify(images01.clone().requires_grad_(True), generator=torch.Generator().manual_seed(0))
        assert out.requires_grad


def test_scoring_forward_needs_no_autograd(defense, images01, tiny_clf):
    """Evaluation draws use the defense's own forward (path None): no graph, same values as purify."""
    x = images01.clone().requires_grad_(True)
    logits = defense.classify(x, tiny_clf, path=None, generator=torch.Generator().manual_seed(3))
    if logits.requires_grad:  # through the classifier's own parameters, never through the input
        assert torch.autograd.grad(logits.sum(), x, allow_unused=True)[0] is None
    again = defense.classify(images01, tiny_clf, path=None, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(logits.detach(), again.detach())
    if type(defense).classify is Defense.classify:  # defenses that vote internally (CMAP) override classify
        ref = tiny_clf(defense.purify(images01, generator=torch.Generator().manual_seed(3)))
        torch.testing.assert_close(logits.detach(), ref.detach())
