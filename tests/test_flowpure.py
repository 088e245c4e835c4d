"""FlowPure (defenses/flowpure.py) and its trainer (harness/train_flowpure.py).

The contract tests (tests/test_contract.py) cover shape, range, seeding, gradient paths
and config round trips of all three variants; these tests check what is specific to
FlowPure: training, the shipped digits flows, the Gaussian start point, the gradients.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from defenses.flowpure import SIGMA_MAX, FlowPureGauss, FlowPurePGD, VelocityField, build_unet, shipped_weights_dir
from harness.core.registry import HarnessError
from harness.training.diffusion import small_unet_config
from harness.training.flowpure import FlowPureRecipe, cfm_loss, cw_l2, train_flowpure
from tests.tolerance import assert_close_scaled
from harness.core.defense import SetupContext

DIGITS_CTX = dict(dataset="digits", image_shape=(1, 8, 8), num_classes=10)


def _tiny_recipe(**kw) -> FlowPureRecipe:
    base = dict(
        unet_config=small_unet_config(8, 1, (8, 16), 4), steps={"pgd": 40, "cw": 40, "gauss": 40}, batch_size=16, lr=2e-3,
        eps_max=0.32, curve_every=5, ckpt_every=1000,
    )
    base.update(kw)
    return FlowPureRecipe(**base)


def _tiny_velocity(dtype=torch.float32, seed: int = 0) -> VelocityField:
    torch.manual_seed(seed)
    return VelocityField(build_unet(small_unet_config(8, 1, (8, 16), 4)), 1000.0).to(dtype).eval()


@pytest.fixture(scope="module")
def digits_cnn():
    from harness.classifiers import load_classifier

    return load_classifier("digits-cnn", dataset="digits").module


@pytest.fixture(scope="module")
def flow_pgd(digits_cnn):
    d = FlowPurePGD()
    d.setup(SetupContext(classifier=digits_cnn, **DIGITS_CTX))
    return d.eval()


@pytest.fixture(scope="module")
def heldout_adv(digits_cnn):
    """PGD-linf at the digits test budget (0.2, 20 steps of 0.05) against the shipped CNN, on 64 test digits."""
    from harness.data import load_split
    from threat_models.attacks.pgd import pgd

    x, y = load_split("digits", "test")
    x, y = x[:64], y[:64]
    res = pgd(digits_cnn, x, y, norm="linf", eps=0.2, steps=20, step_size=0.05, generator=torch.Generator().manual_seed(0))
    return x, y, res.x_adv


# --------------------------------------------------------------------------- training
def test_cfm_loss_falls_on_a_tiny_run(tmp_path):
    rec = train_flowpure("pgd", "digits", steps=40, out=tmp_path, eval_n=0, recipe=_tiny_recipe(), progress=False)
    curve = [loss for _, loss in rec["loss_curve"]]
    assert len(curve) == 8 and all(v == v for v in curve)
    assert curve[-1] < 0.5 * curve[0], curve
    # what ships: a state_dict plus a recipe whose sha256 is the file's, loadable by the defense
    assert rec["sha256"] == json.loads((tmp_path / "flowpure-pgd-digits.json").read_text())["sha256"]
    assert not (tmp_path / "flowpure-pgd-digits.ckpt").exists()
    d = FlowPurePGD.from_dict({"weights": str(tmp_path / "flowpure-pgd-digits.pt")})
    d.setup(SetupContext(classifier=None, **DIGITS_CTX))
    assert d.config.weights_sha256 == rec["sha256"]


def test_resume_continues_bit_identically(tmp_path, monkeypatch):
    import harness.training.flowpure as T

    recipe = _tiny_recipe(ckpt_every=3)
    straight = train_flowpure("gauss", "digits", steps=6, out=tmp_path / "a", eval_n=0, recipe=recipe, progress=False)

    calls = {"n": 0}
    real = T.cfm_loss

    def dies_at_step_5(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(T, "cfm_loss", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_flowpure("gauss", "digits", steps=6, out=tmp_path / "b", eval_n=0, recipe=recipe, progress=False)
    assert (tmp_path / "b" / "flowpure-gauss-digits.ckpt").is_file()
    monkeypatch.setattr(T, "cfm_loss", real)
    resumed = train_flowpure("gauss", "digits", steps=6, out=tmp_path / "b", resume=True, eval_n=0, recipe=recipe, progress=False)
    assert resumed["sha256"] == straight["sha256"]
    assert resumed["loss_curve"] == straight["loss_curve"]


def test_cfm_loss_is_zero_for_the_straight_line_velocity():
    class Exact(torch.nn.Module):  # v(t, x_t) = x1 - x0 for one fixed pair
        def forward(self, t, x):
            return target

    x0, x1 = torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8)
    target = x1 - x0
    assert cfm_loss(Exact(), x0, x1, torch.rand(4)).item() == 0.0


def test_cw_sources_stop_at_each_examples_own_step_count(digits_cnn):
    from harness.data import load_split

    x, y = load_split("digits", "train")
    x, y = x[:5], y[:5]
    params = dict(c=torch.tensor([0.5, 1.0, 2.0, 1.5, 0.1]), kappa=torch.tensor([0.0, 0.5, 1.0, 0.2, 0.9]),
                  n_steps=torch.tensor([1, 7, 3, 12, 5]), lr=torch.tensor([0.02, 0.01, 0.015, 0.005, 0.02]))
    batched = cw_l2(digits_cnn, x, y, **params)
    for i in range(5):
        alone = cw_l2(digits_cnn, x[i : i + 1], y[i : i + 1], **{k: v[i : i + 1] for k, v in params.items()})
        assert_close_scaled(batched[i : i + 1], alone)
    assert batched.min() >= 0 and batched.max() <= 1 and not torch.equal(batched, x)


# --------------------------------------------------------------------------- shipped flows
def test_shipped_pgd_flow_moves_adversarial_inputs_toward_clean(flow_pgd, heldout_adv):
    x, _, x_adv = heldout_adv
    with torch.no_grad():
        pur = flow_pgd.purify(x_adv)
    before = (x_adv - x).flatten(1).norm(dim=1)
    after = (pur - x).flatten(1).norm(dim=1)
    assert after.mean() < 0.7 * before.mean(), (after.mean(), before.mean())
    assert (after < before).float().mean() >= 0.9


def test_detection_score_ranks_adversarial_above_clean(flow_pgd, heldout_adv):
    from sklearn.metrics import roc_auc_score

    x, _, x_adv = heldout_adv
    with torch.no_grad():
        s_clean, s_adv = flow_pgd.detection_score(x), flow_pgd.detection_score(x_adv)
    assert s_clean.shape == (len(x),) and (s_clean >= 0).all()
    auc = roc_auc_score([0] * len(x) + [1] * len(x), torch.cat([s_clean, s_adv]).numpy())
    assert auc > 0.9, auc


def test_deterministic_purification_is_reproducible(flow_pgd, digits_cnn, heldout_adv):
    _, _, x_adv = heldout_adv
    again = FlowPurePGD()
    again.setup(SetupContext(classifier=digits_cnn, **DIGITS_CTX))
    with torch.no_grad():
        a = flow_pgd.purify(x_adv[:16], generator=torch.Generator().manual_seed(1))
        b = flow_pgd.purify(x_adv[:16], generator=torch.Generator().manual_seed(2))
        c = again.eval().purify(x_adv[:16])
    assert torch.equal(a, b) and torch.equal(a, c)


def test_shipped_model_keeps_its_recorded_accuracy():
    from harness.evaluation import RunConfig, resolve, run_job
    from harness.store import Store

    recipe = json.loads((shipped_weights_dir() / "flowpure-pgd-digits.json").read_text())
    ev = recipe["eval"]
    job = resolve(RunConfig(defense="flowpure-pgd", threat="preprocessor-blind", n_examples=ev["n_examples"]))
    out = run_job(job, Store("sqlite://"), progress=False).as_json()
    # Same subset, seeds and weights: only float differences across machines/threads remain.
    assert abs(out["clean_accuracy"] - ev["clean_accuracy"]) <= 0.02
    assert abs(out["robust_accuracy"] - ev["robust_accuracy"]) <= 0.04
    assert out["robust_accuracy"] > 0.5  # far above the undefended CNN's ~2%


# --------------------------------------------------------------------------- the flow
@pytest.mark.parametrize("sigma", [0.15, 0.2])
def test_gaussian_start_point_is_x_plus_sigma_noise(sigma, images01):
    d = FlowPureGauss.from_dict({"sigma": sigma}).use_velocity(_tiny_velocity())
    seen = []
    d.velocity.register_forward_pre_hook(lambda mod, args: seen.append((float(args[0]), args[1].clone())))
    d.purify(images01, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(images01.shape, generator=torch.Generator().manual_seed(3))
    t0, x0 = seen[0]
    assert t0 == pytest.approx(1 - sigma / SIGMA_MAX)
    torch.testing.assert_close(x0, images01 + sigma * noise)
    assert len(seen) == 9 and seen[-1][0] == pytest.approx(1 - (1 - t0) / 9)


def _directional_fd(fn, x, direction, h=1e-6):
    return (fn(x + h * direction) - fn(x - h * direction)) / (2 * h)


@pytest.mark.parametrize("cls", [FlowPurePGD, FlowPureGauss])
def test_full_gradient_matches_finite_differences(cls):
    d = cls().use_velocity(_tiny_velocity(torch.float64))
    g = torch.Generator().manual_seed(0)
    x = 0.3 + 0.4 * torch.rand(3, 1, 8, 8, generator=g, dtype=torch.float64)
    w = torch.randn(x.shape, generator=g, dtype=torch.float64)

    def f(inp):
        return (d.purify(inp, generator=torch.Generator().manual_seed(5)) * w).sum()

    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(f(xr), xr)
    for k in range(3):
        u = torch.randn(x.shape, generator=g, dtype=torch.float64)
        with torch.no_grad():
            fd = _directional_fd(f, x, u)
        assert (grad * u).sum().item() == pytest.approx(fd.item(), rel=1e-5, abs=1e-8)


def _grads(defense, clf, x, y, paths):
    out = {}
    for path in paths:
        xr = x.clone().requires_grad_(True)
        loss = F.cross_entropy(defense.classify(xr, clf, path=path), y, reduction="sum")
        out[path] = torch.autograd.grad(loss, xr)[0].flatten(1)
    return out


def test_adjoint_gradient_agrees_with_full(flow_pgd, digits_cnn, heldout_adv):
    _, y, x_adv = heldout_adv
    g = _grads(flow_pgd, digits_cnn, x_adv, y, ("full", "adjoint", "surrogate"))
    per = F.cosine_similarity(g["full"], g["adjoint"], dim=1)
    assert per.median() >= 0.99 and per.min() >= 0.9, per
    assert F.cosine_similarity(g["full"].flatten(), g["adjoint"].flatten(), dim=0) >= 0.98
    assert F.cosine_similarity(g["full"].flatten(), g["surrogate"].flatten(), dim=0) > 0.5
    # a midpoint adjoint solve tracks the exact (discrete) gradient more closely still
    mid = FlowPurePGD.from_dict({"adjoint_method": "midpoint"}).use_velocity(flow_pgd.velocity)
    g_mid = _grads(mid, digits_cnn, x_adv, y, ("adjoint",))["adjoint"]
    assert F.cosine_similarity(g["full"].flatten(), g_mid.flatten(), dim=0) >= 0.99


def test_nfe_and_capabilities():
    caps = FlowPurePGD.capabilities()
    assert caps["gradient_paths"] == ["adjoint", "bpda", "classifier", "full", "surrogate"]
    assert caps["has_detection_score"] and not caps["stochastic"] and FlowPureGauss.stochastic
    assert FlowPurePGD().nfe_per_call == 9 and FlowPurePGD.from_dict({"steps": 5}).nfe_per_call == 5
    assert FlowPurePGD.strongest_path().value == "full"


# --------------------------------------------------------------------------- errors
def test_missing_weights_give_a_one_line_error():
    with pytest.raises(HarnessError) as err:
        # cifar100: a dataset FlowPure has a recipe for but no shipped weights (cifar10's are shipped)
        FlowPurePGD().setup(SetupContext(classifier=None, dataset="cifar100", image_shape=(3, 32, 32), num_classes=100))
    msg = str(err.value)
    assert "\n" not in msg and "flowpure-pgd-cifar100.pt" in msg
    assert "harness train flowpure --variant pgd --dataset cifar100" in msg


def test_bad_options_and_mismatched_weights_are_errors(tmp_path):
    with pytest.raises(HarnessError, match="sigma"):
        FlowPureGauss.from_dict({"sigma": 0.5})
    with pytest.raises(HarnessError, match="steps"):
        FlowPurePGD.from_dict({"steps": 0})
    with pytest.raises(HarnessError, match="weights_sha256"):
        FlowPurePGD.from_dict({"weights_sha256": "0" * 64}).setup(SetupContext(classifier=None, **DIGITS_CTX))
    with pytest.raises(HarnessError, match="trained for variant 'gauss'"):
        FlowPurePGD.from_dict({"weights": str(shipped_weights_dir() / "flowpure-gauss-digits.pt")}).setup(
            SetupContext(classifier=None, **DIGITS_CTX)
        )
    with pytest.raises(HarnessError, match="does not exist"):
        FlowPurePGD.from_dict({"weights": str(tmp_path / "nope.pt")}).setup(SetupContext(classifier=None, **DIGITS_CTX))


def test_trainer_is_registered():
    from harness.training import load_trainers

    assert "flowpure" in load_trainers().names()
