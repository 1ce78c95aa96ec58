"""RecordStore: idempotent puts, whole-batch refusal, verified reads, keys and rotation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from jacfusion_fed.privacy.pseudonyms import Pseudonymizer, key_fingerprint
from jacfusion_fed.store import CorruptFileError
from jacfusion_fed.store.atomic import read_verified, write_verified
from jacfusion_fed.store.record_store import KeyMismatchError, RecordConflictError, RecordStore

OLD, NEW = b"o" * 32, b"n" * 32
PZ = Pseudonymizer(OLD)
IDS = PZ.many(["a", "b", "c"])


def _store(root: Path, key: bytes = OLD) -> RecordStore:
    return RecordStore(root, key_fingerprint(key))


def test_put_idempotent_conflict_replace(tmp_path: Path) -> None:
    store = _store(tmp_path)
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert store.put(IDS, x).stored == 3
    assert store.put(IDS, x).unchanged == 3
    store.save_logits("v1", IDS[1], np.ones(3))
    y = x.copy()
    y[1] += 1
    with pytest.raises(RecordConflictError, match="record 1"):
        store.put(IDS, y)
    np.testing.assert_array_equal(store.get(IDS[1]), x[1])  # nothing of the batch stored
    result = store.put(IDS, y, replace=True)
    assert (result.replaced, result.unchanged) == (1, 2)
    assert store.cached_logits("v1", IDS[1]) is None  # replaced: its logits are gone
    np.testing.assert_array_equal(_store(tmp_path).get(IDS[1]), y[1])  # survives reopening


def test_bad_ids_refused_before_writing(tmp_path: Path) -> None:
    store = _store(tmp_path)
    x = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match="record 1: the sample id is not a pseudonym"):
        store.put([IDS[0], "Jane Doe"], x)
    with pytest.raises(ValueError, match="record 1: duplicate"):
        store.put([IDS[0], IDS[0]], x)
    assert store.ids() == []


def test_delete_and_corruption(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.put(IDS[:2], np.zeros((2, 4), np.float32))
    store.save_logits("v1", IDS[0], np.ones(3))
    assert store.delete([IDS[0], IDS[2]]) == ([IDS[0]], [IDS[2]])
    assert store.get(IDS[0]) is None and store.cached_logits("v1", IDS[0]) is None
    path = tmp_path / "records" / f"{IDS[1]}.rec"
    blob = bytearray(path.read_bytes())
    blob[-40] ^= 1
    path.write_bytes(bytes(blob))
    with pytest.raises(CorruptFileError):
        store.get(IDS[1])


def test_key_mismatch_and_rotation_recovery(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.put(IDS, np.arange(12, dtype=np.float32).reshape(3, 4))
    with pytest.raises(KeyMismatchError, match="fingerprint"):
        _store(tmp_path, NEW)
    new = Pseudonymizer(NEW)
    mapping = {IDS[0]: new("a"), IDS[1]: new("b")}
    # a rotation interrupted after its commit point is completed by the next open
    staged = tmp_path / "records.rekey"
    staged.mkdir()
    for old_id, new_id in mapping.items():
        payload, meta = read_verified(tmp_path / "records" / f"{old_id}.rec")
        write_verified(staged / f"{new_id}.rec", payload, meta | {"id": new_id})
    write_verified(tmp_path / "REKEY", b"", {"kind": "rekey", "fingerprint": key_fingerprint(NEW)})
    reopened = _store(tmp_path, NEW)
    assert reopened.ids() == sorted(mapping.values())
    np.testing.assert_array_equal(reopened.get(new("b")), np.arange(4, 8, dtype=np.float32))
    assert not (tmp_path / "REKEY").exists() and not staged.exists()
    # and the straight path
    renamed, erased = reopened.rekey({new("a"): PZ("a")}, key_fingerprint(OLD))
    assert (renamed, erased) == (1, 1)
    assert _store(tmp_path).ids() == [PZ("a")]
