"""MultimodalDataset validation and the user-data adapters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from jacfusion_fed.data import MultimodalDataset, from_arrays, from_torch_datasets


def _ds(n: int = 6, **kw: object) -> MultimodalDataset:
    args: dict[str, object] = {
        "modalities": {"a": np.linspace(0, 1, n * 2).reshape(n, 2), "b": np.zeros((n, 1, 3))},
        "labels": np.arange(n) % 3,
        "sample_ids": [f"p{i}" for i in range(n)],
        "num_classes": 3,
    }
    args.update(kw)
    return MultimodalDataset(**args)  # type: ignore[arg-type]


def test_coerces_dtypes_and_basic_api() -> None:
    ds = _ds()
    assert ds.modalities["a"].dtype == np.float32 and ds.labels.dtype == np.int64
    assert len(ds) == 6 and ds.modality_names == ["a", "b"]
    assert ds.class_names == ["0", "1", "2"]
    assert ds.class_counts().tolist() == [2, 2, 2]
    x, y = ds.tensors("b")
    assert x.shape == (6, 1, 3) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert ds.in_unit_range()


def test_subset_keeps_alignment_and_meta() -> None:
    ds = _ds(sample_meta={"voice": np.array([f"v{i}" for i in range(6)])})
    sub = ds.subset([4, 1])
    assert sub.sample_ids == ["p4", "p1"]
    assert sub.labels.tolist() == [1, 1]
    np.testing.assert_array_equal(sub.modalities["a"], ds.modalities["a"][[4, 1]])
    assert sub.sample_meta["voice"].tolist() == ["v4", "v1"]
    mask = np.zeros(6, dtype=bool)
    mask[[0, 5]] = True
    assert ds.subset(mask).sample_ids == ["p0", "p5"]
    with pytest.raises(ValueError, match="out of range"):
        ds.subset([6])


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"labels": np.arange(5) % 3}, "lengths differ"),
        ({"sample_ids": ["p"] * 6}, "duplicate sample ids"),
        ({"labels": np.array([0, 1, 2, 3, 0, 1])}, "out of range"),
        ({"labels": np.array([0, 1, -1, 0, 0, 1])}, "out of range"),
        ({"labels": np.full(6, 0.5)}, "integers"),
        ({"modalities": {"a": np.full((6, 2), np.nan)}}, "NaN"),
        ({"modalities": {}}, "at least one modality"),
        ({"class_names": ["x", "y"]}, "class names"),
        ({"sample_meta": {"v": np.zeros(2)}}, "sample_meta"),
    ],
)
def test_validation_errors(kw: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _ds(**kw)


def test_unknown_modality_in_tensors() -> None:
    with pytest.raises(ValueError, match="unknown modality 'c'"):
        _ds().tensors("c")


def test_from_arrays_defaults_and_rescale() -> None:
    ds = from_arrays({"m": torch.arange(8.0).reshape(4, 2) * 10}, [0, 1, 1, 0], rescale=True)
    assert ds.sample_ids == ["user-000000", "user-000001", "user-000002", "user-000003"]
    assert ds.num_classes == 2
    assert ds.modalities["m"].min() == 0.0 and ds.modalities["m"].max() == 1.0
    with pytest.raises(ValueError, match="lengths differ"):
        from_arrays({"m": np.zeros((3, 1))}, [0, 1])


class _Records(Dataset[dict[str, object]]):
    def __init__(self, ids: list[str], offset: float) -> None:
        self.ids, self.offset = ids, offset

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, object]:
        k = int(self.ids[i][1:])
        return {"x": np.full(2, k + self.offset, dtype=np.float32), "y": k % 2, "id": self.ids[i]}


def test_from_torch_datasets_aligns_by_id() -> None:
    a = _Records(["p0", "p1", "p2", "p3"], 0.0)
    b = _Records(["p3", "p1", "p0", "p2"], 0.5)  # same patients, other order
    ds = from_torch_datasets({"a": a, "b": b})
    assert ds.sample_ids == ["p0", "p1", "p2", "p3"]
    np.testing.assert_array_equal(ds.modalities["a"][:, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(ds.modalities["b"][:, 0], [0.5, 1.5, 2.5, 3.5])
    assert ds.labels.tolist() == [0, 1, 0, 1]


def test_from_torch_datasets_id_mismatch_is_explained() -> None:
    a = _Records(["p0", "p1", "p2"], 0.0)
    b = _Records(["p0", "p1", "p9"], 0.0)
    with pytest.raises(ValueError, match=r"do not match.*missing.*p2.*extra.*p9"):
        from_torch_datasets({"a": a, "b": b})


def test_from_torch_datasets_with_ids_and_labels_arguments() -> None:
    xa, xb = torch.rand(3, 2), torch.rand(3, 4)
    ds = from_torch_datasets(
        {"a": TensorDataset(xa), "b": TensorDataset(xb)},
        labels={"u": 1, "v": 0, "w": 1},
        ids={"a": ["u", "v", "w"], "b": ["w", "u", "v"]},
    )
    assert ds.sample_ids == ["u", "v", "w"]
    np.testing.assert_allclose(ds.modalities["b"], xb[[1, 2, 0]].numpy())
    assert ds.labels.tolist() == [1, 0, 1]


def test_from_torch_datasets_label_errors() -> None:
    x = torch.rand(2, 1)
    with pytest.raises(ValueError, match="no label"):
        from_torch_datasets({"a": TensorDataset(x)})
    with pytest.raises(ValueError, match="conflicting labels"):
        from_torch_datasets(
            {
                "a": TensorDataset(x, torch.tensor([0, 1])),
                "b": TensorDataset(x, torch.tensor([1, 1])),
            }
        )
    with pytest.raises(ValueError, match="duplicate sample ids"):
        from_torch_datasets({"a": TensorDataset(x, torch.tensor([0, 1]))}, ids=["s", "s"])
