"""Robust late fusion when nobody knows which modality is broken (issue 11).

Each owner publishes clean calibration statistics of its own validation logits
(:func:`fit_calibration`); :func:`robust_fusion` uses them to score, per sample and modality,
how much the modality can be trusted, fuses under an epsilon-contamination model whose
epsilon follows that score, and returns a split-conformal prediction set and an abstain flag.

Notation: z_m in R^K the raw logits of modality m, p_m = softmax(z_m), freq the class prior,
n the number of validation samples of an owner.

**Nonconformity and conformal p-values.** For class k, s_m(z, k) = -ln p_m(k). The owner
publishes the sorted true-class scores c_1 <= ... <= c_n of its clean validation split. The
split-conformal p-value of class k is

    pi_m(k) = (1 + #{i : c_i >= s_m(z, k)}) / (n + 1)

and, for a clean test sample exchangeable with the validation split, P(pi_m(y) <= a) <= a.

**Typicality (split conformal).** :func:`fit_calibration` splits the validation samples in
two disjoint halves (stratified by class, a fixed interleaving): the class means mu_k (K, K)
and the shared (pooled within-class) covariance Sigma are fitted on the first half, and the
published reference scores t(z_i) = min_k (z_i - mu_k)^T Sigma^-1 (z_i - mu_k) are those of
the *second* half, which the fit never saw. A clean test sample is then exchangeable with the
reference scores, so its typicality p-value is a valid conformal p-value,
P(u <= a) <= a (the reference scores of the same points that fitted mu and Sigma would be too
small, and the p-values of new clean samples too often small). The conformity scores are
published for the same second half. The p-value is label-free, so it applies to unlabeled
test samples as well.

**Reliability** r_m in [0, 1]: the typicality p-value u_m; for M >= 3 times the cross-modal
consistency min(1, 2 sum_k q_{-m}(k) pi_m(k)), where q_{-m} is the fusion below of the other
modalities gated by typicality alone (how plausible modality m finds what the others say).
With further detection p-values (``pvalues``: the owners' feature p-values and the
coordinator's cross-modal consistency, issue 20, :mod:`jacfusion_fed.fusion.detection`), u_m is
first replaced by their Fisher (or Cauchy) combination with u_m.
The p-values inside r_m are interpolated between the published scores (and decay
exponentially past the largest one, continuously) so that gradients flow for adaptive attacks;
the prediction set uses the exact ones.

**Fusion.** trust tau_m = min(1, r_m / trust_level), epsilon_m = floor + (1 - floor)(1 - tau_m).
The likelihood ratio of modality m, l_m(k) = K softmax(ln p_m - ln freq)(k), is contaminated,
l'_m = (1 - epsilon_m) l_m + epsilon_m (a broken modality carries no class information), and

    p = softmax( ln freq + sum_m ln l'_m )

which is statistical fusion (Lemma 1) when every epsilon_m = 0. The floor bounds how much a
single modality can veto a class: an attacked modality that looks typical still cannot push
a class below epsilon_m times its odds.

**What a distrusted modality keeps** (``retain`` = kappa in [0, 1), issue 20). The
contamination above replaces a distrusted modality's evidence by "no information" (1), so a
fully distrusted modality (epsilon_m = 1) is dropped, even though a perturbed modality usually
still carries some class information. With kappa > 0 the contamination is the tempered
evidence l_m^kappa instead:

    l'_m = (1 - epsilon_m) l_m + epsilon_m l_m^kappa,

so a fully distrusted modality contributes kappa ln l_m (its evidence down-weighted, not
dropped), a fully trusted one (epsilon_m = floor = 0) all of it; kappa = 0 is the rule above.

**Jacobian regularization that follows reliability** (optional: ``grams`` and
``jacobian_level`` > 0). With s_m = min(1, r_m / jacobian_level) per sample, the logits that
enter l_m are z'_m = s_m z_m + (1 - s_m) W_m z_m, where W_m z_m is Algorithm 1's regularized
logit vector at ``gamma`` (one step from p^(0) = statistical fusion of the raw logits). A
modality that looks fully reliable keeps its logits; the less reliable, the closer to the
paper's Stat-w/ at ``gamma``, per sample, without knowing which modality is perturbed.
Reliability and the prediction set always use the raw logits (the calibration is theirs).

**Prediction set.** With ``fused_scores`` (the sorted APS scores of the fused rule on labelled
clean calibration data, :func:`aps_scores`; the calibration does not know which modality will be
broken), the set is the conformal APS set of the fused probabilities: k is in it when the
conformal p-value of its APS score s(p, k) = sum_{j: p_j >= p_k} p_j (RAPS with ``raps_lambda``
> 0: plus raps_lambda * max(0, rank(k) - 1), which keeps the sets small when the fused
probabilities have long tails) exceeds alpha, and the arg-max is always added, so no set is
empty (coverage >= 1 - alpha on clean data, the arg-max only adds to it). Without them (the
served path, where the coordinator holds no labels): Bonferroni over trusted modalities, k is in
the set unless some trusted modality has pi_m(k) <= alpha / M; this set can be empty, and then
the sample abstains. **Abstain** when the arg-max of p is not in the set or max_k p(k) is below
``confidence``; an answered sample therefore never has an empty set.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ._validation import (
    ArrayLike,
    FusionInputError,
    check_log_prior,
    check_logits,
    to_tensor,
)
from .gram import GramFactor, factor_gram
from .implicit import implicit_apply
from .pvalues import COMBINERS, combine_pvalues
from .solver import flush_tiny
from .statistical import combine_logits

__all__ = [
    "CALIBRATION_FIELDS",
    "ModalityCalibration",
    "RobustFusion",
    "aps_scores",
    "aps_sets",
    "calibration_split",
    "fit_calibration",
    "robust_fusion",
    "typicality_pvalues",
]

CALIBRATION_FIELDS: tuple[str, ...] = (
    "class_means",
    "precision",
    "typicality_scores",
    "conformity_scores",
)
"""The arrays an owner publishes (see :meth:`ModalityCalibration.to_arrays`)."""


@dataclass(frozen=True)
class ModalityCalibration:
    """Clean calibration statistics of one modality (aggregates of its validation logits).

    Attributes:
        class_means: mu, (K, K) float64; row k is the mean logit vector of class k.
        precision: Sigma^-1, (K, K) float64, inverse of the ridge-regularised pooled
            within-class covariance of the logits.
        typicality_scores: (n,) ascending, t(z_i) = min_k Mahalanobis^2(z_i, mu_k).
        conformity_scores: (n,) ascending, s(z_i, y_i) = -ln softmax(z_i)_{y_i}.
    """

    class_means: torch.Tensor
    precision: torch.Tensor
    typicality_scores: torch.Tensor
    conformity_scores: torch.Tensor

    @property
    def num_classes(self) -> int:
        return int(self.class_means.shape[0])

    @property
    def num_samples(self) -> int:
        return int(self.conformity_scores.shape[0])

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The published record: float64 arrays named by :data:`CALIBRATION_FIELDS`."""
        return {name: getattr(self, name).detach().cpu().numpy() for name in CALIBRATION_FIELDS}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, ArrayLike]) -> ModalityCalibration:
        """Rebuild (and validate) a calibration from :meth:`to_arrays`' record."""
        missing = [f for f in CALIBRATION_FIELDS if f not in arrays]
        extra = sorted(set(arrays) - set(CALIBRATION_FIELDS))
        if missing or extra:
            raise FusionInputError(
                f"calibration record must hold exactly {list(CALIBRATION_FIELDS)}; "
                f"missing {missing}, unexpected {extra}"
            )
        t = {
            f: to_tensor(arrays[f], f"calibration.{f}", device=None, dtype=torch.float64)
            for f in CALIBRATION_FIELDS
        }
        return _checked(cls(**t), "calibration")


