"""The attack contract, checked on every registered attack (built-in and plugin), plus EOT and scoring.

Every attack must keep its result inside the eps-ball and [0, 1], report margins that
agree with the model's logits, keep a non-increasing curve, and (fixed-budget attacks)
use at least 90% of the budget on the examples it cannot break. The mutation tests
show the checks can fail: with the projection replaced by "no perturbation" the budget
check fails, and with the projection replaced by the identity the ball check fails.
"""

from __future__ import annotations

import pytest
import torch

from harness.core import ATTACKS, SUITES, AttackRandomness, Budget, GradientPath
from harness.core.defense import DEFENSES
from harness.core.registry import HarnessError
from threat_models.eot import AttackedFunction, eot_forward
from threat_models.losses import margin
from threat_models.norms import NORMS
from threat_models.scoring import predict_draws, score_draws
from threat_models.specs import ThreatSpec
from tests.tolerance import assert_close_scaled

EPS = {"linf": 0.05, "l2": 0.5}


def _spec(norm: str) -> ThreatSpec:
    eps = EPS[norm]
    return ThreatSpec(
        name="contract", norm=norm, eps=eps, steps=12, step_size=eps / 4, random_start=True, apgd_steps=12,
        attack_options=("square.n_queries=300", "cw-l2.steps=20", "cw-l2.search_steps=3", "apgd-t.n_target_classes=3",
                        "fab-t.n_target_classes=3", "diffhammer.n_iter=12", "diffhammer.n_eval=3"),
    )


@pytest.fixture
def attack_clf():
    """A small MLP whose margins leave a mix of broken and unbroken examples at the budgets above."""
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)).eval()


@pytest.fixture
def mid_images():
    """Images in [0.25, 0.75], so that clipping to [0, 1] never limits the budget."""
    g = torch.Generator().manual_seed(0)
    return 0.25 + 0.5 * torch.rand(12, 1, 8, 8, generator=g)


@pytest.fixture
def mid_labels(attack_clf, mid_images):
    """The classifier's own predictions: every example starts correctly classified."""
    with torch.no_grad():
        return attack_clf(mid_images).argmax(1)


def run_attack(name, norm, model, x, y, seed=0):
    spec = _spec(norm)
    cls = ATTACKS.get(name)
    attack = cls.from_options(spec, spec.options_for_attack(name))
    ticks = []
    res = attack.run(model, x, y, Budget(norm, spec.eps), AttackRandomness(torch.Generator().manual_seed(seed), seed), ticks.append)
    return attack, res, sum(ticks)


def contract_violations(name, norm, tiny_clf, x, y) -> list[str]:
    """Everything attack ``name`` gets wrong about the contract on (tiny_clf, x, y)."""
    model = AttackedFunction(tiny_clf)
    attack, res, ticks = run_attack(name, norm, model, x, y)
    eps, bad = EPS[norm], []
    d = NORMS.get(norm).distance(res.x_adv - x)
    if (d > eps * (1 + 1e-4) + 1e-6).any():
        bad.append(f"outside the eps-ball: max {norm} {float(d.max()):.4g} > {eps}")
    if res.x_adv.min() < 0 or res.x_adv.max() > 1:
        bad.append("outside [0, 1]")
    with torch.no_grad():
        m = margin(tiny_clf(res.x_adv), y)
    if not torch.allclose(m, res.margin.float(), atol=1e-4, rtol=1e-4):
        bad.append(f"margins disagree with the logits (max diff {float((m - res.margin).abs().max()):.3g})")
    if any(a < b for a, b in zip(res.curve, res.curve[1:])):
        bad.append(f"curve increases: {res.curve}")
    if model.training or any(m.training for m in tiny_clf.modules()):
        bad.append("left the model in training mode (BatchNorm would use batch statistics)")
    if ticks != attack.ticks():
        bad.append(f"reported {ticks} progress ticks, declares {attack.ticks()}")
    unbroken = m <= 0
    if not attack.minimum_norm and unbroken.any() and (d[unbroken] < 0.9 * eps).any():
        bad.append(f"uses {float(d[unbroken].min() / eps):.0%} of the budget on an example it cannot break (needs 90%)")
    return bad


