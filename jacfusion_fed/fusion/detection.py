"""Detection signals for robust fusion (issue 20): owner-side feature typicality, cross-modal
consistency computed from logits alone, and their combination into one p-value per sample
and modality.

Every signal is a split-conformal p-value: a score is fitted on one half of a clean labelled
validation split (:func:`~jacfusion_fed.fusion.robust.calibration_split`), the sorted scores of
the disjoint other half are the reference, and a test sample's p-value is

    u = (1 + #{i : c_i >= s}) / (n + 1)

so that P(u <= a) <= a for a clean test sample exchangeable with the reference half.

**Feature typicality (owner side).** h in R^H the penultimate features of the owner's net,
class means nu_k (K, H) and the pooled within-class covariance S (H, H, ridge 1e-3 tr/H) on
the fit half; the score is the class-conditional Mahalanobis distance (Lee et al. 2018)

    s_F(h) = min_k (h - nu_k)^T S^-1 (h - nu_k).

Only the owner sees h; it publishes u_F per requested sample, nothing else.

**Layered feature typicality.** With L layers of the owner's net (h^(1) .. h^(L), the output of
each block of its feature extractor, h^(L) the penultimate features), one such detector per
layer gives u^(1) .. u^(L), combined by Cauchy (valid under the layers' dependence,
asymptotically in the tail):

    u_F = 1/2 - arctan( (1/L) sum_l tan((1/2 - u^(l)) pi) ) / pi

(Lee et al. 2018 use every layer too: a small perturbation of the input can leave the
penultimate features typical and still be atypical in an early layer).

**Cross-modal consistency (coordinator side, M >= 2).** From logits alone: class means mu_{m,k}
(K, K) and precision P_m of each modality's logits (fit half), and the predictive score of
modality m given the others,

    s_C,m(z) = -ln sum_k q_{-m}(k) exp(-d2_{m,k}(z_m) / 2),
    d2_{m,k}(z_m) = (z_m - mu_{m,k})^T P_m (z_m - mu_{m,k})
    q_{-m} = softmax( ln freq + sum_{j != m} (ln softmax(z_j) - ln freq) )

(how plausible modality m's logits are under the class distribution the other modalities
predict; for M = 2, q_{-m} is the other modality's posterior). An attack that keeps z_m typical
on its own but moves it to another class's region breaks it. With M = 2 the disagreement is
nearly symmetric (both modalities look inconsistent); which one is broken is for the
per-modality signals (typicality, feature p-values) to say once combined. Reference scores
come from the paired clean validation logits of the reference half.

**Combination.** S p-values u_1..u_S of one sample and modality, by Fisher,

    T = -2 sum_s ln u_s,   u = P(chi2_{2S} >= T) = exp(-T/2) sum_{i<S} (T/2)^i / i!

(valid for independent p-values), or by Cauchy (Liu & Xie 2020, valid under arbitrary
dependence asymptotically),

    T = (1/S) sum_s tan((1/2 - u_s) pi),   u = 1/2 - arctan(T) / pi.

All functions are differentiable in their tensor inputs (the p-values used inside gradients
are the smooth interpolation of :func:`~jacfusion_fed.fusion.robust.smooth_pvalues`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ._validation import ArrayLike, FusionInputError, check_log_prior, check_logits, to_tensor
from .pvalues import COMBINERS, combine_pvalues
from .robust import calibration_split, conformal_pvalues, smooth_pvalues

__all__ = [
    "COMBINERS",
    "FEATURE_DETECTOR_FIELDS",
    "ConsistencyCalibration",
    "FeatureDetector",
    "LayeredDetector",
    "combine_pvalues",
    "consistency_pvalues",
    "consistency_scores",
    "feature_pvalues",
    "feature_scores",
    "fit_consistency",
    "fit_feature_detector",
    "fit_layered_detector",
    "layered_pvalues",
]

FEATURE_DETECTOR_FIELDS: tuple[str, ...] = ("class_means", "precision", "reference_scores")


def _labels(labels: ArrayLike, n: int, k: int, device: torch.device) -> torch.Tensor:
    y = to_tensor(labels, "labels_val", device=device, dtype=torch.float64)
    if y.shape != (n,):
        raise FusionInputError(f"labels_val must have shape ({n},), got {tuple(y.shape)}")
    if bool((y != y.round()).any()) or bool((y < 0).any()) or bool((y >= k).any()):
        raise FusionInputError(f"labels_val must be integers in [0, {k})")
    out = y.long()
    counts = torch.bincount(out, minlength=k)
    if bool((counts < 2).any()):
        few = [int(c) for c in (counts < 2).nonzero().flatten()]
        raise FusionInputError(
            f"labels_val needs at least 2 samples of every class (fit and reference halves); "
            f"class(es) {few} have fewer"
        )
    return out


def _class_gaussian(
    x: torch.Tensor, y: torch.Tensor, k: int, ridge: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means (K, D) and the precision (D, D) of the pooled within-class covariance."""
    n, d = x.shape
    counts = torch.bincount(y, minlength=k).to(torch.float64)
    means = torch.zeros(k, d, dtype=torch.float64, device=x.device)
    means.index_add_(0, y, x)
    means = means / counts.clamp(min=1.0).unsqueeze(1)
    resid = x - means[y]
    cov = resid.T @ resid / max(n - k, 1)
    cov = cov + ridge * max(float(torch.trace(cov)) / d, 1e-12) * torch.eye(
        d, dtype=cov.dtype, device=cov.device
    )
    precision = torch.linalg.inv(cov)
    return means, (precision + precision.T) / 2


