"""Perturbations of Supplementary B.1 (w0..w3), l_inf attacks (w4..w6) via torchattacks, and the
adaptive end-to-end attack through the fused prediction."""

from .adaptive import FUSION_METHODS, FusedLogProbs, FusionRule, attack_fused, worst_case_logits
from .attacks import FGSM, PGD, Attack, AttackSpec, check_unit_range
from .perturbations import (
    BiasNoise,
    Corruption,
    GaussianNoise,
    MissingEntries,
    bias_noise,
    gaussian_noise,
    missing_entries,
)

__all__ = [
    "FGSM",
    "FUSION_METHODS",
    "PGD",
    "Attack",
    "AttackSpec",
    "BiasNoise",
    "Corruption",
    "FusedLogProbs",
    "FusionRule",
    "GaussianNoise",
    "MissingEntries",
    "attack_fused",
    "bias_noise",
    "check_unit_range",
    "gaussian_noise",
    "missing_entries",
    "worst_case_logits",
]
