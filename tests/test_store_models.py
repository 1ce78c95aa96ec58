"""ModelStore (content-hashed versions, current pointer, logit cache) and HeadRegistry."""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_registry import copy_entry, flip_entry

from jacfusion_fed.store import CorruptFileError, HeadRegistry, ModelStore
from jacfusion_fed.store.model_store import model_version, serialize_state_dict

SPEC = {"arch": "mlp", "input_shape": [2], "num_classes": 3, "hidden": [8]}


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "features.0.weight": torch.randn(8, 2, generator=g),
        "features.0.bias": torch.randn(8, generator=g),
        "head.weight": torch.randn(3, 8, generator=g, dtype=torch.float64),
        "head.bias": torch.zeros(3, dtype=torch.float64),
        "bn.num_batches_tracked": torch.tensor(7),
        "half": torch.randn(2, 2, generator=g).to(torch.bfloat16),
        "mask": torch.tensor([True, False]),
        "empty": torch.empty(0, 4),
    }


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def test_roundtrip(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    state = _state()
    version = store.save(state, SPEC, {"accuracy": 0.91})
    loaded, spec, meta = store.load(version)
    _assert_same(state, loaded)
    assert spec == SPEC and meta == {"accuracy": 0.91}
    loaded["head.bias"] += 1  # loaded tensors are independent and writable
    _assert_same(state, store.load(version)[0])


def test_version_is_content_hash(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    v = store.save(_state(), SPEC, {"run": 1})
    expected = hashlib.sha256(
        b"jacfusion-model-v1\x00"
        + b'{"arch":"mlp","hidden":[8],"input_shape":[2],"num_classes":3}'
        + b"\x00"
        + serialize_state_dict(_state())
    ).hexdigest()[:16]
    assert v == expected == model_version(SPEC, serialize_state_dict(_state()))[0]
    reordered = dict(reversed(list(_state().items())))
    assert store.save(reordered, dict(reversed(list(SPEC.items()))), {"run": 2}) == v
    assert store.load(v)[2] == {"run": 1}, "content-addressed files are immutable"
    assert store.save(_state(seed=1), SPEC) != v
    assert store.save(_state(), {**SPEC, "hidden": [9]}) != v
    changed = _state()
    changed["head.bias"] = changed["head.bias"].to(torch.float32)
    assert store.save(changed, SPEC) != v
    assert len(store.versions()) == 4


def test_survives_restart(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    v1 = store.save(_state(0), SPEC)
    v2 = store.save(_state(1), SPEC)
    assert store.current_version() is None
    store.set_current(v2)
    store.save_logits(v2, ["p1", "p2"], torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    del store
    again = ModelStore(tmp_path)
    assert again.current_version() == v2
    assert set(again.versions()) == {v1, v2}
    version, state, spec, _ = again.load_current()
    assert version == v2 and spec == SPEC
    _assert_same(state, _state(1))
    ids, logits = again.load_logits(v2)
    assert ids == ["p1", "p2"] and logits.dtype == np.float32
    np.testing.assert_array_equal(logits, [[1, 2, 3], [4, 5, 6]])


def _model_file(root: Path, version: str) -> Path:
    return root / "models" / f"{version}.model"


def test_corrupted_model_is_refused(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    v = store.save(_state(), SPEC)
    path = _model_file(tmp_path, v)
    data = path.read_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(CorruptFileError, match=v):
        store.load(v)
    with pytest.raises(CorruptFileError):
        store.set_current(v)
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CorruptFileError, match="truncated"):
        ModelStore(tmp_path).load(v)
    path.write_bytes(data)
    store.load(v)


def test_saving_again_repairs_a_damaged_copy(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    v = store.save(_state(), SPEC)
    path = _model_file(tmp_path, v)
    path.write_bytes(path.read_bytes()[:-5])
    assert store.save(_state(), SPEC) == v
    _assert_same(store.load(v)[0], _state())


def test_renamed_file_is_refused(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    v1, v2 = store.save(_state(0), SPEC), store.save(_state(1), SPEC)
    shutil.copyfile(_model_file(tmp_path, v1), _model_file(tmp_path, v2))
    with pytest.raises(CorruptFileError, match=f"hashes to version {v1}"):
        store.load(v2)


def test_corrupted_pointer_and_logits(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    v = store.save(_state(), SPEC)
    store.set_current(v)
    store.save_logits(v, ["a"], np.array([[0.5, 1.5, 2.5]]))
    (tmp_path / "CURRENT").write_bytes((tmp_path / "CURRENT").read_bytes()[:-1])
    with pytest.raises(CorruptFileError, match="CURRENT"):
        store.current_version()
    logits_file = tmp_path / "logits" / f"{v}.logits"
    logits_file.write_bytes(logits_file.read_bytes()[:-3])
    with pytest.raises(CorruptFileError, match=v):
        store.load_logits(v)


def test_argument_errors(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    with pytest.raises(KeyError):
        store.load("0123456789abcdef")
    with pytest.raises(ValueError, match="invalid model version"):
        store.load("../../etc/passwd")
    with pytest.raises(KeyError):
        store.set_current("0123456789abcdef")
    with pytest.raises(KeyError):
        store.save_logits("0123456789abcdef", ["a"], np.zeros((1, 3)))
    v = store.save(_state(), SPEC)
    with pytest.raises(KeyError):
        store.load_logits(v)
    with pytest.raises(ValueError, match="shape"):
        store.save_logits(v, ["a", "b"], np.zeros((1, 3)))
    with pytest.raises(ValueError, match="unique"):
        store.save_logits(v, ["a", "a"], np.zeros((2, 3)))
    with pytest.raises(ValueError, match="newlines"):
        store.save_logits(v, ["a\nb"], np.zeros((1, 3)))
    with pytest.raises(TypeError, match="not a Tensor"):
        store.save({"w": np.zeros(2)}, SPEC)  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        store.save(_state(), {"bad": object()})
    assert store.versions() == [v]


def test_logits_cache_float64_and_empty(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    v = store.save(_state(), SPEC)
    rng = np.random.default_rng(0)
    ids = [f"{i:064x}" for i in range(1000)]
    logits = rng.standard_normal((1000, 3))
    store.save_logits(v, ids, logits)
    got_ids, got = store.load_logits(v)
    assert got_ids == ids and got.dtype == np.float64 and got.flags.writeable
    np.testing.assert_array_equal(got, logits)
    store.save_logits(v, [], np.zeros((0, 3)))
    assert store.load_logits(v)[0] == []


def test_stale_temp_files_removed_on_open(tmp_path: Path) -> None:
    ModelStore(tmp_path)
    stale = tmp_path / "models" / ".0123456789abcdef.model.x1y2.tmp"
    stale.write_bytes(b"partial")
    store = ModelStore(tmp_path)
    assert not stale.exists()
    assert store.versions() == []


# -- HeadRegistry ---------------------------------------------------------------------------


def _gram(k: int = 3, seed: int = 0) -> np.ndarray:
    w = np.random.default_rng(seed).standard_normal((k, 5))
    gram: np.ndarray = w @ w.T
    return gram


def test_head_registry_roundtrip_and_history(tmp_path: Path) -> None:
    reg = HeadRegistry(tmp_path)
    when = dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    r1 = reg.register(
        "ecg", "cardiology", "v1", class_counts=[10, 20, 30], gram=_gram(), registered_at=when
    )
    assert r1.sequence == 1 and r1.head_kind == "gram" and r1.registered_at == when
    w = torch.randn(3, 4, dtype=torch.float64)
    b = torch.randn(3, dtype=torch.float64)
    r2 = reg.register("ecg", "cardiology", "v2", class_counts=[1, 2, 3], weight=w, bias=b)
    assert r2.sequence == 2 and r2.head_kind == "full" and r2.feature_dim == 4
    reg.register("xray", "radiology", "u1", class_counts=[30, 20, 10], gram=_gram(seed=1))

    again = HeadRegistry(tmp_path)  # restart
    assert again.modalities() == ["ecg", "xray"]
    cur = again.get("ecg")
    assert cur.model_version == "v2" and cur.owner == "cardiology"
    np.testing.assert_array_equal(cur.weight, w.numpy())
    np.testing.assert_array_equal(cur.bias, b.numpy())
    np.testing.assert_allclose(cur.gram_matrix(), w.numpy() @ w.numpy().T)
    hist = again.history("ecg")
    assert [h.model_version for h in hist] == ["v1", "v2"]
    np.testing.assert_array_equal(hist[0].gram, _gram())
    assert again.num_classes() == 3
    np.testing.assert_allclose(again.class_prior(), np.array([31, 22, 13]) / 66)
    np.testing.assert_allclose(again.class_prior(["xray"]), [0.5, 1 / 3, 1 / 6])


def test_head_registry_idempotent_and_checks(tmp_path: Path) -> None:
    reg = HeadRegistry(tmp_path)
    reg.register("ecg", "cardiology", "v1", class_counts=[1, 1, 1], gram=_gram())
    same = reg.register("ecg", "cardiology", "v1", class_counts=[1, 1, 1], gram=_gram())
    assert same.sequence == 1 and len(reg.history("ecg")) == 1
    with pytest.raises(ValueError, match="registered to owner 'cardiology'"):
        reg.register("ecg", "mallory", "v9", class_counts=[1, 1, 1], gram=_gram())
    with pytest.raises(ValueError, match="K=2 but 'ecg' is registered with K=3"):
        reg.register("xray", "radiology", "u", class_counts=[1, 1], gram=_gram(2))
    with pytest.raises(ValueError, match="symmetric"):
        reg.register("xray", "radiology", "u", class_counts=[1, 1, 1], gram=np.triu(_gram()))
    with pytest.raises(ValueError, match="length K=3"):
        reg.register("xray", "radiology", "u", class_counts=[1, 1], gram=_gram())
    with pytest.raises(ValueError, match="exactly one"):
        reg.register("xray", "radiology", "u", class_counts=[1, 1, 1])
    with pytest.raises(ValueError, match="NaN"):
        reg.register("xray", "radiology", "u", class_counts=[1, 1, 1], gram=_gram() * np.nan)
    with pytest.raises(ValueError, match="invalid modality"):
        reg.register("../x", "radiology", "u", class_counts=[1, 1, 1], gram=_gram())
    with pytest.raises(KeyError):
        reg.get("xray")
    moved = reg.register(
        "ecg", "mallory", "v9", class_counts=[1, 1, 1], gram=_gram(), allow_owner_change=True
    )
    assert moved.owner == "mallory" and moved.sequence == 2


def test_head_registry_corruption_is_refused(tmp_path: Path) -> None:
    reg = HeadRegistry(tmp_path)
    reg.register("ecg", "cardiology", "v1", class_counts=[1, 1, 1], gram=_gram())
    reg.register("ecg", "cardiology", "v2", class_counts=[1, 1, 1], gram=_gram(seed=3))
    flip_entry(tmp_path, "ecg", 2)
    with pytest.raises(CorruptFileError, match=r"ecg/00000002"):
        HeadRegistry(tmp_path).get("ecg")  # no silent fallback to v1
    with pytest.raises(CorruptFileError):
        reg.class_prior()
    # A valid entry copied under another modality's name is refused too.
    copy_entry(tmp_path, "ecg", 1, "xray")
    with pytest.raises(CorruptFileError, match="belongs to 'ecg'"):
        reg.get("xray")


def test_class_prior_errors(tmp_path: Path) -> None:
    reg = HeadRegistry(tmp_path)
    with pytest.raises(KeyError):
        reg.class_prior()
    reg.register("ecg", "c", "v", class_counts=[0, 0], gram=np.eye(2))
    with pytest.raises(ValueError, match="sum to zero"):
        reg.class_prior()