def _checked(cal: ModalityCalibration, name: str) -> ModalityCalibration:
    k = cal.class_means.shape[0] if cal.class_means.ndim == 2 else -1
    if cal.class_means.ndim != 2 or cal.class_means.shape != (k, k) or k < 2:
        raise FusionInputError(
            f"{name}.class_means must have shape (K, K) with K >= 2, "
            f"got {tuple(cal.class_means.shape)}"
        )
    if cal.precision.shape != (k, k):
        raise FusionInputError(
            f"{name}.precision must have shape ({k}, {k}), got {tuple(cal.precision.shape)}"
        )
    for f in ("typicality_scores", "conformity_scores"):
        s = getattr(cal, f)
        if s.ndim != 1 or s.shape[0] < 2:
            raise FusionInputError(f"{name}.{f} must be a 1-D array of at least 2 scores")
        if bool((s[1:] < s[:-1]).any()):
            raise FusionInputError(f"{name}.{f} must be sorted ascending")
    if cal.typicality_scores.shape != cal.conformity_scores.shape:
        raise FusionInputError(f"{name}: typicality and conformity scores differ in length")
    for f in CALIBRATION_FIELDS:
        if not bool(torch.isfinite(getattr(cal, f)).all()):
            raise FusionInputError(f"{name}.{f} contains non-finite values")
    return cal