def _mahalanobis(x: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """d2 (N, K): (x_n - mu_k)^T P (x_n - mu_k) for x (N, D), means (K, D)."""
    xp = x @ precision
    quad = (xp * x).sum(dim=1, keepdim=True)  # (N, 1)
    cross = xp @ means.T  # (N, K)
    mq = ((means @ precision) * means).sum(dim=1)  # (K,)
    return (quad - 2.0 * cross + mq.unsqueeze(0)).clamp(min=0.0)


# --------------------------------------------------------------------------- feature detector


@dataclass(frozen=True)
class FeatureDetector:
    """An owner's class-conditional Mahalanobis detector on its penultimate features.

    Attributes:
        class_means: nu (K, H) float64 (fit half).
        precision: S^-1 (H, H) float64 (fit half).
        reference_scores: (n_ref,) ascending, s_F of the disjoint reference half.
    """

    class_means: torch.Tensor
    precision: torch.Tensor
    reference_scores: torch.Tensor

    @property
    def feature_dim(self) -> int:
        return int(self.class_means.shape[1])

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {f: getattr(self, f).detach().cpu().numpy() for f in FEATURE_DETECTOR_FIELDS}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, ArrayLike]) -> FeatureDetector:
        if set(arrays) != set(FEATURE_DETECTOR_FIELDS):
            raise FusionInputError(
                f"feature detector must hold exactly {list(FEATURE_DETECTOR_FIELDS)}, "
                f"got {sorted(arrays)}"
            )
        t = {
            f: to_tensor(arrays[f], f, device=None, dtype=torch.float64)
            for f in FEATURE_DETECTOR_FIELDS
        }
        det = cls(**t)
        k_h = tuple(det.class_means.shape)
        if det.class_means.ndim != 2 or det.precision.shape != (k_h[1], k_h[1]):
            raise FusionInputError("feature detector: class_means (K, H) and precision (H, H)")
        ref = det.reference_scores
        if ref.ndim != 1 or ref.shape[0] < 2 or bool((ref[1:] < ref[:-1]).any()):
            raise FusionInputError("feature detector: reference_scores must be 1-D ascending")
        return det


