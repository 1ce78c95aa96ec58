"""The coordinator's durable record of each modality's head, with full history.

Entries live in a :class:`~jacfusion_fed.store.registry_backends.RegistryBackend`: SQLite by
default (a registry directory ``DIR`` is the database ``DIR/registry.sqlite3``; a directory in
the old one-file-per-entry layout is imported on first open), PostgreSQL for replicas on
several hosts (``postgresql://...``); :func:`~jacfusion_fed.store.registry_backends.open_backend`
has the rule. Each registration is one immutable entry ``(modality, sequence)``; the newest
sequence of a modality is its current entry, older ones are kept as history.

A payload holds the head as float64 little-endian: the Gram matrix (K x K) for
``head_kind == "gram"``, or W (K x H) followed by b (K) for ``"full"``, then, when the owner
published one, its calibration for robust fusion (class means K x K, precision K x K, the V
sorted typicality scores, the V sorted conformity scores); the metadata holds owner, model
version, K, H, V, class counts and the registration time. Every read is verified: a damaged
current entry raises :class:`~jacfusion_fed.store.atomic.CorruptFileError` (the registry never
silently falls back to an older head).

Shared by several processes (coordinator replicas): a registration runs inside the backend's
exclusive section (SQLite's write lock, PostgreSQL's advisory lock), where it re-reads the
current entries, checks K and the owner against them, and appends the next sequence number, so
two replicas registering at once get sequences N and N+1 (or the second sees the first's
identical head and adds nothing), never one overwriting the other. Readers take no lock and
read the backend again on every call, so a replica sees another's registration on its next
read.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from jacfusion_fed.store.atomic import CorruptFileError
from jacfusion_fed.store.registry_backends import RegistryBackend, StoredEntry, open_backend

__all__ = ["HeadKind", "HeadRecord", "HeadRegistry"]

HeadKind = Literal["gram", "full"]
_MODALITY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
_F8 = np.dtype("<f8")


_CALIBRATION = ("class_means", "precision", "typicality_scores", "conformity_scores")


def _calibration_arrays(
    calibration: Mapping[str, Any] | None, k: int
) -> dict[str, np.ndarray] | None:
    """Checked float64 calibration arrays (shapes: K x K twice, V and V), or None."""
    if calibration is None:
        return None
    missing = [f for f in _CALIBRATION if f not in calibration]
    if missing:
        raise ValueError(f"calibration lacks {', '.join(missing)}")
    cal = {f: _as_f8(calibration[f], f"calibration {f}") for f in _CALIBRATION}
    v = cal["typicality_scores"].shape
    if cal["class_means"].shape != (k, k) or cal["precision"].shape != (k, k):
        raise ValueError(f"calibration class_means and precision must be K x K with K={k}")
    if len(v) != 1 or v[0] < 1 or cal["conformity_scores"].shape != v:
        raise ValueError("calibration score arrays must be two vectors of one length V >= 1")
    return cal


def _same_calibration(a: dict[str, np.ndarray] | None, b: dict[str, np.ndarray] | None) -> bool:
    if a is None or b is None:
        return a is b
    return all(a[f].shape == b[f].shape and np.array_equal(a[f], b[f]) for f in _CALIBRATION)


def _check_modality(modality: str) -> str:
    if not isinstance(modality, str) or not _MODALITY_RE.match(modality):
        raise ValueError(f"invalid modality name {modality!r}: must match {_MODALITY_RE.pattern}")
    return modality


def _as_f8(value: Any, name: str) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    arr = np.array(value, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


@dataclass(frozen=True, eq=False)
class HeadRecord:
    """One registration of a modality's head."""

    modality: str
    owner: str
    model_version: str
    num_classes: int
    class_counts: tuple[int, ...]
    registered_at: dt.datetime
    sequence: int
    gram: np.ndarray | None = field(default=None, repr=False)
    class_names: tuple[str, ...] = ()
    weight: np.ndarray | None = field(default=None, repr=False)
    bias: np.ndarray | None = field(default=None, repr=False)
    #: The owner's calibration arrays (``jacfusion_fed.fusion.CALIBRATION_FIELDS`` names:
    #: class_means, precision, typicality_scores, conformity_scores), or None.
    calibration: dict[str, np.ndarray] | None = field(default=None, repr=False)

    @property
    def head_kind(self) -> HeadKind:
        """``"gram"`` when only W W^T is held, ``"full"`` when W and b are."""
        return "full" if self.weight is not None else "gram"

    @property
    def feature_dim(self) -> int | None:
        """H, when W is held."""
        return None if self.weight is None else int(self.weight.shape[1])

    def gram_matrix(self) -> np.ndarray:
        """W W^T (K x K), whichever form is held."""
        if self.gram is not None:
            return self.gram
        assert self.weight is not None
        gram: np.ndarray = self.weight @ self.weight.T
        return gram


