"""Unimodal networks: a feature extractor ``features`` and a last ``nn.Linear`` ``head``."""

from .archs import ARCHS, build_from_spec, build_model, default_arch, model_spec
from .unimodal import UnimodalNet

__all__ = ["ARCHS", "UnimodalNet", "build_from_spec", "build_model", "default_arch", "model_spec"]
