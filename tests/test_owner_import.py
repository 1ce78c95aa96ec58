"""Bring your own model: the three formats, head detection and the probe check, refused pickles,
input specs, and publication as a store version."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from jacfusion_fed.owner import OwnerWorkspace
from jacfusion_fed.owner.importing import ModelImportError, detect_format, load_model_file
from jacfusion_fed.owner.input_spec import InputSpec, RecordError
from jacfusion_fed.owner.model_import import import_model, load_class_counts
from jacfusion_fed.privacy.pseudonyms import Pseudonymizer

K = 5
SPEC = InputSpec.create((1, 6, 6), "float32", (0.0, 1.0))
COUNTS = [3, 4, 5, 6, 7]

FACTORY_SOURCE = textwrap.dedent(
    """
    from torch import nn

    def make_net() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 12), nn.ReLU(),
            nn.Linear(12, 5),
        )

    def make_other() -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(36, 5))
    """
)


@pytest.fixture()
def factory_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    pkg = tmp_path / "pkgsrc"
    pkg.mkdir()
    (pkg / "byom_test_nets.py").write_text(FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(pkg))
    sys.modules.pop("byom_test_nets", None)
    return "byom_test_nets"


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, K)
    ).eval()


def _ws(root: Path) -> OwnerWorkspace:
    return OwnerWorkspace(root, "image", None, Pseudonymizer(b"k" * 32))


def _x(n: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.rand((n, 1, 6, 6), generator=torch.Generator().manual_seed(seed))


def _check_served(root: Path, net: nn.Module, version: str) -> None:
    """The stored version, rebuilt in a fresh workspace (new process state), gives the net's
    own logits, and its head is the net's last layer."""
    ws = _ws(root)
    assert ws.current_version() == version
    _, model = ws.load_model()
    x = _x()
    with torch.no_grad():
        want = net(x)
        np.testing.assert_allclose(model(x).numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
    head = ws.head()
    last = net[-1]
    assert isinstance(last, nn.Linear)
    w = last.weight.detach().double().numpy()
    np.testing.assert_allclose(head.gram, w @ w.T, rtol=1e-6)
    np.testing.assert_array_equal(ws.class_counts(), COUNTS)
    assert ws.num_classes == K


def test_torchscript_import(tmp_path: Path) -> None:
    net = _net()
    path = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(net), path)
    assert detect_format(path) == "torchscript"
    report = import_model(_ws(tmp_path / "ws"), path, class_counts=COUNTS, input_spec=SPEC)
    assert (report.format, report.head, report.num_classes, report.feature_dim) == (
        "torchscript",
        "5",
        K,
        12,
    )
    assert report.probe_max_error < 1e-5
    _check_served(tmp_path / "ws", net, report.version)


@pytest.mark.parametrize("dynamic", [True, False])
def test_export_import(tmp_path: Path, dynamic: bool) -> None:
    net = _net(1)
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    ep = torch.export.export(net, (_x(4),), dynamic_shapes=shapes)
    path = tmp_path / "net.pt2"
    torch.export.save(ep, path)
    assert detect_format(path) == "export"
    report = import_model(_ws(tmp_path / "ws"), path, class_counts=COUNTS, input_spec=SPEC)
    assert report.format == "export"
    _check_served(tmp_path / "ws", net, report.version)  # 9 records: padded to the static 4


def test_export_shape_must_match_spec(tmp_path: Path) -> None:
    path = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(_net(), (_x(2),)), path)
    wrong = InputSpec.create((1, 7, 7))
    with pytest.raises(ModelImportError, match=r"shape \(1, 6, 6\)"):
        import_model(_ws(tmp_path / "ws"), path, class_counts=COUNTS, input_spec=wrong)


def test_safetensors_with_factory(tmp_path: Path, factory_module: str) -> None:
    net = _net(2)
    path = tmp_path / "net.safetensors"
    safetensors.torch.save_file(net.state_dict(), str(path))
    with pytest.raises(ModelImportError, match="--factory"):
        import_model(_ws(tmp_path / "ws"), path, class_counts=COUNTS, input_spec=SPEC)
    with pytest.raises(ModelImportError, match="do not fit"):
        import_model(
            _ws(tmp_path / "ws"),
            path,
            factory=f"{factory_module}:make_other",
            class_counts=COUNTS,
            input_spec=SPEC,
        )
    report = import_model(
        _ws(tmp_path / "ws"),
        path,
        factory=f"{factory_module}:make_net",
        class_counts=COUNTS,
        input_spec=SPEC,
    )
    assert report.format == "safetensors"
    _check_served(tmp_path / "ws", net, report.version)