def fit_feature_detector(
    features_val: ArrayLike, labels_val: ArrayLike, num_classes: int, *, ridge: float = 1e-3
) -> FeatureDetector:
    """Fit the owner's detector on clean validation features (module docstring).

    Args:
        features_val: (n, H) penultimate features of the owner's clean validation split.
        labels_val: (n,) integer labels in [0, num_classes); every class at least twice.
        num_classes: K.
        ridge: relative ridge of the covariance, > 0.
    """
    h = to_tensor(features_val, "features_val", device=None, dtype=torch.float64)
    if h.ndim != 2 or h.shape[0] < 4 or not bool(torch.isfinite(h).all()):
        raise FusionInputError(
            f"features_val must be a finite (n, H) array with n >= 4, got {tuple(h.shape)}"
        )
    if not (math.isfinite(ridge) and ridge > 0):
        raise FusionInputError(f"ridge must be a positive number, got {ridge}")
    y = _labels(labels_val, h.shape[0], num_classes, h.device)
    fit, ref = calibration_split(y)
    means, precision = _class_gaussian(h[fit], y[fit], num_classes, ridge)
    scores = _mahalanobis(h[ref], means, precision).min(dim=1).values.sort().values
    return FeatureDetector(means, precision, scores)


def feature_scores(detector: FeatureDetector, features: ArrayLike) -> torch.Tensor:
    """s_F (N,) of features (N, H)."""
    h = to_tensor(features, "features", device=None, dtype=torch.float64)
    if h.ndim != 2 or h.shape[1] != detector.feature_dim:
        raise FusionInputError(
            f"features must have shape (N, {detector.feature_dim}), got {tuple(h.shape)}"
        )
    dev = h.device
    return (
        _mahalanobis(h, detector.class_means.to(dev), detector.precision.to(dev)).min(dim=1).values
    )


def feature_pvalues(
    detector: FeatureDetector, features: ArrayLike, *, smooth: bool = False
) -> torch.Tensor:
    """Conformal p-values u_F (N,) in (0, 1] of features (N, H); ``smooth``: the
    differentiable interpolation (for attacks), else the exact p-values (what is published)."""
    s = feature_scores(detector, features)
    ref = detector.reference_scores.to(s.device)
    return smooth_pvalues(s, ref) if smooth else conformal_pvalues(s, ref)


@dataclass(frozen=True)
class LayeredDetector:
    """One :class:`FeatureDetector` per layer of the owner's net (module docstring), the
    penultimate features last."""

    layers: tuple[FeatureDetector, ...]

    @property
    def layer_dims(self) -> tuple[int, ...]:
        return tuple(d.feature_dim for d in self.layers)


def fit_layered_detector(
    layers_val: Sequence[ArrayLike], labels_val: ArrayLike, num_classes: int, *, ridge: float = 1e-3
) -> LayeredDetector:
    """:func:`fit_feature_detector` on each layer's clean validation activations.

    Args:
        layers_val: L >= 1 arrays (n, D_l), the same n validation samples in every layer.
        labels_val: (n,) integer labels in [0, num_classes).
        num_classes: K.
        ridge: relative ridge of each layer's covariance, > 0.
    """
    if isinstance(layers_val, (torch.Tensor, np.ndarray)) or len(layers_val) == 0:
        raise FusionInputError("layers_val must be a non-empty sequence of (n, D) arrays")
    return LayeredDetector(
        tuple(fit_feature_detector(f, labels_val, num_classes, ridge=ridge) for f in layers_val)
    )


def layered_pvalues(
    detector: LayeredDetector, layers: Sequence[ArrayLike], *, smooth: bool = False
) -> torch.Tensor:
    """u_F (N,) in (0, 1]: the Cauchy combination over layers of each layer's
    :func:`feature_pvalues` (module docstring); one layer: that layer's p-value."""
    if len(layers) != len(detector.layers):
        raise FusionInputError(
            f"the detector has {len(detector.layers)} layers, got {len(layers)} activations"
        )
    u = torch.stack(
        [
            feature_pvalues(d, f, smooth=smooth)
            for d, f in zip(detector.layers, layers, strict=True)
        ],
        dim=-1,
    )
    return combine_pvalues(u, "cauchy")


# --------------------------------------------------------------------------- consistency