def _registered():
    return [(a, n) for a in ATTACKS.names() for n in sorted(ATTACKS.get(a).norms) if not ATTACKS.get(a).requires]


@pytest.mark.parametrize("name,norm", _registered())
def test_every_attack_keeps_the_contract(name, norm, attack_clf, mid_images, mid_labels):
    assert contract_violations(name, norm, attack_clf, mid_images, mid_labels) == []


@pytest.mark.parametrize("name", ["pgd", "apgd-ce", "square"])
def test_budget_check_is_not_vacuous(name, attack_clf, mid_images, mid_labels):
    """Some examples survive at this budget, so the 90%-of-budget check has something to check."""
    _, res, _ = run_attack(name, "l2", AttackedFunction(attack_clf), mid_images, mid_labels)
    with torch.no_grad():
        assert (margin(attack_clf(res.x_adv), mid_labels) <= 0).sum() >= 2


def test_mutation_no_perturbation_fails_the_budget_check(monkeypatch, attack_clf, mid_images, mid_labels):
    l2 = NORMS.get("l2")
    monkeypatch.setattr(l2, "clip_delta", lambda delta, eps: torch.zeros_like(delta))
    bad = contract_violations("pgd", "l2", attack_clf, mid_images, mid_labels)
    assert any("of the budget" in b for b in bad), bad


def test_mutation_identity_projection_fails_the_ball_check(monkeypatch, attack_clf, mid_images, mid_labels):
    l2 = NORMS.get("l2")
    monkeypatch.setattr(l2, "clip_delta", lambda delta, eps: delta)
    bad = contract_violations("pgd", "l2", attack_clf, mid_images, mid_labels)
    assert any("outside the eps-ball" in b for b in bad), bad


def test_attacks_declare_what_the_engine_needs():
    for name, cls in ATTACKS.items():
        caps = cls.capabilities()
        assert caps["norms"] and set(caps["norms"]) <= set(NORMS.names()), name
        assert caps["eot"] in ("batched", "looped", "none"), name
    for name, suite in SUITES.items():
        for member in suite.deterministic + (suite.stochastic or ()):
            assert member in ATTACKS, (name, member)


def test_pgd_curve_counts_robust_examples(attack_clf, mid_images, mid_labels):
    _, res, _ = run_attack("pgd", "linf", AttackedFunction(attack_clf), mid_images, mid_labels)
    assert len(res.curve) == _spec("linf").steps + 1
    assert res.curve[-1] == int((res.margin <= 0).sum())
    assert res.curve[0] >= res.curve[-1]


def test_stronger_budget_breaks_more(attack_clf, mid_images, mid_labels):
    """A sanity check that attacks attack: at a large budget PGD breaks every example."""
    spec = ThreatSpec(name="big", eps=0.5, steps=20, step_size=0.05)
    attack = ATTACKS.get("pgd").from_options(spec)
    res = attack.run(AttackedFunction(attack_clf), mid_images, mid_labels, Budget("linf", 0.5),
                     AttackRandomness(torch.Generator().manual_seed(0), 0), lambda k: None)
    assert (res.margin > 0).all()


def test_per_example_budgets(tiny_clf, images01, labels):
    from threat_models.attacks.pgd import pgd

    eps = torch.tensor([0.0, 0.02, 0.05, 0.1, 0.2, 0.3])
    res = pgd(tiny_clf, images01, labels, norm="linf", eps=eps, steps=5, step_size=eps / 4, generator=torch.Generator().manual_seed(0))
    per = (res.x_adv - images01).flatten(1).abs().max(1).values
    assert (per <= eps + 1e-6).all()
    with pytest.raises(HarnessError, match="one budget per batch"):
        Budget("linf", eps).scalar_eps()


