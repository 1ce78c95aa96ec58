"""Allow-list for replies that reach the coordinator.

The coordinator must never receive raw inputs, features or local patient ids: only the
head (Gram matrix), class counts, the model version, training metrics and K logits per
requested pseudonymous id. `check_reply_allowed` enforces that on every reply *before*
anything else reads it: every record name, record type, field name, array dtype and array
shape must be declared, or the whole reply is rejected.

Shapes may use symbolic dimensions (strings): ``("K", "K")`` for a Gram matrix,
``("N", "K")`` for logits. A symbol gets its value from ``dims`` (e.g. ``N`` = number of
requested ids, ``K`` = number of classes) or, if absent there, from its first occurrence
in the reply; every other occurrence must agree. So features of shape ``(N, H)`` with
``H != K`` never pass as logits.

Arrays are deserialized here (``allow_pickle=False``) and the actual ndarray is checked,
not only the metadata a client declares; trailing bytes after the array are rejected.

SecAgg+'s masked messages carry arrays as ``.npy`` payloads inside a ConfigRecord (a list of
bytes) and keys and secret shares as bytes: :class:`PackedArraysSpec` checks such a list
exactly like arrays (count, order, shape, dtype, and a value range), and
:meth:`ValueSpec.bytes_list` bounds lists of opaque bytes (see
:mod:`jacfusion_fed.federation.private` for the four SecAgg+ replies).

Example::

    HEAD_REPLY = {
        "head": RecordSpec.arrays({"gram": ArraySpec(("K", "K"))}),
        "metrics": RecordSpec.metrics({"train-loss": ValueSpec.number(),
                                       "num-examples": ValueSpec.integer()}),
        "info": RecordSpec.configs({"modality": ValueSpec.string(64),
                                    "version": ValueSpec.string(128)}),
    }
    dims = check_reply_allowed(reply.content, HEAD_REPLY, dims={"K": 10})
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.lib.format as npy_format
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

__all__ = [
    "ArraySpec",
    "PackedArraysSpec",
    "RecordSpec",
    "ReplyNotAllowedError",
    "ValueSpec",
    "check_reply_allowed",
]

RecordKind = Literal["array", "metric", "config"]
_KIND_OF_TYPE: dict[type, RecordKind] = {
    ArrayRecord: "array",
    MetricRecord: "metric",
    ConfigRecord: "config",
}
_TYPE_NAME: dict[RecordKind, str] = {
    "array": "ArrayRecord",
    "metric": "MetricRecord",
    "config": "ConfigRecord",
}


class ReplyNotAllowedError(ValueError):
    """A reply carries something that is not in the allow-list."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__(
            "reply rejected by the allow-list: " + "; ".join(self.problems)
            if self.problems
            else "reply rejected by the allow-list"
        )


@dataclass(frozen=True)
class ArraySpec:
    """An allowed array: exact rank, per-axis size (int or symbol), allowed dtypes."""

    shape: tuple[int | str, ...]
    dtypes: frozenset[str] = frozenset({"float32", "float64"})

    def __post_init__(self) -> None:
        for dim in self.shape:
            if isinstance(dim, bool) or not isinstance(dim, (int, str)):
                raise TypeError(f"ArraySpec dimensions must be int or str, got {dim!r}")
            if isinstance(dim, int) and dim < 0:
                raise ValueError(f"ArraySpec dimensions must be >= 0, got {dim}")
        object.__setattr__(self, "dtypes", frozenset(self.dtypes))


@dataclass(frozen=True)
class ValueSpec:
    """An allowed ConfigRecord/MetricRecord value.

    ``types``: allowed scalar types (``bool`` is never accepted as ``int``).
    ``max_items``: ``None`` allows scalars only; an int allows a list of at most that many
    items (each of an allowed type) instead; lists are how features could be smuggled.
    ``max_len``: longest allowed ``str``/``bytes``.
    """

    types: tuple[type, ...]
    max_items: int | None = None
    max_len: int = 256

    @classmethod
    def number(cls) -> ValueSpec:
        return cls((int, float))

    @classmethod
    def integer(cls) -> ValueSpec:
        return cls((int,))

    @classmethod
    def boolean(cls) -> ValueSpec:
        return cls((bool,))

    @classmethod
    def string(cls, max_len: int = 256) -> ValueSpec:
        return cls((str,), max_len=max_len)

    @classmethod
    def integers(cls, max_items: int) -> ValueSpec:
        """A list of at most ``max_items`` ints (e.g. class counts)."""
        return cls((int,), max_items=max_items)

    @classmethod
    def bytes_list(cls, max_items: int, max_len: int) -> ValueSpec:
        """A list of at most ``max_items`` byte strings of at most ``max_len`` bytes each
        (e.g. SecAgg+'s encrypted key shares)."""
        return cls((bytes,), max_items=max_items, max_len=max_len)