class HeadRegistry:
    """Per-modality heads known to the coordinator (see the module docstring).

    Args:
        target: a registry directory, an SQLite file, a ``postgresql://`` URI, or a backend.
        lock_timeout_s: how long a registration waits for another process's
            (``TimeoutError`` after it).
    """

    def __init__(
        self,
        target: str | os.PathLike[str] | RegistryBackend,
        *,
        lock_timeout_s: float = 30.0,
    ) -> None:
        self.backend = open_backend(target, lock_timeout_s=lock_timeout_s)
        self.location = self.backend.location
        #: The path given (a registry directory or an SQLite file; opening it again reaches the
        #: same registry), ``None`` for PostgreSQL or a backend object.
        self.root: Path | None = None
        if isinstance(target, (str, os.PathLike)) and "://" not in os.fspath(target):
            self.root = Path(target)
        self.lock_timeout_s = lock_timeout_s

    def close(self) -> None:
        self.backend.close()

    def register(
        self,
        modality: str,
        owner: str,
        model_version: str,
        *,
        class_counts: Sequence[int],
        gram: Any = None,
        weight: Any = None,
        bias: Any = None,
        registered_at: dt.datetime | None = None,
        allow_owner_change: bool = False,
        class_names: Sequence[str] = (),
        calibration: Mapping[str, Any] | None = None,
    ) -> HeadRecord:
        """Record a new head for ``modality`` and return it.

        Exactly one of ``gram`` (K x K, symmetric) or ``weight`` (K x H, with ``bias`` of
        length K) must be given. K must equal that of the other registered modalities.
        Registering the same owner, version and head again returns the current record
        without adding history. A different owner for a known modality is refused unless
        ``allow_owner_change``. ``class_names`` (K names, or none) are kept with the head, so
        every coordinator reading this registry labels classes the same way.
        ``calibration`` (the owner's arrays for robust fusion, see :class:`HeadRecord`) is kept
        with the head.
        """
        _check_modality(modality)
        if not owner:
            raise ValueError("owner must be a non-empty name")
        if not model_version:
            raise ValueError("model_version must be non-empty")
        if (gram is None) == (weight is None):
            raise ValueError("pass exactly one of gram= or weight= (with bias=)")
        counts = tuple(int(c) for c in class_counts)
        if any(c < 0 for c in counts):
            raise ValueError(f"class counts must be non-negative, got {counts}")
        g = w = b = None
        if gram is not None:
            g = _as_f8(gram, "gram")
            if g.ndim != 2 or g.shape[0] != g.shape[1]:
                raise ValueError(f"gram must be square (K x K), got shape {g.shape}")
            if not np.allclose(g, g.T, rtol=1e-6, atol=1e-9):
                raise ValueError("gram must be symmetric")
            k = g.shape[0]
        else:
            w = _as_f8(weight, "weight")
            if w.ndim != 2:
                raise ValueError(f"weight must be K x H, got shape {w.shape}")
            k = w.shape[0]
            if bias is None:
                raise ValueError("a full head needs bias= as well as weight=")
            b = _as_f8(bias, "bias").reshape(-1)
            if b.shape != (k,):
                raise ValueError(f"bias must have length K={k}, got shape {b.shape}")
        if k < 2:
            raise ValueError(f"a head needs K >= 2 classes, got {k}")
        if len(counts) != k:
            raise ValueError(f"class_counts must have length K={k}, got {len(counts)}")
        names = tuple(str(n) for n in class_names)
        if names and len(names) != k:
            raise ValueError(f"class_names must have length K={k}, got {len(names)}")
        cal = _calibration_arrays(calibration, k)
        with self.backend.exclusive():  # re-read and write as one step across replicas
            return self._register_locked(
                modality,
                owner,
                model_version,
                counts,
                k,
                g,
                w,
                b,
                registered_at,
                allow_owner_change,
                names,
                cal,
            )

    def _register_locked(
        self,
        modality: str,
        owner: str,
        model_version: str,
        counts: tuple[int, ...],
        k: int,
        g: np.ndarray | None,
        w: np.ndarray | None,
        b: np.ndarray | None,
        registered_at: dt.datetime | None,
        allow_owner_change: bool,
        names: tuple[str, ...] = (),
        cal: dict[str, np.ndarray] | None = None,
    ) -> HeadRecord:
        for other, rec in self.current().items():
            if other != modality and rec.num_classes != k:
                raise ValueError(
                    f"modality {modality!r} has K={k} but {other!r} is registered with "
                    f"K={rec.num_classes}"
                )
        entries = self.backend.entries(modality, latest=True)
        if entries:
            latest = self._load(entries[-1])
            if latest.owner != owner and not allow_owner_change:
                raise ValueError(
                    f"modality {modality!r} is registered to owner {latest.owner!r}, not "
                    f"{owner!r} (pass allow_owner_change=True to transfer it)"
                )
            if (
                latest.owner == owner
                and latest.model_version == model_version
                and latest.class_counts == counts
                and (not names or latest.class_names == names)
                and _same(latest.gram, g)
                and _same(latest.weight, w)
                and _same(latest.bias, b)
                and _same_calibration(latest.calibration, cal)
            ):
                return latest
        sequence = entries[-1].sequence + 1 if entries else 1
        when = (registered_at or dt.datetime.now(dt.timezone.utc)).astimezone(dt.timezone.utc)
        meta = {
            "kind": "head",
            "modality": modality,
            "owner": owner,
            "model_version": model_version,
            "num_classes": k,
            "feature_dim": None if w is None else int(w.shape[1]),
            "head_kind": "gram" if g is not None else "full",
            "class_counts": list(counts),
            "class_names": list(names),
            "registered_at": when.isoformat(),
            "sequence": sequence,
        }
        arrays = [g] if g is not None else [w, b]
        if cal is not None:
            meta["calibration_samples"] = int(cal["typicality_scores"].size)
            arrays += [cal[f] for f in _CALIBRATION]
        payload = b"".join(np.ascontiguousarray(a, dtype=_F8).tobytes() for a in arrays)
        entry = StoredEntry(modality, sequence, meta, payload)
        self.backend.append(entry)
        return self._load(entry)

    def _load(self, entry: StoredEntry) -> HeadRecord:
        modality, sequence, meta = entry.modality, entry.sequence, entry.meta
        payload = entry.payload
        try:
            if meta["kind"] != "head" or meta["modality"] != modality:
                raise ValueError(f"entry belongs to {meta.get('modality')!r}")
            if int(meta["sequence"]) != sequence:
                raise ValueError("sequence number does not match the entry's")
            k = int(meta["num_classes"])
            values = np.frombuffer(payload, dtype=_F8).astype(np.float64)
            cal = None
            if meta.get("calibration_samples") is not None:
                v = int(meta["calibration_samples"])
                size = 2 * k * k + 2 * v
                if v < 1 or values.size < size:
                    raise ValueError("calibration size does not match K and V")
                tail, values = values[-size:], values[:-size]
                cal = {
                    "class_means": tail[: k * k].reshape(k, k),
                    "precision": tail[k * k : 2 * k * k].reshape(k, k),
                    "typicality_scores": tail[2 * k * k : 2 * k * k + v].copy(),
                    "conformity_scores": tail[2 * k * k + v :].copy(),
                }
            g = w = b = None
            if meta["head_kind"] == "gram":
                if values.size != k * k:
                    raise ValueError("gram size does not match K")
                g = values.reshape(k, k)
            elif meta["head_kind"] == "full":
                h = int(meta["feature_dim"])
                if values.size != k * h + k:
                    raise ValueError("weight/bias size does not match K and H")
                w, b = values[: k * h].reshape(k, h), values[k * h :].copy()
            else:
                raise ValueError(f"unknown head kind {meta['head_kind']!r}")
            return HeadRecord(
                modality=modality,
                owner=str(meta["owner"]),
                model_version=str(meta["model_version"]),
                num_classes=k,
                class_counts=tuple(int(c) for c in meta["class_counts"]),
                registered_at=dt.datetime.fromisoformat(meta["registered_at"]),
                sequence=sequence,
                class_names=tuple(str(n) for n in meta.get("class_names", [])),
                gram=g,
                weight=w,
                bias=b,
                calibration=cal,
            )
        except (KeyError, TypeError, ValueError) as exc:
            where = f"{self.location} entry {modality}/{sequence:08d}"
            raise CorruptFileError(where, f"malformed head entry ({exc})") from exc

    def modalities(self) -> list[str]:
        """Registered modality names, sorted."""
        return [m for m in self.backend.modalities() if _MODALITY_RE.match(m)]

    def get(self, modality: str) -> HeadRecord:
        """The current record of ``modality``; ``KeyError`` if unknown."""
        entries = self.backend.entries(_check_modality(modality), latest=True)
        if not entries:
            raise KeyError(f"modality {modality!r} is not registered")
        return self._load(entries[-1])

    def history(self, modality: str) -> list[HeadRecord]:
        """All records of ``modality``, oldest first (each verified)."""
        return [self._load(e) for e in self.backend.entries(_check_modality(modality))]

    def current(self) -> dict[str, HeadRecord]:
        """The current record of every registered modality."""
        return {m: self.get(m) for m in self.modalities()}

    def num_classes(self) -> int:
        """K shared by all registered modalities; ``KeyError`` if none is registered."""
        records = self.current()
        if not records:
            raise KeyError("no modality is registered")
        return next(iter(records.values())).num_classes

    def class_prior(self, modalities: Iterable[str] | None = None) -> np.ndarray:
        """Class prior (K,) from the class counts summed over (the given) modalities."""
        names = list(modalities) if modalities is not None else self.modalities()
        if not names:
            raise KeyError("no modality is registered")
        total = np.sum(
            [np.asarray(self.get(m).class_counts, dtype=np.float64) for m in names], axis=0
        )
        s = total.sum()
        if s <= 0:
            raise ValueError("class counts sum to zero; the prior is undefined")
        prior: np.ndarray = total / s
        return prior


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(np.array_equal(a, b))
