"""The coordinator's online-inference core: owner connections, registered heads, the
concurrent fan-out for logits, and fusion (batched across concurrent requests by
:class:`~jacfusion_fed.server.batching.FusionBatcher`).

:class:`Coordinator` is transport-agnostic towards requesters (the gRPC face is
:mod:`jacfusion_fed.server.fusion_service`); towards owners it is a ``ModalityService`` client
over mTLS whose every handshake pins the owner's modality
(:func:`jacfusion_fed.rpc.auth.connect_owner`).

Heads
    What the coordinator knows per modality (owner name, model version, K, the Gram matrix
    W W^T, class counts) lives in a :class:`~jacfusion_fed.store.HeadRegistry` and reloads on
    restart without retraining or even reaching the owners. Each registered Gram matrix is
    factored once (:func:`jacfusion_fed.fusion.factor_gram`) and kept on the fusion device.

Model versions
    Every logit answer carries the version of the model that produced it. Logits are only ever
    fused with the head of that same version: when an owner answers with another version, the
    coordinator first fetches and registers that version's head (``GetHead`` with
    ``expected_model_version``); when this fails (for instance because the owner moved on once
    more) the modality counts as failed for this request, with status ``ABORTED`` in its
    contribution's ``error``.

Partial answers (never silent)
    Owners are called concurrently with a deadline (the per-owner timeout, capped by the
    request's own deadline). A modality that fails (unreachable, late, bad answer) is left out
    and its contribution says so (``error``, all ``used`` flags false); per sample, ``used``
    says which modalities' logits went into it. With ``require_all`` any failed modality fails
    the call with ``UNAVAILABLE`` instead.

Unknown ids
    An id is unknown when no answering selected owner holds it (with ``require_all``: when any
    selected owner lacks it). By default the whole call fails with ``NOT_FOUND`` naming them
    (``UNAVAILABLE`` instead when some owner did not answer, since that owner might hold them);
    with ``skip_unknown_ids`` the other samples are predicted and those ids are returned in
    ``unpredicted_sample_ids``.

Failures raise :class:`~jacfusion_fed.server.predict_types.PredictError`; its status codes
are listed in :mod:`jacfusion_fed.server.predict_types`.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc
import numpy as np
import torch

from jacfusion_fed.fusion import (
    FusionInputError,
    confidence_mean_fusion,
    factor_gram,
    jacobian_fusion,
    mean_fusion,
    statistical_fusion,
)
from jacfusion_fed.fusion._validation import check_gamma
from jacfusion_fed.privacy.pseudonyms import first_non_pseudonym
from jacfusion_fed.rpc.auth import AuthError, connect_owner, fetch_server_principal
from jacfusion_fed.rpc.jacfusion.v1 import modality_pb2, modality_pb2_grpc
from jacfusion_fed.rpc.matrix import MatrixDecodeError, decode_matrix
from jacfusion_fed.rpc.tls import Insecure, Security, TlsFiles, TransportOptions, create_channel
from jacfusion_fed.store import CorruptFileError, HeadRegistry

from .batching import FusionBatcher, _FusionKey
from .predict_types import (
    MAX_ABS_OWNER_VALUE,
    MAX_ID_LENGTH,
    MAX_OWNER_TIMEOUT_S,
    METHODS,
    OWNER_RECONNECT,
    Contribution,
    CoordinatorConfig,
    ModelInfo,
    OwnerEndpoint,
    PredictError,
    PredictOptions,
    PredictResult,
    RegisteredHead,
)

# The value types, limits and the batcher lived here before they moved to predict_types and
# batching; callers (and tests, for _FusionKey) still import them from this module.
__all__ = [
    "MAX_ABS_OWNER_VALUE",
    "MAX_ID_LENGTH",
    "MAX_OWNER_TIMEOUT_S",
    "METHODS",
    "OWNER_RECONNECT",
    "Contribution",
    "Coordinator",
    "CoordinatorConfig",
    "FusionBatcher",
    "ModelInfo",
    "OwnerEndpoint",
    "PredictError",
    "PredictOptions",
    "PredictResult",
    "RegisteredHead",
    "_FusionKey",
]

log = logging.getLogger(__name__)

#: Ids named in an error message (the rest are counted).
_LISTED_IDS: Final = 20
#: Time kept back from the request's deadline for fusion and the reply (at most a tenth of
#: the time left).
_DEADLINE_MARGIN_S: Final = 0.05
#: Owner failures whose code a failed request takes over when every selected owner failed
#: that way (fusion.proto); any other code of an owner (its own INTERNAL or UNKNOWN, a
#: RESOURCE_EXHAUSTED, ...) makes the request UNAVAILABLE, with the owner's status named in
#: the message, so that an owner's fault is never reported as the coordinator's.
_RELAYED = frozenset(
    {
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.ABORTED,
    }
)


# --- errors of one owner -----------------------------------------------------------------------


class _OwnerFailure(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def text(self) -> str:
        return f"{self.code.name}: {self.message}"


def _rpc_failure(modality: str, target: str, exc: grpc.RpcError) -> _OwnerFailure:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return _OwnerFailure(code, f"owner of {modality!r} at {target}: {details}")


def _list_ids(ids: Sequence[str]) -> str:
    shown = ", ".join(ids[:_LISTED_IDS])
    more = len(ids) - _LISTED_IDS
    return shown + (f" ... and {more} more" if more > 0 else "")


# --- owners -------------------------------------------------------------------------------------


class _Owner:
    """Connection and head of one configured modality."""

    def __init__(self, endpoint: OwnerEndpoint) -> None:
        self.endpoint = endpoint
        self.modality = endpoint.modality
        self.channel: grpc.Channel | None = None
        self.stub: Any = None
        self.head: RegisteredHead | None = None
        self.class_names: list[str] = []
        self.lock = threading.Lock()  # serialises registrations of this modality
        self.last_error = ""
        self.last_sync = 0.0


@dataclass
class _Plan:
    """A request's validated options."""

    method: str
    modalities: list[str]
    gammas: dict[str, float]
    regularize: set[str]
    iterations: int
    require_all: bool
    owner_timeout_s: float
    skip_unknown_ids: bool


