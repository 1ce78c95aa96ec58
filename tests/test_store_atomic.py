"""Atomic writes and the hash-verified envelope."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jacfusion_fed.store.atomic import (
    CorruptFileError,
    atomic_write_bytes,
    read_envelope_meta,
    read_verified,
    remove_stale_temp_files,
    write_verified,
)


def _temps(d: Path) -> list[Path]:
    return [p for p in d.iterdir() if p.name.endswith(".tmp")]


def test_atomic_write_replaces_and_sets_mode(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "f.bin"
    atomic_write_bytes(path, b"one")
    assert path.read_bytes() == b"one"
    atomic_write_bytes(path, b"two", mode=0o600)
    assert path.read_bytes() == b"two"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert _temps(path.parent) == []


def test_failure_before_rename_leaves_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old content")

    def crash(src: str, dst: str) -> None:
        raise OSError("simulated crash between write and rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        atomic_write_bytes(path, b"new content that never lands")
    monkeypatch.undo()
    assert path.read_bytes() == b"old content"
    assert _temps(tmp_path) == [], "the temporary file is cleaned up"


def test_process_killed_between_write_and_rename(tmp_path: Path) -> None:
    """A real crash (os._exit after fsync, before rename): target intact, temp ignorable."""
    path = tmp_path / "f.bin"
    write_verified(path, b"old payload", {"n": 1})
    script = textwrap.dedent(
        f"""
        import os
        from jacfusion_fed.store.atomic import write_verified
        os.replace = lambda src, dst: os._exit(17)
        write_verified({str(path)!r}, b"new payload" * 1000, {{"n": 2}})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], check=False)
    assert proc.returncode == 17
    assert read_verified(path) == (b"old payload", {"n": 1})
    leftovers = _temps(tmp_path)
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".f.bin.")
    assert remove_stale_temp_files(tmp_path) == leftovers
    assert _temps(tmp_path) == []
    assert read_verified(path) == (b"old payload", {"n": 1})


def test_verified_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "e"
    digest = write_verified(path, b"\x00payload\xff", {"a": [1, 2], "b": "x"})
    assert len(digest) == 64
    assert read_verified(path) == (b"\x00payload\xff", {"a": [1, 2], "b": "x"})
    assert read_envelope_meta(path) == {"a": [1, 2], "b": "x"}
    write_verified(path, b"", None)
    assert read_verified(path) == (b"", {})


def test_every_truncation_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "e"
    write_verified(path, b"some payload bytes", {"k": "v"})
    data = path.read_bytes()
    for cut in range(len(data)):
        path.write_bytes(data[:cut])
        with pytest.raises(CorruptFileError) as info:
            read_verified(path)
        assert str(path) in str(info.value) and info.value.path == path


def test_every_bit_flip_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "e"
    write_verified(path, b"payload", {"k": 1})
    data = path.read_bytes()
    for i in range(len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 0x01
        path.write_bytes(bytes(flipped))
        with pytest.raises(CorruptFileError, match=str(path)):
            read_verified(path)


def test_appended_bytes_and_foreign_files(tmp_path: Path) -> None:
    path = tmp_path / "e"
    write_verified(path, b"payload")
    path.write_bytes(path.read_bytes() + b"junk")
    with pytest.raises(CorruptFileError):
        read_verified(path)
    path.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    with pytest.raises(CorruptFileError, match="bad magic"):
        read_verified(path)
    with pytest.raises(CorruptFileError, match="bad magic"):
        read_envelope_meta(path)
    with pytest.raises(FileNotFoundError):
        read_verified(tmp_path / "missing")


def test_meta_must_be_json(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_verified(tmp_path / "e", b"", {"x": float("nan")})
    with pytest.raises(TypeError):
        write_verified(tmp_path / "e", b"", {"x": object()})
    assert not (tmp_path / "e").exists() and _temps(tmp_path) == []
