"""Training-free late fusion without regularization: statistical fusion and mean baselines.

Notation follows the paper: z_m in R^K are raw logits of modality m, p_m = softmax(z_m),
freq the class frequencies of the training set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._validation import ArrayLike, check_log_prior, check_logits


def combine_logits(logits: Sequence[torch.Tensor], log_prior: torch.Tensor | None) -> torch.Tensor:
    """sum_m z_m - (M - 1) ln freq, the argument of the softmax in Lemma 1 (no checks)."""
    total = logits[0].clone()
    for z in logits[1:]:
        total = total + z
    if log_prior is not None and len(logits) > 1:
        total = total - (len(logits) - 1) * log_prior
    return total


def statistical_fusion(
    logits: Sequence[ArrayLike], log_prior: ArrayLike | None = None
) -> torch.Tensor:
    """Statistical late fusion under conditional independence (Eq. 2, Lemma 1).

    For M modalities with raw logits z_m (each of shape (N, K)) and ln freq (K,)::

        p = sigma_2( prod_m p_m / freq^(M-1) ) = softmax( sum_m z_m - (M - 1) ln freq )

    which is Lemma 1 generalised from two modalities to M (Bayes' rule with modalities
    conditionally independent given the class).

    Args:
        logits: M arrays of shape (N, K).
        log_prior: ln freq, shape (K,); ``None`` means a uniform prior (the term is constant).

    Returns:
        Fused probabilities, shape (N, K), on the first array's device.
    """
    zs = check_logits(logits)
    prior = check_log_prior(log_prior, zs[0].shape[1], zs[0])
    return torch.softmax(combine_logits(zs, prior), dim=-1)


def mean_fusion(logits: Sequence[ArrayLike]) -> torch.Tensor:
    """Mean fusion (Section 5.1 baseline "Mean-w/o"): p = (1/M) sum_m softmax(z_m).

    Args:
        logits: M arrays of shape (N, K).

    Returns:
        Probabilities, shape (N, K).
    """
    zs = check_logits(logits)
    return torch.stack([torch.softmax(z, dim=-1) for z in zs]).mean(dim=0)


def confidence_mean_fusion(logits: Sequence[ArrayLike]) -> torch.Tensor:
    """Confidence-weighted mean fusion (Section 5.1 baseline "Mean-w/").

    The paper adapts the confidence-based weighted summation of Yu et al. (2021), whose
    confidence is one minus the normalised entropy. We use exactly that, per sample:

        c_m = 1 - H(p_m) / ln K,  H(p) = -sum_k p_k ln p_k,  so c_m in [0, 1]
        p = sum_m c_m p_m / sum_m c_m

    A confident (peaked) modality counts more; a uniform one counts nothing. When every
    modality is exactly uniform (all c_m = 0) the plain mean is used.

    Args:
        logits: M arrays of shape (N, K).

    Returns:
        Probabilities, shape (N, K).
    """
    zs = check_logits(logits)
    probs = torch.stack([torch.softmax(z, dim=-1) for z in zs])  # (M, N, K)
    log_probs = torch.stack([torch.log_softmax(z, dim=-1) for z in zs])
    entropy = -(probs * log_probs).sum(dim=-1)  # (M, N)
    confidence = (1.0 - entropy / math.log(zs[0].shape[1])).clamp(min=0.0, max=1.0)
    total = confidence.sum(dim=0, keepdim=True)  # (1, N)
    uniform_weights = torch.full_like(confidence, 1.0 / len(zs))
    weights = torch.where(total > 0, confidence / total.clamp(min=1e-300), uniform_weights)
    return (weights.unsqueeze(-1) * probs).sum(dim=0)
