"""RecordStore (SQLite): idempotent puts, whole-batch refusal, verified reads, keys, rotation,
erasure that leaves no byte behind, and the migration from the one-file-per-record layout."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from helpers_legacy_store import files_containing, write_legacy_store

from jacfusion_fed.privacy.pseudonyms import Pseudonymizer, key_fingerprint
from jacfusion_fed.store import CorruptFileError
from jacfusion_fed.store.atomic import read_verified, write_verified
from jacfusion_fed.store.record_migration import migrate_record_files
from jacfusion_fed.store.record_store import (
    DB_NAME,
    KeyMismatchError,
    LegacyLayoutError,
    RecordConflictError,
    RecordStore,
    id_key,
    id_str,
)

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


def _sql(root: Path, statement: str, *args: object) -> None:
    con = sqlite3.connect(root / DB_NAME)
    con.execute(statement, args)
    con.commit()
    con.close()


def test_delete_and_corruption(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.put(IDS[:2], np.zeros((2, 4), np.float32))
    store.save_logits("v1", IDS[0], np.ones(3))
    store.save_logits("v1", IDS[1], np.ones(3))
    assert store.delete([IDS[0], IDS[2]]) == ([IDS[0]], [IDS[2]])
    assert store.get(IDS[0]) is None and store.cached_logits("v1", IDS[0]) is None
    # a flipped bit in a stored input or in cached logits is refused, never served
    _sql(tmp_path, "UPDATE records SET data = ? WHERE id = ?", b"\x01" + bytes(15), id_key(IDS[1]))
    with pytest.raises(CorruptFileError, match="does not match its hash"):
        store.get(IDS[1])
    _sql(tmp_path, "UPDATE logits SET data = ?", np.full(3, 2.0).tobytes())
    with pytest.raises(CorruptFileError, match="do not match their digest"):
        store.cached_logits("v1", IDS[1])


def test_key_mismatch_and_rotation(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.put(IDS, np.arange(12, dtype=np.float32).reshape(3, 4))
    store.save_logits("v1", IDS[0], np.ones(3))
    with pytest.raises(KeyMismatchError, match="fingerprint"):
        _store(tmp_path, NEW)
    new = Pseudonymizer(NEW)
    mapping = {IDS[0]: new("a"), IDS[1]: new("b")}
    assert store.rekey(mapping, key_fingerprint(NEW), retire=[PZ("z")]) == (2, 1)
    reopened = _store(tmp_path, NEW)
    assert reopened.ids() == sorted(mapping.values())
    np.testing.assert_array_equal(reopened.get(new("b")), np.arange(4, 8, dtype=np.float32))
    assert reopened.cached_logits("v1", new("a")) is None  # every cached logit dropped
    assert reopened.retired == {*IDS, PZ("z")}
    with pytest.raises(KeyMismatchError):
        _store(tmp_path)
    renamed, erased = reopened.rekey({new("a"): PZ("a")}, key_fingerprint(OLD))
    assert (renamed, erased) == (1, 1)
    assert _store(tmp_path).ids() == [PZ("a")]
    assert PZ("a") not in _store(tmp_path).retired  # in use again under the old key


def test_an_interrupted_file_rotation_is_completed_by_the_migration(tmp_path: Path) -> None:
    """The old layout's rotation journal (REKEY + records.rekey/) after its commit point: the
    migration finishes it exactly as the old store did, then imports the new ids."""
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    write_legacy_store(tmp_path, key_fingerprint(OLD), dict(zip(IDS, x, strict=True)))
    new = Pseudonymizer(NEW)
    mapping = {IDS[0]: new("a"), IDS[1]: new("b")}
    staged = tmp_path / "records.rekey"
    staged.mkdir()
    for old_id, new_id in mapping.items():
        payload, meta = read_verified(tmp_path / "records" / f"{old_id}.rec")
        write_verified(staged / f"{new_id}.rec", payload, meta | {"id": new_id})
    write_verified(tmp_path / "REKEY", b"", {"kind": "rekey", "fingerprint": key_fingerprint(NEW)})
    with pytest.raises(LegacyLayoutError, match="migrate-store"):
        _store(tmp_path, NEW)  # never opened as if it were empty
    report = migrate_record_files(tmp_path)
    assert report is not None and report.records == 2
    reopened = _store(tmp_path, NEW)
    assert reopened.ids() == sorted(mapping.values())
    np.testing.assert_array_equal(reopened.get(new("b")), x[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        DB_NAME,
        *(f"{DB_NAME}-{s}" for s in ("shm", "wal")),
    ]


def test_migration_imports_everything_verified_and_once(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ids = PZ.many([f"p{i}" for i in range(40)])
    x = rng.normal(size=(40, 5)).astype(np.float32)
    import datetime as dt

    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=5)
    write_legacy_store(
        tmp_path,
        key_fingerprint(OLD),
        dict(zip(ids, x, strict=True)),
        logits={"v1": {ids[0]: np.arange(3.0), ids[1]: np.ones(3)}, "v2": {ids[2]: np.zeros(3)}},
        retired=[Pseudonymizer(NEW)("gone")],
        expires_at={ids[39]: past},
    )
    damaged = tmp_path / "records" / f"{ids[5]}.rec"
    original = damaged.read_bytes()
    damaged.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(CorruptFileError, match=ids[5]):
        migrate_record_files(tmp_path)
    assert (tmp_path / "records").is_dir() and len(list((tmp_path / "records").iterdir())) == 40
    damaged.write_bytes(original)
    report = migrate_record_files(tmp_path)
    assert report is not None
    assert (report.records, report.logits, report.retired, report.expired) == (39, 3, 1, 1)
    assert migrate_record_files(tmp_path) is None  # nothing left to do
    store = _store(tmp_path)
    assert store.ids() == sorted(ids[:39])
    got = store.get_many(ids)
    assert len(got) == 39
    for i in range(39):
        np.testing.assert_array_equal(got[ids[i]], x[i])
    np.testing.assert_array_equal(store.cached_logits("v1", ids[0]), np.arange(3.0))
    np.testing.assert_array_equal(store.cached_logits("v2", ids[2]), np.zeros(3))
    assert store.retired == {Pseudonymizer(NEW)("gone")}
    assert store.put(ids[:39], x[:39]).unchanged == 39  # same content: idempotent after it


def test_erased_records_leave_no_byte_in_any_file(tmp_path: Path) -> None:
    """After ``delete`` neither the input nor the cached logits of a forgotten record are in
    the database, its WAL, its -shm file or anything else under the store's directory, even
    after many batches moved the rows between pages; the records still stored are found by
    the same search (so the search can fail)."""
    rng = np.random.default_rng(1)
    store = _store(tmp_path)
    ids = PZ.many([f"p{i}" for i in range(3000)])
    x = rng.normal(size=(3000, 76)).astype(np.float32)
    for start in range(0, 3000, 300):
        store.put(ids[start : start + 300], x[start : start + 300])
    logits = rng.normal(size=(3000, 10))
    store.save_logits_many("v1", dict(zip(ids, logits, strict=True)))
    forgotten = sorted(rng.choice(3000, 400, replace=False).tolist())
    for part in (forgotten[:200], forgotten[200:]):
        store.delete([ids[i] for i in part])
    kept = next(i for i in range(3000) if i not in set(forgotten))  # replaced: old content gone
    store.put([ids[kept]], (x[kept] + 1)[None], replace=True)
    needles = {f"input {i}": x[i].tobytes() for i in forgotten}
    needles |= {f"logits {i}": logits[i].tobytes() for i in forgotten}
    needles[f"replaced {kept}"] = x[kept].tobytes()
    assert files_containing(tmp_path, needles) == {}
    survivors = [i for i in range(3000) if i not in set(forgotten) and i != kept][:50]
    found = files_containing(tmp_path, {str(i): x[i].tobytes() for i in survivors})
    assert len(found) == 50


def test_another_process_commit_is_seen(tmp_path: Path) -> None:
    a, b = _store(tmp_path), _store(tmp_path)
    a.put(IDS[:1], np.zeros((1, 4), np.float32))
    assert IDS[0] in b.ids()  # b's in-memory index follows a's commit (data_version)
    b.delete([IDS[0]])
    assert a.get(IDS[0]) is None and a.put(IDS[:1], np.ones((1, 4), np.float32)).stored == 1


def test_pseudonym_forms_round_trip() -> None:
    b32 = Pseudonymizer(OLD, encoding="base32")("a")
    odd = b32[:-1] + ("b" if b32[-1] != "b" else "c")  # not a canonical base32 encoding
    for sid in (IDS[0], b32, odd):
        assert id_str(id_key(sid)) == sid
    assert len(id_key(IDS[0])) == 32 and len(id_key(b32)) == 33


def test_concurrent_puts_of_the_same_batch_store_it_once(tmp_path: Path) -> None:
    import threading

    store = _store(tmp_path)
    ids = PZ.many([f"p{i}" for i in range(200)])
    x = np.random.default_rng(2).random((200, 8)).astype(np.float32)
    results = []
    threads = [threading.Thread(target=lambda: results.append(store.put(ids, x))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted((r.stored, r.unchanged) for r in results) == [(0, 200)] * 3 + [(200, 0)]
    con = sqlite3.connect(tmp_path / DB_NAME)
    assert con.execute("SELECT count(*), count(DISTINCT id) FROM records").fetchone() == (200, 200)
    con.close()
