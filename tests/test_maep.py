"""MAEP: the masked-autoencoder purifier and its trainer (issue 7).

CPU only; tiny random networks except where the shipped digits purifier is the point.
"""

from __future__ import annotations

import json

import pytest
import torch

from defenses import maep as M
from harness.core.registry import HarnessError
from harness.core.defense import SetupContext

#: A network small enough for float64 finite differences in a fraction of a second.
TINY_ARCH = dict(patch=2, emb=16, enc_depth=1, enc_heads=2, dec_depth=1, dec_heads=2, mlp_ratio=2.0)
#: Sizes for the tiny training runs (the recipe's schedule and loss, a smaller network).
TRAIN_ARCH = dict(emb=32, enc_depth=1, enc_heads=2, dec_depth=1, dec_heads=2)

#: Tolerances on the shipped model's recorded engine numbers (n=256). The run is
#: deterministic, so on the training machine they agree exactly; elsewhere float
#: differences may flip a few borderline examples (0.02 = 5 of 256).
CLEAN_TOL = 0.02
ROBUST_TOL = 0.04


def _ctx(dataset="digits", shape=(1, 8, 8), clf=None, weights_dir=None):
    return SetupContext(classifier=clf, dataset=dataset, image_shape=shape, num_classes=10, weights_dir=weights_dir)


def _tiny(dtype=torch.float32, size=8, seed=0) -> M.MAEP:
    torch.manual_seed(seed)
    net = M.MaskedAutoencoder(M.MAEArch(image_size=size, channels=1, **TINY_ARCH)).to(dtype)
    return M.MAEP().use_model(net)


@pytest.fixture(scope="module")
def shipped():
    d = M.MAEP()
    d.setup(_ctx())
    return d.eval()


@pytest.fixture(scope="module")
def recipe() -> dict:
    return json.loads(M.shipped_weights("digits").with_suffix(".json").read_text())


