"""The modality owner's node-local logic, shared by its Flower ClientApp and gRPC service."""

from .source import DataSource, load_npz_records, load_records
from .workspace import Head, HeadKind, LogitAnswer, OwnerWorkspace, UnknownVersionError, choose_arch

__all__ = [
    "DataSource",
    "Head",
    "HeadKind",
    "LogitAnswer",
    "OwnerWorkspace",
    "UnknownVersionError",
    "choose_arch",
    "load_npz_records",
    "load_records",
]