# --------------------------------------------------------------------------- EOT
def _toy_noise_model(tiny_clf, seed):
    d = DEFENSES.get("toy-noise").from_dict({})
    gen = torch.Generator().manual_seed(seed)
    return d, (lambda x: d.classify(x, tiny_clf, path=GradientPath.FULL, generator=gen))


def _blur(x):
    import sys

    # the toy plugin is loaded under its own module name, as `--plugin` loads it
    return sys.modules[DEFENSES.get("toy-noise").__module__]._blur(x)


def test_eot_batched_matches_averaged_gradients(tiny_clf, images01, labels):
    """K EOT samples stacked along the batch give the mean of K single-sample gradients."""
    d, model = _toy_noise_model(tiny_clf, 5)
    K = 4
    _, _, g_batched = eot_forward(model, images01, labels, eot=K, reduce="loss", loss="ce", max_batch=10_000, need_grad=True)
    gen = torch.Generator().manual_seed(5)  # the same noise, one sample at a time
    noise = torch.randn((K,) + images01.shape, generator=gen)
    acc = torch.zeros_like(images01)
    for k in range(K):
        x = images01.clone().requires_grad_(True)
        out = tiny_clf(_blur(x + d.config.sigma * noise[k]).clamp(0, 1))
        acc += torch.autograd.grad(torch.nn.functional.cross_entropy(out, labels, reduction="sum") / K, x)[0]
    assert_close_scaled(g_batched, acc)
    _, chunked = _toy_noise_model(tiny_clf, 5)  # chunking draws the same stream in the same order
    _, _, g_chunked = eot_forward(chunked, images01, labels, eot=K, reduce="loss", loss="ce", max_batch=len(labels), need_grad=True)
    assert_close_scaled(g_chunked, g_batched)


def test_logit_averaging_eot_reduce(tiny_clf, images01, labels):
    logits, _, g = eot_forward(tiny_clf, images01, labels, eot=3, reduce="logits", loss="ce", max_batch=6, need_grad=True)
    x = images01.clone().requires_grad_(True)
    ref = torch.autograd.grad(torch.nn.functional.cross_entropy(tiny_clf(x), labels, reduction="sum"), x)[0]
    assert_close_scaled(g, ref)
    assert_close_scaled(logits, tiny_clf(images01).detach())


@pytest.mark.parametrize("name", ["pgd", "apgd-ce", "apgd-dlr", "apgd-t", "toy-fgsm", "diffhammer"])
def test_eot_attacks_run_on_a_stochastic_model(name, tiny_clf, images01, labels):
    _, fn = _toy_noise_model(tiny_clf, 0)
    model = AttackedFunction(fn, stochastic=True, eot_samples=3)
    _, res, _ = run_attack(name, "l2", model, images01, labels)
    assert (res.x_adv - images01).flatten(1).norm(dim=1).max() <= EPS["l2"] + 1e-5


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_batched_eot_in_apgd_is_the_looped_estimator_in_one_call(loss, tiny_clf, images01, labels):
    """pyautoattack's APGD with the batched-EOT model and eot_iter=1 follows exactly the trajectory of its own
    K-call loop (the same noise stream on a fixed generator, the mean of per-draw loss gradients), in one call.
    """
    from pyautoattack.autopgd_base import APGDAttack

    from threat_models.attacks._pyautoattack import eot_model, pyautoattack, seeded

    pyautoattack()
    K, n_iter, out = 4, 3, {}
    for batched in (False, True):
        _, fn = _toy_noise_model(tiny_clf, 5)
        calls = []
        model = AttackedFunction(lambda x, fn=fn, calls=calls: calls.append(len(x)) or fn(x), stochastic=True, eot_samples=K)
        module, eot_iter = eot_model(model, batched)
        att = APGDAttack(module, n_iter=n_iter, eps=0.1, norm="Linf", eot_iter=eot_iter, loss=loss, seed=0, device="cpu")
        if batched:
            module.bind(att, labels)
        att.init_hyperparam(images01)
        with seeded(0, images01.device):
            out[batched] = (att.attack_single_run(images01.clone(), labels.clone()), calls)
    (looped, c_loop), (batch, c_batch) = out[False], out[True]
    for a, b in zip(looped, batch):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-6)
    assert len(c_loop) == K * (n_iter + 1) and set(c_loop) == {6}  # K calls of B per gradient
    assert len(c_batch) == n_iter + 1 and set(c_batch) == {6 * K}  # one call of K*B per gradient


