"""robust_fusion: conformal coverage, reliability, order invariance, gradients, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jacfusion_fed.fusion import (
    FusionInputError,
    ModalityCalibration,
    fit_calibration,
    robust_fusion,
    statistical_fusion,
)

K = 5


def _logits(y: torch.Tensor, signal: float, gen: torch.Generator) -> torch.Tensor:
    """Gaussian class-conditional logits: signal * onehot(y) + N(0, I)."""
    z = torch.randn(y.shape[0], K, generator=gen, dtype=torch.float64)
    return z + signal * torch.nn.functional.one_hot(y, K).to(torch.float64)


def _problem(
    m: int, n_val: int, n_test: int, seed: int
) -> tuple[list[ModalityCalibration], list[torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    signals = [2.5, 1.5, 2.0, 1.0][:m]
    y_val = torch.randint(0, K, (n_val,), generator=gen)
    y_val[:K] = torch.arange(K)  # every class present
    y_test = torch.randint(0, K, (n_test,), generator=gen)
    cals = [fit_calibration(_logits(y_val, s, gen), y_val) for s in signals]
    return cals, [_logits(y_test, s, gen) for s in signals], y_test


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2, 0.3])
@pytest.mark.parametrize("m", [2, 3])
def test_coverage_on_exchangeable_data(alpha: float, m: int) -> None:
    # Averaged over independent calibration draws the guarantee is exact: >= 1 - alpha.
    covered = []
    for seed in range(10):
        cals, zs, y = _problem(m, 200, 1000, seed)
        out = robust_fusion(zs, cals, alpha=alpha)
        covered.append(out.prediction_set[torch.arange(y.shape[0]), y].double().mean())
    coverage = float(torch.stack(covered).mean())
    assert coverage >= 1 - alpha - 0.01, coverage  # 10,000 samples: sd < 0.005
    # and the sets are informative (not the trivial all-classes set)
    assert float(out.prediction_set.double().sum(1).mean()) < K


@pytest.mark.parametrize("m", [2, 3])
def test_reliability_low_for_noise_high_for_clean(m: int) -> None:
    cals, zs, y = _problem(m, 300, 400, seed=1)
    clean = robust_fusion(zs, cals)
    gen = torch.Generator().manual_seed(7)
    broken = list(zs)
    broken[1] = 8.0 * torch.randn(zs[1].shape, generator=gen, dtype=torch.float64)
    out = robust_fusion(broken, cals)
    r = out.reliability
    # clean: p-values of typicality (times consistency for M = 3), mostly above trust_level
    assert float((clean.reliability >= 0.05).double().mean()) > 0.8
    assert float(clean.reliability.median()) > 0.2
    assert float(r[:, 1].median()) < 0.02
    assert float((r[:, 0] >= 0.05).double().mean()) > 0.7
    # the broken modality is dropped: accuracy stays near that of the clean modalities
    others = [z for i, z in enumerate(zs) if i != 1]
    acc_clean_only = float((statistical_fusion(others).argmax(1) == y).double().mean())
    acc_stat = float((statistical_fusion(broken).argmax(1) == y).double().mean())
    acc_robust = float((out.p.argmax(1) == y).double().mean())
    assert acc_robust >= acc_clean_only - 0.03
    assert acc_robust > acc_stat + 0.1


def test_reduces_to_statistical_fusion_when_fully_trusted() -> None:
    cals, zs, _ = _problem(2, 200, 50, seed=2)
    prior = torch.log(torch.full((K,), 1.0 / K, dtype=torch.float64))
    out = robust_fusion(zs, cals, prior, floor=0.0, trust_level=1e-9)
    torch.testing.assert_close(out.p, statistical_fusion(zs, prior))


def test_order_invariance() -> None:
    cals, zs, _ = _problem(3, 200, 100, seed=3)
    out = robust_fusion(zs, cals)
    perm = [2, 0, 1]
    swapped = robust_fusion([zs[i] for i in perm], [cals[i] for i in perm])
    torch.testing.assert_close(swapped.p, out.p)
    torch.testing.assert_close(swapped.reliability, out.reliability[:, perm])
    assert torch.equal(swapped.prediction_set, out.prediction_set)
    assert torch.equal(swapped.abstain, out.abstain)


@pytest.mark.parametrize("floor", [0.0, 0.05])
def test_gradients_flow_through_fusion_and_reliability(floor: float) -> None:
    cals, zs, y = _problem(2, 200, 30, seed=4)
    z = zs[1].clone().requires_grad_(True)
    out = robust_fusion([zs[0], z], cals, floor=floor)
    loss = torch.nn.functional.nll_loss(torch.log(out.p), y) + out.reliability[:, 1].sum()
    loss.backward()
    assert z.grad is not None and bool(torch.isfinite(z.grad).all())
    assert float(z.grad.abs().sum()) > 0
    z2 = zs[1].clone().requires_grad_(True)
    robust_fusion([zs[0], z2], cals).reliability[:, 1].sum().backward()
    assert z2.grad is not None and float(z2.grad.abs().sum()) > 0


def test_jacobian_regularization_follows_reliability() -> None:
    """jacobian_level = 0 (or gamma = 1) is the plain rule; a modality whose reliability is at
    or above the level keeps its logits; below it, the fused p moves as Stat-w/ would, and
    gradients flow through the Jacobian solve."""
    from jacfusion_fed.fusion import gram_of, jacobian_fusion

    cals, zs, _ = _problem(2, 200, 40, seed=8)
    gen = torch.Generator().manual_seed(3)
    grams = [gram_of(torch.randn(K, 6, generator=gen, dtype=torch.float64)) for _ in range(2)]
    plain = robust_fusion(zs, cals, floor=0.0, trust_level=1e-9)
    off = robust_fusion(
        zs, cals, grams=grams, floor=0.0, trust_level=1e-9, gamma=1.0, jacobian_level=0.5
    )
    torch.testing.assert_close(off.p, plain.p)
    # level 1e-12: every modality counts as reliable, nothing changes
    high = robust_fusion(
        zs, cals, grams=grams, floor=0.0, trust_level=1e-9, gamma=0.1, jacobian_level=1e-12
    )
    torch.testing.assert_close(high.p, plain.p)
    # level close to 1 and reliability ~0 for an out-of-distribution modality: its logits are
    # replaced by W z, as in Stat-w/ on that modality (trust_level tiny: no contamination
    # where the reliability is not exactly 0)
    broken = [zs[0], zs[1] * 5.0]
    out = robust_fusion(
        broken,
        cals,
        grams=[None, grams[1]],
        floor=0.0,
        trust_level=1e-300,
        gamma=0.1,
        jacobian_level=0.999,
    )
    r = out.reliability[:, 1]
    tiny = (r > 1e-290) & (r < 1e-6)
    assert int(tiny.sum()) >= 3
    want = jacobian_fusion(broken, [None, grams[1]], gamma=0.1)
    torch.testing.assert_close(out.p[tiny], want[tiny], atol=1e-9, rtol=1e-9)
    assert float((out.p[~tiny] - want[~tiny]).abs().max()) > 1e-3  # elsewhere it differs
    z = broken[1].clone().requires_grad_(True)
    res = robust_fusion([zs[0], z], cals, grams=grams, gamma=0.1, jacobian_level=0.5)
    res.p[:, 0].sum().backward()
    assert z.grad is not None and bool(torch.isfinite(z.grad).all())


def test_retain_keeps_a_share_of_a_distrusted_modality() -> None:
    """retain = kappa: a fully distrusted modality (eps = 1) contributes kappa ln l_m, i.e.
    kappa times its statistical-fusion evidence; a fully trusted one with floor 0 its whole
    evidence, whatever kappa; retain = 0 is the rule without the option (dropped)."""
    cals, zs, _ = _problem(2, 200, 60, seed=8)
    prior = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15], dtype=torch.float64))
    # modality 1 looks broken (reliability ~ 0), modality 0 is itself
    gen = torch.Generator().manual_seed(3)
    broken = [zs[0], 40.0 * torch.randn(zs[1].shape, generator=gen, dtype=torch.float64)]
    base = robust_fusion(broken, cals, prior, floor=0.0)
    torch.testing.assert_close(robust_fusion(broken, cals, prior, floor=0.0, retain=0.0).p, base.p)
    distrusted = base.trust[:, 1] < 1e-9
    trusted = base.trust[:, 0] > 1 - 1e-9
    rows = distrusted & trusted
    assert int(rows.sum()) > 20
    for kappa in (0.25, 0.5, 0.9):
        out = robust_fusion(broken, cals, prior, floor=0.0, retain=kappa)
        # statistical fusion with modality 1's log-likelihood ratio scaled by kappa:
        # ln p = ln freq + (z_0 part) + kappa (ln softmax(z_1) - ln freq) + const
        lr = [torch.log_softmax(torch.log_softmax(z, 1) - prior, 1) for z in broken]
        expect = torch.softmax(prior + lr[0] + kappa * lr[1], dim=1)
        torch.testing.assert_close(out.p[rows], expect[rows])
        # the reliability does not depend on retain (it gates, it is not gated)
        torch.testing.assert_close(out.reliability, base.reliability)
    # kappa -> 1 approaches statistical fusion for the distrusted rows
    near = robust_fusion(broken, cals, prior, floor=0.0, retain=0.999).p[rows]
    torch.testing.assert_close(near, statistical_fusion(broken, prior)[rows], atol=0.02, rtol=0)


def test_numpy_in_torch_out_dtype_and_shapes() -> None:
    cals, zs, _ = _problem(2, 100, 20, seed=5)
    out = robust_fusion([z.float().numpy() for z in zs], cals)
    assert isinstance(out.p, torch.Tensor) and out.p.dtype == torch.float32
    assert out.p.shape == (20, K) and out.reliability.shape == (20, 2)
    assert out.prediction_set.dtype == torch.bool and out.abstain.shape == (20,)
    torch.testing.assert_close(out.p.sum(1), torch.ones(20))
    assert bool(((out.reliability >= 0) & (out.reliability <= 1)).all())


def test_calibration_record_round_trip() -> None:
    cals, zs, _ = _problem(2, 100, 20, seed=6)
    again = [ModalityCalibration.from_arrays(c.to_arrays()) for c in cals]
    torch.testing.assert_close(robust_fusion(zs, again).p, robust_fusion(zs, cals).p)
    rec = cals[0].to_arrays()
    rec["raw_logits"] = np.zeros((3, K))
    with pytest.raises(FusionInputError, match="unexpected"):
        ModalityCalibration.from_arrays(rec)
    rec = cals[0].to_arrays()
    rec["conformity_scores"] = rec["conformity_scores"][::-1].copy()
    with pytest.raises(FusionInputError, match="sorted"):
        ModalityCalibration.from_arrays(rec)


def test_bad_input() -> None:
    cals, zs, _ = _problem(2, 100, 20, seed=7)
    with pytest.raises(FusionInputError, match="M >= 2"):
        robust_fusion([zs[0]], cals[:1])
    with pytest.raises(FusionInputError, match="one calibration per modality"):
        robust_fusion(zs, cals[:1])
    with pytest.raises(FusionInputError, match="alpha"):
        robust_fusion(zs, cals, alpha=1.5)
    with pytest.raises(FusionInputError, match="grams"):
        robust_fusion(zs, cals, grams=[None])
    with pytest.raises(FusionInputError, match="grams"):
        robust_fusion(zs, cals, grams=torch.eye(K))  # type: ignore[arg-type]
    with pytest.raises(FusionInputError, match=r"grams\[1\] has K=3"):
        robust_fusion(zs, cals, grams=[None, torch.eye(3)], jacobian_level=0.5)
    with pytest.raises(FusionInputError, match="jacobian_level"):
        robust_fusion(zs, cals, jacobian_level=1.0)
    for bad in (-0.1, 1.0, "0.5"):
        with pytest.raises(FusionInputError, match="retain must lie in"):
            robust_fusion(zs, cals, retain=bad)  # type: ignore[arg-type]
    with pytest.raises(FusionInputError, match="gamma"):
        robust_fusion(zs, cals, jacobian_level=0.5, gamma=0.0)
    with pytest.raises(FusionInputError, match="K="):
        robust_fusion([z[:, :3] for z in zs], cals)
    with pytest.raises(FusionInputError, match="non-finite"):
        robust_fusion([zs[0], zs[1] * float("nan")], cals)
    with pytest.raises(FusionInputError, match="no sample of class"):
        fit_calibration(zs[0], torch.zeros(20, dtype=torch.long))
    with pytest.raises(FusionInputError, match="labels_val must have shape"):
        fit_calibration(zs[0], torch.zeros(3, dtype=torch.long))
    with pytest.raises(FusionInputError, match="integers"):
        fit_calibration(zs[0], torch.full((20,), 9))
