"""Property tests (hypothesis) of the fusion API over shapes, M, gamma and regularize subsets."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jacfusion_fed.fusion import jacobian_fusion, statistical_fusion


@st.composite
def fusion_problems(draw: st.DrawFn) -> dict:  # type: ignore[type-arg]
    n = draw(st.integers(1, 6))
    k = draw(st.integers(2, 9))
    m = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0, 30.0]))
    rng = np.random.default_rng(seed)
    logits = [rng.normal(size=(n, k)) * scale for _ in range(m)]
    grams = []
    for _ in range(m):
        h = int(rng.integers(1, k + 3))  # h < k gives a singular Gram matrix
        head = rng.normal(size=(k, h)) * rng.uniform(0.1, 3.0)
        grams.append(head @ head.T)
    regularize = sorted(draw(st.sets(st.integers(0, m - 1))))
    gammas = [draw(st.floats(0.01, 1.0)) for _ in range(m)]
    prior = np.log(rng.dirichlet(np.ones(k)) + 1e-3)
    iterations = draw(st.integers(0, 3))
    return {
        "logits": logits,
        "grams": grams,
        "regularize": regularize,
        "gamma": gammas,
        "log_prior": prior,
        "iterations": iterations,
    }


@settings(max_examples=150, deadline=None)
@given(fusion_problems())
def test_output_is_a_probability_distribution(problem: dict) -> None:  # type: ignore[type-arg]
    p = jacobian_fusion(**problem)
    n, k = problem["logits"][0].shape
    assert p.shape == (n, k)
    assert bool(torch.isfinite(p).all())
    assert float(p.min()) >= 0.0
    np.testing.assert_allclose(p.sum(-1).numpy(), 1.0, atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(fusion_problems())
def test_exact_and_dense_solvers_agree(problem: dict) -> None:  # type: ignore[type-arg]
    exact = jacobian_fusion(**problem, solver="exact")
    dense = jacobian_fusion(**problem, solver="dense")
    np.testing.assert_allclose(exact.numpy(), dense.numpy(), atol=1e-9)


@settings(max_examples=100, deadline=None)
@given(fusion_problems(), st.randoms(use_true_random=False))
def test_class_permutation_equivariance(problem: dict, rnd) -> None:  # type: ignore[no-untyped-def,type-arg]
    k = problem["logits"][0].shape[1]
    perm = list(range(k))
    rnd.shuffle(perm)
    permuted = dict(problem)
    permuted["logits"] = [z[:, perm] for z in problem["logits"]]
    permuted["grams"] = [g[np.ix_(perm, perm)] for g in problem["grams"]]
    permuted["log_prior"] = problem["log_prior"][perm]
    np.testing.assert_allclose(
        jacobian_fusion(**permuted).numpy(),
        jacobian_fusion(**problem).numpy()[:, perm],
        atol=1e-10,
    )


@settings(max_examples=100, deadline=None)
@given(fusion_problems(), st.randoms(use_true_random=False))
def test_modality_order_does_not_matter(problem: dict, rnd) -> None:  # type: ignore[no-untyped-def,type-arg]
    m = len(problem["logits"])
    order = list(range(m))
    rnd.shuffle(order)
    position = {old: new for new, old in enumerate(order)}
    permuted = dict(problem)
    permuted["logits"] = [problem["logits"][i] for i in order]
    permuted["grams"] = [problem["grams"][i] for i in order]
    permuted["gamma"] = [problem["gamma"][i] for i in order]
    permuted["regularize"] = sorted(position[i] for i in problem["regularize"])
    np.testing.assert_allclose(
        jacobian_fusion(**permuted).numpy(), jacobian_fusion(**problem).numpy(), atol=1e-10
    )


@settings(max_examples=60, deadline=None)
@given(fusion_problems())
def test_fusion_is_sample_wise(problem: dict) -> None:  # type: ignore[type-arg]
    """Each sample's result depends on that sample alone (chunking and batching are invisible)."""
    batch = jacobian_fusion(**problem).numpy()
    for n in range(batch.shape[0]):
        single = dict(problem)
        single["logits"] = [z[n : n + 1] for z in problem["logits"]]
        np.testing.assert_allclose(jacobian_fusion(**single).numpy()[0], batch[n], atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(fusion_problems())
def test_no_regularization_is_statistical_fusion(problem: dict) -> None:  # type: ignore[type-arg]
    stat = statistical_fusion(problem["logits"], problem["log_prior"])
    unreg = dict(problem, regularize=[])
    assert torch.equal(jacobian_fusion(**unreg), stat)
    off = dict(problem, gamma=1.0)
    assert torch.equal(jacobian_fusion(**off), stat)