def test_batched_eot_refuses_another_loss(tiny_clf, images01, labels):
    from pyautoattack.autopgd_base import APGDAttack

    from threat_models.attacks._pyautoattack import BatchedEOT

    _, fn = _toy_noise_model(tiny_clf, 0)
    module = BatchedEOT(fn, 3, 1024)
    module.bind(APGDAttack(module, loss="ce", eps=0.1, device="cpu"), labels)
    x = images01.clone().requires_grad_(True)
    with pytest.raises(HarnessError, match="another loss"):
        torch.autograd.grad(margin(module(x), labels).sum(), x)


def test_diffhammer_grafts_through_the_selected_draw(tiny_clf, images01, labels):
    """The grafted gradient is the VJP of the selected draw's own purification (replayed with its seed),
    whether the evaluation pass keeps its graph (one chunk) or replays chunk by chunk.
    """
    from harness.evaluation.forward import DefendedForward
    from threat_models.attacks.diffhammer import _Draws, em_select

    d = DEFENSES.get("toy-noise").from_dict({})
    B, N = len(labels), 3
    sel = torch.tensor([0, 1, 2, 0, 1, 2])
    for max_forward in (10_000, B):  # one chunk holding every draw (graph kept) / one draw per chunk (replayed)
        model = DefendedForward(d, tiny_clf, GradientPath.FULL, torch.Generator().manual_seed(1), max_forward=max_forward)
        draws = _Draws(model, N, "linf", lambda: 7, False)
        z, ell, G, chunks = draws.evaluate(images01, labels, "ce", True)
        r = G.flatten(2)[sel, torch.arange(B)]
        g = draws.graft(images01, labels, "ce", sel, r, chunks)
        xin = images01.repeat(N, 1, 1, 1).requires_grad_(True)
        if max_forward > B * N:
            xp = d.purify(xin, generator=torch.Generator().manual_seed(7))
        else:
            xp = torch.cat([d.purify(xin[j * B:(j + 1) * B], generator=torch.Generator().manual_seed(7 + j))
                            for j in range(N)])
        per = torch.nn.functional.cross_entropy(tiny_clf(xp), labels.repeat(N), reduction="none").view(N, B)
        ref = torch.autograd.grad(per[sel, torch.arange(B)].sum(), xin)[0].view(N, B, *images01.shape[1:]).sum(0)
        assert_close_scaled(g, ref)
        assert_close_scaled(z, tiny_clf(xp).detach().view(N, B, -1))
    s, r = em_select(G.flatten(2), ell, torch.full((B,), 0.1), "linf", lam=5.0, steps=5)
    assert s.shape == (B,) and r.shape == (B, G[0, 0].numel()) and torch.isfinite(r).all()


def test_diffhammer_on_a_stochastic_defense_reports_the_any_iterate_worst(tiny_clf, images01, labels):
    from harness.evaluation.forward import DefendedForward

    d = DEFENSES.get("toy-noise").from_dict({})
    model = DefendedForward(d, tiny_clf, GradientPath.FULL, torch.Generator().manual_seed(1), eot_samples=2)
    model.stochastic = True
    attack, res, ticks = run_attack("diffhammer", "linf", model, images01, labels)
    assert ticks == attack.ticks() == 3 * 13
    assert len(res.curve) == 3 * 13 and all(a >= b for a, b in zip(res.curve, res.curve[1:]))
    assert res.curve[-1] == int((res.margin <= 0).sum())  # broken by some draw at some iterate <=> margin > 0
    assert (res.x_adv - images01).abs().max() <= EPS["linf"] + 1e-6
    assert model.purified > 0
    # its two statistics per example: robust under every draw of every iterate (the curve's count), and 1 - best avg
    anyit, avg = res.stats["any_iterate"], res.stats["avg"]
    assert int(anyit.sum()) == res.curve[-1] and ((avg >= 0) & (avg <= 1)).all() and (avg[anyit == 1] == 1).all()


