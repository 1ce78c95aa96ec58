"""Deprecated: the requester's client is :mod:`jacfusion_fed.requester` now.

Kept importable for one release; importing it warns (``DeprecationWarning``). Its
``Prediction`` is :class:`~jacfusion_fed.answer.FusedAnswer` (``Requester.predict``'s answer).
"""

import warnings

from jacfusion_fed.requester import Forgotten, FusedAnswer, Requester, Submitted, load_labels

warnings.warn(
    "jacfusion_fed.client is deprecated; import jacfusion_fed.requester instead",
    DeprecationWarning,
    stacklevel=2,
)

Prediction = FusedAnswer

__all__ = ["Forgotten", "FusedAnswer", "Prediction", "Requester", "Submitted", "load_labels"]