@dataclass(frozen=True)
class ConsistencyCalibration:
    """What the coordinator fits on paired clean validation logits for consistency.

    Attributes:
        class_means: (M, K, K) mu_{m,k}; precision: (M, K, K) P_m (fit half).
        reference_scores: (M, n_ref) ascending per modality, s_C,m of the reference half.
        log_prior: (K,) ln freq used inside q_{-m}.
    """

    class_means: torch.Tensor
    precision: torch.Tensor
    reference_scores: torch.Tensor
    log_prior: torch.Tensor

    @property
    def num_modalities(self) -> int:
        return int(self.class_means.shape[0])


def consistency_scores(
    logits: Sequence[ArrayLike],
    class_means: torch.Tensor,
    precision: torch.Tensor,
    log_prior: torch.Tensor,
) -> torch.Tensor:
    """s_C (N, M) of M logits arrays (N, K) (module docstring); differentiable."""
    zs = [z.to(torch.float64) for z in check_logits(logits)]
    m_count = len(zs)
    if m_count < 2:
        raise FusionInputError(f"consistency needs M >= 2 modalities, got M={m_count}")
    dev = zs[0].device
    lp = log_prior.to(dev, torch.float64)
    ev = [torch.log_softmax(z, dim=1) - lp for z in zs]
    total = torch.stack(ev).sum(dim=0)
    out = []
    for m, z in enumerate(zs):
        log_q = torch.log_softmax(lp + total - ev[m], dim=1)
        d2 = _mahalanobis(z, class_means[m].to(dev), precision[m].to(dev))
        out.append(-torch.logsumexp(log_q - d2 / 2.0, dim=1))
    return torch.stack(out, dim=1)


def fit_consistency(
    logits_val: Sequence[ArrayLike],
    labels_val: ArrayLike,
    log_prior: ArrayLike | None = None,
    *,
    ridge: float = 1e-3,
) -> ConsistencyCalibration:
    """Fit cross-modal consistency on paired clean validation logits (M arrays (n, K), the
    same samples in the same order) and their labels (n,)."""
    zs = [z.to(torch.float64) for z in check_logits(logits_val)]
    if len(zs) < 2:
        raise FusionInputError(f"consistency needs M >= 2 modalities, got M={len(zs)}")
    n, k = zs[0].shape
    if not (math.isfinite(ridge) and ridge > 0):
        raise FusionInputError(f"ridge must be a positive number, got {ridge}")
    y = _labels(labels_val, n, k, zs[0].device)
    prior = check_log_prior(log_prior, k, zs[0])
    lp = (prior if prior is not None else torch.zeros(k)).to(torch.float64).to(zs[0].device)
    fit, ref = calibration_split(y)
    if fit.shape[0] <= k or ref.shape[0] < 2:
        raise FusionInputError(f"need more validation samples than classes, got n={n}, K={k}")
    pairs = [_class_gaussian(z[fit], y[fit], k, ridge) for z in zs]
    means = torch.stack([p[0] for p in pairs])
    precision = torch.stack([p[1] for p in pairs])
    scores = consistency_scores([z[ref] for z in zs], means, precision, lp)
    return ConsistencyCalibration(means, precision, scores.T.sort(dim=1).values.contiguous(), lp)


def consistency_pvalues(
    logits: Sequence[ArrayLike], calibration: ConsistencyCalibration, *, smooth: bool = True
) -> torch.Tensor:
    """Conformal consistency p-values (N, M) of M logits arrays (N, K)."""
    if len(logits) != calibration.num_modalities:
        raise FusionInputError(
            f"consistency calibration is for M={calibration.num_modalities}, got {len(logits)}"
        )
    s = consistency_scores(
        logits, calibration.class_means, calibration.precision, calibration.log_prior
    )
    ref = calibration.reference_scores.to(s.device)
    fn = smooth_pvalues if smooth else conformal_pvalues
    return torch.stack([fn(s[:, m], ref[m]) for m in range(s.shape[1])], dim=1)