@dataclass(frozen=True)
class PackedArraysSpec:
    """A ConfigRecord field holding exactly ``len(arrays)`` ``.npy`` payloads (bytes), in
    order, each matching its :class:`ArraySpec`; with ``below``, every value in [0, below)
    (e.g. SecAgg+'s masked vectors: integers modulo the protocol's range)."""

    arrays: tuple[ArraySpec, ...]
    below: int | None = None


@dataclass(frozen=True)
class RecordSpec:
    """An allowed record: its type and its fields (all required unless listed optional)."""

    kind: RecordKind
    fields: Mapping[str, ArraySpec | ValueSpec | PackedArraysSpec]
    optional_fields: frozenset[str] = field(default_factory=frozenset)
    required: bool = True

    def __post_init__(self) -> None:
        if self.kind not in _TYPE_NAME:
            raise ValueError(f"RecordSpec.kind must be one of {sorted(_TYPE_NAME)}")
        want: tuple[type, ...] = (
            (ArraySpec,)
            if self.kind == "array"
            else (ValueSpec, PackedArraysSpec)
            if self.kind == "config"
            else (ValueSpec,)
        )
        for name, spec in self.fields.items():
            if not isinstance(spec, want):
                raise TypeError(
                    f"field {name!r} of a {_TYPE_NAME[self.kind]} spec must be a "
                    f"{' or '.join(w.__name__ for w in want)}, got {type(spec).__name__}"
                )
        unknown = set(self.optional_fields) - set(self.fields)
        if unknown:
            raise ValueError(f"optional_fields not among fields: {sorted(unknown)}")
        object.__setattr__(self, "fields", dict(self.fields))
        object.__setattr__(self, "optional_fields", frozenset(self.optional_fields))

    @classmethod
    def arrays(
        cls,
        fields: Mapping[str, ArraySpec],
        *,
        optional: frozenset[str] | set[str] = frozenset(),
        required: bool = True,
    ) -> RecordSpec:
        return cls("array", fields, frozenset(optional), required)

    @classmethod
    def metrics(
        cls,
        fields: Mapping[str, ValueSpec],
        *,
        optional: frozenset[str] | set[str] = frozenset(),
        required: bool = True,
    ) -> RecordSpec:
        return cls("metric", fields, frozenset(optional), required)

    @classmethod
    def configs(
        cls,
        fields: Mapping[str, ValueSpec | PackedArraysSpec],
        *,
        optional: frozenset[str] | set[str] = frozenset(),
        required: bool = True,
    ) -> RecordSpec:
        return cls("config", fields, frozenset(optional), required)


def _load_array(arr: Array, where: str, problems: list[str]) -> np.ndarray | None:
    """Deserialize like ``Array.numpy()`` but also reject trailing bytes / lying metadata."""
    if arr.stype != "numpy.ndarray":
        problems.append(f"{where}: unsupported serialization type {arr.stype!r}")
        return None
    nd = _load_npy(arr.data, where, problems)
    if nd is not None and (tuple(nd.shape) != tuple(arr.shape) or str(nd.dtype) != arr.dtype):
        problems.append(
            f"{where}: declared {arr.dtype}{tuple(arr.shape)} but payload is "
            f"{nd.dtype}{tuple(nd.shape)}"
        )
        return None
    return nd


def _load_npy(data: bytes, where: str, problems: list[str]) -> np.ndarray | None:
    """One ``.npy`` payload (no pickles, no object arrays, no trailing bytes)."""
    buf = io.BytesIO(data)
    try:
        version = npy_format.read_magic(buf)
        if version == (1, 0):
            header = npy_format.read_array_header_1_0(buf)
        elif version == (2, 0):
            header = npy_format.read_array_header_2_0(buf)
        else:
            problems.append(f"{where}: unsupported .npy format version {version}")
            return None
        header_end = buf.tell()
        if header[2].hasobject:
            problems.append(f"{where}: object arrays are not allowed")
            return None
        buf.seek(0)
        nd = np.load(buf, allow_pickle=False)
    except Exception as exc:  # any malformed payload is a rejection, never a crash
        problems.append(f"{where}: not a valid .npy payload ({type(exc).__name__}: {exc})")
        return None
    if not isinstance(nd, np.ndarray):
        problems.append(f"{where}: payload is not a single array")
        return None
    if len(data) != header_end + nd.nbytes:
        problems.append(
            f"{where}: payload has {len(data) - header_end - nd.nbytes} unexpected "
            "extra bytes after the array"
        )
        return None
    return nd


def _check_packed(
    value: Any, spec: PackedArraysSpec, where: str, dims: dict[str, int], problems: list[str]
) -> None:
    if not isinstance(value, list) or not all(isinstance(v, bytes) for v in value):
        problems.append(f"{where}: expected a list of .npy payloads (bytes)")
        return
    if len(value) != len(spec.arrays):
        problems.append(f"{where}: {len(value)} arrays, allowed exactly {len(spec.arrays)}")
        return
    for i, (data, array_spec) in enumerate(zip(value, spec.arrays, strict=True)):
        nd = _load_npy(data, f"{where}[{i}]", problems)
        if nd is None:
            continue
        _check_array(nd, array_spec, f"{where}[{i}]", dims, problems)
        if spec.below is not None and nd.size and (nd.min() < 0 or nd.max() >= spec.below):
            problems.append(f"{where}[{i}]: values outside [0, {spec.below})")