@dataclass
class _Gathered:
    """Owner calls in flight for one batch."""

    ids: list[str]
    plan: _Plan
    calls: dict[str, list[tuple[int, int, Any]]]  # modality -> [(start, stop, future)]
    deadline: float
    index: dict[str, int] | None = None


@dataclass
class _Answer:
    modality: str
    head: RegisteredHead
    logits: np.ndarray  # (n, K), zero rows where not known
    known: np.ndarray | None  # (n,) bool; None when every id is known


class Coordinator:
    """Owner registry, fan-out and fusion (see the module docstring).

    Args:
        registry: the :class:`HeadRegistry` (or its directory) where heads persist.
        owners: the configured owners, one per modality.
        security: the coordinator's :class:`TlsFiles` (its client identity towards owners)
            or :data:`jacfusion_fed.rpc.tls.INSECURE`.
        config: defaults and limits.
        transport: message-size, keepalive and reconnect settings of the owner channels
            (default: :class:`TransportOptions` with :data:`OWNER_RECONNECT`).
    """

    def __init__(
        self,
        registry: HeadRegistry | str | Path,
        owners: Sequence[OwnerEndpoint],
        security: Security | str | Path,
        config: CoordinatorConfig | None = None,
        *,
        transport: TransportOptions | None = None,
    ) -> None:
        self.config = config or CoordinatorConfig()
        self.registry = registry if isinstance(registry, HeadRegistry) else HeadRegistry(registry)
        if not owners:
            raise ValueError("a coordinator needs at least one owner")
        names = [o.modality for o in owners]
        if len(set(names)) != len(names):
            raise ValueError(f"each modality needs exactly one owner endpoint, got {names}")
        if isinstance(security, (str, Path)):
            security = TlsFiles.from_dir(security)
        self.security: Security = security
        self.transport = transport or TransportOptions(extra=OWNER_RECONNECT)
        self.device = torch.device(
            self.config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        )
        self._owners = {o.modality: _Owner(o) for o in owners}
        self._pool = concurrent.futures.ThreadPoolExecutor(
            self.config.fanout_threads, thread_name_prefix="jacfusion-fanout"
        )
        self._state_lock = threading.Lock()
        self._log_prior: torch.Tensor | None = None
        self._prior = np.zeros(0)
        self._listeners: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._sync_thread: threading.Thread | None = None
        self.batcher = FusionBatcher(
            self._fuse, enabled=self.config.batch_fusion, max_rows=self.config.max_fusion_rows
        )
        self._load_registered()
        for owner in self._owners.values():
            self._connect(owner)

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def modalities(self) -> list[str]:
        """Configured modalities, in configuration order."""
        return list(self._owners)

    def head(self, modality: str) -> RegisteredHead | None:
        return self._owners[modality].head

    def has_heads(self) -> bool:
        return any(o.head is not None for o in self._owners.values())

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` whenever a head is (re)registered."""
        self._listeners.append(listener)

    def start_sync(self) -> None:
        """Background thread: register owners without a head, notice new model versions."""
        if self._sync_thread is None:
            self._sync_thread = threading.Thread(
                target=self._sync_loop, name="jacfusion-coordinator-sync", daemon=True
            )
            self._sync_thread.start()

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        for owner in self._owners.values():
            if owner.channel is not None:
                owner.channel.close()

    def _connect(self, owner: _Owner) -> None:
        target = owner.endpoint.target
        if isinstance(self.security, Insecure):
            owner.channel = create_channel(target, self.security, options=self.transport)
        else:
            # No handshake now (the owner may be down); every later handshake pins the
            # owner's modality through its certificate's DNS name.
            owner.channel = connect_owner(
                target, self.security, owner.modality, options=self.transport, verify_now=False
            )
        owner.stub = modality_pb2_grpc.ModalityServiceStub(owner.channel)

    def _load_registered(self) -> None:
        for modality, owner in self._owners.items():
            try:
                record = self.registry.get(modality)
            except KeyError:
                continue
            try:
                factor = factor_gram(record.gram_matrix(), f"Gram matrix of {modality!r}")
            except FusionInputError as exc:
                log.error("registered head of %r is unusable: %s", modality, exc)
                continue
            owner.head = RegisteredHead(record, factor.to(self.device))
            log.info("loaded head of %r, version %s", modality, record.model_version)
        self._update_prior()

    def _update_prior(self) -> None:
        heads = [o.head for o in self._owners.values() if o.head is not None]
        if not heads:
            with self._state_lock:
                self._prior, self._log_prior = np.zeros(0), None
            return
        counts = np.sum([np.asarray(h.record.class_counts, dtype=np.float64) for h in heads], 0)
        if (counts <= 0).any():
            log.warning("a class has no training samples; using add-one smoothing for the prior")
            counts = counts + 1.0
        prior = counts / counts.sum()
        with self._state_lock:
            self._prior = prior
            self._log_prior = torch.from_numpy(np.log(prior)).to(self.device)

    def _changed(self) -> None:
        self._update_prior()
        for listener in self._listeners:
            try:
                listener()
            except Exception:
                log.exception("head-change listener failed")

    # --- registration --------------------------------------------------------------------------

    def _identity(self, owner: _Owner, timeout: float) -> str | None:
        """The owner's name from its server certificate, after checking that it is the owner
        of the configured modality (``None`` without TLS); raises :class:`_OwnerFailure`."""
        if not isinstance(self.security, TlsFiles):
            return None
        modality, target = owner.modality, owner.endpoint.target
        try:
            principal = fetch_server_principal(target, self.security, timeout=timeout)
        except AuthError as exc:
            raise _OwnerFailure(exc.code, f"owner of {modality!r} at {target}: {exc}") from exc
        except (ssl.SSLError, OSError) as exc:
            raise _OwnerFailure(
                grpc.StatusCode.UNAVAILABLE,
                f"owner of {modality!r} at {target}: TLS handshake failed: {exc}",
            ) from exc
        if principal.role != "owner" or principal.modality != modality:
            raise _OwnerFailure(
                grpc.StatusCode.PERMISSION_DENIED,
                f"server at {target} is {principal.describe()}, expected the owner of "
                f"modality {modality!r}",
            )
        return principal.name

    def _register(self, owner: _Owner, version: str | None, timeout: float) -> RegisteredHead:
        """Fetch the owner's current head (of ``version`` when given) and register it."""
        modality, target = owner.modality, owner.endpoint.target
        name = self._identity(owner, timeout)
        try:
            info = owner.stub.GetInfo(modality_pb2.GetInfoRequest(), timeout=timeout)
            if info.modality != modality:
                raise _OwnerFailure(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"server at {target} serves modality {info.modality!r}, expected {modality!r}",
                )
            wanted, version = version, info.model_version
            head = owner.stub.GetHead(
                modality_pb2.GetHeadRequest(
                    kind=modality_pb2.HEAD_KIND_GRAM, expected_model_version=version
                ),
                timeout=timeout,
            )
        except grpc.RpcError as exc:
            failure = _rpc_failure(modality, target, exc)
            if failure.code == grpc.StatusCode.FAILED_PRECONDITION:
                failure.code = grpc.StatusCode.ABORTED  # the version moved on: retryable
            raise failure from exc
        k = int(info.num_classes)
        if head.model_version != version or head.WhichOneof("head") != "gram":
            raise _OwnerFailure(
                grpc.StatusCode.DATA_LOSS,
                f"owner of {modality!r} answered GetHead with version {head.model_version} / "
                f"kind {head.WhichOneof('head')}, expected the Gram matrix of {version}",
            )
        try:
            gram = decode_matrix(head.gram.gram, shape=(k, k), name=f"Gram matrix of {modality!r}")
            if gram.size and (largest := float(np.abs(gram).max())) > MAX_ABS_OWNER_VALUE:
                raise FusionInputError(
                    f"Gram matrix of {modality!r} has entries of magnitude up to {largest:.3g} "
                    f"(more than {MAX_ABS_OWNER_VALUE:g})"
                )
            factor = factor_gram(gram, f"Gram matrix of {modality!r}")
        except (MatrixDecodeError, FusionInputError) as exc:
            raise _OwnerFailure(grpc.StatusCode.DATA_LOSS, str(exc)) from exc
        for other in self._owners.values():
            if other is not owner and other.head is not None and other.head.num_classes != k:
                raise _OwnerFailure(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"K mismatch between owners: modality {modality!r} has K={k} classes but "
                    f"{other.modality!r} has K={other.head.num_classes}",
                )
        try:
            record = self.registry.register(
                modality,
                name or info.owner or f"{modality}-owner",
                version,
                class_counts=list(info.class_counts),
                gram=gram,
            )
        except ValueError as exc:
            raise _OwnerFailure(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"cannot register the head of {modality!r}: {exc}",
            ) from exc
        except CorruptFileError as exc:  # a damaged registry entry is never used
            raise _OwnerFailure(
                grpc.StatusCode.DATA_LOSS,
                f"cannot register the head of {modality!r}: the head registry is damaged: {exc}",
            ) from exc
        except OSError as exc:  # e.g. the disk is full: retried by the next request or sync
            raise _OwnerFailure(
                grpc.StatusCode.UNAVAILABLE,
                f"cannot record the head of {modality!r} in the head registry: {exc}",
            ) from exc
        registered = RegisteredHead(record, factor.to(self.device))
        owner.head = registered
        owner.class_names = list(info.class_names)
        owner.last_error = ""
        owner.last_sync = time.monotonic()
        log.info("registered head of %r: owner %r, version %s", modality, record.owner, version)
        self._changed()
        if wanted is not None and wanted != version:
            # The logits at hand came from a version the owner no longer serves; its current
            # head is registered now (for the next request), these logits are not fused.
            raise _OwnerFailure(
                grpc.StatusCode.ABORTED,
                f"owner of {modality!r} answered with model version {wanted} but its current "
                f"version is {version}; retry",
            )
        return registered

    def _refresh(self, owner: _Owner, version: str, timeout: float) -> RegisteredHead:
        with owner.lock:
            head = owner.head
            if head is not None and head.version == version:
                return head  # registered meanwhile by another request
            return self._register(owner, version, timeout)

    def sync(self, modality: str | None = None, timeout: float | None = None) -> dict[str, str]:
        """Register the current head of every (or one) owner whose version changed.

        Returns modality -> error text (empty when in sync).
        """
        timeout = timeout or self.config.registration_timeout_s
        out: dict[str, str] = {}
        for name, owner in self._owners.items():
            if modality is not None and name != modality:
                continue
            try:
                with owner.lock:
                    info = owner.stub.GetInfo(modality_pb2.GetInfoRequest(), timeout=timeout)
                    if owner.head is None or owner.head.version != info.model_version:
                        self._register(owner, None, timeout)
                    owner.last_sync = time.monotonic()
                    owner.last_error = ""
                out[name] = ""
            except grpc.RpcError as exc:
                failure = _rpc_failure(name, owner.endpoint.target, exc)
                if failure.code == grpc.StatusCode.UNAVAILABLE:
                    try:  # say so when the address is served by someone else
                        self._identity(owner, timeout)
                    except _OwnerFailure as found:
                        if found.code == grpc.StatusCode.PERMISSION_DENIED:
                            failure = found
                owner.last_error = failure.text
                out[name] = owner.last_error
            except _OwnerFailure as exc:
                owner.last_error = exc.text
                out[name] = exc.text
        return out

    def _sync_loop(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            for name, owner in self._owners.items():
                due = (
                    self.config.retry_interval_s
                    if owner.head is None or owner.last_error
                    else self.config.sync_interval_s
                )
                if now - owner.last_sync >= due:
                    previous = owner.last_error
                    try:
                        error = self.sync(name).get(name, "")
                    except Exception as exc:  # never let the sync thread die
                        log.exception("sync of owner %r failed", name)
                        error = owner.last_error = f"INTERNAL: sync failed: {exc!r}"
                    owner.last_sync = time.monotonic()
                    if error and error != previous:
                        log.warning("owner of %r: %s", name, error)
                    elif previous and not error:
                        log.info("owner of %r answers again", name)
            self._stop.wait(min(self.config.retry_interval_s, self.config.sync_interval_s, 1.0))

    # --- model info ----------------------------------------------------------------------------

    def model_info(self) -> ModelInfo:
        heads = [o.head.record for o in self._owners.values() if o.head is not None]
        names = next((o.class_names for o in self._owners.values() if o.class_names), [])
        with self._state_lock:
            prior = self._prior.copy()
        return ModelInfo(
            num_classes=heads[0].num_classes if heads else 0,
            class_prior=prior,
            class_names=list(names) if heads and len(names) == heads[0].num_classes else [],
            heads=heads,
            default_method=self.config.default_method,
        )

    # --- request validation ------------------------------------------------------------------

    def _plan(self, options: PredictOptions) -> _Plan:
        bad = grpc.StatusCode.INVALID_ARGUMENT
        cfg = self.config
        known = ", ".join(self._owners)
        selected = list(options.modalities) or list(self._owners)
        for name in selected:
            if name not in self._owners:
                raise PredictError(bad, f"unknown modality {name!r}; registered: {known}")
        if len(set(selected)) != len(selected):
            raise PredictError(bad, f"modalities lists a modality twice: {selected}")
        method = options.method or cfg.default_method
        if method not in METHODS:
            raise PredictError(
                bad, f"unknown fusion method {method!r}; expected one of {', '.join(METHODS)}"
            )
        jacobian_only = {
            "gammas": bool(options.gammas),
            "default_gamma": options.default_gamma is not None,
            "regularize": bool(options.regularize),
            "iterations": options.iterations is not None,
        }
        if method != "jacobian" and any(jacobian_only.values()):
            used = ", ".join(k for k, v in jacobian_only.items() if v)
            raise PredictError(bad, f"{used} only apply to the jacobian method, not {method!r}")
        try:
            default_gamma = check_gamma(
                cfg.default_gamma if options.default_gamma is None else options.default_gamma,
                "default_gamma",
            )
            gammas = {}
            for name, value in options.gammas.items():
                if name not in selected:
                    raise PredictError(
                        bad,
                        f"gamma given for {'unselected' if name in self._owners else 'unknown'} "
                        f"modality {name!r}; selected: {', '.join(selected)}",
                    )
                gammas[name] = check_gamma(value, f"gamma of modality {name!r}")
        except FusionInputError as exc:
            raise PredictError(bad, str(exc)) from exc
        for name in selected:
            gammas.setdefault(name, default_gamma)
        regularize = list(options.regularize) or selected
        for name in regularize:
            if name not in selected:
                raise PredictError(
                    bad,
                    f"regularize names {'unselected' if name in self._owners else 'unknown'} "
                    f"modality {name!r}; selected: {', '.join(selected)}",
                )
        if len(set(regularize)) != len(regularize):
            raise PredictError(bad, f"regularize lists a modality twice: {regularize}")
        iterations = cfg.default_iterations if options.iterations is None else options.iterations
        if not 1 <= iterations <= cfg.max_iterations:
            raise PredictError(
                bad, f"iterations must be in 1..{cfg.max_iterations}, got {iterations}"
            )
        timeout = (
            cfg.owner_timeout_s if options.owner_timeout_s is None else options.owner_timeout_s
        )
        if not (timeout > 0 and math.isfinite(timeout)):
            raise PredictError(bad, f"owner_timeout must be positive, got {timeout}")
        if timeout > MAX_OWNER_TIMEOUT_S:
            raise PredictError(
                bad, f"owner_timeout must be at most {MAX_OWNER_TIMEOUT_S:g} s, got {timeout:g} s"
            )
        return _Plan(
            method=method,
            modalities=selected,
            gammas=gammas,
            regularize=set(regularize),
            iterations=iterations,
            require_all=options.require_all,
            owner_timeout_s=timeout,
            skip_unknown_ids=options.skip_unknown_ids,
        )

    @staticmethod
    def _check_ids(ids: list[str], limit: int, what: str) -> dict[str, int]:
        bad = grpc.StatusCode.INVALID_ARGUMENT
        n = len(ids)
        if n == 0:
            raise PredictError(bad, "empty batch: no sample ids")
        if n > limit:
            hint = " (use PredictStream for large batches)" if what == "Predict" else ""
            raise PredictError(bad, f"batch of {n} sample ids exceeds the limit of {limit}{hint}")
        not_pseudonym = first_non_pseudonym(ids)  # before any message could echo a raw id
        if not_pseudonym is not None:
            raise PredictError(
                bad,
                f"sample id at position {not_pseudonym} is not a pseudonym (HMAC-SHA256: 64 hex "
                "digits or 52 base32 characters); pseudonymize ids with the deployment key",
            )
        index = dict(zip(ids, range(n), strict=True))
        if len(index) != n:
            seen: set[str] = set()
            dups = [s for s in ids if s in seen or seen.add(s)]  # type: ignore[func-returns-value]
            raise PredictError(bad, f"duplicate sample ids: {_list_ids(sorted(set(dups)))}")
        if "" in index:
            raise PredictError(bad, f"empty sample id at position {index['']}")
        longest = max(map(len, ids))
        if longest > MAX_ID_LENGTH:
            raise PredictError(
                bad,
                f"sample ids must be pseudonyms of at most {MAX_ID_LENGTH} characters; "
                f"got one of {longest}",
            )
        return index

    # --- prediction ------------------------------------------------------------------------------

    def predict(
        self, ids: Sequence[str], options: PredictOptions | None = None, *,
        deadline: float | None = None,
    ) -> PredictResult:  # fmt: skip
        """Fuse the owners' logits for ``ids``.

        Args:
            ids: pseudonymous sample ids.
            options: request options.
            deadline: absolute ``time.monotonic()`` by which the answer is due (the gRPC
                call's deadline); owner calls never outlast it.

        Raises:
            PredictError: with the status code and message to return.
        """
        ids = list(ids)
        plan = self._plan(options or PredictOptions())
        index = self._check_ids(ids, self.config.max_batch, "Predict")
        gathered = self._gather(ids, plan, deadline)
        gathered.index = index
        return self._finish(gathered)

    def predict_stream(
        self, ids: Sequence[str], options: PredictOptions | None = None, *,
        chunk_size: int = 0, deadline: float | None = None,
    ) -> Iterator[PredictResult]:  # fmt: skip
        """:meth:`predict` in chunks of ``chunk_size`` ids (0: the configured default).

        All ids and options are validated before the first chunk; the owners of chunk i+1 are
        asked while chunk i is fused. Unknown ids fail the stream at the chunk that holds them
        (earlier chunks have been delivered by then) unless ``skip_unknown_ids``.
        """
        ids = list(ids)
        plan = self._plan(options or PredictOptions())
        self._check_ids(ids, self.config.max_stream_batch, "PredictStream")
        chunk = chunk_size or self.config.stream_chunk
        chunk = min(chunk, self.config.max_batch)
        starts = list(range(0, len(ids), chunk))
        pending = self._gather(ids[:chunk], plan, deadline, inline=False)
        for i, _start in enumerate(starts):
            current = pending
            if i + 1 < len(starts):
                nxt = starts[i + 1]
                pending = self._gather(ids[nxt : nxt + chunk], plan, deadline, inline=False)
            yield self._finish(current)

    def _owner_timeout(self, plan: _Plan, deadline: float | None) -> tuple[float, float]:
        """(seconds for the owner calls, absolute deadline)."""
        now = time.monotonic()
        timeout = plan.owner_timeout_s
        if deadline is not None:
            left = deadline - now
            left -= min(_DEADLINE_MARGIN_S, 0.1 * left)
            if left <= 0:
                raise PredictError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    "the request's deadline leaves no time to ask the owners",
                )
            timeout = min(timeout, left)
        return timeout, now + timeout

    def _gather(
        self, ids: list[str], plan: _Plan, deadline: float | None, *, inline: bool = True
    ) -> _Gathered:
        """Ask every selected owner for the logits of ``ids``, concurrently.

        The calls run on the fan-out pool as blocking unary calls (grpc's ``.future()`` starts
        a channel thread per call when none is in flight, which costs more than a pool hand-off).
        With ``inline`` the last call runs on the caller's thread meanwhile, so a lone owner
        costs one round trip and no hand-off at all.
        """
        timeout, until = self._owner_timeout(plan, deadline)
        step = self.config.owner_chunk
        if len(ids) <= step:
            requests = [(0, len(ids), modality_pb2.GetLogitsRequest(sample_ids=ids))]
        else:
            requests = [
                (
                    s,
                    min(s + step, len(ids)),
                    modality_pb2.GetLogitsRequest(sample_ids=ids[s : s + step]),
                )
                for s in range(0, len(ids), step)
            ]
        jobs = [
            (name, start, stop, self._owners[name].stub.GetLogits, req)
            for name in plan.modalities
            for start, stop, req in requests
        ]
        calls: dict[str, list[tuple[int, int, Any]]] = {name: [] for name in plan.modalities}
        last = jobs.pop() if inline else None
        for name, start, stop, method, req in jobs:
            calls[name].append((start, stop, self._pool.submit(method, req, timeout=timeout)))
        if last is not None:
            name, start, stop, method, req = last
            done: concurrent.futures.Future[Any] = concurrent.futures.Future()
            try:
                done.set_result(method(req, timeout=timeout))
            except Exception as exc:
                done.set_exception(exc)
            calls[name].append((start, stop, done))
        return _Gathered(ids, plan, calls, until)

    def _collect(self, gathered: _Gathered, name: str) -> _Answer:
        """Wait for one modality's answers and check them; raises :class:`_OwnerFailure`."""
        owner = self._owners[name]
        target = owner.endpoint.target
        ids = gathered.ids
        responses = []
        for start, stop, future in gathered.calls[name]:
            try:
                responses.append((start, stop, future.result()))
            except grpc.RpcError as exc:
                for _s, _e, other in gathered.calls[name]:
                    other.cancel()  # not started yet: no need to ask any more
                raise _rpc_failure(name, target, exc) from exc
            except Exception as exc:  # e.g. the pool or channel shut down
                raise _OwnerFailure(
                    grpc.StatusCode.UNAVAILABLE, f"owner of {name!r} at {target}: {exc!r}"
                ) from exc
        version = responses[0][2].model_version
        if any(resp.model_version != version for _s, _e, resp in responses):
            versions = sorted({resp.model_version for _s, _e, resp in responses})
            raise _OwnerFailure(
                grpc.StatusCode.ABORTED,
                f"owner of {name!r} changed its model version during the request "
                f"({', '.join(versions)}); retry",
            )
        head = owner.head
        if head is None or head.version != version:
            timeout = max(gathered.deadline - time.monotonic(), 0.0) or 0.001
            head = self._refresh(owner, version, min(timeout, self.config.registration_timeout_s))
        k = head.num_classes
        n = len(ids)
        if len(responses) == 1:
            batch = responses[0][2].batch
            if (
                len(batch.sample_ids) == n
                and not batch.unknown_sample_ids
                and list(batch.sample_ids) == ids
            ):
                # The common case: one call, every id known, in request order (a reply that
                # also lists ids as unknown contradicts itself: checked below).
                return _Answer(name, head, self._logits_of(name, batch, n, k, version), None)
        logits = np.zeros((n, k))
        known = np.zeros(n, dtype=bool)
        for start, stop, resp in responses:
            batch = resp.batch
            rows_known = len(batch.sample_ids)
            if rows_known + len(batch.unknown_sample_ids) != stop - start:
                raise _OwnerFailure(
                    grpc.StatusCode.DATA_LOSS,
                    f"owner of {name!r} accounted for {rows_known + len(batch.unknown_sample_ids)}"
                    f" sample ids, {stop - start} were requested",
                )
            if not rows_known:
                continue
            values = self._logits_of(name, batch, rows_known, k, version)
            if rows_known == stop - start and list(batch.sample_ids) == ids[start:stop]:
                logits[start:stop] = values
                known[start:stop] = True
                continue
            if gathered.index is None:
                gathered.index = dict(zip(ids, range(n), strict=True))
            index = gathered.index
            try:
                rows = np.fromiter((index[s] for s in batch.sample_ids), np.int64, rows_known)
            except KeyError as exc:
                raise _OwnerFailure(
                    grpc.StatusCode.DATA_LOSS,
                    f"owner of {name!r} sent logits for sample id {exc.args[0]!r}, which was "
                    "not requested",
                ) from exc
            if rows.min() < start or rows.max() >= stop or np.unique(rows).size != rows_known:
                raise _OwnerFailure(
                    grpc.StatusCode.DATA_LOSS,
                    f"owner of {name!r} sent logits for ids outside its request or twice",
                )
            logits[rows] = values
            known[rows] = True
        return _Answer(name, head, logits, None if known.all() else known)

    @staticmethod
    def _logits_of(name: str, batch: Any, rows: int, k: int, version: str) -> np.ndarray:
        """The (rows, K) logits of a ``LogitsBatch``: right shape, all finite."""
        matrix = batch.logits
        if matrix.cols != k:
            raise _OwnerFailure(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"K mismatch: owner of {name!r} sent {matrix.cols} logits per sample, but its "
                f"registered head (version {version}) has K={k}",
            )
        try:
            values = decode_matrix(matrix, shape=(rows, k), name=f"logits of {name!r}")
        except MatrixDecodeError as exc:
            # Only a matrix of the right shape and size can be read to name the bad rows
            # (np.frombuffer itself fails on a size that is not a multiple of 8 bytes).
            if matrix.rows != rows or len(matrix.data) != rows * k * 8:
                raise _OwnerFailure(grpc.StatusCode.DATA_LOSS, str(exc)) from exc
            values = np.frombuffer(matrix.data, dtype="<f8")
            finite = np.isfinite(values.reshape(rows, k)).all(axis=1)
            bad = [batch.sample_ids[i] for i in np.flatnonzero(~finite)]
            raise _OwnerFailure(
                grpc.StatusCode.DATA_LOSS,
                f"owner of {name!r} sent non-finite logits (NaN or Inf) for {len(bad)} "
                f"sample(s): {_list_ids(bad)}",
            ) from exc
        if values.size and (largest := float(np.abs(values).max())) > MAX_ABS_OWNER_VALUE:
            out = np.abs(values).max(axis=1) > MAX_ABS_OWNER_VALUE
            bad = [batch.sample_ids[i] for i in np.flatnonzero(out)]
            raise _OwnerFailure(
                grpc.StatusCode.DATA_LOSS,
                f"owner of {name!r} sent logits of magnitude up to {largest:.3g} (more than "
                f"{MAX_ABS_OWNER_VALUE:g}) for {len(bad)} sample(s): {_list_ids(bad)}",
            )
        return values

    def _finish(self, gathered: _Gathered) -> PredictResult:
        plan = gathered.plan
        ids = gathered.ids
        answers: dict[str, _Answer] = {}
        failures: dict[str, _OwnerFailure] = {}
        for name in plan.modalities:
            try:
                answers[name] = self._collect(gathered, name)
            except _OwnerFailure as exc:
                failures[name] = exc
                self._owners[name].last_error = exc.text
        if failures and (plan.require_all or not answers):
            codes = {f.code for f in failures.values()}
            relayed = len(codes) == 1 and codes <= _RELAYED
            code = codes.pop() if relayed else grpc.StatusCode.UNAVAILABLE
            what = "require_all is set and" if answers else "no selected owner answered:"
            raise PredictError(
                code,
                f"{what} {len(failures)} of {len(plan.modalities)} selected modalities failed: "
                + "; ".join(f.text for f in failures.values()),
            )
        ok = [m for m in plan.modalities if m in answers]
        heads = {m: answers[m].head for m in ok}
        ks = {h.num_classes for h in heads.values()}
        if len(ks) > 1:
            raise PredictError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "K mismatch between owners: "
                + ", ".join(f"{m!r} has K={heads[m].num_classes}" for m in ok),
            )
        k = ks.pop()
        n = len(ids)
        unpredicted: list[str] = []
        if all(answers[m].known is None for m in ok):
            # The common case: every answering modality holds every sample.
            probs = self._fuse_group(plan, ok, heads, [answers[m].logits for m in ok])
            everywhere = np.ones(n, dtype=bool)
            used = {m: everywhere for m in ok}
            sample_ids = ids
        else:
            everywhere = np.ones(n, dtype=bool)
            masks = np.stack(
                [known if (known := answers[m].known) is not None else everywhere for m in ok]
            )  # (M_ok, n)
            predicted = masks.all(axis=0) if plan.require_all else masks.any(axis=0)
            if not predicted.all():
                unpredicted = [ids[i] for i in np.flatnonzero(~predicted)]
                if not plan.skip_unknown_ids:
                    held = (
                        "held by every selected owner" if plan.require_all else "held by any owner"
                    )
                    if failures:
                        raise PredictError(
                            grpc.StatusCode.UNAVAILABLE,
                            f"{len(unpredicted)} sample id(s) not {held} that answered, and "
                            f"{', '.join(failures)} did not answer ("
                            + "; ".join(f.text for f in failures.values())
                            + f"): {_list_ids(unpredicted)}",
                        )
                    raise PredictError(
                        grpc.StatusCode.NOT_FOUND,
                        f"{len(unpredicted)} unknown sample id(s), not {held}: "
                        f"{_list_ids(unpredicted)}",
                    )
            rows = np.flatnonzero(predicted)
            masks = masks[:, rows]
            probs = np.empty((rows.size, k))
            # Fuse each group of samples with the same set of modalities on its own.
            patterns = np.zeros(rows.size, dtype=np.int64)
            for j in range(len(ok)):
                patterns |= masks[j].astype(np.int64) << j
            for pattern in np.unique(patterns):
                members = [m for j, m in enumerate(ok) if pattern >> j & 1]
                sel = np.flatnonzero(patterns == pattern)
                src = rows[sel]
                probs[sel] = self._fuse_group(
                    plan, members, heads, [answers[m].logits[src] for m in members]
                )
            used = {m: masks[j] for j, m in enumerate(ok)}
            sample_ids = [ids[i] for i in rows]
        labels = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=np.int64)
        contributions = []
        jac = plan.method == "jacobian"
        for m in plan.modalities:
            if m in answers:
                head = answers[m].head
                contributions.append(
                    Contribution(
                        m, head.record.owner, head.version, used[m],
                        gamma=plan.gammas[m] if jac else 0.0,
                        regularized=jac and m in plan.regularize and bool(used[m].any()),
                    )
                )  # fmt: skip
            else:
                known_head = self._owners[m].head
                contributions.append(
                    Contribution(
                        m,
                        known_head.record.owner if known_head else "",
                        known_head.version if known_head else "",
                        np.zeros(len(probs), dtype=bool),
                        gamma=plan.gammas[m] if jac else 0.0,
                        error=failures[m].text,
                    )
                )
        return PredictResult(sample_ids, probs, labels, contributions, unpredicted, plan.method)

    def _fuse_group(
        self, plan: _Plan, members: list[str], heads: Mapping[str, RegisteredHead],
        logits: list[np.ndarray],
    ) -> np.ndarray:  # fmt: skip
        jac = plan.method == "jacobian"
        regularize = tuple(j for j, m in enumerate(members) if jac and m in plan.regularize)
        key = _FusionKey(
            method=plan.method,
            modalities=tuple(members),
            versions=tuple(heads[m].version for m in members),
            gammas=tuple(plan.gammas[m] for m in members) if jac else (),
            regularize=regularize,
            iterations=plan.iterations if jac else 0,
        )
        factors = [heads[m].factor if j in regularize else None for j, m in enumerate(members)]
        try:
            probs = self.batcher.run(key, logits, factors)
        except FusionInputError as exc:
            raise PredictError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        if not np.isfinite(probs).all():
            # Never answer with NaN: the inputs are beyond float64's range for this fusion
            # (e.g. a tiny gamma with a large Gram matrix).
            bad = int((~np.isfinite(probs).all(axis=1)).sum())
            gammas = ", ".join(f"{m}={plan.gammas[m]:g}" for m in members) if jac else "-"
            raise PredictError(
                grpc.StatusCode.DATA_LOSS,
                f"{plan.method} fusion of {', '.join(members)} is not finite in float64 for "
                f"{bad} sample(s) (gammas {gammas}): the owners' logits or Gram matrices are "
                "too large for these settings (a larger gamma may help)",
            )
        return probs

    def _fuse(self, key: _FusionKey, logits: list[np.ndarray], factors: Any) -> np.ndarray:
        """One fusion call on the fusion device (the batcher's ``compute``)."""
        zs = [torch.from_numpy(np.ascontiguousarray(z)).to(self.device) for z in logits]
        with self._state_lock:
            log_prior = self._log_prior
        with torch.inference_mode():
            if key.method == "statistical":
                probs = statistical_fusion(zs, log_prior)
            elif key.method == "mean":
                probs = mean_fusion(zs)
            elif key.method == "confidence_mean":
                probs = confidence_mean_fusion(zs)
            else:
                probs = jacobian_fusion(
                    zs, factors, log_prior, gamma=list(key.gammas),
                    regularize=list(key.regularize), iterations=key.iterations,
                )  # fmt: skip
        out: np.ndarray = probs.to(torch.float64).cpu().numpy()
        return out
