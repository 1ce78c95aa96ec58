"""A modality owner's node-local state: its records, its model store, its head and logits.

Both faces of an owner use this one class: the Flower ClientApp (``clients/client_app.py``:
train, publish the head, answer logit queries) and the long-lived gRPC ModalityService
(``clients/modality_service.py``). Everything that must outlive a Flower message or a process
restart lives on disk under ``root``::

    root/store/          ModelStore: content-hashed model versions, CURRENT, logit caches
    root/live/           RecordStore: records.sqlite3 with the records sent by requesters
                         (PutRecords), their logits, the pseudonym key's fingerprint and
                         retired pseudonyms (migrated from the old file layout on open)

An owner may have a data source (its own records), live records, or both; a live record
shadows a data-source record of the same pseudonym. Model versions are trained here
(:meth:`OwnerWorkspace.train`) or imported (:mod:`jacfusion_fed.owner.importing`).

What leaves the owner (and nothing else): the head (Gram matrix W W^T by default; W and b
when the owner allows it), class counts, the model version, training metrics, and K logits per
requested pseudonymous sample id. Raw inputs, features and local patient ids never do.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from jacfusion_fed.data import MultimodalDataset
from jacfusion_fed.fusion import gram_of
from jacfusion_fed.models import UnimodalNet, build_from_spec, build_model, default_arch
from jacfusion_fed.privacy.pseudonyms import Pseudonymizer
from jacfusion_fed.robustness import AttackSpec, Corruption
from jacfusion_fed.store import ModelStore
from jacfusion_fed.store.record_store import DB_NAME, PutResult
from jacfusion_fed.training import predict_logits, train_epochs

from .detector import (
    fit_workspace_input_test,
    pvalues_of_inputs,
    workspace_detector,
    workspace_input_test,
)
from .importing import IMPORT_FORMATS, ImportedModel, rebuild
from .input_spec import InputSpec
from .live import LiveRecords
from .source import DataSource, load_records

HeadKind = Literal["gram", "full"]


class UnknownVersionError(LookupError):
    """A model version this owner does not have (or no model trained yet)."""


@dataclass(frozen=True)
class Head:
    """What an owner publishes about its last layer for one model version."""

    version: str
    num_classes: int
    feature_dim: int
    gram: np.ndarray  # (K, K) float64, always
    weight: np.ndarray | None = None  # (K, H), only for kind "full"
    bias: np.ndarray | None = None  # (K,)


class _LogitTable:
    """A version's cached logits: ``values[index[pseudonym]]`` is that record's K logits."""

    __slots__ = ("index", "values")

    def __init__(self, index: dict[str, int], values: np.ndarray) -> None:
        self.index = index
        self.values = values


@dataclass(frozen=True)
class LogitAnswer:
    """Logits for the known ids (in request order), the version used, the ids not found."""

    version: str
    sample_ids: list[str]
    logits: np.ndarray  # (len(sample_ids), K) float64
    unknown_ids: list[str]
    #: the owner's detector p-value per known id (issue 20), None when it has no detector
    pvalues: np.ndarray | None = None


def choose_arch(dataset: str, modality: str, input_shape: tuple[int, ...]) -> str:
    """The built-in architecture for a built-in dataset; otherwise by the input's rank."""
    try:
        return default_arch(dataset, modality)
    except ValueError:
        return "image_cnn" if len(input_shape) == 3 and min(input_shape[1:]) >= 4 else "mlp"