# --------------------------------------------------------------------------- model
def test_masked_forward_encodes_only_visible_patches():
    torch.manual_seed(0)
    net = M.MaskedAutoencoder(M.MAEArch(image_size=8, channels=1, **TINY_ARCH)).eval()
    x = torch.rand(3, 1, 8, 8)
    keep = M.random_keep(3, 16, 0.75, torch.Generator().manual_seed(0))
    assert keep.shape == (3, 4) and all(len(set(r.tolist())) == 4 for r in keep)
    # hidden patches of the input do not change the masked reconstruction
    hidden = torch.ones(3, 16, dtype=torch.bool)
    hidden[torch.arange(3)[:, None], keep] = False
    x2 = x.clone().view(3, 1, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(3, 16, 4)
    x2[hidden] = torch.rand(int(hidden.sum()), 4)
    x2 = x2.view(3, 4, 4, 1, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(net(x, keep), net(x2, keep))
        assert not torch.allclose(net(x), net(x2))


def test_config_and_capabilities():
    caps = M.MAEP.capabilities()
    assert caps["stochastic"] is False and "full" in caps["gradient_paths"] and M.MAEP.nfe_per_call == 1
    with pytest.raises(HarnessError, match="tile"):
        M.MAEP.from_dict({"tile": "sideways"})


# --------------------------------------------------------------------------- tiling
def test_tiling_one_tile_reproduces_untiled():
    d = _tiny()
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        ref = d.net(x).clamp(0, 1)
        torch.testing.assert_close(d.purify(x), ref, rtol=0, atol=0)
        torch.testing.assert_close(M.from_tiles(d.net(M.to_tiles(x, 8)), 5, 8, 8).clamp(0, 1), ref)


def test_tiling_16x16_equals_purifying_each_tile(shipped):
    from harness.data import load_split

    x, _ = load_split("digits", "test")
    digits = x[:8].view(2, 4, 1, 8, 8)  # 2 images of 2x2 digits
    big = torch.cat([torch.cat([digits[:, 0], digits[:, 1]], 3), torch.cat([digits[:, 2], digits[:, 3]], 3)], 2)
    assert big.shape == (2, 1, 16, 16)
    with torch.no_grad():
        out = shipped.purify(big)
        each = shipped.purify(x[:8]).view(2, 4, 1, 8, 8)
    torch.testing.assert_close(out[:, :, :8, :8], each[:, 0])
    torch.testing.assert_close(out[:, :, :8, 8:], each[:, 1])
    torch.testing.assert_close(out[:, :, 8:, :8], each[:, 2])
    torch.testing.assert_close(out[:, :, 8:, 8:], each[:, 3])


def test_tiling_errors_are_one_line(shipped):
    with pytest.raises(HarnessError, match="multiples of 8") as e:
        shipped.purify(torch.rand(1, 1, 12, 16))
    assert "\n" not in str(e.value)
    off = M.MAEP.from_dict({"tile": "off"}).use_model(shipped.net)
    with pytest.raises(HarnessError, match="tile=off") as e:
        off.purify(torch.rand(1, 1, 16, 16))
    assert "\n" not in str(e.value)
    # without an adapter (adapter=none), setup refuses a dataset whose images cannot be tiled,
    # before any attack runs (adapter=auto resizes them to a multiple of 8 first)
    with pytest.raises(HarnessError, match="multiples of 8"):
        M.MAEP.from_dict({"adapter": "none"}).use_model(shipped.net).setup(_ctx(dataset="mnist5k", shape=(1, 28, 28)))


def test_setup_records_tiling_and_weights_in_config(shipped, recipe):
    cfg = shipped.config
    assert cfg.tile == "8" and cfg.weights_sha256 == recipe["sha256"]
    assert shipped.identity()["config"]["weights_sha256"] == recipe["sha256"]
    with pytest.raises(HarnessError, match="pins"):
        M.MAEP.from_dict({"weights_sha256": "0" * 64}).setup(_ctx())


# --------------------------------------------------------------------------- gradients
def test_full_gradient_matches_finite_differences():
    d = _tiny(torch.float64)
    g = torch.Generator().manual_seed(0)
    x = (0.2 + 0.6 * torch.rand(2, 1, 8, 8, generator=g, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: d.purify(t), (x,), eps=1e-6, atol=1e-5, rtol=1e-4)
    # and through the tiles of a larger image
    x16 = (0.2 + 0.6 * torch.rand(1, 1, 16, 16, generator=g, dtype=torch.float64)).requires_grad_(True)
    w = torch.randn(1, 1, 16, 16, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: (d.purify(t) * w).sum(), (x16,), eps=1e-6, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- weights
def test_missing_weights_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(M, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(HarnessError) as e:
        M.MAEP().setup(_ctx())
    msg = str(e.value)
    assert "\n" not in msg and "maep-digits.pt" in msg and "harness train maep --dataset digits" in msg
    with pytest.raises(HarnessError, match="do not exist"):
        M.MAEP.from_dict({"weights": str(tmp_path / "nope.pt")}).setup(_ctx())


def test_corrupt_weights_are_refused(tmp_path):
    bad = tmp_path / "maep-digits.pt"
    torch.save({"not": torch.zeros(1)}, bad)
    with pytest.raises(HarnessError, match="not a MAEP checkpoint"):
        M.MAEP.from_dict({"weights": str(bad)}).setup(_ctx())


def test_shipped_weights_fit_the_recipe(shipped, recipe):
    assert M.shipped_weights("digits").stat().st_size < 2_000_000
    assert recipe["sha256"] == M.sha256_file(M.shipped_weights("digits"))
    from harness.training.maep import RECIPES

    assert recipe["mask_ratio"] == RECIPES["digits"].mask_ratio and recipe["adversarial_inputs"]["eps"] == 0.2
    assert recipe["command"].startswith("harness train maep --dataset digits --seed 0") and recipe["train_time_s"] < 900
    assert recipe["engine_eval"]["maep"]["robust_accuracy"] > recipe["engine_eval"]["undefended"]["robust_accuracy"] + 0.3


def test_shipped_model_moves_heldout_adversarial_inputs_towards_clean(shipped):
    from harness.classifiers import load_classifier
    from harness.data import load_split
    from harness.training.maep import RECIPES, make_adversarial

    x, y = load_split("digits", "test")
    x, y = x[-128:], y[-128:]
    clf = load_classifier("digits-cnn", dataset="digits").module
    x_adv = make_adversarial(clf, x, y, RECIPES["digits"], torch.Generator().manual_seed(123))
    with torch.no_grad():
        pur = shipped.purify(x_adv)
    before, after = (x_adv - x).abs().mean(), (pur - x).abs().mean()
    assert after < 0.8 * before, (float(before), float(after))


def test_shipped_model_keeps_recorded_accuracy_through_the_engine(recipe):
    from harness.evaluation import RunConfig, resolve, run_job
    from harness.store import Store

    rec = recipe["engine_eval"]
    job = resolve(RunConfig(defense="maep", threat="preprocessor-blind", dataset="digits", n_examples=rec["n"]))
    assert job.path.value == "classifier" and job.eot == 1 and job.draws == 1
    out = run_job(job, Store("sqlite://"), progress=False).as_json()
    assert abs(out["clean_accuracy"] - rec["maep"]["clean_accuracy"]) <= CLEAN_TOL
    assert abs(out["robust_accuracy"] - rec["maep"]["robust_accuracy"]) <= ROBUST_TOL


# --------------------------------------------------------------------------- training
def _train(tmp_path, **kw):
    from harness.training.maep import train_maep

    args = dict(
        epochs=6, batch_size=32, lr=3e-3, pgd_steps=2, arch_overrides=TRAIN_ARCH, n_train=96, eval_n=0,
        out=tmp_path, progress=False, checkpoint_every=0, log=lambda s: None,
    )
    args.update(kw)
    return train_maep("digits", **args)


def test_training_loss_falls_and_writes_a_loadable_purifier(tmp_path):
    rec = _train(tmp_path, eval_n=16, adv="online")
    curve = rec["loss_curve"]
    assert len(curve) == 6 and curve[-1] < 0.7 * curve[0], curve
    assert rec["classifier"]["name"] == "digits-cnn" and rec["adversarial_inputs"]["mode"] == "online"
    assert set(rec["engine_eval"]) >= {"maep", "undefended"} and rec["heldout_l1"]["n"] == 16
    d = M.MAEP.from_dict({"weights": str(tmp_path / "maep-digits.pt")})
    d.setup(_ctx())
    assert d.config.weights_sha256 == rec["sha256"] and not (tmp_path / "maep-digits.ckpt").exists()


def test_resume_continues_to_the_uninterrupted_result(tmp_path):
    full = _train(tmp_path / "a", epochs=4, adv="cached")
    stopped = _train(tmp_path / "b", epochs=4, adv="cached", stop_after=2)
    assert stopped["stopped_at"] == 2 and (tmp_path / "b" / "maep-digits.ckpt").is_file()
    with pytest.raises(HarnessError, match="different run"):
        _train(tmp_path / "b", epochs=4, adv="cached", seed=1, resume=True)
    resumed = _train(tmp_path / "b", epochs=4, adv="cached", resume=True)
    assert resumed["loss_curve"] == full["loss_curve"]
    a = torch.load(tmp_path / "a" / "maep-digits.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "maep-digits.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_trainer_is_registered():
    from harness.training import load_trainers

    assert "maep" in load_trainers().names()