def test_pickle_refused_unless_weights_only(tmp_path: Path, factory_module: str) -> None:
    net = _net(3)
    full = tmp_path / "full.pth"
    torch.save(net, full)
    with pytest.raises(ModelImportError) as info:
        load_model_file(full)
    message = str(info.value)
    assert "weights_only=True" in message and "torch.jit.save" in message
    assert "safetensors.torch.save_file" in message
    # a plain state dict reads with weights_only=True: accepted with a factory
    weights = tmp_path / "weights.pth"
    torch.save(net.state_dict(), weights)
    report = import_model(
        _ws(tmp_path / "ws"),
        weights,
        factory=f"{factory_module}:make_net",
        class_counts=COUNTS,
        input_spec=SPEC,
    )
    _check_served(tmp_path / "ws", net, report.version)


def _script(module: nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(module.eval()), path)
    return path


def test_head_detection_and_ambiguity(tmp_path: Path) -> None:
    torch.manual_seed(0)
    twin = nn.Sequential(nn.Flatten(), nn.Linear(36, K), nn.ReLU(), nn.Linear(K, K))
    path = _script(twin, tmp_path / "twin.pt")
    with pytest.raises(ModelImportError, match=r"ambiguous: 2 layers .*\(1, 3\).*--head"):
        import_model(_ws(tmp_path / "a"), path, class_counts=COUNTS, input_spec=SPEC)
    with pytest.raises(ModelImportError, match="layer '1' does not produce the model's logits"):
        import_model(_ws(tmp_path / "b"), path, head="1", class_counts=COUNTS, input_spec=SPEC)
    report = import_model(_ws(tmp_path / "c"), path, head="3", class_counts=COUNTS, input_spec=SPEC)
    assert report.head == "3"
    with pytest.raises(ModelImportError, match=r"has no parameter nope\.weight"):
        import_model(_ws(tmp_path / "d"), path, head="nope", class_counts=COUNTS, input_spec=SPEC)


class _Tempered(nn.Module):
    def __init__(self, after: str) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.ReLU())
        self.fc = nn.Linear(8, K)
        self.after = after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc(self.body(x))
        if self.after == "temperature":
            return z / 2.0
        if self.after == "softmax":
            return torch.softmax(z, dim=1)
        return z


@pytest.mark.parametrize("after", ["temperature", "softmax"])
def test_probe_check_refuses_layers_after_the_head(tmp_path: Path, after: str) -> None:
    path = _script(_Tempered(after), tmp_path / "m.pt")
    with pytest.raises(ModelImportError, match=r"layer 'fc' does not produce .*Gram matrix"):
        import_model(_ws(tmp_path / "ws"), path, class_counts=COUNTS, input_spec=SPEC)
    assert _ws(tmp_path / "ws").store.current_version() is None  # nothing published


def test_plain_head_accepted_and_normalisation_applied(tmp_path: Path) -> None:
    torch.manual_seed(4)
    net = _Tempered("none").eval()
    path = _script(net, tmp_path / "m.pt")
    spec = InputSpec.create((1, 6, 6), "float32", (0, 1), mean=0.5, std=0.25)
    report = import_model(_ws(tmp_path / "ws"), path, class_counts=COUNTS, input_spec=spec)
    assert report.head == "fc"
    _, model = _ws(tmp_path / "ws").load_model()
    x = _x()
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), net((x - 0.5) / 0.25).numpy(), rtol=1e-5)


def test_class_counts_checked(tmp_path: Path) -> None:
    path = _script(_net(), tmp_path / "m.pt")
    with pytest.raises(ModelImportError, match="K=5 classes but 3 class counts"):
        import_model(_ws(tmp_path / "ws"), path, class_counts=[1, 2, 3], input_spec=SPEC)
    with pytest.raises(ValueError, match="class counts"):
        import_model(_ws(tmp_path / "ws"), path, input_spec=SPEC)
    good = tmp_path / "counts.json"
    good.write_text("[1, 2, 3]")
    assert load_class_counts(good) == [1, 2, 3]
    good.write_text('{"a": 1}')
    with pytest.raises(ValueError, match="JSON list"):
        load_class_counts(good)


