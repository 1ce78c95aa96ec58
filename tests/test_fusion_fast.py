"""The fast solver: within its stated bound of the exact solver, and falling back when it can't."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from jacfusion_fed.fusion import factor_gram, jacobian_fusion
from jacfusion_fed.fusion.fast import fast_apply

TOLS = (1e-4, 1e-6, 1e-9)


def _confident_logits(rng: np.random.Generator, n: int, k: int, noise: float = 1.0) -> np.ndarray:
    z = rng.normal(size=(n, k)) * noise
    z[np.arange(n), rng.integers(0, k, n)] += 7.0
    return z


def _gram(rng: np.random.Generator, k: int, h: int, scale: float = 0.3) -> np.ndarray:
    head = rng.normal(size=(k, h)) * scale
    return head @ head.T


_EXACT: dict[bytes, torch.Tensor] = {}


def _exact(zs: list[np.ndarray], grams: list, **kw) -> torch.Tensor:  # type: ignore[type-arg,no-untyped-def]
    """The exact solver's answer, computed once per input: each case is checked at every
    tolerance in ``TOLS`` against the same exact answer (most of the time at large K)."""
    key = hashlib.sha256(repr(sorted(kw.items())).encode())
    for a in [*zs, *grams]:
        key.update(
            b"-" if a is None else repr(a.shape).encode() + np.ascontiguousarray(a).tobytes()
        )
    digest = key.digest()
    if digest not in _EXACT:
        _EXACT[digest] = jacobian_fusion(zs, grams, solver="exact", **kw)
    return _EXACT[digest]


def _compare(zs: list[np.ndarray], grams: list, tol: float, **kw) -> float:  # type: ignore[type-arg,no-untyped-def]
    exact = _exact(zs, grams, **kw)
    fast = jacobian_fusion(zs, grams, solver="fast", tol=tol, **kw)
    return float((exact - fast).abs().max())


@pytest.mark.parametrize("k", [2, 10, 100, 309])
@pytest.mark.parametrize("tol", TOLS)
def test_confident_predictions_agree_within_tol_and_use_the_fast_path(k: int, tol: float) -> None:
    rng = np.random.default_rng(k)
    zs = [_confident_logits(rng, 64, k) for _ in range(2)]
    gram = _gram(rng, k, k + 16)
    assert _compare(zs, [gram, None], tol) <= tol
    p = torch.softmax(torch.tensor(zs[0] + zs[1]), dim=-1)
    _, report = fast_apply(p, [torch.tensor(zs[0])], [factor_gram(gram)], [1.0], tol=tol)
    if k >= 100:  # confident p at large K: every sample on the fast path
        assert report.fast_samples == 64


@pytest.mark.parametrize("tol", TOLS)
def test_k1000_agrees_within_tol(tol: float) -> None:
    rng = np.random.default_rng(1000)
    zs = [_confident_logits(rng, 12, 1000) for _ in range(2)]
    assert _compare(zs, [_gram(rng, 1000, 500), None], tol) <= tol


@pytest.mark.parametrize("tol", TOLS)
def test_ties_in_p(tol: float) -> None:
    """Several classes with exactly equal probability (repeated eigenvalues of J)."""
    k = 60
    z = np.zeros((8, k))
    z[:, :3] = 5.0  # three tied leaders
    z[4:, 10:20] = 2.0  # and a tied plateau
    rng = np.random.default_rng(2)
    assert _compare([z, z.copy()], [_gram(rng, k, 80), None], tol) <= tol


@pytest.mark.parametrize("tol", TOLS)
def test_nearly_one_hot(tol: float) -> None:
    rng = np.random.default_rng(3)
    z = _confident_logits(rng, 16, 200) * 6.0
    assert _compare([z, z * 0.5], [_gram(rng, 200, 216, scale=2.0), None], tol) <= tol


@pytest.mark.parametrize("tol", TOLS)
def test_uniform_p_falls_back_and_agrees(tol: float) -> None:
    rng = np.random.default_rng(4)
    k = 400
    z = np.zeros((6, k))
    gram = _gram(rng, k, 450, scale=1.0)
    assert _compare([z + 1e-3 * rng.normal(size=z.shape), z], [gram, None], tol) <= tol
    p = torch.full((6, k), 1.0 / k, dtype=torch.float64)
    _, report = fast_apply(p, [torch.tensor(z + 1.0)], [factor_gram(gram)], [9.0], tol=1e-9)
    assert report.exact_samples == 6  # no small support can be bounded: all exact


@pytest.mark.parametrize("tol", TOLS)
def test_singular_gram(tol: float) -> None:
    rng = np.random.default_rng(5)
    k = 150
    zs = [_confident_logits(rng, 20, k, noise=2.0) for _ in range(2)]
    gram = _gram(rng, k, 20)  # rank 20 < K
    assert _compare(zs, [gram, None], tol) <= tol


def test_several_regularized_modalities_share_the_bound() -> None:
    rng = np.random.default_rng(6)
    k = 120
    zs = [_confident_logits(rng, 32, k, noise=1.5) for _ in range(3)]
    grams = [_gram(rng, k, k + 4) for _ in range(3)]
    for tol in TOLS:
        assert _compare(zs, grams, tol, gamma=[0.2, 0.5, 0.9]) <= tol


def test_more_iterations_use_the_exact_solver() -> None:
    rng = np.random.default_rng(7)
    zs = [_confident_logits(rng, 10, 80) for _ in range(2)]
    gram = _gram(rng, 80, 96)
    fast = jacobian_fusion(zs, [gram, None], solver="fast", iterations=3)
    exact = jacobian_fusion(zs, [gram, None], solver="exact", iterations=3)
    assert torch.equal(fast, exact)


def test_auto_picks_exact_for_small_k_and_fast_for_large_k() -> None:
    rng = np.random.default_rng(8)
    small = [_confident_logits(rng, 10, 10) for _ in range(2)]
    g_small = _gram(rng, 10, 20)
    assert torch.equal(
        jacobian_fusion(small, [g_small, None], solver="auto"),
        jacobian_fusion(small, [g_small, None], solver="exact"),
    )
    large = [_confident_logits(rng, 10, 200) for _ in range(2)]
    g_large = _gram(rng, 200, 216)
    auto = jacobian_fusion(large, [g_large, None], solver="auto", tol=1e-6)
    exact = jacobian_fusion(large, [g_large, None], solver="exact")
    fast = jacobian_fusion(large, [g_large, None], solver="fast", tol=1e-6)
    assert torch.equal(auto, fast)
    assert float((auto - exact).abs().max()) <= 1e-6


def test_bad_tol_is_rejected() -> None:
    from jacfusion_fed.fusion import FusionInputError

    with pytest.raises(FusionInputError, match="tol"):
        jacobian_fusion([np.zeros((1, 3))], [np.eye(3)], tol=0.0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("solver", ["exact", "fast"])
def test_cuda_matches_cpu_and_stays_on_device(dtype: torch.dtype, solver: str) -> None:
    rng = np.random.default_rng(9)
    k = 100
    zs = [torch.tensor(_confident_logits(rng, 512, k), dtype=dtype) for _ in range(2)]
    gram = torch.tensor(_gram(rng, k, k + 16))
    cpu = jacobian_fusion(zs, [gram, None], solver="exact")
    on_gpu = jacobian_fusion([z.cuda() for z in zs], [gram.cuda(), None], solver=solver, tol=1e-6)
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == dtype
    atol = 1e-5 if dtype == torch.float32 else 1e-6
    assert float((on_gpu.cpu() - cpu).abs().max()) <= atol
