"""HMAC-SHA256 pseudonyms and their key files."""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jacfusion_fed.privacy.pseudonyms import (
    Pseudonymizer,
    generate_key,
    load_key,
    pseudonymize,
    write_key,
)

KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))


def test_deterministic_and_key_dependent() -> None:
    p = pseudonymize("patient-0042", KEY_A)
    assert p == pseudonymize("patient-0042", KEY_A)
    assert p != pseudonymize("patient-0042", KEY_B)
    assert p != pseudonymize("patient-0043", KEY_A)
    assert len(p) == 64 and all(c in "0123456789abcdef" for c in p)


def test_matches_reference_hmac() -> None:
    expected = hmac.new(KEY_A, b"patient-0042", hashlib.sha256).hexdigest()
    assert pseudonymize("patient-0042", KEY_A) == expected


def test_base32_encoding() -> None:
    p = pseudonymize("x", KEY_A, encoding="base32")
    assert len(p) == 52 and p == p.lower() and "=" not in p
    with pytest.raises(ValueError, match="unknown encoding"):
        pseudonymize("x", KEY_A, encoding="b64")  # type: ignore[arg-type]


def test_unicode_normalisation() -> None:
    composed, decomposed = "Jos\u00e9", "Jose\u0301"
    assert pseudonymize(composed, KEY_A) == pseudonymize(decomposed, KEY_A)


@settings(max_examples=50, deadline=None)
@given(st.text(min_size=1), st.text(min_size=1))
def test_distinct_ids_get_distinct_pseudonyms(a: str, b: str) -> None:
    import unicodedata

    same = unicodedata.normalize("NFC", a) == unicodedata.normalize("NFC", b)
    assert (pseudonymize(a, KEY_A) == pseudonymize(b, KEY_A)) == same


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        pseudonymize("x", b"short")
    with pytest.raises(TypeError):
        pseudonymize("x", "a string key")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty"):
        pseudonymize("", KEY_A)


def test_key_file_roundtrip_and_permissions(tmp_path: Path) -> None:
    key = generate_key()
    assert len(key) == 32 and key != generate_key()
    path = write_key(tmp_path / "keys" / "pseudonym.key", key)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_key(path) == key
    with pytest.raises(FileExistsError):
        write_key(path, generate_key())
    write_key(path, KEY_B, overwrite=True)
    assert load_key(path) == KEY_B
    assert not [p for p in path.parent.iterdir() if p.name != path.name]


def test_load_refuses_readable_key(tmp_path: Path) -> None:
    path = write_key(tmp_path / "k", KEY_A)
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError, match="0644"):
        load_key(path)
    assert load_key(path, check_permissions=False) == KEY_A
    other = tmp_path / "not-a-key"
    other.write_bytes(b"hello")
    os.chmod(other, 0o600)
    with pytest.raises(ValueError, match="not a jacfusion pseudonym key"):
        load_key(other)


def test_pseudonymizer_hides_key(tmp_path: Path) -> None:
    ps = Pseudonymizer.from_file(write_key(tmp_path / "k", KEY_A))
    assert ps("a") == pseudonymize("a", KEY_A)
    assert ps.many(["a", "b"]) == [pseudonymize("a", KEY_A), pseudonymize("b", KEY_A)]
    assert KEY_A.hex() not in repr(ps) and "hidden" in repr(ps)