def test_import_from_data_source(tmp_path: Path) -> None:
    """With --data: spec, probe records and class counts come from the owner's own data."""
    rng = np.random.default_rng(0)
    x = rng.random((40, 1, 6, 6)).astype(np.float32)
    y = np.arange(40) % K
    data = tmp_path / "d.npz"
    np.savez(data, x_train=x, y_train=y, x_test=x[:10], y_test=y[:10])
    ws = OwnerWorkspace(tmp_path / "ws", "image", f"npz:{data}", Pseudonymizer(b"k" * 32))
    report = import_model(ws, _script(_net(), tmp_path / "m.pt"))
    assert report.class_counts == (8, 8, 8, 8, 8)
    assert report.input_spec.shape == (1, 6, 6)
    assert set(report.accuracy) == {"train", "test"}


def test_input_spec_validation() -> None:
    good = np.zeros((3, 1, 6, 6), np.float32)
    assert SPEC.validate_batch(good).dtype == np.float32
    bad = good.copy()
    bad[2, 0, 0, 0] = np.nan
    with pytest.raises(RecordError, match="record 2: contains NaN"):
        SPEC.validate_batch(bad)
    bad[2, 0, 0, 0] = 3.0
    with pytest.raises(RecordError, match=r"record 2: values span .*outside the range"):
        SPEC.validate_batch(bad)
    with pytest.raises(ValueError, match="must have shape"):
        SPEC.validate_batch(np.zeros((3, 6, 6), np.float32))
    with pytest.raises(ValueError, match="exceeds the limit"):
        SPEC.validate_batch(good, max_records=2)
    assert InputSpec.from_dict(SPEC.to_dict()) == SPEC


def test_imported_features_for_the_owner_detector(tmp_path: Path, factory_module: str) -> None:
    """Issue 20: a factory (safetensors) import gives the head's input as features, per
    thread; archives through the head probe on a private copy (tested below)."""
    import threading

    from jacfusion_fed.training import predict_features

    net = _net(2)
    path = tmp_path / "net.safetensors"
    safetensors.torch.save_file(net.state_dict(), str(path))
    import_model(
        _ws(tmp_path / "ws"),
        path,
        factory=f"{factory_module}:make_net",
        class_counts=COUNTS,
        input_spec=SPEC,
    )
    _, model = _ws(tmp_path / "ws").load_model()
    x = _x(7)
    with torch.no_grad():
        want = net[:-1](x).double()
    feats = predict_features(model, x)
    assert feats is not None and feats.shape == (7, 12)
    np.testing.assert_allclose(feats.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
    # plain forward passes capture nothing; concurrent callers each get their own rows
    model(x)
    results: dict[int, torch.Tensor | None] = {}

    def work(i: int) -> None:
        results[i] = predict_features(model, _x(3 + i, seed=i))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, got in results.items():
        assert got is not None and got.shape == (3 + i, 12)
        with torch.no_grad():
            ref = net[:-1](_x(3 + i, seed=i)).double()
        np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", ["torchscript", "export-static", "export-dynamic"])
def test_archive_features_come_from_a_private_copy(tmp_path: Path, fmt: str) -> None:
    """TorchScript and export archives have no hooks: their features are read by the head
    probe on a private copy of the module, so logits served at the same time never change."""
    import threading

    from jacfusion_fed.training import predict_features

    net = _net(3)
    if fmt == "torchscript":
        path = tmp_path / "net.pt"
        torch.jit.save(torch.jit.script(net), path)
    else:
        shapes = ({0: torch.export.Dim("batch")},) if fmt == "export-dynamic" else None
        path = tmp_path / "net.pt2"
        torch.export.save(torch.export.export(net, (_x(4),), dynamic_shapes=shapes), path)
    import_model(_ws(tmp_path / "ws"), path, class_counts=COUNTS, input_spec=SPEC)
    _, model = _ws(tmp_path / "ws").load_model()
    x = _x(7)
    with torch.no_grad():
        want_feats, want_logits = net[:-1](x).double(), net(x)
    feats = predict_features(model, x)
    assert feats is not None and feats.shape == (7, 12)
    np.testing.assert_allclose(feats.numpy(), want_feats.numpy(), rtol=1e-5, atol=1e-6)
    stop, seen = threading.Event(), []

    def serve() -> None:  # logits requests while features are probed
        while not stop.is_set():
            with torch.no_grad():
                seen.append(float((model(x) - want_logits).abs().max()))

    t = threading.Thread(target=serve)
    t.start()
    try:
        for _ in range(5):
            assert predict_features(model, x) is not None
    finally:
        stop.set()
        t.join()
    assert seen and max(seen) < 1e-5  # the serving module's head was never swapped
