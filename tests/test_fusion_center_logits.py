"""The paper's Jacobian fusion depends on a constant offset of one modality's logits (which
that modality's softmax ignores); ``center_logits`` removes the dependence."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jacfusion_fed.fusion import FusionInputError, gram_of, jacobian_fusion, statistical_fusion
from jacfusion_fed.rpc.fusion_codec import PredictOptions, options_from_proto, options_to_proto

K = 10


def _problem(seed: int, n: int = 400) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    zs = [2.0 * torch.randn(n, K, generator=gen, dtype=torch.float64) for _ in range(2)]
    grams = [gram_of(torch.randn(K, 16, generator=gen, dtype=torch.float64)) for _ in range(2)]
    return zs, grams


@settings(max_examples=10, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    offset=st.floats(5.0, 50.0),
    modality=st.sampled_from([0, 1]),
    gamma=st.sampled_from([0.1, 0.5]),
)
def test_paper_method_depends_on_a_per_modality_offset(
    seed: int, offset: float, modality: int, gamma: float
) -> None:
    zs, grams = _problem(seed)
    shifted = list(zs)
    shifted[modality] = zs[modality] + offset
    # statistical fusion (and each softmax) ignores the offset ...
    assert torch.allclose(statistical_fusion(zs), statistical_fusion(shifted), atol=1e-12)
    # ... the paper's W_a z does not: the fused answer changes
    p = jacobian_fusion(zs, grams, gamma=gamma)
    q = jacobian_fusion(shifted, grams, gamma=gamma)
    assert float((p - q).abs().max()) > 1e-3


@pytest.mark.parametrize("solver", ["exact", "dense", "fast"])
@pytest.mark.parametrize("gamma", [0.1, 0.5, 0.9])
def test_center_logits_is_invariant_to_offsets_up_to_50(solver: str, gamma: float) -> None:
    zs, grams = _problem(1)
    gen = torch.Generator().manual_seed(2)
    p = jacobian_fusion(zs, grams, gamma=gamma, solver=solver, center_logits=True)  # type: ignore[arg-type]
    worst = 0.0
    for offset in (-50.0, -5.0, 0.5, 20.0, 50.0):
        for m in range(2):
            shifted = list(zs)
            # a constant per modality, or even a different one per sample
            shifted[m] = zs[m] + offset * (1 + torch.rand(zs[m].shape[0], 1, generator=gen))
            q = jacobian_fusion(shifted, grams, gamma=gamma, solver=solver, center_logits=True)  # type: ignore[arg-type]
            worst = max(worst, float((p - q).abs().max()))
    assert worst <= 1e-9, worst
    # and centering is a different method: it does not reduce to statistical fusion
    assert float((p - statistical_fusion(zs)).abs().max()) > 1e-3


def test_center_logits_must_be_a_bool() -> None:
    zs, grams = _problem(0, 4)
    with pytest.raises(FusionInputError, match="center_logits"):
        jacobian_fusion(zs, grams, center_logits=1)  # type: ignore[arg-type]


def test_center_logits_travels_in_fusion_options() -> None:
    for value in (None, True, False):
        back = options_from_proto(options_to_proto(PredictOptions(center_logits=value)))
        assert back.center_logits is value
