"""Colour shifts, the paired reference and its interval, cross-dataset purifiers and the store migration."""

from __future__ import annotations

import math
import shutil
import sqlite3

import numpy as np
import pytest
import torch

from harness import evaluation as E
from harness.core.registry import HarnessError
from harness.core.shift import SHIFTS, ShiftContext
from harness.evaluation.plan import IncompatibleError
from harness.evaluation.stats import newcombe_paired_interval, paired_change
from harness.store import Store
from threat_models.shifts._color import rgb_to_lalphabeta
from threat_models.shifts.reinhard import reinhard_transfer, target_positions


def cfg(**kw) -> E.RunConfig:
    base = dict(defense="none", threat="color-shift", dataset="digits", n_examples=32)
    base.update(kw)
    base["overrides"] = tuple(base.get("overrides", ()))
    return E.RunConfig(**base)


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean((2, 3)), x.std((2, 3), correction=0)


def _rgb(seed: int, lo: float, hi: float, n: int = 4) -> torch.Tensor:
    """Smooth RGB images in [lo, hi] (a transfer between such images stays inside [0, 1], so no clip binds)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 4, 4, generator=g)
    return lo + (hi - lo) * torch.nn.functional.interpolate(base, size=(12, 12), mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------- Reinhard
def test_reinhard_gives_the_content_the_targets_lalphabeta_moments_and_maps_a_target_to_itself():
    content, target = _rgb(0, 0.3, 0.7), _rgb(1, 0.35, 0.65)
    out = reinhard_transfer(content, target)
    assert out.shape == content.shape and 0.3 < float(out.min()) and float(out.max()) < 0.8  # no clipping involved
    (mo, so), (mt, st) = _moments(rgb_to_lalphabeta(out)), _moments(rgb_to_lalphabeta(target))
    assert torch.allclose(mo, mt, atol=1e-5) and torch.allclose(so, st, atol=1e-5)
    (mc, _) = _moments(rgb_to_lalphabeta(content))
    assert (mc - mt).abs().max() > 1e-2  # the check above is not vacuous
    assert (reinhard_transfer(target, target) - target).abs().max() < 1e-6


def test_reinhard_in_cie_lab_matches_kornias_lab_moments():
    from kornia.color import rgb_to_lab

    content, target = _rgb(2, 0.3, 0.7), _rgb(3, 0.35, 0.65)
    out = reinhard_transfer(content, target, "lab")
    (mo, so), (mt, st) = _moments(rgb_to_lab(out)), _moments(rgb_to_lab(target))
    assert torch.allclose(mo, mt, atol=2e-3) and torch.allclose(so, st, atol=2e-3)
    assert (reinhard_transfer(target, target, "lab") - target).abs().max() < 1e-4


def test_reinhard_on_grey_images_matches_the_mean_and_std_of_intensity():
    g = torch.Generator().manual_seed(0)
    content, target = 0.3 + 0.4 * torch.rand(5, 1, 8, 8, generator=g), 0.4 + 0.2 * torch.rand(5, 1, 8, 8, generator=g)
    out = reinhard_transfer(content, target)
    (mo, so), (mt, st) = _moments(out), _moments(target)
    assert torch.allclose(mo, mt, atol=1e-6) and torch.allclose(so, st, atol=1e-6)
    assert torch.equal(reinhard_transfer(content, target, "lab"), out)  # one formula on grey images


def test_reinhard_pairing_is_uniform_over_the_others_and_never_the_image_itself():
    n = 50
    t = target_positions(3, np.arange(n), n)
    assert (t != np.arange(n)).all() and t.min() >= 0 and t.max() < n
    assert not np.array_equal(t, target_positions(4, np.arange(n), n))  # the job seed changes the pairing
    assert np.array_equal(target_positions(3, np.array([7, 2]), n), t[[7, 2]])  # per position: order and batch free
    big = target_positions(0, np.arange(2000), 2000)
    assert len(np.unique(big)) > 1100  # about 2000 (1 - 1/e) = 1264 distinct targets for a uniform draw


def test_the_pairing_and_every_outcome_are_independent_of_the_batch_size(tmp_path):
    store = Store(str(tmp_path / "r.db"))

    def run(bs: int):
        out = E.run_job(E.resolve(cfg(overrides=[("batch_size", str(bs))])), store, progress=False)
        pairs = {}
        for b in store.batch_rows(out.job_id):
            info = b.extra["shift"]
            lo = min(e.position for e in store.example_rows(out.job_id) if e.batch == b.batch)
            for k, t in enumerate(info["target_position"]):
                pairs[lo + k] = (t, info["target_index"][k])
        # the shifted inputs and their clean predictions (the attack's random starts are drawn per batch)
        ex = [(e.position, e.label, e.clean_preds, e.reference["classifier"]["clean"]) for e in store.example_rows(out.job_id)]
        return out, pairs, ex

    a, pa, ea = run(32)
    b, pb, eb = run(7)
    assert a.job_id != b.job_id  # batch_size is part of the spec
    assert pa == pb and len(pa) == 32
    assert ea == eb
    job = E.resolve(cfg())
    tpos = target_positions(0, np.arange(32), 32)
    assert [pa[p][0] for p in range(32)] == tpos.tolist()
    assert [pa[p][1] for p in range(32)] == job.subset.indices[tpos].tolist()  # the target's dataset index
    assert [e[1] for e in ea] == job.subset.y.tolist()  # labels kept


# --------------------------------------------------------------------------- CIFAR-10-C corruptions
def _apply(name: str, x: torch.Tensor, **opts) -> torch.Tensor:
    shift = SHIFTS.get(name).from_options(opts)
    assert shift.check(tuple(x.shape[1:])) is None
    ctx = ShiftContext(generator=torch.Generator(), positions=np.arange(len(x)), subset_x=x, subset_y=torch.zeros(len(x)),
                       dataset="t")
    out = shift.apply(x, torch.zeros(len(x)), context=ctx)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("name", ["reinhard", "brightness", "contrast", "saturate"])
@pytest.mark.parametrize("channels", [1, 3])
def test_every_colour_shift_keeps_shape_and_unit_range(name, channels):
    if name == "saturate" and channels == 1:
        assert "saturation" in SHIFTS.get(name)().check((1, 8, 8))
        return
    x = torch.rand(6, channels, 8, 8, generator=torch.Generator().manual_seed(1))
    for sev in ([None] if name == "reinhard" else range(1, 6)):
        out = _apply(name, x, **({} if sev is None else {"severity": sev}))
        assert out.shape == x.shape and out.dtype == x.dtype
        assert float(out.min()) >= 0 and float(out.max()) <= 1 and torch.isfinite(out).all()


def test_severities_are_monotone_and_follow_the_cifar10c_constants():
    x = _rgb(5, 0.1, 0.8, n=8)
    means = [float(_apply("brightness", x, severity=k).mean()) for k in range(1, 6)]
    assert all(a < b for a, b in zip([float(x.mean())] + means, means))
    stds = [float(_apply("contrast", x, severity=k).std()) for k in range(1, 6)]
    assert all(a > b for a, b in zip([float(x.std())] + stds, stds))
    # contrast: exactly (x - channel mean) * c + mean where nothing clips
    c3 = _apply("contrast", x, severity=3)
    m = x.mean((2, 3), keepdim=True)
    assert torch.allclose(c3, (x - m) * 0.4 + m, atol=1e-6)
    # brightness on grey images is clip(x + c); saturate scales the HSV saturation by a and adds b
    grey = x[:, :1]
    assert torch.allclose(_apply("brightness", grey, severity=5), (grey + 0.3).clamp(0, 1), atol=1e-5)
    from kornia.color import rgb_to_hsv

    s_in = rgb_to_hsv(x)[:, 1]
    for k, (a, b) in enumerate([(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)], start=1):
        s_out = rgb_to_hsv(_apply("saturate", x, severity=k))[:, 1]
        assert torch.allclose(s_out, (s_in * a + b).clamp(0, 1), atol=1e-4), k
    with pytest.raises(HarnessError, match="severity"):
        SHIFTS.get("brightness").from_options({"severity": "6"})


def test_saturate_is_refused_on_single_channel_datasets_with_the_reason():
    with pytest.raises(IncompatibleError, match="saturation is undefined on 1-channel"):
        E.resolve(cfg(overrides=[("shift", "saturate"), ("severity", "2")]))


# --------------------------------------------------------------------------- paired interval
def test_newcombe_paired_interval_on_a_hand_computed_table():
    # 32 examples: 20 right before and after the shift, 5 only after, 1 only before, 6 never
    a, b, c, d, n, z = 20, 5, 1, 6, 32, 1.959963984540054
    p1, p2 = 25 / 32, 21 / 32  # 0.78125, 0.65625

    def wilson(k):
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return centre - half, centre + half

    (l1, u1), (l2, u2) = wilson(25), wilson(21)
    assert (round(l1, 4), round(u1, 4), round(l2, 4), round(u2, 4)) == (0.6125, 0.8898, 0.4831, 0.7959)
    phi = (a * d - b * c - n / 2) / math.sqrt(25 * 7 * 21 * 11)  # ad - bc = 115 > n/2: 99 / sqrt(40425) = 0.4924
    assert round(phi, 4) == 0.4924
    lower = 0.125 - math.sqrt((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2)
    upper = 0.125 + math.sqrt((p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2)
    diff, lo, hi = newcombe_paired_interval(a, b, c, d)
    assert diff == 0.125 and lo == pytest.approx(lower, abs=1e-12) and hi == pytest.approx(upper, abs=1e-12)
    assert (round(lo, 4), round(hi, 4)) == (-0.0324, 0.2775)
    # no discordant pair: a zero change with a non-degenerate interval; the interval stays in [-1, 1]
    assert newcombe_paired_interval(10, 0, 0, 22)[0] == 0 and newcombe_paired_interval(10, 0, 0, 22)[1] < 0
    assert newcombe_paired_interval(0, 0, 32, 0)[1] >= -1
    assert paired_change([True] * 25 + [False] * 7, [True] * 20 + [False] * 5 + [True] + [False] * 6)[:3] == (diff, lo, hi)


# --------------------------------------------------------------------------- the color-shift threat
def test_a_color_shift_cell_stores_the_paired_changes_of_the_defense_and_the_classifier(tmp_path):
    out = E.run_job(E.resolve(cfg(overrides=[("shift", "brightness"), ("severity", "5")])), Store(str(tmp_path / "r.db")),
                    progress=False)
    m = out.metrics
    for k in ("clean", "robust"):
        change = m[f"{k}_accuracy_change"]
        assert change["value"] == pytest.approx(m[f"{k}_accuracy"]["value"] - m[f"{k}_accuracy_unshifted"]["value"])
        assert change["lower"] <= change["value"] <= change["upper"] and change["n"] == 32
        # the undefended 'none' defense is the classifier: both changes agree
        assert m[f"{k}_accuracy_classifier_change"]["value"] == pytest.approx(change["value"])
    unshifted = E.run_job(E.resolve(cfg(threat="preprocessor-blind")), Store(str(tmp_path / "r.db")), progress=False).metrics
    assert m["clean_accuracy_unshifted"]["value"] == unshifted["clean_accuracy"]["value"]
    assert m["robust_accuracy_unshifted"]["value"] == unshifted["robust_accuracy"]["value"]  # same attack seeds
    assert m["clean_accuracy_change"]["value"] < 0  # +0.3 brightness on 16-level digits costs the CNN accuracy


def test_color_shift_routes_shift_options_and_each_shift_is_its_own_job():
    ids = {E.resolve(cfg(overrides=o)).job_id for o in (
        [], [("space", "lab")], [("shift", "brightness")], [("shift", "brightness"), ("severity", "2")], [("shift", "contrast")],
    )}
    assert len(ids) == 5
    assert E.resolve(cfg(overrides=[("space", "lab")])).shift.config.space == "lab"


# --------------------------------------------------------------------------- cross-dataset
@pytest.fixture
def fake_mnist5k_maep(tmp_path):
    """The shipped digits MAEP filed as maep-mnist5k (a stand-in, so the test needs no mnist5k weights)."""
    from harness.core.env import WEIGHTS_DIR

    for ext in (".pt", ".json"):
        shutil.copy(WEIGHTS_DIR / f"maep-digits{ext}", tmp_path / f"maep-mnist5k{ext}")
    return str(tmp_path)


def test_a_cross_dataset_jobs_identity_changes_with_trained_on(fake_mnist5k_maep):
    def job(*over):
        return E.resolve(E.RunConfig(defense="maep", threat="cross-dataset", n_examples=8, weights_dir=fake_mnist5k_maep,
                                     overrides=(("attacks", "pgd"),) + over))

    default, explicit, other = job(), job(("trained_on", "digits")), job(("trained_on", "mnist5k"))
    assert default.job_id == explicit.job_id  # unset = the evaluated dataset
    assert other.job_id != default.job_id
    assert other.defense.config.trained_on == "mnist5k" and default.defense.config.trained_on == "digits"
    assert other.identity["defense"]["config"]["trained_on"] == "mnist5k"
    assert other.reference_defense is not None and other.reference_defense.config.trained_on == "digits"
    assert default.reference_defense is None


def test_adapters_map_between_resolutions_and_channels_differentiably():
    from defenses._transfer import Adapter

    a = Adapter(data_shape=(1, 28, 28), inner_shape=(3, 8, 8), mode="resize")
    x = torch.rand(2, 1, 28, 28, requires_grad=True)
    inner = a.to_purifier(x)
    assert inner.shape == (2, 3, 8, 8) and torch.allclose(inner[:, 0], inner[:, 2])
    back = a.from_purifier(inner)
    assert back.shape == x.shape and 0 <= float(back.min()) and float(back.max()) <= 1
    back.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    const = torch.full((1, 1, 28, 28), 0.4)
    assert torch.allclose(a.from_purifier(a.to_purifier(const)), const, atol=1e-6)


def test_the_digits_maep_on_mnist5k_tiles_and_says_so():
    job = E.resolve(E.RunConfig(defense="maep", threat="preprocessor-blind", dataset="mnist5k", n_examples=4,
                                overrides=(("trained_on", "digits"),)))
    assert any("1x28x28 -> 1x32x32 and back by tiles" in n for n in job.notes)
    x = job.subset.x[:4]
    assert job.defense.purify(x).shape == x.shape
    with pytest.raises(HarnessError, match="does not split into 8x8 tiles"):
        E.resolve(E.RunConfig(defense="maep", threat="preprocessor-blind", dataset="mnist5k", n_examples=4,
                              overrides=(("trained_on", "digits"), ("adapter", "none"))))


# --------------------------------------------------------------------------- store migration
def test_an_old_store_gains_the_reference_column_and_keeps_working(tmp_path):
    db = tmp_path / "old.db"
    Store(str(db))
    with sqlite3.connect(db) as con:
        con.execute("ALTER TABLE examples DROP COLUMN reference")  # what a store written before this change looks like
        assert "reference" not in {r[1] for r in con.execute("PRAGMA table_info(examples)")}
    store = Store(str(db))
    Store(str(db))  # idempotent
    with sqlite3.connect(db) as con:
        assert "reference" in {r[1] for r in con.execute("PRAGMA table_info(examples)")}
    out = E.run_job(E.resolve(cfg(n_examples=8)), store, progress=False)
    assert "robust_accuracy_change" in out.metrics
    assert all(e.reference is not None for e in store.example_rows(out.job_id))


# --------------------------------------------------------------------------- the smoke grid and its table
PURIFIERS = ("maep", "flowpure-pgd", "flowpure-cw", "flowpure-gauss", "diffpure", "diffpure-ddpm", "coup")


def test_the_smoke_grid_has_shift_and_transfer_cells_for_every_purifier_on_both_datasets():
    from pathlib import Path

    from harness.scheduler.cells import expand
    from harness.scheduler.gridfile import load_grid

    cells = expand(load_grid(Path(__file__).resolve().parent.parent / "grids" / "smoke.yaml"))
    have = {(c.defense, c.threat, c.dataset, dict(c.overrides).get("trained_on"), dict(c.overrides).get("shift")) for c in cells}
    for d in PURIFIERS:
        for ds, other in (("digits", "mnist5k"), ("mnist5k", "digits")):
            assert (d, "color-shift", ds, None, None) in have and (d, "color-shift", ds, None, "brightness") in have
            assert (d, "cross-dataset", ds, None, None) in have and (d, "cross-dataset", ds, other, None) in have
    # the transfer entries run with cross-dataset only, on the dataset they were not trained on
    assert all(c.threat == "cross-dataset" and dict(c.overrides)["trained_on"] != c.dataset
               for c in cells if "trained_on" in dict(c.overrides))


def test_the_smoke_table_checks_the_shift_and_transfer_cells_and_their_paired_changes():
    import csv
    from pathlib import Path

    rows = list(csv.DictReader((Path(__file__).resolve().parent.parent / "tables" / "smoke.csv").open()))
    have = {(r["defense"], r["threat"], r["dataset"], r["shift"], r["trained_on"], r["metric"]) for r in rows}
    for d in PURIFIERS:
        for ds, other in (("digits", "mnist5k"), ("mnist5k", "digits")):
            for metric in ("robust_accuracy", "robust_accuracy_change", "clean_accuracy_change"):
                assert (d, "color-shift", ds, "reinhard:space=lalphabeta", ds, metric) in have, (d, ds, metric)
                assert (d, "color-shift", ds, "brightness:severity=3", ds, metric) in have, (d, ds, metric)
                assert (d, "cross-dataset", ds, "none", ds, metric) in have, (d, ds, metric)
                assert (d, "cross-dataset", ds, "none", other, metric) in have, (d, ds, other, metric)
