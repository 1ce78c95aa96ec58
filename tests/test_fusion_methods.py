"""The fusion-method registry: names, declared inputs and options, one entry point."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from jacfusion_fed.fusion import (
    METHODS,
    FusionInputError,
    FusionMethod,
    confidence_mean_fusion,
    fit_calibration,
    fuse,
    fuse_full,
    get_method,
    jacobian_fusion,
    mean_fusion,
    register,
    robust_fusion,
    statistical_fusion,
)


@pytest.fixture
def problem() -> dict[str, Any]:
    rng = np.random.default_rng(3)
    logits = [rng.normal(size=(5, 3)) for _ in range(2)]
    w = rng.normal(size=(3, 4))
    return {"logits": logits, "grams": [w @ w.T, w @ w.T], "log_prior": np.log([0.2, 0.3, 0.5])}


def test_names_are_the_four_rules_of_the_paper_and_robust() -> None:
    assert set(METHODS) == {"statistical", "jacobian", "mean", "confidence_mean", "robust"}


def test_fuse_is_each_rule(problem: dict[str, Any]) -> None:
    z, grams, prior = problem["logits"], problem["grams"], problem["log_prior"]
    rng = np.random.default_rng(4)
    cals = [fit_calibration(rng.normal(size=(60, 3)), np.arange(60) % 3) for _ in z]
    robust = robust_fusion(z, cals, prior, alpha=0.2)
    want = {
        "statistical": statistical_fusion(z, prior),
        "mean": mean_fusion(z),
        "confidence_mean": confidence_mean_fusion(z),
        "jacobian": jacobian_fusion(z, grams, prior, gamma=0.3, regularize=[1]),
        "robust": robust.p,
    }
    options = {"jacobian": {"gamma": 0.3, "regularize": [1]}, "robust": {"alpha": 0.2}}
    for name in METHODS:
        got = fuse(name, z, grams, prior, options.get(name), calibrations=cals)
        torch.testing.assert_close(got, want[name], rtol=0, atol=0)
    full = fuse_full("robust", z, None, prior, {"alpha": 0.2}, calibrations=cals)
    assert full.reliability is not None and full.prediction_set is not None
    torch.testing.assert_close(full.reliability, robust.reliability, rtol=0, atol=0)
    assert torch.equal(full.prediction_set, robust.prediction_set)
    assert full.abstain is not None and torch.equal(full.abstain, robust.abstain)
    assert fuse_full("mean", z).reliability is None
    kept = robust_fusion(z, cals, prior, retain=0.25, trust_level=0.5)
    got = fuse("robust", z, None, prior, {"retain": 0.25, "trust_level": 0.5}, calibrations=cals)
    torch.testing.assert_close(got, kept.p, rtol=0, atol=0)
    with pytest.raises(FusionInputError, match="robust method needs calibrations"):
        fuse("robust", z, log_prior=prior)


def test_bad_calls_name_the_problem(problem: dict[str, Any]) -> None:
    z = problem["logits"]
    with pytest.raises(FusionInputError, match="unknown fusion method 'median'"):
        fuse("median", z)
    with pytest.raises(FusionInputError, match="jacobian method needs grams"):
        fuse("jacobian", z)
    with pytest.raises(FusionInputError, match="gamma do not apply to the mean method"):
        fuse("mean", z, options={"gamma": 0.5})
    with pytest.raises(ValueError, match="registered already"):
        register(get_method("mean"))


def test_a_method_declares_what_it_needs(problem: dict[str, Any]) -> None:
    """A new rule (e.g. one needing calibration data) plugs in through its declaration."""
    seen: dict[str, Any] = {}

    def scaled(logits: Any, calibrations: Any, log_prior: Any = None, alpha: float = 0.1) -> Any:
        seen.update(calibrations=calibrations, log_prior=log_prior, alpha=alpha)
        return mean_fusion(logits)

    rule = FusionMethod(
        "scaled",
        scaled,
        needs=frozenset({"calibrations"}),
        uses=frozenset({"log_prior"}),
        options=("alpha",),
    )
    with pytest.raises(FusionInputError, match="scaled method needs calibrations"):
        fuse(rule, problem["logits"])
    fuse(rule, problem["logits"], problem["grams"], None, {"alpha": 0.2}, calibrations=[1, 2])
    assert seen == {"calibrations": [1, 2], "log_prior": None, "alpha": 0.2}
    assert rule.takes("alpha") and not rule.takes("gamma")
    assert rule.pick(alpha=0.3, gamma=0.5) == {"alpha": 0.3}
    assert get_method("jacobian").pick(gamma=0.5, alpha=1) == {"gamma": 0.5}
    with pytest.raises(ValueError, match="unknown inputs"):
        FusionMethod("odd", scaled, needs=frozenset({"features"}))
