"""jacfusion-fed: privacy-oriented federated late fusion with sample-wise Jacobian regularization.

The layers, lowest first: ``fusion`` (pure tensor math) <- ``data``/``models``/``training``/
``robustness``/``evaluation`` (plain PyTorch) <- ``store``/``privacy``/``rpc``/``federation``
(I/O, Flower, gRPC) <- ``cli``.
"""

__version__ = "0.1.0"
