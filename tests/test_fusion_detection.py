"""Issue 20: feature detector, cross-modal consistency and p-value combination (pure math)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jacfusion_fed.fusion import (
    FusionInputError,
    combine_pvalues,
    consistency_pvalues,
    feature_pvalues,
    fit_calibration,
    fit_consistency,
    fit_feature_detector,
    robust_fusion,
)
from jacfusion_fed.fusion.detection import consistency_scores


def _gaussian_classes(n: int, k: int, h: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = 4.0 * torch.randn(k, h, generator=g, dtype=torch.float64)
    y = torch.arange(n) % k
    return centers[y] + torch.randn(n, h, generator=g, dtype=torch.float64), y


def _paired_logits(n: int, k: int, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    eye = 5.0 * torch.eye(k, dtype=torch.float64)
    zs = [eye[y] + torch.randn(n, k, generator=g, dtype=torch.float64) for _ in range(2)]
    return zs, y


def test_feature_pvalues_are_valid_on_clean_and_small_off_distribution() -> None:
    x, y = _gaussian_classes(2000, 4, 6, seed=0)
    det = fit_feature_detector(x[:1000], y[:1000], 4)
    assert det.reference_scores.shape == (500,)  # the reference half only
    u = feature_pvalues(det, x[1000:])
    # validity: P(u <= a) <= a (+ sampling slack) for clean exchangeable samples
    for a in (0.05, 0.1, 0.3):
        assert float((u <= a).double().mean()) <= a + 0.03
    far = x[1000:] + 6.0 * torch.ones(6, dtype=torch.float64)
    assert float(feature_pvalues(det, far).median()) < 0.01


def test_feature_detector_roundtrip_and_bad_input() -> None:
    x, y = _gaussian_classes(200, 3, 5, seed=1)
    det = fit_feature_detector(x, y, 3)
    again = type(det).from_arrays(det.to_arrays())
    fresh, _ = _gaussian_classes(50, 3, 5, seed=9)  # not the reference points (no exact ties)
    assert torch.equal(feature_pvalues(again, fresh), feature_pvalues(det, fresh))
    with pytest.raises(FusionInputError, match=r"features must have shape \(N, 5\)"):
        feature_pvalues(det, x[:, :4])
    with pytest.raises(FusionInputError, match="at least 2 samples of every class"):
        fit_feature_detector(x[:5], y[:5], 3)  # class 2 once


def test_consistency_sees_a_modality_moved_to_another_class() -> None:
    zs, y = _paired_logits(2000, 5, seed=2)
    cal = fit_consistency([z[:1000] for z in zs], y[:1000])
    assert cal.reference_scores.shape == (2, 500)
    clean = consistency_pvalues([z[1000:] for z in zs], cal, smooth=False)
    assert float((clean <= 0.1).double().mean()) <= 0.13
    # modality 0 replaced by a typical sample of another class: each alone looks clean,
    # but they disagree
    swapped = zs[0][1000:].roll(1, dims=0)
    u = consistency_pvalues([swapped, zs[1][1000:]], cal, smooth=False)
    assert float((u[:, 0] <= 0.1).double().mean()) > 0.8
    # with M = 2 the disagreement is symmetric: the other modality looks inconsistent too
    # (which one is broken is for the per-modality signals to say)
    assert float((u[:, 1] <= 0.1).double().mean()) > 0.8


def test_consistency_is_differentiable_and_checks_m() -> None:
    zs, y = _paired_logits(100, 3, seed=3)
    cal = fit_consistency(zs, y)
    z0 = zs[0].clone().requires_grad_(True)
    consistency_pvalues([z0, zs[1]], cal).sum().backward()
    assert z0.grad is not None and bool(torch.isfinite(z0.grad).all())
    with pytest.raises(FusionInputError, match="M=2"):
        consistency_pvalues([zs[0], zs[1], zs[0]], cal)
    s = consistency_scores(zs, cal.class_means, cal.precision, cal.log_prior)
    assert s.shape == (100, 2)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(min_value=1e-6, max_value=1.0), min_size=1, max_size=5),
    st.sampled_from(["fisher", "cauchy", "bonferroni"]),
)
def test_combination_properties(us: list[float], method: str) -> None:
    u = torch.tensor(us, dtype=torch.float64)
    c = float(combine_pvalues(u, method))
    assert 0.0 <= c <= 1.0
    if len(us) == 1:
        assert c == pytest.approx(us[0])
    # monotone: lowering one p-value never raises the combination
    lower = u.clone()
    lower[0] = lower[0] / 2
    assert float(combine_pvalues(lower, method)) <= c + 1e-12
    # equal p-values combine to themselves under Cauchy
    if method == "cauchy":
        same = torch.full((len(us),), us[0], dtype=torch.float64)
        assert float(combine_pvalues(same, method)) == pytest.approx(us[0], rel=1e-6)


def test_bonferroni_is_valid_under_dependence_and_not_cancelled_by_a_large_pvalue() -> None:
    rng = np.random.default_rng(1)
    v = rng.uniform(size=20000)
    dependent = torch.from_numpy(np.stack([v, v, rng.uniform(size=20000)], axis=1))
    c = combine_pvalues(dependent, "bonferroni")
    for a in (0.01, 0.05, 0.2):
        assert float((c <= a).double().mean()) <= a + 0.01
    # one atypical test, one that finds the sample more typical than its whole reference
    u = torch.tensor([1 / 360, 1.0], dtype=torch.float64)
    assert float(combine_pvalues(u, "bonferroni")) == pytest.approx(2 / 360)
    assert float(combine_pvalues(u, "cauchy")) > 0.4  # Cauchy: the large one cancels it


def test_fisher_matches_chi2_and_is_uniform_under_the_null() -> None:
    # two p-values: sf of chi2_4 at T is exp(-T/2)(1 + T/2)
    u = torch.tensor([0.2, 0.3], dtype=torch.float64)
    t_half = -math.log(0.2) - math.log(0.3)
    assert float(combine_pvalues(u)) == pytest.approx(math.exp(-t_half) * (1 + t_half))
    rng = np.random.default_rng(0)
    c = combine_pvalues(torch.from_numpy(rng.uniform(size=(20000, 3))))
    for a in (0.05, 0.2, 0.5):
        assert float((c <= a).double().mean()) == pytest.approx(a, abs=0.015)
    with pytest.raises(FusionInputError, match="unknown combination"):
        combine_pvalues(u, "stouffer")
    with pytest.raises(FusionInputError, match=r"in \[0, 1\]"):
        combine_pvalues(torch.tensor([1.5]))


def test_robust_fusion_pvalues_lower_reliability_and_gate() -> None:
    zs, y = _paired_logits(400, 4, seed=4)
    cals = [fit_calibration(z[:200], y[:200]) for z in zs]
    test = [z[200:] for z in zs]
    base = robust_fusion(test, cals)
    ones = robust_fusion(test, cals, pvalues=torch.ones(200, 2))
    tiny = torch.ones(200, 2, dtype=torch.float64)
    tiny[:, 0] = 1e-9
    low = robust_fusion(test, cals, pvalues=tiny)
    # an extra p-value of 1 keeps Fisher's combination near the typicality p-value's order,
    # a tiny one on modality 0 drives its reliability (and trust) down
    assert bool((low.reliability[:, 0] < 1e-6).all())
    assert bool((low.trust[:, 0] <= ones.trust[:, 0] + 1e-12).all())
    assert torch.allclose(low.reliability[:, 1], ones.reliability[:, 1])
    assert base.p.shape == low.p.shape
    with pytest.raises(FusionInputError, match=r"pvalues must have shape \(200, 2\)"):
        robust_fusion(test, cals, pvalues=torch.ones(200, 3))
    with pytest.raises(FusionInputError, match="unknown combination"):
        robust_fusion(test, cals, combine="min")


def test_combined_reliability_gates_the_jacobian_term() -> None:
    from jacfusion_fed.fusion import gram_of

    zs, y = _paired_logits(300, 4, seed=5)
    cals = [fit_calibration(z[:200], y[:200]) for z in zs]
    test = [z[200:] for z in zs]
    g = torch.Generator().manual_seed(0)
    grams = [gram_of(torch.randn(4, 6, generator=g, dtype=torch.float64)) for _ in range(2)]
    tiny = torch.ones(100, 2, dtype=torch.float64)
    tiny[:, 0] = 1e-12
    kw = {"grams": grams, "gamma": 0.5, "floor": 0.0, "trust_level": 1e-30}
    # trust_level so small that contamination stays off: only the Jacobian gate can move p
    on = robust_fusion(test, cals, jacobian_level=0.5, pvalues=tiny, **kw)  # type: ignore[arg-type]
    off = robust_fusion(test, cals, jacobian_level=0.0, pvalues=tiny, **kw)  # type: ignore[arg-type]
    assert not torch.allclose(on.p, off.p)
    # the p-values reach the gate differentiably
    pv = tiny.clone().requires_grad_(True)
    robust_fusion(test, cals, jacobian_level=0.5, pvalues=pv, **kw).p[:, 0].sum().backward()  # type: ignore[arg-type]
    assert pv.grad is not None and bool(torch.isfinite(pv.grad).all())


def test_layered_pvalues_one_layer_equals_the_feature_detector() -> None:
    from jacfusion_fed.fusion import fit_layered_detector, layered_pvalues

    x, y = _gaussian_classes(600, 3, 5, seed=3)
    det = fit_layered_detector([x[:300]], y[:300], 3)
    single = fit_feature_detector(x[:300], y[:300], 3)
    torch.testing.assert_close(layered_pvalues(det, [x[300:]]), feature_pvalues(single, x[300:]))
    with pytest.raises(FusionInputError, match="2 activations"):
        layered_pvalues(det, [x[300:], x[300:]])
    with pytest.raises(FusionInputError, match="non-empty sequence"):
        fit_layered_detector([], y[:300], 3)


def test_layered_pvalues_are_valid_and_see_a_shift_in_any_one_layer() -> None:
    """Two dependent layers (the second a noisy linear map of the first): clean samples keep
    P(u <= a) near a (Cauchy: valid under dependence, asymptotically), and a shift that only
    the first layer shows is seen although the second layer (the "penultimate") looks typical."""
    from jacfusion_fed.fusion import fit_layered_detector, layered_pvalues

    g = torch.Generator().manual_seed(4)
    x, y = _gaussian_classes(4000, 4, 6, seed=4)
    mix = torch.randn(6, 3, generator=g, dtype=torch.float64)

    def second(h: torch.Tensor) -> torch.Tensor:
        return h @ mix + 0.5 * torch.randn(h.shape[0], 3, generator=g, dtype=torch.float64)

    det = fit_layered_detector([x[:2000], second(x[:2000])], y[:2000], 4)
    test = x[2000:]
    u = layered_pvalues(det, [test, second(test)])
    for a in (0.05, 0.1, 0.3):
        assert float((u <= a).double().mean()) <= a + 0.03
    # a shift in the null space of the map: invisible in the second layer, not in the first
    null = torch.linalg.svd(mix.T).Vh[-1]
    shifted = test + 8.0 * null
    last_only = feature_pvalues(det.layers[1], second(shifted))
    assert float(last_only.median()) > 0.2
    assert float(layered_pvalues(det, [shifted, second(shifted)]).median()) < 0.05


def test_unimodal_net_layers_end_with_the_features() -> None:
    from torch import nn

    from jacfusion_fed.models import UnimodalNet
    from jacfusion_fed.models.unimodal import MAX_LAYER_DIM

    wide = MAX_LAYER_DIM + 8
    features = nn.Sequential(nn.Linear(4, wide), nn.ReLU(), nn.Linear(wide, 6), nn.ReLU())
    net = UnimodalNet(features, nn.Linear(6, 3))
    x = torch.randn(5, 4)
    acts = net.layers(x)
    assert [a.shape[1] for a in acts] == [6, 6]  # the two wide blocks are left out
    torch.testing.assert_close(acts[-1], features(x))
    torch.testing.assert_close(net.head(acts[-1]), net(x))
    plain = UnimodalNet(nn.Linear(4, 6), nn.Linear(6, 3))  # not a Sequential: one layer
    assert [a.shape for a in plain.layers(x)] == [torch.Size([5, 6])]
