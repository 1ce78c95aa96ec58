"""Unit tests of the coordinator's reply allow-list (no Flower runtime, no processes)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from jacfusion_fed.federation import (
    ArraySpec,
    RecordSpec,
    ReplyNotAllowedError,
    ValueSpec,
    check_reply_allowed,
)

HEAD = {
    "head": RecordSpec.arrays({"gram": ArraySpec(("K", "K"))}),
    "metrics": RecordSpec.metrics(
        {"train-loss": ValueSpec.number(), "num-examples": ValueSpec.integer()},
        optional={"num-examples"},
    ),
    "info": RecordSpec.configs({"modality": ValueSpec.string(16)}),
    "counts": RecordSpec.configs({"class-counts": ValueSpec.integers(10)}, required=False),
}
LOGITS = {"logits": RecordSpec.arrays({"logits": ArraySpec(("N", "K"))})}


def _head_reply(gram: np.ndarray | None = None, **extra: object) -> RecordDict:
    if gram is None:
        w = np.arange(12, dtype=np.float64).reshape(3, 4)
        gram = w @ w.T
    records: dict[str, object] = {
        "head": ArrayRecord({"gram": Array(gram)}),
        "metrics": MetricRecord({"train-loss": 0.25, "num-examples": 10}),
        "info": ConfigRecord({"modality": "audio"}),
    }
    records.update(extra)
    return RecordDict(records)  # type: ignore[arg-type]


def _npy(arr: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


def _problems(content: RecordDict, allowed: dict, dims: dict | None = None) -> list[str]:
    with pytest.raises(ReplyNotAllowedError) as info:
        check_reply_allowed(content, allowed, dims)
    assert info.value.problems, "a rejection must say why"
    assert str(info.value).startswith("reply rejected by the allow-list: ")
    return info.value.problems


def test_valid_reply_passes_and_binds_symbols() -> None:
    assert check_reply_allowed(_head_reply(), HEAD) == {"K": 3}
    assert check_reply_allowed(_head_reply(), HEAD, dims={"K": 3}) == {"K": 3}
    counts = ConfigRecord({"class-counts": [5, 5, 0]})
    assert check_reply_allowed(_head_reply(counts=counts), HEAD)["K"] == 3


def test_optional_field_may_be_absent() -> None:
    reply = _head_reply(metrics=MetricRecord({"train-loss": 1.0}))
    check_reply_allowed(reply, HEAD)


def test_unknown_record_is_rejected_by_name() -> None:
    feats = ArrayRecord({"features": Array(np.zeros((5, 4), np.float32))})
    problems = _problems(_head_reply(features=feats), HEAD)
    assert problems == ["record 'features' (ArrayRecord) is not in the allow-list"]


def test_unknown_field_in_allowed_record_is_rejected() -> None:
    w = np.ones((3, 4))
    reply = _head_reply()
    reply["head"] = ArrayRecord({"gram": Array(w @ w.T), "w": Array(w)})
    assert _problems(reply, HEAD) == ["record 'head': field 'w' is not in the allow-list"]


def test_missing_required_record_and_field() -> None:
    reply = _head_reply()
    del reply["info"]
    reply["metrics"] = MetricRecord({"num-examples": 3})
    problems = _problems(reply, HEAD)
    assert "required record 'info' (ConfigRecord) missing" in problems
    assert "record 'metrics': required field 'train-loss' missing" in problems


def test_wrong_record_type() -> None:
    reply = _head_reply(head=MetricRecord({"gram": 1.0}))
    assert _problems(reply, HEAD) == ["record 'head' is a MetricRecord, allowed ArrayRecord"]


@pytest.mark.parametrize(
    ("array", "dims", "needle"),
    [
        (np.zeros((3, 4)), None, "axis 1 has size 4, but K=3"),  # W instead of W W^T
        (np.zeros((4, 4)), {"K": 3}, "axis 0 has size 4, but K=3"),
        (np.zeros((3,)), None, "has rank 1"),
        (np.zeros((3, 3, 1)), None, "has rank 3"),
        (np.zeros((3, 3), dtype=np.int64), None, "dtype int64 not allowed"),
    ],
)
def test_array_shape_rank_and_dtype(array: np.ndarray, dims: dict | None, needle: str) -> None:
    problems = _problems(_head_reply(gram=array), HEAD, dims)
    assert any(needle in p for p in problems), problems


def test_features_do_not_pass_as_logits() -> None:
    feats = np.zeros((5, 16), np.float32)  # (N, H) with H != K
    reply = RecordDict({"logits": ArrayRecord({"logits": Array(feats)})})
    problems = _problems(reply, LOGITS, {"N": 5, "K": 3})
    assert any("axis 1 has size 16, but K=3" in p for p in problems)
    ok = RecordDict({"logits": ArrayRecord({"logits": Array(np.zeros((5, 3), np.float32))})})
    assert check_reply_allowed(ok, LOGITS, {"N": 5, "K": 3}) == {"N": 5, "K": 3}
    more_rows = RecordDict({"logits": ArrayRecord({"logits": Array(np.zeros((6, 3)))})})
    assert any("but N=5" in p for p in _problems(more_rows, LOGITS, {"N": 5, "K": 3}))


def test_fixed_int_dimensions() -> None:
    spec = {"a": RecordSpec.arrays({"x": ArraySpec((2, "K"))})}
    good = RecordDict({"a": ArrayRecord({"x": Array(np.zeros((2, 7)))})})
    assert check_reply_allowed(good, spec) == {"K": 7}
    bad = RecordDict({"a": ArrayRecord({"x": Array(np.zeros((3, 7)))})})
    assert any("axis 0 has size 3, allowed 2" in p for p in _problems(bad, spec))


def test_declared_metadata_must_match_payload() -> None:
    big = np.zeros((100, 100))
    liar = Array(dtype="float64", shape=(3, 3), stype="numpy.ndarray", data=_npy(big))
    reply = _head_reply()
    reply["head"] = ArrayRecord({"gram": liar})
    problems = _problems(reply, HEAD)
    assert any("declared float64(3, 3) but payload is float64(100, 100)" in p for p in problems)


def test_trailing_bytes_are_rejected() -> None:
    gram = np.eye(3)
    smuggler = Array(
        dtype="float64",
        shape=(3, 3),
        stype="numpy.ndarray",
        data=_npy(gram) + b"patient-42,raw,input,bytes",
    )
    reply = _head_reply()
    reply["head"] = ArrayRecord({"gram": smuggler})
    assert any("extra bytes" in p for p in _problems(reply, HEAD))


def test_object_and_garbage_payloads_are_rejected() -> None:
    obj = np.array([{"raw": 1}, None, 3], dtype=object)
    pickled = Array(dtype="object", shape=(3,), stype="numpy.ndarray", data=_npy(obj, True))
    spec = {"a": RecordSpec.arrays({"x": ArraySpec(("N",), frozenset({"object"}))})}
    problems = _problems(RecordDict({"a": ArrayRecord({"x": pickled})}), spec)
    assert any("object arrays are not allowed" in p for p in problems)
    garbage = Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=b"not npy")
    problems = _problems(RecordDict({"a": ArrayRecord({"x": garbage})}), spec)
    assert any("not a valid .npy payload" in p for p in problems)
    other = Array(dtype="float32", shape=(2,), stype="torch.raw", data=b"\x00" * 8)
    problems = _problems(RecordDict({"a": ArrayRecord({"x": other})}), spec)
    assert any("unsupported serialization type 'torch.raw'" in p for p in problems)


def test_metric_and_config_values() -> None:
    spec = {
        "m": RecordSpec.metrics({"loss": ValueSpec.number(), "n": ValueSpec.integer()}),
        "c": RecordSpec.configs(
            {"name": ValueSpec.string(8), "flag": ValueSpec.boolean(), "n": ValueSpec.integer()}
        ),
    }
    good = RecordDict(
        {
            "m": MetricRecord({"loss": 1, "n": 3}),
            "c": ConfigRecord({"name": "audio", "flag": True, "n": 2}),
        }
    )
    check_reply_allowed(good, spec)
    bad = RecordDict(
        {
            # a list of floats is how features would be smuggled through metrics
            "m": MetricRecord({"loss": [0.1] * 50, "n": 1.5}),
            "c": ConfigRecord({"name": "x" * 9, "flag": 1, "n": True}),
        }
    )
    problems = _problems(bad, spec)
    assert any("m['loss']: lists are not allowed" in p for p in problems)
    assert any("m['n']: value of type float, allowed int" in p for p in problems)
    assert any("c['name']: str of length 9 > 8" in p for p in problems)
    assert any("c['flag']: value of type int, allowed bool" in p for p in problems)
    assert any("c['n']: value of type bool, allowed int" in p for p in problems)


def test_bytes_and_long_lists_in_config() -> None:
    spec = {"c": RecordSpec.configs({"counts": ValueSpec.integers(3)})}
    check_reply_allowed(RecordDict({"c": ConfigRecord({"counts": [1, 2, 3]})}), spec)
    problems = _problems(RecordDict({"c": ConfigRecord({"counts": [1, 2, 3, 4]})}), spec)
    assert problems == ["c['counts']: list of 4 items > 3"]
    problems = _problems(RecordDict({"c": ConfigRecord({"counts": b"raw"})}), spec)
    assert problems == ["c['counts']: value of type bytes, allowed int"]


def test_every_problem_is_reported() -> None:
    reply = _head_reply(gram=np.zeros((3, 4)), leak=ConfigRecord({"ids": "p1,p2"}))
    reply["info"] = ConfigRecord({"modality": "audio", "patient-id": "p1"})
    problems = _problems(reply, HEAD)
    assert len(problems) == 3, problems


def test_empty_allow_list_rejects_any_content() -> None:
    assert check_reply_allowed(RecordDict(), {}) == {}
    assert _problems(_head_reply(), {})


def test_spec_validation() -> None:
    with pytest.raises(TypeError):
        RecordSpec.arrays({"x": ValueSpec.number()})  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        RecordSpec.metrics({"x": ArraySpec((1,))})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="optional_fields"):
        RecordSpec.arrays({"x": ArraySpec((1,))}, optional={"y"})
    with pytest.raises(TypeError):
        ArraySpec((1.5,))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ArraySpec((-1,))
    with pytest.raises(ReplyNotAllowedError, match="not RecordDict"):
        check_reply_allowed({"head": 1}, HEAD)  # type: ignore[arg-type]
