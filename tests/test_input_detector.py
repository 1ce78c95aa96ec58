"""The owner's attack-free input test (issue 20): jacfusion_fed.training.input_detector."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from jacfusion_fed.evaluation.detection import auroc
from jacfusion_fed.training.input_detector import (
    applies,
    fit_input_detector,
    input_pvalues,
    sign_noise,
)


def _images(n: int, seed: int) -> torch.Tensor:
    """(n, 1, 8, 8) smooth random images in [0, 1]: a 4x4 field upsampled bilinearly."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((n, 1, 4, 4), generator=g)
    return torch.nn.functional.interpolate(coarse, size=(8, 8), mode="bilinear")


@pytest.fixture(scope="module")
def fitted() -> tuple[object, torch.Tensor]:
    det = fit_input_detector(_images(600, 0), _images(300, 1), seed=0)
    return det, _images(2000, 2)


def test_pvalues_are_valid_on_clean_inputs_and_see_sign_noise(fitted) -> None:  # type: ignore[no-untyped-def]
    det, clean = fitted
    u = input_pvalues(det, clean)
    assert u.shape == (len(clean),) and u.dtype == torch.float64
    assert float(u.min()) > 0 and float(u.max()) <= 1
    for a in (0.05, 0.1, 0.2):  # conformal: P(u <= a) <= a, up to sampling noise
        assert float((u <= a).double().mean()) <= a + 0.03
    noised = sign_noise(clean, 0.02, 0.02, torch.Generator().manual_seed(3))
    v = input_pvalues(det, noised)
    assert auroc(1 - v.numpy(), 1 - u.numpy()) > 0.9


def test_smooth_pvalues_are_differentiable_and_follow_the_exact_ones(fitted) -> None:  # type: ignore[no-untyped-def]
    det, clean = fitted
    x = clean[:200].clone().requires_grad_(True)
    s = input_pvalues(det, x, smooth=True)
    (g,) = torch.autograd.grad(s.sum(), x)
    assert g.abs().sum() > 0
    exact = input_pvalues(det, clean[:200])
    assert float((s.detach() - exact).abs().max()) <= 2.0 / (len(det.reference_scores) + 1)


def test_fit_is_deterministic_and_leaves_the_global_generator_alone() -> None:
    x, ref = _images(100, 0), _images(50, 1)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = fit_input_detector(x, ref, seed=4, epochs=2)
    after = torch.rand(3)
    b = fit_input_detector(x, ref, seed=4, epochs=2)
    c = fit_input_detector(x, ref, seed=5, epochs=2)
    assert torch.equal(before, after)
    assert torch.equal(a.reference_scores, b.reference_scores)
    assert not torch.equal(a.reference_scores, c.reference_scores)


def test_bad_inputs_are_refused_by_name() -> None:
    x = _images(20, 0)
    assert applies(x) and not applies(x.reshape(20, -1)) and not applies(x[:, :, :1])
    with pytest.raises(ValueError, match=r"x_fit must be \(N, C, H, W\)"):
        fit_input_detector(x.reshape(20, -1), x)
    with pytest.raises(ValueError, match="same sample shape"):
        fit_input_detector(x, torch.rand(5, 1, 6, 6))
    with pytest.raises(ValueError, match="x_ref must hold at least 2"):
        fit_input_detector(x, x[:1])
    with pytest.raises(ValueError, match="low <= high"):
        fit_input_detector(x, x, low=0.05, high=0.01)


def test_signals_publish_the_bonferroni_of_feature_and_input_tests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from jacfusion_fed.evaluation import unknown
    from jacfusion_fed.evaluation.unknown import SeedRun
    from jacfusion_fed.fusion import combine_pvalues

    # what is combined, not how well: two epochs are enough
    monkeypatch.setattr(unknown, "fit_input_detector", partial(fit_input_detector, epochs=2))
    run = SeedRun("avdigits", 0, quick=True, repeats=1, input_test=True)
    base = SeedRun("avdigits", 0, quick=True, repeats=1)
    sig, plain = run.signals(), base.signals()
    assert sig.names[-1] == "input" and "input" not in plain.names
    xs, zs = run.x["test"], run.clean["test"]
    p, q = sig.pvalues(zs, xs), plain.pvalues(zs, xs)
    both = torch.stack([q["feature"], p["input"]], dim=-1)
    assert torch.allclose(p["feature"], combine_pvalues(both, "bonferroni"))
    # one small p-value is enough: the owner's p-value is never above twice either test's
    assert bool((p["feature"] <= 2 * p["input"] + 1e-12).all())
    assert not torch.equal(p["feature"], q["feature"])
    assert np.isfinite(p["fisher"].numpy()).all()