class OwnerWorkspace:
    """One modality owner's records and models (see the module docstring).

    Args:
        root: node-local directory (created if missing).
        modality: the modality this owner holds.
        source: where its local records come from (a :class:`DataSource` or its string), or
            ``None`` for an owner that answers only for live records.
        pseudonymizer: HMAC pseudonyms of local patient ids; the key never leaves the owner
            and its requesters. Its fingerprint must match the workspace's stored records
            (:class:`~jacfusion_fed.store.record_store.KeyMismatchError` on first use of
            :attr:`live`). ``None`` only for model management (``import-model``): anything
            that needs pseudonyms then raises ``ValueError``.
        allow_full_head: whether W and b may be shared (else only the Gram matrix).
        retention_s: seconds live records are kept (``None``: until deleted).
    """

    def __init__(
        self,
        root: str | Path,
        modality: str,
        source: DataSource | str | None,
        pseudonymizer: Pseudonymizer | None,
        *,
        allow_full_head: bool = False,
        retention_s: float | None = None,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.modality = modality
        self.source = DataSource.parse(source) if isinstance(source, str) else source
        self.allow_full_head = allow_full_head
        self.store = ModelStore(self.root / "store")
        self.retention_s = retention_s
        self._live: LiveRecords | None = None
        self._pseudonymizer = pseudonymizer
        self._records: dict[str, MultimodalDataset] | None = None
        self._index: dict[str, tuple[str, int]] | None = None
        self._lock = threading.Lock()
        self._models: dict[str, UnimodalNet | ImportedModel] = {}
        # detector p-values of data-source records per model version (they never change)
        self._source_pvalues: dict[str, dict[str, float]] = {}
        self._logit_cache: dict[str, _LogitTable] = {}

    # --- records -------------------------------------------------------------------------

    @property
    def records(self) -> dict[str, MultimodalDataset]:
        """The data source's splits (empty without a data source)."""
        if self._records is None:
            self._records = {} if self.source is None else load_records(self.source, self.modality)
        return self._records

    @property
    def pseudonymizer(self) -> Pseudonymizer:
        if self._pseudonymizer is None:
            raise ValueError(f"the workspace {self.root} was opened without the pseudonym key")
        return self._pseudonymizer

    @property
    def key_fingerprint(self) -> str:
        return self.pseudonymizer.fingerprint

    @property
    def live(self) -> LiveRecords:
        """The live records; opening them checks the key fingerprint (``KeyMismatchError``)."""
        with self._lock:
            if self._live is None:
                live = self.root / "live"
                if not ((live / DB_NAME).exists() or (live / "KEY").exists()):
                    # A workspace from before key fingerprints: its logit caches may belong
                    # to any key, so they are recomputed rather than trusted.
                    self.store.drop_logit_caches()
                self._live = LiveRecords(live, self.key_fingerprint, retention_s=self.retention_s)
            return self._live

    def class_names(self) -> list[str]:
        train = self.records.get("train")
        return [] if train is None else list(train.class_names)

    def _pseudonym_index(self) -> dict[str, tuple[str, int]]:
        """pseudonym -> (split, row), built once; the local ids stay inside this object."""
        if self._index is None:
            index: dict[str, tuple[str, int]] = {}
            for split, ds in self.records.items():
                for row, local_id in enumerate(ds.sample_ids):
                    index[self.pseudonymizer(local_id)] = (split, row)
            self._index = index
        return self._index

    def pseudonyms(self, split: str) -> list[str]:
        """Pseudonymous ids of one split (what a requester derives with the same key)."""
        return self.pseudonymizer.many(self.records[split].sample_ids)

    @property
    def num_classes(self) -> int:
        if "train" in self.records:
            return self.records["train"].num_classes
        return int(self.load_model()[1].head.out_features)

    def class_counts(self, version: str | None = None) -> np.ndarray:
        """Training-set count per class: recorded with the version (imported models), else
        counted in the data source's train split."""
        try:
            version = version or self.store.current_version()
        except Exception:
            version = None
        if version is not None and self.store.exists(version):
            _, _, meta = self.store.load(version)
            if meta.get("class_counts") is not None:
                return np.asarray(meta["class_counts"], dtype=np.int64)
        if "train" not in self.records:
            raise UnknownVersionError(
                f"owner of {self.modality!r} has no class counts (no data source, no model)"
            )
        return self.records["train"].class_counts()

    def input_spec(self, version: str | None = None) -> InputSpec:
        """What one record must look like for ``version`` (the current one by default)."""
        version = version or self.current_version()
        _, spec, meta = self.store.load(version)
        if isinstance(spec.get("input_spec"), dict):
            return InputSpec.from_dict(spec["input_spec"])
        if isinstance(meta.get("input_spec"), dict):
            return InputSpec.from_dict(meta["input_spec"])
        return InputSpec.create(spec["input_shape"])

    # --- live records --------------------------------------------------------------------

    def put_records(self, ids: list[str], x: np.ndarray, *, replace: bool = False) -> PutResult:
        """Validate a batch against the current input spec as a whole, then store it.

        Raises :class:`~jacfusion_fed.owner.input_spec.RecordError` (nothing stored) naming
        the first bad record; ``RecordConflictError`` for different content without
        ``replace``; ``ValueError`` for an id already held by the data source (unless
        ``replace``: the live record then shadows it).
        """
        arr = self.input_spec().validate_batch(x)
        if not replace:
            index = self._pseudonym_index()
            clash = next((i for i, sid in enumerate(ids) if sid in index), None)
            if clash is not None:
                from jacfusion_fed.store.record_store import RecordConflictError

                raise RecordConflictError(clash)
        return self.live.put(ids, arr, replace=replace)

    def delete_records(self, ids: list[str]) -> tuple[list[str], list[str]]:
        """Erase live records; ``PermissionError`` naming the position of a data-source id."""
        index = self._pseudonym_index() if self.source is not None else {}
        for i, sid in enumerate(ids):
            if sid in index and sid not in self.live:
                raise PermissionError(
                    f"sample id at position {i} belongs to the owner's data source, which "
                    "cannot be erased through DeleteRecords"
                )
        return self.live.delete(ids)

    def rekey(self, new: Pseudonymizer, mapping: dict[str, str]) -> tuple[int, int]:
        """Move this workspace to the key of ``new``: live records are renamed by ``mapping``
        (old -> new pseudonym; unmapped ones are erased), every logit cache is dropped, and
        the old key's pseudonyms are retired (refused from now on). Returns
        ``(renamed, erased)``."""
        old_source = list(self._pseudonym_index())
        renamed_erased = self.live.rekey(mapping, new.fingerprint, old_source)
        self.store.drop_logit_caches()
        with self._lock:
            self._pseudonymizer = new
            self._index = None
            self._logit_cache.clear()
            self._source_pvalues.clear()
        return renamed_erased

    # --- training ------------------------------------------------------------------------

    def new_model(self) -> UnimodalNet:
        train = self.records["train"]
        shape = tuple(train.modalities[self.modality].shape[1:])
        arch = choose_arch(self.source.location if self.source else "", self.modality, shape)
        return build_model(arch, shape, train.num_classes)

    def train(
        self,
        method: str = "regular",
        epochs: int = 8,
        *,
        initial_state: dict[str, torch.Tensor] | None = None,
        seed: int = 0,
        lr: float = 1e-3,
        batch_size: int = 64,
        publish: bool = True,
        progress: bool = False,
        **method_params: Any,
    ) -> tuple[UnimodalNet, dict[str, float]]:
        """Train locally (from ``initial_state`` when given, as in a FedAvg round).

        With ``publish`` the result is saved to the store and becomes the current version.
        Returns the model and metrics (train loss/accuracy, examples, seconds).
        """
        torch.manual_seed(seed)
        model = self.new_model()
        if initial_state is not None:
            model.load_state_dict(initial_state)
        x, y = self.records["train"].tensors(self.modality)
        report = train_epochs(
            model,
            (x, y),
            method,
            epochs,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            progress=progress,
            **{"num_threads": 1, **method_params},  # one thread: the same model in every process
        )
        metrics = {
            "train_loss": float(report.losses[-1]) if report.losses else float("nan"),
            "train_accuracy": float(report.train_accuracy),
            "num_examples": float(len(y)),
            "seconds": float(report.seconds),
        }
        if publish:
            self.publish(model, metrics | {"method": method, "epochs": epochs})
        return model, metrics

    def publish(self, model: UnimodalNet | ImportedModel, metadata: dict[str, Any]) -> str:
        """Save ``model`` as a new version and make it current; returns the version.

        An imported model is stored as its archive or weights with its spec (format, head,
        input spec); ``metadata`` should then hold its ``class_counts``.
        """
        from jacfusion_fed.models import model_spec

        if isinstance(model, ImportedModel):
            state = dict(model.loaded.state)
            spec = model.spec
        else:
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            spec = model_spec(model)
        version = self.store.save(state, spec, metadata)
        self.store.set_current(version)
        return version

    # --- serving -------------------------------------------------------------------------

    def current_version(self) -> str:
        version = self.store.current_version()
        if version is None:
            raise UnknownVersionError(f"owner of {self.modality!r} has no trained model yet")
        return version

    def load_model(self, version: str | None = None) -> tuple[str, UnimodalNet | ImportedModel]:
        version = version or self.current_version()
        with self._lock:
            if version not in self._models:
                if not self.store.exists(version):
                    raise UnknownVersionError(
                        f"model version {version!r} is not in the store of {self.modality!r}"
                    )
                state, spec, _meta = self.store.load(version)
                model: UnimodalNet | ImportedModel
                if spec.get("format") in IMPORT_FORMATS:
                    model = rebuild(spec, state)
                else:
                    model = build_from_spec(spec)
                    model.load_state_dict(state)
                model.eval()
                self._models[version] = model
            return version, self._models[version]

    def head(self, version: str | None = None, kind: HeadKind = "gram") -> Head:
        if kind not in ("gram", "full"):
            raise ValueError(f"head kind must be 'gram' or 'full', got {kind!r}")
        if kind == "full" and not self.allow_full_head:
            raise PermissionError(
                f"owner of {self.modality!r} shares only the Gram matrix (full head not allowed)"
            )
        version, model = self.load_model(version)
        weight = model.head.weight.detach().to(torch.float64)
        gram = gram_of(weight).numpy()
        full = kind == "full"
        return Head(
            version=version,
            num_classes=int(weight.shape[0]),
            feature_dim=int(weight.shape[1]),
            gram=gram,
            weight=weight.numpy() if full else None,
            bias=model.head.bias.detach().to(torch.float64).numpy() if full else None,
        )

    def _all_logits(self, version: str) -> _LogitTable:
        """Logits of every local record under ``version``: one (n, K) float64 matrix and the
        row of each pseudonym; computed once per version and kept in memory and in the store's
        logit cache (survives restarts)."""
        with self._lock:
            cached = self._logit_cache.get(version)
        if cached is not None:
            return cached
        if self.store.has_logits(version):
            ids, values = self.store.load_logits(version)
        else:
            _, model = self.load_model(version)
            ids, blocks = [], []
            for split, ds in self.records.items():
                ids.extend(self.pseudonyms(split))
                x, _ = ds.tensors(self.modality)
                blocks.append(predict_logits(model, x).to(torch.float64).numpy())
            values = np.concatenate(blocks)
            self.store.save_logits(version, ids, values)
        table = _LogitTable(
            {sid: i for i, sid in enumerate(ids)},
            np.ascontiguousarray(values, dtype=np.float64),
        )
        with self._lock:
            self._logit_cache[version] = table
        return table

    def _fresh_logits(self, pseudonyms: list[str], version: str) -> LogitAnswer:
        """Forward passes over just the requested records, bypassing every logit cache."""
        index = self._pseudonym_index()
        known = [sid for sid in pseudonyms if sid in index]
        unknown = [sid for sid in pseudonyms if sid not in index]
        _, model = self.load_model(version)
        values = np.zeros((len(known), self.num_classes))
        by_split: dict[str, tuple[list[int], list[int]]] = {}
        for pos, sid in enumerate(known):
            split, row = index[sid]
            positions, rows = by_split.setdefault(split, ([], []))
            positions.append(pos)
            rows.append(row)
        for split, (positions, rows) in by_split.items():
            x = self.records[split].modalities[self.modality][rows]
            values[positions] = predict_logits(model, x).to(torch.float64).numpy()
        return LogitAnswer(version, known, values, unknown)

    def logits(
        self, pseudonyms: list[str], version: str | None = None, *, cache: bool = True
    ) -> LogitAnswer:
        """K logits for each known pseudonym, in request order; unknown ones are listed.

        With ``cache=False`` the model runs on just the requested records every time (no
        in-memory or on-disk logit cache is read or written); for benchmarks and debugging.
        """
        version = version or self.current_version()
        if not self.store.exists(version):
            raise UnknownVersionError(
                f"model version {version!r} is not in the store of {self.modality!r}"
            )
        self.live.check_not_retired(pseudonyms)
        if len(self.live) and any(sid in self.live for sid in pseudonyms):
            return self._with_live(pseudonyms, version, cache)
        return self._source_logits(pseudonyms, version, cache)

    def _source_logits(self, pseudonyms: list[str], version: str, cache: bool) -> LogitAnswer:
        if self.source is None:
            k = self.num_classes
            return LogitAnswer(version, [], np.zeros((0, k)), list(pseudonyms))
        if not cache:
            return self._fresh_logits(pseudonyms, version)
        table = self._all_logits(version)
        index = table.index
        rows = [index.get(sid, -1) for sid in pseudonyms]
        if -1 not in rows:  # the common case: every id is held; one gather of the rows
            return LogitAnswer(version, list(pseudonyms), table.values[rows], [])
        known = [sid for sid, row in zip(pseudonyms, rows, strict=True) if row >= 0]
        unknown = [sid for sid, row in zip(pseudonyms, rows, strict=True) if row < 0]
        values = table.values[[row for row in rows if row >= 0]]
        return LogitAnswer(version, known, values, unknown)

    def _with_live(self, pseudonyms: list[str], version: str, cache: bool) -> LogitAnswer:
        """Live records first (they shadow the data source), then the data source."""
        _, model = self.load_model(version)

        def forward(x: np.ndarray) -> np.ndarray:
            out: np.ndarray = predict_logits(model, torch.from_numpy(x)).to(torch.float64).numpy()
            return out

        live = self.live.logits(pseudonyms, version, forward, cache=cache)
        rest = [sid for sid in pseudonyms if sid not in live]
        found = dict(live)
        if rest and self.source is not None:
            other = self._source_logits(rest, version, cache)
            found.update(zip(other.sample_ids, other.logits, strict=True))
        known = [sid for sid in pseudonyms if sid in found]
        unknown = [sid for sid in pseudonyms if sid not in found]
        k = self.num_classes
        rows = [found[sid] for sid in known]
        values = np.concatenate(rows).reshape(len(rows), k) if rows else np.zeros((0, k))
        return LogitAnswer(version, known, values, unknown)

    # --- detection (issue 20) -------------------------------------------------------------

    def fit_input_test(self, on_fit: Callable[[int], None] | None = None) -> tuple[bool, float]:
        """Fit the opt-in input test on this owner's training records and keep it in the
        workspace (:func:`~.detector.fit_workspace_input_test`: ``(fitted now, seconds)``,
        ``on_fit(n)`` before a fit; ValueError naming what is missing); the p-values
        memoized so far are dropped."""
        out = fit_workspace_input_test(self, on_fit)
        with self._lock:
            self._source_pvalues.clear()
        return out

    def detection_pvalues(self, sample_ids: list[str], version: str) -> np.ndarray | None:
        """The feature detector's conformal p-value (float64) of each of ``sample_ids`` (ids
        this owner holds, e.g. a :class:`LogitAnswer`'s), in order; None without a detector
        (no validation split, or a model that exposes no features). Data-source records are
        computed once per version; live records every time (they can be replaced)."""
        if workspace_detector(self, version) is None and workspace_input_test(self) is None:
            return None
        index = self._pseudonym_index()
        with self._lock:
            memo = self._source_pvalues.setdefault(version, {})
            if len(self._source_pvalues) > 2:  # keep the newest versions
                self._source_pvalues.pop(next(iter(self._source_pvalues)))
        live = (
            self.live.store.get_many([s for s in sample_ids if s in self.live])
            if len(self.live)
            else {}
        )
        todo, rows = [], []
        for pos, sid in enumerate(sample_ids):
            if sid in live:
                todo.append(pos)
                rows.append(np.asarray(live[sid]))
            elif sid in memo:
                continue
            elif sid in index:
                split, row = index[sid]
                todo.append(pos)
                rows.append(self.records[split].modalities[self.modality][row])
            else:  # erased or expired since its logits were read: no p-values this time
                return None
        fresh: dict[int, float] = {}
        if rows:
            _, model = self.load_model(version)
            x = torch.from_numpy(np.stack(rows).astype(np.float32, copy=False))
            values = pvalues_of_inputs(self, version, model, x)
            if values is None:
                return None
            fresh = dict(zip(todo, (float(v) for v in values), strict=True))
            with self._lock:
                for pos, v in fresh.items():
                    if sample_ids[pos] not in live:
                        memo[sample_ids[pos]] = v
        return np.array(
            [fresh[pos] if pos in fresh else memo[sid] for pos, sid in enumerate(sample_ids)],
            dtype=np.float64,
        )

    # --- robustness evaluation -----------------------------------------------------------

    def perturbed_logits(
        self,
        pseudonyms: list[str],
        perturbation: Corruption | AttackSpec,
        version: str | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> LogitAnswer:
        """K logits of the requested records after perturbing their inputs *here*.

        ``perturbation`` is a random corruption (Gaussian noise, missing entries, bias noise)
        or an l_inf attack (FGSM / PGD) computed against this owner's own network with its own
        labels (setting 1 of the paper). Neither the perturbed inputs nor the labels leave the
        owner: only the logits do. ``generator`` seeds the random draws.
        """
        version, model = self.load_model(version)
        index = self._pseudonym_index()
        known = [sid for sid in pseudonyms if sid in index]
        unknown = [sid for sid in pseudonyms if sid not in index]
        if not known:
            return LogitAnswer(version, [], np.zeros((0, self.num_classes)), unknown)
        xs, ys = [], []
        for sid in known:
            split, row = index[sid]
            xs.append(self.records[split].modalities[self.modality][row])
            ys.append(self.records[split].labels[row])
        x = torch.from_numpy(np.stack(xs).astype(np.float32, copy=False))
        y = torch.from_numpy(np.asarray(ys, dtype=np.int64))
        if isinstance(perturbation, AttackSpec):
            x = perturbation.build(model)(x, y, generator)
        else:
            x = perturbation(x, generator)
        values = predict_logits(model, x).to(torch.float64).numpy()
        return LogitAnswer(
            version, known, values, unknown, pvalues_of_inputs(self, version, model, x)
        )
