"""jacfusion-fed: privacy-oriented federated late fusion with sample-wise Jacobian regularization.

The layers (one diagram, checked by ``make lint``) are in ``docs/architecture.md``.
"""

__version__ = "0.1.0"