def test_diffhammer_statistics_are_stored_metrics_of_the_job():
    from harness.evaluation import RunConfig, evaluate

    over = (("attacks", "diffhammer"), ("diffhammer.n_iter", "2"), ("diffhammer.n_eval", "2"), ("batch_size", "4"))
    out = evaluate(RunConfig(defense="toy-noise", threat="bpda", n_examples=8, overrides=over))
    m = out.metrics
    anyit, avg = m["robust_accuracy_diffhammer_any_iterate"], m["robust_accuracy_diffhammer_avg"]  # label: the plan's
    assert anyit["n"] == avg["n"] == 8 and anyit["lower"] <= anyit["value"] <= anyit["upper"] and avg["lower"] is None
    assert 0 <= anyit["value"] <= avg["value"] <= m["clean_accuracy"]["value"]  # per example: any-iterate robust => avg 1


def test_adaptive_runs_diffhammer_only_against_stochastic_defenses():
    from harness.core.defense import DEFENSES as D
    from harness.evaluation.plan import build_plan
    from threat_models.specs import THREATS

    spec = THREATS.get("adaptive").resolve("digits")
    assert "diffhammer.n_iter=10" in spec.attack_options  # the CPU budget of the digit datasets
    labels = {name: [p.label for p in build_plan(D.get(name), spec).attacks] for name in ("diffpure", "none", "maep")}
    assert "diffhammer" in labels["diffpure"] and "diffhammer@bpda" in labels["diffpure"]
    assert not any(lab.startswith("diffhammer") for lab in labels["none"] + labels["maep"])
    assert SUITES.get("diffhammer-stochastic").members(False) == ()


def test_diffhammer_deterministic_model_is_plain_apgd_with_one_draw(attack_clf, mid_images, mid_labels):
    sizes = []
    model = AttackedFunction(lambda x: sizes.append(len(x)) or attack_clf(x))
    run_attack("diffhammer", "linf", model, mid_images, mid_labels)
    assert max(sizes) == len(mid_labels)  # one draw per iterate (n_eval=3 would stack 36)


# --------------------------------------------------------------------------- scoring
def test_score_draws_rules():
    preds = torch.tensor([[1, 1, 1], [1, 2, 1], [2, 1, 2], [1, 2, 3]])
    s = score_draws(preds, torch.tensor([1, 1, 1, 1]))
    assert s["single"].tolist() == [True, True, False, True]
    assert s["majority"].tolist() == [True, True, False, False]  # a 1-1-1 tie is not a majority
    assert s["worst"].tolist() == [True, False, False, False]


def test_predict_draws_uses_independent_noise(tiny_clf, images01):
    d = DEFENSES.get("toy-noise").from_dict({"sigma": 2.0})
    gen = torch.Generator().manual_seed(0)
    p = predict_draws(lambda x: d.classify(x, tiny_clf, generator=gen), images01, draws=8)
    assert p.shape == (6, 8)
    assert (p != p[:, :1]).any()  # with large noise, draws disagree somewhere


def test_projection_l2_and_linf():
    x = torch.full((2, 1, 4, 4), 0.5)
    far = x + torch.ones_like(x)
    p = NORMS.get("l2").project(far, x, 1.0)
    torch.testing.assert_close((p - x).flatten(1).norm(dim=1), torch.tensor([1.0, 1.0]))
    p = NORMS.get("linf").project(far, x, 0.1)
    torch.testing.assert_close(p, x + 0.1)
