"""Training of unimodal nets with the paper's robust add-ons (Section 5.1).

``regular``, ``adversarial`` (PGD, Madry et al.), ``free`` (free-m, Shafahi et al.),
``stability`` (Zheng et al.) and ``mixup`` (Zhang et al.); see :mod:`.methods`.
"""

from .evaluate import evaluate_accuracy, predict_features, predict_layers, predict_logits
from .loop import TrainReport, train_epochs, train_model
from .methods import METHODS, resolve_params

__all__ = [
    "METHODS",
    "TrainReport",
    "evaluate_accuracy",
    "predict_features",
    "predict_layers",
    "predict_logits",
    "resolve_params",
    "train_epochs",
    "train_model",
]