def _typicality(z: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """t(z) = min_k (z - mu_k)^T P (z - mu_k); z (N, K) -> (N,)."""
    d = z.unsqueeze(1) - means.unsqueeze(0)  # (N, K classes, K dims)
    return torch.einsum("nci,ij,ncj->nc", d, precision, d).min(dim=1).values


def calibration_split(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the fit half and the reference half of ``labels`` (n,): within every class,
    in order of appearance, the samples alternate fit, reference, fit, ... (deterministic,
    stratified, disjoint)."""
    fit, ref = [], []
    for k in torch.unique(labels):
        idx = (labels == k).nonzero().flatten()
        fit.append(idx[0::2])
        ref.append(idx[1::2])
    return torch.cat(fit).sort().values, torch.cat(ref).sort().values


def fit_calibration(
    logits_val: ArrayLike, labels_val: ArrayLike, *, ridge: float = 1e-3
) -> ModalityCalibration:
    """Clean calibration statistics of one modality from its validation logits.

    The samples are split by :func:`calibration_split`: class means and
    Sigma = (1 / (n_fit - K)) sum_i (z_i - mu_{y_i})(z_i - mu_{y_i})^T + ridge * (tr / K) I
    (pooled within-class covariance; the ridge keeps it invertible, logits being shift-free)
    are fitted on the first half; the published typicality and conformity scores are those of
    the disjoint second half (split conformal: valid p-values, module docstring).

    Args:
        logits_val: (n, K) clean validation logits; every class must occur at least twice,
            and the fit half must hold more samples than classes.
        labels_val: (n,) integer labels in [0, K).
        ridge: relative ridge added to Sigma, > 0.

    Returns:
        The :class:`ModalityCalibration` (float64, on the logits' device).
    """
    (z,) = check_logits([logits_val])
    z = z.to(torch.float64)
    n, k = z.shape
    y = to_tensor(labels_val, "labels_val", device=z.device, dtype=torch.float64)
    if y.shape != (n,):
        raise FusionInputError(f"labels_val must have shape ({n},), got {tuple(y.shape)}")
    if bool((y != y.round()).any()) or bool((y < 0).any()) or bool((y >= k).any()):
        raise FusionInputError(f"labels_val must be integers in [0, {k})")
    if not (math.isfinite(ridge) and ridge > 0):
        raise FusionInputError(f"ridge must be a positive number, got {ridge}")
    labels = y.long()
    counts = torch.bincount(labels, minlength=k)
    if bool((counts == 0).any()):
        absent = [int(c) for c in (counts == 0).nonzero().flatten()]
        raise FusionInputError(f"labels_val has no sample of class(es) {absent}")
    if bool((counts < 2).any()):
        few = [int(c) for c in (counts < 2).nonzero().flatten()]
        raise FusionInputError(
            f"labels_val needs at least 2 samples of every class (one to fit, one to "
            f"calibrate); class(es) {few} have one"
        )
    fit_idx, ref_idx = calibration_split(labels)
    n_fit = int(fit_idx.shape[0])
    if n_fit <= k or ref_idx.shape[0] < 2:
        raise FusionInputError(
            f"need more validation samples than classes in the fit half, got n={n} "
            f"(fit half {n_fit}), K={k}"
        )
    z_fit, y_fit = z[fit_idx], labels[fit_idx]
    fit_counts = torch.bincount(y_fit, minlength=k)
    means = torch.zeros(k, k, dtype=torch.float64, device=z.device)
    means.index_add_(0, y_fit, z_fit)
    means = means / fit_counts.unsqueeze(1).to(torch.float64)
    resid = z_fit - means[y_fit]
    cov = resid.T @ resid / (n_fit - k)
    cov = cov + ridge * max(float(torch.trace(cov)) / k, 1e-12) * torch.eye(k, dtype=cov.dtype)
    precision = torch.linalg.inv(cov)
    precision = (precision + precision.T) / 2
    z_ref, y_ref = z[ref_idx], labels[ref_idx]
    typ = _typicality(z_ref, means, precision).sort().values
    conf = (-torch.log_softmax(z_ref, dim=1).gather(1, y_ref[:, None]).squeeze(1)).sort().values
    return ModalityCalibration(means, precision, typ, conf)


def conformal_pvalues(scores: torch.Tensor, sorted_cal: torch.Tensor) -> torch.Tensor:
    """Exact split-conformal p-values (1 + #{c_i >= s}) / (n + 1), any shape of ``scores``."""
    n = sorted_cal.shape[0]
    below = torch.searchsorted(sorted_cal, scores.detach().contiguous(), right=False)
    return (1.0 + (n - below).to(torch.float64)) / (n + 1.0)


def smooth_pvalues(scores: torch.Tensor, sorted_cal: torch.Tensor) -> torch.Tensor:
    """Differentiable p-values: the rank of s interpolated linearly between the sorted
    c_i; past c_n it decays as exp(-(s - c_n) / spread), spread = c_n - c_1 over n (> 0)."""
    n = sorted_cal.shape[0]
    s = scores.to(torch.float64)
    idx = torch.searchsorted(sorted_cal, s.detach().contiguous(), right=False).clamp(1, n - 1)
    lo, hi = sorted_cal[idx - 1], sorted_cal[idx]
    frac = ((s - lo) / (hi - lo).clamp(min=1e-12)).clamp(0.0, 1.0)
    below = (idx - 1).to(torch.float64) + frac  # #{c_i < s}, interpolated (exact at each c_i)
    p = (1.0 + n - below) / (n + 1.0)
    spread = max(float(sorted_cal[-1] - sorted_cal[0]) / n, 1e-6)
    tail = 2.0 / (n + 1.0) * torch.exp(-(s - sorted_cal[-1]).clamp(min=0.0) / spread)
    return torch.where(s > sorted_cal[-1], tail, p.clamp(max=1.0))


def typicality_pvalues(
    logits: torch.Tensor, calibration: ModalityCalibration, *, smooth: bool = False
) -> torch.Tensor:
    """Typicality p-values u (N,) of float64 logits (N, K) against one modality's calibration
    (module docstring); ``smooth``: the differentiable interpolation, else the exact ones."""
    t = _typicality(logits, calibration.class_means, calibration.precision)
    pv = smooth_pvalues if smooth else conformal_pvalues
    return pv(t, calibration.typicality_scores)


def _aps_all(p: torch.Tensor, lam: float = 0.0, k_reg: int = 1) -> torch.Tensor:
    """(R)APS score of every class, (N, K): s(p, k) = sum of p_j over classes j with
    p_j >= p_k, plus lam * max(0, rank(k) - k_reg) (rank 1: the arg-max; lam = 0: APS)."""
    p = p.detach().to(torch.float64)
    above = p.unsqueeze(1) >= p.unsqueeze(2)  # [n, k, j]: p_j >= p_k
    score = (p.unsqueeze(1) * above).sum(dim=2)
    if lam > 0:
        rank = above.sum(dim=2).to(torch.float64)
        score = score + lam * (rank - k_reg).clamp(min=0.0)
    return score


def _check_lam(lam: float) -> float:
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
        raise FusionInputError(f"raps_lambda must be a number >= 0, got {lam!r}")
    return float(lam)


def aps_scores(probs: ArrayLike, labels: ArrayLike, *, raps_lambda: float = 0.0) -> torch.Tensor:
    """Sorted (ascending) APS scores of the true labels: the calibration record of the fused
    conformal set (``fused_scores`` of :func:`robust_fusion`).

    Args:
        probs: (n, K) fused probabilities of labelled clean calibration samples.
        labels: (n,) integer labels in [0, K).
        raps_lambda: RAPS's size penalty per rank past the first (0: plain APS).
    """
    lam = _check_lam(raps_lambda)
    p = to_tensor(probs, "probs", device=None, dtype=torch.float64)
    if p.ndim != 2 or p.shape[0] < 2:
        raise FusionInputError(f"probs must have shape (n, K) with n >= 2, got {tuple(p.shape)}")
    y = to_tensor(labels, "labels", device=p.device, dtype=torch.float64)
    if (
        y.shape != (p.shape[0],)
        or bool((y != y.round()).any())
        or bool((y < 0).any())
        or bool((y >= p.shape[1]).any())
    ):
        raise FusionInputError(f"labels must be {p.shape[0]} integers in [0, {p.shape[1]})")
    return _aps_all(p, lam).gather(1, y.long()[:, None]).squeeze(1).sort().values


def aps_sets(
    probs: ArrayLike, fused_scores: ArrayLike, alpha: float, *, raps_lambda: float = 0.0
) -> torch.Tensor:
    """Conformal APS sets (N, K) bool of ``probs``: class k is in when its conformal p-value
    (1 + #{c_i >= s(p, k)}) / (n + 1) exceeds ``alpha``; the arg-max is always in (no set is
    empty; coverage >= 1 - alpha for samples exchangeable with the calibration)."""
    p = to_tensor(probs, "probs", device=None, dtype=torch.float64)
    cal = to_tensor(fused_scores, "fused_scores", device=p.device, dtype=torch.float64)
    if cal.ndim != 1 or cal.shape[0] < 2 or bool((cal[1:] < cal[:-1]).any()):
        raise FusionInputError("fused_scores must be a 1-D ascending array of at least 2 scores")
    if not 0.0 < float(alpha) < 1.0:
        raise FusionInputError(f"alpha must lie in (0, 1), got {alpha!r}")
    in_set = conformal_pvalues(_aps_all(p, _check_lam(raps_lambda)), cal) > alpha
    top = p.argmax(dim=1, keepdim=True)
    return in_set.scatter(1, top, True)


@dataclass(frozen=True)
class RobustFusion:
    """Result of :func:`robust_fusion` (N samples, M modalities, K classes).

    Attributes:
        p: fused probabilities (N, K), differentiable in the logits.
        reliability: r (N, M) in [0, 1], differentiable.
        trust: 1 - epsilon (N, M), the weight each modality's evidence got.
        prediction_set: (N, K) bool, split-conformal, coverage >= 1 - alpha on clean data
            (APS of the fused probabilities with ``fused_scores``: never empty).
        abstain: (N,) bool.
    """

    p: torch.Tensor
    reliability: torch.Tensor
    trust: torch.Tensor
    prediction_set: torch.Tensor
    abstain: torch.Tensor


def _check_options(alpha: float, floor: float, trust_level: float, confidence: float) -> None:
    for name, v, lo, hi in (
        ("alpha", alpha, 0.0, 1.0),
        ("floor", floor, 0.0, 1.0),
        ("trust_level", trust_level, 0.0, 1.0),
    ):
        if not (isinstance(v, (int, float)) and lo < float(v) < hi) and not (
            name == "floor" and v == 0
        ):
            raise FusionInputError(f"{name} must lie in ({lo}, {hi}), got {v!r}")
    if not (isinstance(confidence, (int, float)) and 0.0 <= confidence <= 1.0):
        raise FusionInputError(f"confidence must lie in [0, 1], got {confidence!r}")


def _factors(
    grams: Sequence[ArrayLike | GramFactor | None] | None, m_count: int, k: int
) -> list[GramFactor | None]:
    if grams is None:
        return [None] * m_count
    if isinstance(grams, (torch.Tensor, np.ndarray, GramFactor)) or len(grams) != m_count:
        raise FusionInputError(f"grams must have one entry per modality (M={m_count}, or None)")
    out: list[GramFactor | None] = []
    for m, g in enumerate(grams):
        f = None if g is None else g if isinstance(g, GramFactor) else factor_gram(g, f"grams[{m}]")
        if f is not None and f.num_classes != k:
            raise FusionInputError(f"grams[{m}] has K={f.num_classes}, logits have K={k}")
        out.append(f)
    return out


def robust_fusion(
    logits: Sequence[ArrayLike],
    calibrations: Sequence[ModalityCalibration],
    log_prior: ArrayLike | None = None,
    grams: Sequence[ArrayLike | GramFactor | None] | None = None,
    alpha: float = 0.1,
    *,
    floor: float = 0.05,
    trust_level: float = 0.05,
    confidence: float = 0.5,
    consistency: bool | None = None,
    jacobian_level: float = 0.0,
    gamma: float = 0.1,
    fused_scores: ArrayLike | None = None,
    raps_lambda: float = 0.0,
    pvalues: ArrayLike | None = None,
    combine: str = "fisher",
    retain: float = 0.0,
) -> RobustFusion:
    """Reliability-gated statistical fusion with a conformal prediction set (module docstring).

    Args:
        logits: M >= 2 arrays (N, K), one per modality.
        calibrations: M :class:`ModalityCalibration`, same order as ``logits``.
        log_prior: ln freq (K,) or None (uniform).
        grams: per modality W_m W_m^T (K, K), a GramFactor or None (never regularized); used
            only when ``jacobian_level`` > 0.
        alpha: miscoverage level of the prediction set, in (0, 1).
        floor: minimum contamination epsilon of every modality, in [0, 1).
        trust_level: reliability at and above which a modality is fully trusted, in (0, 1).
        confidence: abstain when max_k p(k) is below it, in [0, 1].
        consistency: multiply reliability by cross-modal consistency (None: for M >= 3 only;
            with M = 2 each modality is judged by the other alone).
        jacobian_level: reliability below which a modality's logits move towards the
            Jacobian-regularized W_m z_m (module docstring), in [0, 1); 0 turns it off.
        gamma: the Jacobian gamma of that regularization, in (0, 1].
        fused_scores: sorted APS calibration scores of this fused rule (:func:`aps_scores`
            on labelled clean calibration data); the prediction set is then the fused APS
            set (:func:`aps_sets`). None: the per-modality Bonferroni set.
        raps_lambda: RAPS's size penalty of that set (the value the scores were computed with).
        pvalues: further detection p-values per sample and modality, (N, M) or (N, M, S)
            (issue 20: the owners' feature p-values, the coordinator's cross-modal
            consistency, :mod:`jacfusion_fed.fusion.detection`); combined with the typicality
            p-value by ``combine`` into the reliability r_m, which then sets both the
            contamination and the Jacobian gate. None: typicality alone (as before).
        combine: ``"fisher"`` or ``"cauchy"``
            (:func:`~jacfusion_fed.fusion.pvalues.combine_pvalues`).
        retain: the share kappa of its evidence a distrusted modality keeps, in [0, 1): the
            contamination is l_m^kappa instead of 1 (module docstring); 0 drops a fully
            distrusted modality (as before).

    Returns:
        :class:`RobustFusion` on the first array's device, in the logits' result dtype.
    """
    zs = check_logits(logits)
    m_count = len(zs)
    if m_count < 2:
        raise FusionInputError(f"robust_fusion needs M >= 2 modalities, got M={m_count}")
    if not (isinstance(jacobian_level, (int, float)) and 0.0 <= jacobian_level < 1.0):
        raise FusionInputError(f"jacobian_level must lie in [0, 1), got {jacobian_level!r}")
    if not (isinstance(gamma, (int, float)) and 0.0 < gamma <= 1.0):
        raise FusionInputError(f"gamma must lie in (0, 1], got {gamma!r}")
    if isinstance(calibrations, ModalityCalibration) or len(calibrations) != m_count:
        got = 1 if isinstance(calibrations, ModalityCalibration) else len(calibrations)
        raise FusionInputError(f"need one calibration per modality: M={m_count}, got {got}")
    _check_options(alpha, floor, trust_level, confidence)
    if not (isinstance(retain, (int, float)) and 0.0 <= retain < 1.0):
        raise FusionInputError(f"retain must lie in [0, 1), got {retain!r}")
    n, k = zs[0].shape
    factors = _factors(grams, m_count, k)
    prior = check_log_prior(log_prior, k, zs[0])
    dtype, device = zs[0].dtype, zs[0].device
    cals = []
    for m, c in enumerate(calibrations):
        if not isinstance(c, ModalityCalibration):
            raise FusionInputError(f"calibrations[{m}] must be a ModalityCalibration")
        if c.num_classes != k:
            raise FusionInputError(f"calibrations[{m}] has K={c.num_classes}, logits have K={k}")
        cals.append(ModalityCalibration(*(getattr(c, f).to(device) for f in CALIBRATION_FIELDS)))
    lp = prior.to(torch.float64) if prior is not None else torch.zeros(k, dtype=torch.float64)
    lp = lp.to(device)
    z64 = [z.to(torch.float64) for z in zs]
    log_p = [torch.log_softmax(z, dim=1) for z in z64]
    scores = [-x for x in log_p]  # s_m(z, k), (N, K)
    typ = torch.stack(
        [typicality_pvalues(z, c, smooth=True) for z, c in zip(z64, cals, strict=True)], dim=1
    )
    log_ratios = [torch.log_softmax(x - lp, dim=1) + math.log(k) for x in log_p]  # ln l_m(k)
    regularized = (
        [(m, f.to(device)) for m, f in enumerate(factors) if f is not None]
        if jacobian_level > 0 and gamma < 1.0
        else []
    )
    if regularized:  # W_m z_m from p^(0) = statistical fusion of the raw logits (Algorithm 1)
        p0 = flush_tiny(torch.softmax(combine_logits(z64, lp), dim=1))
        wz = {m: implicit_apply(p0, z64[m], f, 1.0 / gamma - 1.0) for m, f in regularized}

    def evidence(rel: torch.Tensor) -> list[torch.Tensor]:
        """ln l'_m per modality, (N, K) each, for reliabilities ``rel`` (N, M); computed as
        logaddexp(ln(1 - eps) + ln l, ln eps + kappa ln l) so that eps = 0 or 1 stays finite
        (and so do the gradients: both clamps are inactive wherever eps moves)."""
        eps = floor + (1.0 - floor) * (1.0 - (rel / trust_level).clamp(max=1.0))
        keep = torch.log1p(-eps.clamp(max=1.0 - 1e-12))
        drop = torch.log(eps.clamp(min=1e-300))
        return [
            torch.logaddexp(keep[:, m : m + 1] + lr, drop[:, m : m + 1] + retain * lr)
            for m, lr in enumerate(log_ratios)
        ]

    if combine not in COMBINERS:
        raise FusionInputError(f"unknown combination {combine!r}; valid: {', '.join(COMBINERS)}")
    reliability = typ
    if pvalues is not None:
        extra = to_tensor(pvalues, "pvalues", device=device, dtype=torch.float64)
        if extra.ndim == 2:
            extra = extra.unsqueeze(2)
        if extra.ndim != 3 or extra.shape[:2] != (n, m_count):
            raise FusionInputError(
                f"pvalues must have shape ({n}, {m_count}) or ({n}, {m_count}, S), "
                f"got {tuple(extra.shape)}"
            )
        reliability = combine_pvalues(torch.cat([typ.unsqueeze(2), extra], dim=2), combine)
    if consistency if consistency is not None else m_count >= 3:
        # the others' opinion is itself gated by their typicality, so one broken modality
        # does not make the clean ones look inconsistent
        ev = evidence(typ)
        total = torch.stack(ev).sum(dim=0)
        cons = []
        for m in range(m_count):
            q_others = torch.softmax(lp + total - ev[m], dim=1)
            pi = smooth_pvalues(scores[m], cals[m].conformity_scores)
            cons.append((2.0 * (q_others * pi).sum(dim=1)).clamp(max=1.0))
        reliability = reliability * torch.stack(cons, dim=1)
    eps = floor + (1.0 - floor) * (1.0 - (reliability / trust_level).clamp(max=1.0))  # (N, M)
    if regularized:  # z'_m = s z_m + (1 - s) W_m z_m, s = min(1, r_m / jacobian_level)
        for m, _f in regularized:
            keep_m = (reliability[:, m : m + 1] / jacobian_level).clamp(max=1.0)
            z_m = keep_m * z64[m] + (1.0 - keep_m) * wz[m]
            log_ratios[m] = torch.log_softmax(torch.log_softmax(z_m, dim=1) - lp, dim=1)
            log_ratios[m] = log_ratios[m] + math.log(k)
    fused = lp + torch.stack(evidence(reliability)).sum(dim=0)
    p = torch.softmax(fused, dim=1)
    if fused_scores is not None:
        in_set = aps_sets(p.detach(), fused_scores, alpha, raps_lambda=raps_lambda).to(device)
    else:
        in_set = torch.ones(n, k, dtype=torch.bool, device=device)
        trusted = reliability.detach() >= trust_level
        for m in range(m_count):
            keep = conformal_pvalues(scores[m], cals[m].conformity_scores) > alpha / m_count
            in_set &= keep | ~trusted[:, m : m + 1]
    top = p.detach().argmax(dim=1, keepdim=True)
    abstain = ~in_set.gather(1, top).squeeze(1) | (p.detach().max(dim=1).values < confidence)
    return RobustFusion(
        p=p.to(dtype),
        reliability=reliability.to(dtype),
        trust=(1.0 - eps).to(dtype),
        prediction_set=in_set,
        abstain=abstain,
    )
