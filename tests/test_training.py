"""Training add-ons (Section 5.1): each runs and learns; adversarial training buys robustness."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torchattacks
from torch.utils.data import DataLoader, TensorDataset

from jacfusion_fed.data import MultimodalDataset, SpeechUnavailableError, load_builtin
from jacfusion_fed.models import build_model, default_arch
from jacfusion_fed.training import (
    METHODS,
    TrainReport,
    evaluate_accuracy,
    predict_logits,
    train_epochs,
    train_model,
)


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Small models train fastest on one thread, and do not thrash when the CPUs are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _blobs(n: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two separable 2-D classes inside [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = 0.3 + 0.4 * y[:, None].float() + 0.08 * torch.randn(n, 2, generator=g)
    return x.clamp(0, 1), y


@pytest.mark.parametrize("method", METHODS)
def test_each_method_changes_weights_and_learns(method: str) -> None:
    x, y = _blobs()
    torch.manual_seed(0)
    model = build_model("mlp", (2,), 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = train_model(
        model, x, y, method=method, epochs=15, lr=1e-2, batch_size=32, progress=False
    )
    assert isinstance(report, TrainReport) and report.method == method
    assert len(report.losses) == 15 and all(np.isfinite(report.losses))
    assert report.num_samples == 96 and report.seconds > 0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert report.train_accuracy >= 0.9, report
    json.dumps(report.to_dict())  # metrics must be JSON-serializable


def test_same_seed_same_weights_and_global_state_untouched() -> None:
    x, y = _blobs()
    states = []
    for _ in range(2):
        torch.manual_seed(1)
        model = build_model("mlp", (2,), 2)
        marker, threads = torch.get_rng_state(), torch.get_num_threads()
        train_model(
            model, x, y, method="stability", epochs=2, seed=5, progress=False, num_threads=2
        )
        assert torch.equal(torch.get_rng_state(), marker)
        assert torch.get_num_threads() == threads
        states.append(model.state_dict())
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "dropout"}, r"unknown training method 'dropout'.*regular.*mixup"),
        ({"method": "adversarial", "eps": -0.1}, r"'eps' must be a positive number"),
        ({"method": "free", "m": 0}, r"'m' must be an integer >= 1"),
        ({"method": "mixup", "eps": 0.1}, r"unknown parameter\(s\) \['eps'\] for method 'mixup'"),
        ({"method": "regular", "steps": 3}, r"unknown parameter.*valid: none"),
        ({"epochs": 0}, "epochs must be an integer >= 1"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"num_threads": 0}, "num_threads must be an integer >= 1"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, object], match: str) -> None:
    x, y = _blobs(8)
    args: dict[str, object] = {"epochs": 1, "progress": False, **kwargs}
    with pytest.raises(ValueError, match=match):
        train_model(build_model("mlp", (2,), 2), x, y, **args)  # type: ignore[arg-type]


def test_train_epochs_with_loader_over_rounds() -> None:
    x, y = _blobs()
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    model = build_model("mlp", (2,), 2)
    reports = [train_epochs(model, loader, "free", 1, lr=1e-2, m=2) for _ in range(3)]
    assert [r.epochs for r in reports] == [1, 1, 1]
    assert reports[-1].losses[0] < reports[0].losses[0]
    with pytest.raises(ValueError, match="x has 3 samples but y has 2"):
        train_epochs(model, (x[:3], y[:2]))


def test_progress_bar_runs(capsys: pytest.CaptureFixture[str]) -> None:
    x, y = _blobs(32)
    train_model(build_model("mlp", (2,), 2), x, y, epochs=2, progress=True)
    shown = capsys.readouterr()
    assert "epoch 2/2" in shown.out + shown.err  # rich's bar, with the epoch and loss
    train_model(build_model("mlp", (2,), 2), x, y, epochs=2, progress=False)
    quiet = capsys.readouterr()
    assert quiet.out == "" and quiet.err == ""


def test_predict_and_evaluate_restore_mode() -> None:
    x, y = _blobs(40)
    model = build_model("mlp", (2,), 2)
    model.train()
    logits = predict_logits(model, x.numpy(), batch_size=7)
    assert logits.shape == (40, 2) and model.training
    assert torch.allclose(logits, model.eval()(x))
    acc = evaluate_accuracy(model, x, y)
    assert acc == float((logits.argmax(1) == y).float().mean())
    with pytest.raises(ValueError, match="40 inputs but 3 labels"):
        evaluate_accuracy(model, x, y[:3])


def _avdigits_quick(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[MultimodalDataset, MultimodalDataset]:
    # Same folder as tests/test_data_builtin.py uses: AV-Digits quick is generated once.
    cache = tmp_path_factory.getbasetemp() / "avdigits-quick-cache"
    try:
        train = load_builtin("avdigits", "train", quick=True, cache_dir=cache)
        test = load_builtin("avdigits", "test", quick=True, cache_dir=cache)
    except SpeechUnavailableError:
        pytest.skip("eSpeak NG not installed")
    return train, test


def test_adversarial_training_is_more_robust_under_pgd(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """AV-Digits images, PGD at eps=0.1 (units of the [0, 1] range), 10 steps.

    Measured over seeds 0-3: regular 0.03-0.09, adversarial 0.36-0.46, free-m 0.13-0.29.
    """
    train, test = _avdigits_quick(tmp_path_factory)
    x, y = train.tensors("image")
    xt, yt = test.tensors("image")
    eps = 0.1
    runs = {
        "regular": (20, {}),
        "adversarial": (20, {"eps": eps, "alpha": eps / 3, "steps": 5}),
        "free": (5, {"eps": eps, "m": 4}),
    }
    robust = {}
    for method, (epochs, kw) in runs.items():
        torch.manual_seed(0)
        model = build_model("image_cnn", (1, 8, 8), 10)
        train_model(
            model, x, y, method=method, epochs=epochs, lr=3e-3, batch_size=32, progress=False, **kw
        )
        assert evaluate_accuracy(model, xt, yt) >= 0.5
        attack = torchattacks.PGD(model, eps=eps, alpha=eps / 4, steps=10, random_start=False)
        robust[method] = evaluate_accuracy(model, attack(xt, yt), yt)
    assert robust["adversarial"] >= robust["regular"] + 0.2, robust
    assert robust["free"] >= robust["regular"] + 0.05, robust


@pytest.mark.parametrize(("modality", "min_acc"), [("image", 0.65), ("audio", 0.35)])
def test_regular_training_on_avdigits_quick(
    modality: str, min_acc: float, tmp_path_factory: pytest.TempPathFactory
) -> None:
    train, test = _avdigits_quick(tmp_path_factory)
    x, y = train.tensors(modality)
    torch.manual_seed(0)
    model = build_model(default_arch("avdigits", modality), tuple(x.shape[1:]), 10)
    train_model(model, x, y, epochs=15, lr=3e-3, batch_size=32, progress=False)
    acc = evaluate_accuracy(model, *test.tensors(modality))
    assert acc >= min_acc, f"{modality} test accuracy {acc:.3f}"
