"""The fusion engine against the paper's numbers, scipy, and its lemmas and theorem."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import scipy.linalg
import torch

from jacfusion_fed.fusion import (
    FusionInputError,
    confidence_mean_fusion,
    factor_gram,
    gram_of,
    jacobian_fusion,
    mean_fusion,
    solve_jacobian_weights,
    statistical_fusion,
)


def _jacobian(p: np.ndarray) -> np.ndarray:
    return np.outer(p, p) - np.diag(p)


def _random_gram(rng: np.random.Generator, k: int, h: int, scale: float = 1.0) -> np.ndarray:
    w = rng.normal(size=(k, h)) * scale
    return w @ w.T


# --- The paper's worked example (Section 4) -------------------------------------------------


@pytest.mark.parametrize(
    ("gamma", "expected"),
    [(0.5, [0.270, 0.096, 0.635]), (0.01, [0.391, 0.219, 0.390]), (1.0, [0.245, 0.090, 0.665])],
)
def test_paper_unimodal_example(gamma: float, expected: list[float]) -> None:
    z = torch.tensor([[1.0, 0.0, 2.0]], dtype=torch.float64)
    p = jacobian_fusion([z], [torch.eye(3, dtype=torch.float64)], gamma=gamma)
    np.testing.assert_allclose(p[0].numpy(), expected, atol=5e-4)


def test_paper_example_changes_argmax_only_for_small_gamma() -> None:
    z = torch.tensor([[1.0, 0.0, 2.0]], dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64)
    assert int(jacobian_fusion([z], [eye], gamma=0.5).argmax()) == 2
    assert int(jacobian_fusion([z], [eye], gamma=0.01).argmax()) == 0


# --- The solver against scipy ----------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3, 5, 10, 17, 32, 64])
@pytest.mark.parametrize("solver", ["exact", "dense"])
def test_solver_matches_scipy_sylvester(k: int, solver: str) -> None:
    rng = np.random.default_rng(k)
    gram = _random_gram(rng, k, k + 4)
    gram_inv = np.linalg.inv(gram)
    probs = torch.softmax(torch.tensor(rng.normal(size=(6, k)) * 3.0), dim=-1)
    for gamma in (0.05, 0.3, 0.9):
        kappa = 1.0 / gamma - 1.0
        weights = solve_jacobian_weights(probs, gram, gamma, solver=solver)  # type: ignore[arg-type]
        assert weights.dtype == torch.float64 and weights.shape == (6, k, k)
        for n in range(6):
            jac = _jacobian(probs[n].numpy())
            # (S3): A W + W B = B with A = kappa J^2, B = G^{-1}.
            expected = scipy.linalg.solve_sylvester(kappa * jac @ jac, gram_inv, gram_inv)
            np.testing.assert_allclose(weights[n].numpy(), expected, atol=1e-8, rtol=0)
            residual = kappa * jac @ jac @ weights[n].numpy() @ gram + weights[n].numpy()
            np.testing.assert_allclose(residual, np.eye(k), atol=1e-10, rtol=0)


@pytest.mark.parametrize("k", [4, 12, 40])
def test_solver_singular_gram(k: int) -> None:
    """K larger than the feature width H: G is singular and (S3) still has one solution."""
    rng = np.random.default_rng(1)
    head = rng.normal(size=(k, k // 2))
    gram = gram_of(torch.tensor(head))
    assert np.linalg.matrix_rank(gram.numpy()) == k // 2
    probs = torch.softmax(torch.tensor(rng.normal(size=(5, k)) * 2.0), dim=-1)
    gamma = 0.2
    kappa = 1.0 / gamma - 1.0
    exact = solve_jacobian_weights(probs, gram, gamma)
    dense = solve_jacobian_weights(probs, gram, gamma, solver="dense")
    np.testing.assert_allclose(exact.numpy(), dense.numpy(), atol=1e-10)
    for n in range(5):
        jac = _jacobian(probs[n].numpy())
        residual = kappa * jac @ jac @ exact[n].numpy() @ gram.numpy() + exact[n].numpy()
        np.testing.assert_allclose(residual, np.eye(k), atol=1e-10)


def test_solver_nearly_one_hot_and_large_gram_stays_accurate() -> None:
    """Real logits give nearly one-hot p; J^2 is then a tiny difference of O(1) terms."""
    rng = np.random.default_rng(7)
    k = 30
    gram = _random_gram(rng, k, k + 3, scale=5.0)
    logits = rng.normal(size=(8, k)) * 5.0
    logits[np.arange(8), rng.integers(0, k, size=8)] += 40.0
    probs = torch.softmax(torch.tensor(logits), dim=-1)
    assert float(probs.max(dim=-1).values.min()) > 0.999
    for gamma in (0.01, 0.5):
        kappa = 1.0 / gamma - 1.0
        weights = solve_jacobian_weights(probs, gram, gamma)
        for n in range(8):
            jac = _jacobian(probs[n].numpy())
            residual = kappa * jac @ jac @ weights[n].numpy() @ gram + weights[n].numpy()
            np.testing.assert_allclose(residual, np.eye(k), atol=1e-9)


def test_float32_input_nearly_one_hot_does_not_fail() -> None:
    z = torch.tensor([[60.0, 0.0, -5.0, 1.0], [0.0, 0.0, 0.0, 80.0]], dtype=torch.float32)
    gram = torch.eye(4)
    p = jacobian_fusion([z, z], [gram, None], gamma=0.1)
    assert p.dtype == torch.float32
    assert bool(torch.isfinite(p).all())
    np.testing.assert_allclose(p.sum(-1).numpy(), 1.0, atol=1e-6)


# --- Statistical fusion (Lemma 1) and the mean baselines -------------------------------------


def test_lemma1_statistical_fusion_equals_normalized_product() -> None:
    rng = np.random.default_rng(3)
    z_a, z_b = rng.normal(size=(20, 6)) * 2, rng.normal(size=(20, 6)) * 2
    freq = rng.dirichlet(np.ones(6))
    p_a = scipy.special.softmax(z_a, axis=-1)
    p_b = scipy.special.softmax(z_b, axis=-1)
    product = p_a * p_b / freq
    expected = product / product.sum(axis=-1, keepdims=True)  # sigma_2
    got = statistical_fusion([z_a, z_b], log_prior=np.log(freq))
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)


def test_statistical_fusion_m_modalities_divides_prior_m_minus_1_times() -> None:
    rng = np.random.default_rng(4)
    zs = [rng.normal(size=(5, 4)) for _ in range(3)]
    freq = np.array([0.1, 0.2, 0.3, 0.4])
    probs = [scipy.special.softmax(z, axis=-1) for z in zs]
    product = probs[0] * probs[1] * probs[2] / freq**2
    expected = product / product.sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(statistical_fusion(zs, np.log(freq)).numpy(), expected, atol=1e-12)


def test_mean_and_confidence_mean_fusion() -> None:
    z_peaked = np.array([[8.0, 0.0, 0.0]])
    z_flat = np.array([[0.0, 0.1, 0.0]])
    mean = mean_fusion([z_peaked, z_flat]).numpy()
    expected_mean = (
        scipy.special.softmax(z_peaked, axis=-1) + scipy.special.softmax(z_flat, axis=-1)
    ) / 2
    np.testing.assert_allclose(mean, expected_mean, atol=1e-6)
    conf = confidence_mean_fusion([z_peaked, z_flat]).numpy()
    # The peaked modality is far more confident, so it dominates more than in the plain mean.
    assert conf[0, 0] > mean[0, 0]
    p1 = scipy.special.softmax(z_peaked[0])
    p2 = scipy.special.softmax(z_flat[0])
    c1 = 1 - (-(p1 * np.log(p1)).sum()) / math.log(3)
    c2 = 1 - (-(p2 * np.log(p2)).sum()) / math.log(3)
    np.testing.assert_allclose(conf[0], (c1 * p1 + c2 * p2) / (c1 + c2), atol=1e-6)


def test_confidence_mean_all_uniform_falls_back_to_mean() -> None:
    z = np.zeros((2, 4))
    np.testing.assert_allclose(confidence_mean_fusion([z, z]).numpy(), 0.25, atol=1e-7)


# --- Algorithm 1 ---------------------------------------------------------------------------


def test_gamma_one_is_exactly_statistical_fusion() -> None:
    rng = np.random.default_rng(5)
    zs = [torch.tensor(rng.normal(size=(7, 5)), dtype=torch.float32) for _ in range(2)]
    gram = _random_gram(rng, 5, 8)
    prior = np.log(rng.dirichlet(np.ones(5)))
    a = jacobian_fusion(zs, [gram, gram], log_prior=prior, gamma=1.0)
    b = statistical_fusion(zs, log_prior=prior)
    assert torch.equal(a, b)


def test_jacobian_fusion_matches_hand_written_algorithm_1() -> None:
    rng = np.random.default_rng(6)
    k = 6
    z_a, z_b = rng.normal(size=(4, k)) * 2, rng.normal(size=(4, k)) * 2
    g_a, g_b = _random_gram(rng, k, 9), _random_gram(rng, k, 9)
    freq = rng.dirichlet(np.ones(k))
    gamma_a, gamma_b = 0.2, 0.6
    got = jacobian_fusion(
        [z_a, z_b], [g_a, g_b], log_prior=np.log(freq), gamma=[gamma_a, gamma_b], iterations=3
    ).numpy()
    for n in range(4):
        p = scipy.special.softmax(z_a[n] + z_b[n] - np.log(freq))
        for _ in range(3):
            jac2 = _jacobian(p) @ _jacobian(p)
            w_a = scipy.linalg.solve_sylvester(
                (1 / gamma_a - 1) * jac2, np.linalg.inv(g_a), np.linalg.inv(g_a)
            )
            w_b = scipy.linalg.solve_sylvester(
                (1 / gamma_b - 1) * jac2, np.linalg.inv(g_b), np.linalg.inv(g_b)
            )
            p = scipy.special.softmax(w_a @ z_a[n] + w_b @ z_b[n] - np.log(freq))
        np.testing.assert_allclose(got[n], p, atol=1e-9)


def test_regularize_selects_modalities_and_none_gram_means_identity() -> None:
    rng = np.random.default_rng(8)
    zs = [rng.normal(size=(5, 4)) for _ in range(3)]
    g = _random_gram(rng, 4, 6)
    only_first = jacobian_fusion(zs, [g, g, g], regularize=[0], gamma=0.3)
    via_none = jacobian_fusion(zs, [g, None, None], gamma=0.3)
    np.testing.assert_allclose(only_first.numpy(), via_none.numpy(), atol=1e-14)
    nothing = jacobian_fusion(zs, [g, g, g], regularize=[], gamma=0.3)
    np.testing.assert_allclose(nothing.numpy(), statistical_fusion(zs).numpy(), atol=1e-14)
    assert not torch.allclose(only_first, nothing)


def test_iterations_zero_is_statistical_and_more_iterations_change_little() -> None:
    rng = np.random.default_rng(9)
    zs = [rng.normal(size=(50, 5)) * 2 for _ in range(2)]
    g = _random_gram(rng, 5, 7)
    p0 = jacobian_fusion(zs, [g, None], iterations=0)
    np.testing.assert_allclose(p0.numpy(), statistical_fusion(zs).numpy(), atol=1e-14)
    p1 = jacobian_fusion(zs, [g, None], iterations=1)
    p5 = jacobian_fusion(zs, [g, None], iterations=5)
    assert float((p1 - p0).abs().max()) > 1e-3
    assert float((p5 - p1).abs().max()) < float((p1 - p0).abs().max())


def test_precomputed_gram_factor_gives_same_result() -> None:
    rng = np.random.default_rng(10)
    zs = [rng.normal(size=(5, 4)) for _ in range(2)]
    g = _random_gram(rng, 4, 6)
    a = jacobian_fusion(zs, [g, None])
    b = jacobian_fusion(zs, [factor_gram(g), None])
    assert torch.equal(a, b)


def test_numpy_and_torch_inputs_agree_and_dtypes_follow_input() -> None:
    rng = np.random.default_rng(11)
    zs = [rng.normal(size=(3, 4)) for _ in range(2)]
    g = _random_gram(rng, 4, 6)
    from_numpy = jacobian_fusion(zs, [g, None])
    from_torch = jacobian_fusion([torch.tensor(z) for z in zs], [torch.tensor(g), None])
    assert from_numpy.dtype == torch.float64
    assert torch.equal(from_numpy, from_torch)
    as_float32 = jacobian_fusion([torch.tensor(z, dtype=torch.float32) for z in zs], [g, None])
    assert as_float32.dtype == torch.float32
    np.testing.assert_allclose(as_float32.numpy(), from_numpy.numpy(), atol=1e-6)


# --- Supplementary A.4 and Theorem 1 ---------------------------------------------------------


def _binary_order_flips(z: np.ndarray, gram: np.ndarray, gamma: float) -> np.ndarray:
    p = jacobian_fusion([z], [gram], gamma=gamma).numpy()
    decided = np.abs(z[:, 0] - z[:, 1]) > 1e-9
    return decided & (p.argmax(-1) != z.argmax(-1))


def test_unimodal_binary_never_changes_argmax_when_claim_applies() -> None:
    """Supplementary A.4: one modality, K = 2, W_x never changes the arg-max.

    For K = 2, J^2 = 2 (p1 p2)^2 e e^T with e = (1, -1), and (S3) gives
    e^T W_x = e^T (I + 2 kappa (p1 p2)^2 G)^{-1}. The order of the logits is therefore preserved
    whenever e is an eigenvector of G (G = I, the paper's worked example, or any G with equal
    diagonal entries), or whenever the logits have zero mean (z = t e), for every gamma.
    """
    rng = np.random.default_rng(12)
    for _ in range(200):
        z = rng.normal(size=(16, 2)) * rng.uniform(0.1, 10) + rng.normal() * 10
        gamma = float(rng.uniform(1e-3, 1.0))
        diag, off = rng.uniform(0.1, 5), rng.uniform(-1, 1)
        symmetric_gram = np.array([[diag, off * diag], [off * diag, diag]])
        assert not _binary_order_flips(z, symmetric_gram, gamma).any()
        general_gram = _random_gram(rng, 2, int(rng.integers(1, 5)))
        centred = z - z.mean(axis=1, keepdims=True)
        assert not _binary_order_flips(centred, general_gram, gamma).any()


def test_unimodal_binary_claim_fails_for_general_gram_with_offset_logits() -> None:
    """What we measured: A.4's proof treats the non-symmetric matrix in (S13) as PSD because its
    eigenvalues are >= 0; that does not make the quadratic form >= 0. With a general G and a
    common offset in z, the regularized logit difference picks up the offset and the arg-max
    flips. This test pins the counterexample found while reproducing the paper.
    """
    z = np.array([[6.92674971, 7.41491019]])
    gram = np.array([[0.11879735, 0.40216355], [0.40216355, 3.60498361]])
    gamma = 0.4195880409634567
    assert _binary_order_flips(z, gram, gamma).all()
    # The same solution satisfies (S3) to rounding, so it is the paper's W_x, not a solver error.
    p = torch.softmax(torch.tensor(z), dim=-1)
    w_x = solve_jacobian_weights(p, gram, gamma)[0].numpy()
    jac = _jacobian(p[0].numpy())
    residual = (1 / gamma - 1) * jac @ jac @ w_x @ gram + w_x
    np.testing.assert_allclose(residual, np.eye(2), atol=1e-12)


def test_theorem1_jacobian_norm_bound() -> None:
    """(S6): ||J W_a W_A||_F^2 <= gamma K / (2 (1 - gamma)) for the solution of (S3)."""
    rng = np.random.default_rng(13)
    for _ in range(100):
        k = int(rng.integers(2, 12))
        head = rng.normal(size=(k, int(rng.integers(1, 16)))) * rng.uniform(0.1, 5)
        gamma = float(rng.uniform(0.01, 0.99))
        p = torch.softmax(torch.tensor(rng.normal(size=(4, k)) * 3.0), dim=-1)
        weights = solve_jacobian_weights(p, head @ head.T, gamma).numpy()
        bound = gamma * k / (2 * (1 - gamma))
        for n in range(4):
            norm2 = np.linalg.norm(_jacobian(p[n].numpy()) @ weights[n] @ head) ** 2
            assert norm2 <= bound * (1 + 1e-9)


def test_theorem1_prediction_change_bound_for_small_perturbation() -> None:
    """Theorem 1 with f_A the identity (l = 1): at the fixed point of Algorithm 1 and W_a held
    fixed (the theorem's first-order argument), ||p'(h + eps) - p'(h)|| <= sqrt(gK/(2(1-g)))||eps||.
    """
    rng = np.random.default_rng(14)
    k, h_dim = 5, 7
    for _ in range(20):
        head = rng.normal(size=(k, h_dim)) * rng.uniform(0.5, 3)
        bias = rng.normal(size=k)
        h = rng.normal(size=h_dim)
        z_b = rng.normal(size=k) * 2
        gamma = float(rng.uniform(0.05, 0.95))
        z_a = head @ h + bias
        p = scipy.special.softmax(z_a + z_b)
        for _ in range(200):  # iterate Algorithm 1 to its fixed point
            w_a = solve_jacobian_weights(p[None], head @ head.T, gamma)[0].numpy()
            p = scipy.special.softmax(w_a @ z_a + z_b)
        eps = rng.normal(size=h_dim)
        eps *= 1e-6 / np.linalg.norm(eps)
        p_noise = scipy.special.softmax(w_a @ (head @ (h + eps) + bias) + z_b)
        bound = math.sqrt(gamma * k / (2 * (1 - gamma))) * np.linalg.norm(eps)
        assert np.linalg.norm(p_noise - p) <= bound * (1 + 1e-3)


# --- Differentiability (used by the adaptive attack) ------------------------------------------


def test_gradients_through_the_solve_match_finite_differences() -> None:
    torch.manual_seed(0)
    k = 4
    head = torch.randn(k, 6, dtype=torch.float64)
    z_b = torch.randn(3, k, dtype=torch.float64)
    z_a = torch.randn(3, k, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a: jacobian_fusion([a, z_b], [head @ head.T, None], gamma=0.3, iterations=2),
        (z_a,),
    )


def test_gradients_with_tied_probabilities() -> None:
    """Ties in p give repeated eigenvalues of J; the implicit gradient must stay finite/correct."""
    k = 5
    z = torch.zeros(2, k, dtype=torch.float64, requires_grad=True)  # uniform p: all ties
    gram = torch.eye(k, dtype=torch.float64) * 2.0
    other = torch.zeros(2, k, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a: jacobian_fusion([a, other], [gram, None], gamma=0.2), (z,)
    )


# --- Bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: statistical_fusion([np.zeros((2, 3)), np.zeros((2, 4))]), "K mismatch"),
        (lambda: statistical_fusion([np.zeros((2, 3)), np.zeros((3, 3))]), "batch size"),
        (lambda: statistical_fusion([np.zeros((0, 3))]), "empty batch"),
        (lambda: statistical_fusion([np.array([[0.0, np.nan]])]), "non-finite"),
        (lambda: statistical_fusion([np.array([[0.0, np.inf]])]), "non-finite"),
        (lambda: statistical_fusion(np.zeros((2, 3))), "sequence"),
        (lambda: statistical_fusion([]), "non-empty"),
        (lambda: statistical_fusion([np.zeros(3)]), "shape"),
        (lambda: statistical_fusion([np.zeros((2, 3))], log_prior=np.zeros(4)), "log_prior"),
        (lambda: statistical_fusion([np.zeros((2, 3))], log_prior=[-np.inf, -0.7, -0.7]), "log"),
        (lambda: jacobian_fusion([np.zeros((2, 3))], [np.eye(4)]), "grams[0]"),
        (lambda: jacobian_fusion([np.zeros((2, 3))], [np.eye(3)], gamma=0.0), "gamma"),
        (lambda: jacobian_fusion([np.zeros((2, 3))], [np.eye(3)], gamma=1.5), "gamma"),
        (lambda: jacobian_fusion([np.zeros((2, 3))], [np.eye(3)], gamma=float("nan")), "gamma"),
        (lambda: jacobian_fusion([np.zeros((2, 3))], [np.eye(3)], gamma=[0.5, 0.5]), "gamma"),
        (lambda: jacobian_fusion([np.zeros((2, 3))], [np.eye(3)], regularize=[1]), "modality 1"),
        (lambda: jacobian_fusion([np.zeros((2, 3))], [None], regularize=[0]), "grams[0] is None"),
        (lambda: jacobian_fusion([np.zeros((2, 3))], [np.eye(3), None]), "one entry per"),
        (lambda: jacobian_fusion([np.zeros((2, 3))], [np.eye(3)], iterations=-1), "iterations"),
        (lambda: jacobian_fusion([np.zeros((2, 3))], [np.eye(3)], solver="magic"), "solver"),
        (
            lambda: jacobian_fusion(
                [np.zeros((2, 3))], [np.array([[1, 2, 0], [0, 1, 0], [0, 0, 1]])]
            ),
            "symmetric",
        ),
        (lambda: jacobian_fusion([np.zeros((2, 3))], [-np.eye(3)]), "positive semi-definite"),
        (lambda: solve_jacobian_weights(np.full((1, 3), 0.5), np.eye(3), 0.5), "sum to 1"),
        (lambda: solve_jacobian_weights(np.array([[1.5, -0.5]]), np.eye(2), 0.5), "negative"),
        (lambda: gram_of(np.zeros(3)), "shape"),
        (lambda: statistical_fusion([np.array([["a", "b"]])]), "numeric"),
    ],
)
def test_bad_input_raises_value_error_naming_the_problem(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FusionInputError, match=re.escape(message)) as info:
        call()
    assert isinstance(info.value, ValueError)


# --- Extreme gamma: accuracy against 60-digit arithmetic ----------------------------------------


def _reference_regularized_logits(p: np.ndarray, z: np.ndarray, gram: np.ndarray, kappa: float):  # type: ignore[no-untyped-def]
    """W_a z from (S3) in vectorised form, solved with 60 significant digits (mpmath)."""
    import mpmath as mp

    mp.mp.dps = 60
    k = len(p)
    pm = [mp.mpf(float(x)) for x in p]
    jac = mp.matrix(k, k)
    for i in range(k):
        for j in range(k):
            jac[i, j] = pm[i] * pm[j] - (pm[i] if i == j else 0)
    a = jac * jac * mp.mpf(kappa)
    g = mp.matrix(gram.tolist())
    system, rhs = mp.matrix(k * k, k * k), mp.matrix(k * k, 1)
    for r in range(k):
        for c in range(k):
            row = r + c * k
            rhs[row] = 1 if r == c else 0
            for i in range(k):
                for j in range(k):
                    system[row, i + j * k] = (1 if (r == i and c == j) else 0) + a[r, i] * g[j, c]
    x = mp.lu_solve(system, rhs)
    w = mp.matrix(k, k)
    for r in range(k):
        for c in range(k):
            w[r, c] = x[r + c * k]
    return np.array([float(v) for v in w * mp.matrix(z.tolist())])


@pytest.mark.parametrize("gain", [1e2, 1e4, 1e8, 1e12])
def test_exact_solver_stays_accurate_for_tiny_gamma(gain: float) -> None:
    """kappa * sigma_max up to 1e12: the Woodbury form's rounding grows with it, so the exact
    solver switches to the dense form past 1e5; either way within 1e-9 of 60-digit arithmetic."""
    from jacfusion_fed.fusion.solver import structured_apply

    rng = np.random.default_rng(21)
    head = rng.normal(size=(6, 8))
    gram = head @ head.T
    factor = factor_gram(gram)
    kappa = gain / float(factor.eigenvalues.max())
    z = rng.normal(size=6) * 8.0
    p = torch.softmax(torch.tensor(z), dim=-1)
    got = structured_apply(p[None], torch.tensor(z)[None], factor, kappa)[0].numpy()
    expected = _reference_regularized_logits(p.numpy(), z, gram, kappa)
    np.testing.assert_allclose(got, expected, atol=1e-9, rtol=0)


def test_gamma_near_zero_and_huge_gram_give_finite_probabilities() -> None:
    rng = np.random.default_rng(22)
    zs = [rng.normal(size=(50, 10)) * 3 for _ in range(2)]
    gram = _random_gram(rng, 10, 20) * 1e8
    for gamma in (1e-6, 1e-15, 1e-300):
        p = jacobian_fusion(zs, [gram, None], gamma=gamma)
        assert bool(torch.isfinite(p).all())
        np.testing.assert_allclose(p.sum(-1).numpy(), 1.0, atol=1e-12)
        dense = jacobian_fusion(zs, [gram, None], gamma=gamma, solver="dense")
        np.testing.assert_allclose(p.numpy(), dense.numpy(), atol=1e-12)
