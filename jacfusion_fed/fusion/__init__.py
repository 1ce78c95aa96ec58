"""Late fusion of unimodal logits: pure tensor math (no I/O, no Flower, no gRPC).

Equation numbers refer to Gao et al., "Training-Free Robust Multimodal Learning via Sample-Wise
Jacobian Regularization" (``shared/paper/jacobian-fusion-paper.md``).
"""

from ._validation import FusionInputError
from .gram import GramFactor, factor_gram, gram_of
from .jacobian import SOLVERS, jacobian_fusion, solve_jacobian_weights
from .robust import ModalityCalibration, RobustFusion, fit_calibration, robust_fusion
from .statistical import confidence_mean_fusion, mean_fusion, statistical_fusion

__all__ = [
    "SOLVERS",
    "FusionInputError",
    "GramFactor",
    "ModalityCalibration",
    "RobustFusion",
    "confidence_mean_fusion",
    "factor_gram",
    "fit_calibration",
    "gram_of",
    "jacobian_fusion",
    "mean_fusion",
    "robust_fusion",
    "solve_jacobian_weights",
    "statistical_fusion",
]
