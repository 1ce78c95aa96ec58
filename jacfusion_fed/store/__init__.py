"""Durable storage: versioned model store and head registry (atomic writes, hash-verified)."""

from jacfusion_fed.store.atomic import (
    CorruptFileError,
    atomic_write_bytes,
    read_verified,
    write_verified,
)
from jacfusion_fed.store.head_registry import HeadRecord, HeadRegistry
from jacfusion_fed.store.model_store import ModelStore

__all__ = [
    "CorruptFileError",
    "HeadRecord",
    "HeadRegistry",
    "ModelStore",
    "atomic_write_bytes",
    "read_verified",
    "write_verified",
]
