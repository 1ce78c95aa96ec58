"""Content-addressed, crash-safe store of model versions and their logit caches.

Layout under ``root``::

    models/<version>.model    verified envelope: tensors (own format, no pickle) + spec + metadata
    logits/<version>.logits   verified envelope: sample ids + (N, K) logits of that version
    CURRENT                   verified envelope naming the current version

``version`` is the first 16 hex digits of SHA-256 over a domain tag, the canonical JSON of the
spec and the canonical tensor serialisation (names sorted; dtype, shape and little-endian raw
bytes of each tensor). Metadata (metrics, timestamps) is stored but not hashed, so retraining
to identical weights gives the same version, and saving existing content again is a no-op
that keeps the first metadata. Nothing is ever unpickled: loading a file cannot run code.

Every write is atomic (:func:`jacfusion_fed.store.atomic.atomic_write_bytes`) and every read
verified; a damaged file raises :class:`~jacfusion_fed.store.atomic.CorruptFileError` and is
never loaded. The store assumes one writing process at a time.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import struct
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jacfusion_fed.store.atomic import (
    CorruptFileError,
    canonical_json,
    read_envelope_meta,
    read_verified,
    remove_stale_temp_files,
    write_verified,
)

__all__ = ["ModelStore", "deserialize_state_dict", "model_version", "serialize_state_dict"]

_VERSION_RE = re.compile(r"^[0-9a-f]{16}$")
_DOMAIN = b"jacfusion-model-v1\x00"
_LEN = struct.Struct(">Q")
_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "float64",
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.int16: "int16",
    torch.int8: "int8",
    torch.uint8: "uint8",
    torch.bool: "bool",
}
_DTYPE_BY_NAME = {name: dtype for dtype, name in _DTYPES.items()}

if sys.byteorder != "little":  # pragma: no cover - all supported platforms are little-endian
    raise ImportError("jacfusion_fed.store requires a little-endian platform")


def serialize_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bytes:
    """Canonical bytes of a state dict: index JSON (sorted names) then raw tensor bytes."""
    index: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(state_dict):
        tensor = state_dict[name]
        if not isinstance(name, str):
            raise TypeError(f"state dict keys must be str, got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state dict entry {name!r} is {type(tensor).__name__}, not a Tensor")
        if tensor.layout != torch.strided:
            raise ValueError(f"state dict entry {name!r}: only dense tensors are supported")
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"state dict entry {name!r}: unsupported dtype {tensor.dtype}")
        t = tensor.detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        index.append(
            {
                "name": name,
                "dtype": _DTYPES[t.dtype],
                "shape": list(t.shape),
                "offset": offset,
                "nbytes": len(raw),
            }
        )
        chunks.append(raw)
        offset += len(raw)
    header = canonical_json(index)
    return _LEN.pack(len(header)) + header + b"".join(chunks)


def deserialize_state_dict(payload: bytes, *, source: str = "<bytes>") -> dict[str, torch.Tensor]:
    """Inverse of :func:`serialize_state_dict`; ``ValueError`` naming ``source`` if malformed."""
    try:
        (header_len,) = _LEN.unpack_from(payload, 0)
        start = _LEN.size + header_len
        index = json.loads(payload[_LEN.size : start].decode("utf-8"))
        out: dict[str, torch.Tensor] = {}
        for entry in index:
            dtype = _DTYPE_BY_NAME[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            lo = start + int(entry["offset"])
            hi = lo + int(entry["nbytes"])
            if hi > len(payload):
                raise ValueError(f"tensor {entry['name']!r} runs past the end of the data")
            if entry["nbytes"] == 0:
                out[entry["name"]] = torch.empty(shape, dtype=dtype)
                continue
            flat = torch.frombuffer(bytearray(payload[lo:hi]), dtype=torch.uint8)
            out[entry["name"]] = flat.view(dtype).reshape(shape)
        return out
    except (struct.error, KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{source}: malformed tensor data ({exc})") from exc


def model_version(spec: Mapping[str, Any], tensor_payload: bytes) -> tuple[str, str]:
    """``(version, full_sha256_hex)`` of a model: hash of domain tag, spec and tensors."""
    h = hashlib.sha256()
    h.update(_DOMAIN)
    h.update(canonical_json(dict(spec)))
    h.update(b"\x00")
    h.update(tensor_payload)
    full = h.hexdigest()
    return full[:16], full


def _check_version(version: str) -> str:
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise ValueError(f"invalid model version {version!r}: expected 16 lowercase hex digits")
    return version


class ModelStore:
    """Versioned models of one owner on disk (see the module docstring for the layout)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._models = self.root / "models"
        self._logits = self.root / "logits"
        self._current = self.root / "CURRENT"
        for d in (self._models, self._logits):
            d.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(d)
        remove_stale_temp_files(self.root)

    def _model_path(self, version: str) -> Path:
        return self._models / f"{_check_version(version)}.model"

    def _logits_path(self, version: str) -> Path:
        return self._logits / f"{_check_version(version)}.logits"

    # -- models ------------------------------------------------------------------------------

    def save(
        self,
        state_dict: Mapping[str, torch.Tensor],
        spec: Mapping[str, Any],
        metadata: Mapping[str, Any] | None = None,
    ) -> str:
        """Store a model; return its version (content hash of tensors + spec).

        ``spec`` (architecture, input shape, K, ...) and ``metadata`` must be JSON-serialisable.
        Does not change the current version (see :meth:`set_current`).
        """
        payload = serialize_state_dict(state_dict)
        version, full = model_version(spec, payload)
        path = self._model_path(version)
        if path.exists():
            try:
                self.load(version)
                return version
            except CorruptFileError:
                pass  # damaged copy of the same content: rewrite it below
        meta = {
            "kind": "model",
            "version": version,
            "content_sha256": full,
            "spec": dict(spec),
            "metadata": dict(metadata or {}),
            "saved_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        }
        canonical_json(meta)  # fail before writing if not JSON-serialisable
        write_verified(path, payload, meta)
        return version

    def load(self, version: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
        """``(state_dict, spec, metadata)`` of ``version``, verified.

        Raises:
            KeyError: no such version.
            CorruptFileError: the file is damaged or its content does not hash to ``version``.
        """
        path = self._model_path(version)
        if not path.exists():
            raise KeyError(f"model version {version} not found in {self._models}")
        payload, meta = read_verified(path)
        if meta.get("kind") != "model":
            raise CorruptFileError(path, f"not a model file (kind {meta.get('kind')!r})")
        spec = meta.get("spec")
        if not isinstance(spec, dict):
            raise CorruptFileError(path, "missing spec")
        actual, _ = model_version(spec, payload)
        if actual != version or meta.get("version") != version:
            raise CorruptFileError(
                path, f"content hashes to version {actual}, not {version} (file renamed or forged)"
            )
        try:
            state_dict = deserialize_state_dict(payload, source=str(path))
        except ValueError as exc:
            raise CorruptFileError(path, str(exc)) from exc
        return state_dict, spec, dict(meta.get("metadata") or {})

    def exists(self, version: str) -> bool:
        """Whether a file for ``version`` exists (not verified)."""
        return self._model_path(version).exists()

    def versions(self) -> list[str]:
        """Stored versions, oldest first (by their recorded save time, then version).

        Reads only the file headers; :meth:`load` verifies.
        """
        found: list[tuple[str, str]] = []
        for p in self._models.glob("*.model"):
            if not _VERSION_RE.match(p.stem):
                continue
            try:
                saved_at = str(read_envelope_meta(p).get("saved_at", ""))
            except CorruptFileError:
                saved_at = ""
            found.append((saved_at, p.stem))
        return [v for _, v in sorted(found)]

    # -- current pointer ---------------------------------------------------------------------

    def set_current(self, version: str) -> None:
        """Atomically make ``version`` current (it must exist and verify)."""
        self.load(version)
        write_verified(self._current, b"", {"kind": "pointer", "version": version})

    def current_version(self) -> str | None:
        """The current version, or ``None`` if none was set. Raises ``CorruptFileError``."""
        if not self._current.exists():
            return None
        _, meta = read_verified(self._current)
        version = meta.get("version")
        if meta.get("kind") != "pointer" or not isinstance(version, str):
            raise CorruptFileError(self._current, "not a version pointer")
        try:
            return _check_version(version)
        except ValueError as exc:
            raise CorruptFileError(self._current, str(exc)) from exc

    def load_current(self) -> tuple[str, dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
        """``(version, state_dict, spec, metadata)`` of the current version."""
        version = self.current_version()
        if version is None:
            raise KeyError(f"no current model version set in {self.root}")
        return (version, *self.load(version))

    # -- logit cache -------------------------------------------------------------------------

    def save_logits(self, version: str, ids: Sequence[str], logits: Any) -> None:
        """Cache the (N, K) logits of model ``version`` for pseudonymous ``ids`` (atomic).

        ``logits`` may be a numpy array or a torch tensor; float32 is kept, anything else is
        stored as float64. Replaces an earlier cache of the same version.
        """
        if not self.exists(version):
            raise KeyError(f"model version {version} not found in {self._models}")
        if hasattr(logits, "detach"):
            logits = logits.detach().cpu().numpy()
        arr = np.asarray(logits)
        if arr.dtype != np.float32:
            arr = arr.astype(np.float64)
        ids = list(ids)
        if arr.ndim != 2 or arr.shape[0] != len(ids):
            raise ValueError(f"logits must have shape ({len(ids)}, K), got {arr.shape}")
        for sid in ids:
            if not isinstance(sid, str) or not sid or "\n" in sid:
                raise ValueError(f"sample id {sid!r} must be a non-empty str without newlines")
        if len(set(ids)) != len(ids):
            raise ValueError("sample ids must be unique")
        id_bytes = "\n".join(ids).encode("utf-8")
        payload = (
            _LEN.pack(len(id_bytes)) + id_bytes + arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        )
        meta = {
            "kind": "logits",
            "version": version,
            "num_samples": int(arr.shape[0]),
            "num_classes": int(arr.shape[1]),
            "dtype": "float32" if arr.dtype == np.float32 else "float64",
        }
        write_verified(self._logits_path(version), payload, meta)

    def drop_logit_caches(self) -> int:
        """Delete every version's logit cache (e.g. after a pseudonym key rotation: the cached
        ids are pseudonyms of the old key); returns how many were deleted."""
        gone = 0
        for p in self._logits.glob("*.logits"):
            p.unlink(missing_ok=True)
            gone += 1
        return gone

    def has_logits(self, version: str) -> bool:
        """Whether a logit cache exists for ``version`` (not verified)."""
        return self._logits_path(version).exists()

    def load_logits(self, version: str) -> tuple[list[str], np.ndarray]:
        """``(ids, logits)`` cached for ``version``, verified.

        Raises:
            KeyError: no cache for this version.
            CorruptFileError: the cache file is damaged or belongs to another version.
        """
        path = self._logits_path(version)
        if not path.exists():
            raise KeyError(f"no logit cache for model version {version} in {self._logits}")
        payload, meta = read_verified(path)
        if meta.get("kind") != "logits" or meta.get("version") != version:
            raise CorruptFileError(path, f"not the logit cache of version {version}")
        try:
            n, k = int(meta["num_samples"]), int(meta["num_classes"])
            dtype = np.dtype("<f4") if meta["dtype"] == "float32" else np.dtype("<f8")
            (id_len,) = _LEN.unpack_from(payload, 0)
            id_text = payload[_LEN.size : _LEN.size + id_len].decode("utf-8")
            ids = id_text.split("\n") if n else []
            body = payload[_LEN.size + id_len :]
            if len(ids) != n or len(body) != n * k * dtype.itemsize:
                raise ValueError("sizes do not match the header")
            arr = np.frombuffer(body, dtype=dtype).reshape(n, k).astype(dtype.newbyteorder("="))
        except (KeyError, ValueError, struct.error, UnicodeDecodeError) as exc:
            raise CorruptFileError(path, f"malformed logit cache ({exc})") from exc
        return ids, arr
