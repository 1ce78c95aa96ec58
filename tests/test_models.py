"""Unimodal nets: the head is the last nn.Linear, forward = head(features), specs round-trip."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from jacfusion_fed.models import (
    ARCHS,
    UnimodalNet,
    build_from_spec,
    build_model,
    default_arch,
    model_spec,
)

SHAPES = {"mlp": (1,), "image_cnn": (1, 8, 8), "spectrogram_cnn": (1, 32, 32)}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_head_is_last_linear_and_forward_composes(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, SHAPES[arch], 10)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears[-1] is model.head
    assert model.num_classes == 10 and model.head.out_features == 10
    x = torch.rand(5, *SHAPES[arch])
    feats = model.features(x)
    assert feats.shape == (5, model.feature_dim)
    torch.testing.assert_close(model(x), model.head(feats), rtol=0, atol=0)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < 100_000, f"{arch} has {n_params} parameters: keep CPU models small"


@pytest.mark.parametrize("arch", list(ARCHS))
def test_spec_round_trip_through_json(arch: str) -> None:
    model = build_model(arch, SHAPES[arch], 3, hidden=20)
    spec = json.loads(json.dumps(model_spec(model)))
    assert spec == {
        "arch": arch,
        "input_shape": list(SHAPES[arch]),
        "num_classes": 3,
        "kwargs": {"hidden": 20},
    }
    clone = build_from_spec(spec)
    clone.load_state_dict(model.state_dict())
    x = torch.rand(4, *SHAPES[arch])
    torch.testing.assert_close(clone(x), model(x))


def test_default_archs() -> None:
    assert default_arch("twomoon", "x") == "mlp"
    assert default_arch("avdigits", "image") == "image_cnn"
    assert default_arch("avdigits", "audio") == "spectrogram_cnn"
    with pytest.raises(ValueError, match="avdigits/image"):
        default_arch("avdigits", "video")


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"unknown arch 'resnet'.*mlp.*image_cnn"):
        build_model("resnet", (1,), 2)
    with pytest.raises(ValueError, match="bad options"):
        build_model("mlp", (1,), 2, depth=3)
    with pytest.raises(ValueError, match="input shape"):
        build_model("image_cnn", (8, 8), 2)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("mlp", (2,), 1)
    with pytest.raises(ValueError, match="lacks"):
        build_from_spec({"arch": "mlp"})
    with pytest.raises(ValueError, match=r"nn\.Linear"):
        UnimodalNet(nn.Identity(), nn.Identity())  # type: ignore[arg-type]
