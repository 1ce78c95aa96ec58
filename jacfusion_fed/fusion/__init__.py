"""Late fusion of unimodal logits: pure tensor math (no I/O, no Flower, no gRPC).

Equation numbers refer to Gao et al., "Training-Free Robust Multimodal Learning via Sample-Wise
Jacobian Regularization" (``shared/paper/jacobian-fusion-paper.md``).

Pick a rule by name through the registry (:mod:`jacfusion_fed.fusion.methods`): :func:`fuse`,
:data:`METHODS`, :func:`get_method`; class priors come from :func:`log_prior_from_counts`.
"""

from ._validation import FusionInputError, check_gamma
from .detection import (
    ConsistencyCalibration,
    FeatureDetector,
    LayeredDetector,
    consistency_pvalues,
    feature_pvalues,
    fit_consistency,
    fit_feature_detector,
    fit_layered_detector,
    layered_pvalues,
)
from .gram import GramFactor, factor_gram, gram_of
from .jacobian import SOLVERS, jacobian_fusion, solve_jacobian_weights
from .methods import (
    METHODS,
    Fused,
    FusionMethod,
    fuse,
    fuse_full,
    get_method,
    log_prior_from_counts,
    methods,
    prior_from_counts,
    register,
)
from .pvalues import COMBINERS, combine_pvalues
from .robust import (
    ModalityCalibration,
    RobustFusion,
    aps_scores,
    aps_sets,
    calibration_split,
    fit_calibration,
    robust_fusion,
)
from .statistical import confidence_mean_fusion, mean_fusion, statistical_fusion

__all__ = [
    "COMBINERS",
    "METHODS",
    "SOLVERS",
    "ConsistencyCalibration",
    "FeatureDetector",
    "Fused",
    "FusionInputError",
    "FusionMethod",
    "GramFactor",
    "LayeredDetector",
    "ModalityCalibration",
    "RobustFusion",
    "aps_scores",
    "aps_sets",
    "calibration_split",
    "check_gamma",
    "combine_pvalues",
    "confidence_mean_fusion",
    "consistency_pvalues",
    "factor_gram",
    "feature_pvalues",
    "fit_calibration",
    "fit_consistency",
    "fit_feature_detector",
    "fit_layered_detector",
    "fuse",
    "fuse_full",
    "get_method",
    "gram_of",
    "jacobian_fusion",
    "layered_pvalues",
    "log_prior_from_counts",
    "mean_fusion",
    "methods",
    "prior_from_counts",
    "register",
    "robust_fusion",
    "solve_jacobian_weights",
    "statistical_fusion",
]