def _check_array(
    nd: np.ndarray, spec: ArraySpec, where: str, dims: dict[str, int], problems: list[str]
) -> None:
    if str(nd.dtype) not in spec.dtypes:
        problems.append(f"{where}: dtype {nd.dtype} not allowed (allowed: {sorted(spec.dtypes)})")
    if nd.ndim != len(spec.shape):
        problems.append(
            f"{where}: shape {tuple(nd.shape)} has rank {nd.ndim}, allowed shape is {spec.shape}"
        )
        return
    for axis, (got, want) in enumerate(zip(nd.shape, spec.shape, strict=True)):
        if isinstance(want, int):
            if got != want:
                problems.append(
                    f"{where}: axis {axis} has size {got}, allowed {want} (shape "
                    f"{tuple(nd.shape)} vs {spec.shape})"
                )
        elif want in dims:
            if got != dims[want]:
                problems.append(
                    f"{where}: axis {axis} has size {got}, but {want}={dims[want]} (shape "
                    f"{tuple(nd.shape)} vs {spec.shape})"
                )
        else:
            dims[want] = int(got)


def _check_value(value: Any, spec: ValueSpec, where: str, problems: list[str]) -> None:
    def scalar_ok(v: Any) -> bool:
        if isinstance(v, bool):
            return bool in spec.types
        if not isinstance(v, spec.types):
            return False
        if isinstance(v, (str, bytes)) and len(v) > spec.max_len:
            problems.append(f"{where}: {type(v).__name__} of length {len(v)} > {spec.max_len}")
        return True

    allowed = "/".join(t.__name__ for t in spec.types)
    if isinstance(value, list):
        if spec.max_items is None:
            problems.append(f"{where}: lists are not allowed (expected a single {allowed})")
            return
        if len(value) > spec.max_items:
            problems.append(f"{where}: list of {len(value)} items > {spec.max_items}")
            return
        bad = [type(v).__name__ for v in value if not scalar_ok(v)]
        if bad:
            problems.append(f"{where}: list items of type {sorted(set(bad))}, allowed {allowed}")
    elif not scalar_ok(value):
        problems.append(f"{where}: value of type {type(value).__name__}, allowed {allowed}")


def check_reply_allowed(
    record_dict: RecordDict,
    allowed: Mapping[str, RecordSpec],
    dims: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Raise `ReplyNotAllowedError` unless ``record_dict`` matches ``allowed`` exactly.

    Returns the symbolic dimensions (given ``dims`` plus those bound from the reply).
    Every problem found is listed in the exception, not only the first.
    """
    if not isinstance(record_dict, RecordDict):
        raise ReplyNotAllowedError([f"content is {type(record_dict).__name__}, not RecordDict"])
    bound = {str(k): int(v) for k, v in (dims or {}).items()}
    problems: list[str] = []

    present = set(record_dict.keys())
    for name in sorted(present - set(allowed)):
        kind = _KIND_OF_TYPE.get(type(record_dict[name]))
        type_name = _TYPE_NAME[kind] if kind else type(record_dict[name]).__name__
        problems.append(f"record {name!r} ({type_name}) is not in the allow-list")
    for name, spec in allowed.items():
        if name not in present:
            if spec.required:
                problems.append(f"required record {name!r} ({_TYPE_NAME[spec.kind]}) missing")
            continue
        record = record_dict[name]
        kind = _KIND_OF_TYPE.get(type(record))
        if kind != spec.kind:
            got = _TYPE_NAME[kind] if kind else type(record).__name__
            problems.append(f"record {name!r} is a {got}, allowed {_TYPE_NAME[spec.kind]}")
            continue
        keys = set(record.keys())
        for key in sorted(keys - set(spec.fields)):
            problems.append(f"record {name!r}: field {key!r} is not in the allow-list")
        for key in sorted(set(spec.fields) - keys - set(spec.optional_fields)):
            problems.append(f"record {name!r}: required field {key!r} missing")
        for key in sorted(keys & set(spec.fields)):
            where = f"{name}[{key!r}]"
            field_spec = spec.fields[key]
            value = record[key]
            if isinstance(field_spec, PackedArraysSpec):
                _check_packed(value, field_spec, where, bound, problems)
            elif isinstance(field_spec, ArraySpec):
                if not isinstance(value, Array):
                    problems.append(f"{where}: not an Array ({type(value).__name__})")
                    continue
                nd = _load_array(value, where, problems)
                if nd is not None:
                    _check_array(nd, field_spec, where, bound, problems)
            else:
                _check_value(value, field_spec, where, problems)
    if problems:
        raise ReplyNotAllowedError(problems)
    return bound
