"""The modality owner's ``jacfusion.v1.ModalityService`` (thin: every answer comes from
:class:`jacfusion_fed.owner.OwnerWorkspace`; no math here).

What crosses this service and nothing else: the modality name, the owner's name, the current
model version, K and H, class counts (and names), the head (Gram matrix W W^T by default; W and
b only when the owner allows it) and K logits per requested pseudonymous sample id, always
tagged with the model version that produced them.

Status codes:

* ``INVALID_ARGUMENT``: empty batch, a batch over the unary limit (use ``StreamLogits``), an
  unknown head kind, a sample id that is not a pseudonym (the message names its position,
  never its value: it may be a raw patient id), a ``PutRecords`` batch that does not fit the
  model's input spec (naming the record and the problem; nothing of the batch is stored).
  The status carries a ``google.rpc.BadRequest`` whose field violations name the field and
  the index (``sample_ids[3]``, ``inputs[2]``; :mod:`jacfusion_fed.rpc.status_details`).
* ``ALREADY_EXISTS``: ``PutRecords`` of an id stored with other content, without ``replace``.
* ``FAILED_PRECONDITION``: no trained model yet, or ``expected_model_version`` is set and is
  not the current version (the message names both); a pseudonym of a rotated-out key; a
  ``key_fingerprint`` that is not the owner's; ``DeleteRecords`` of a data-source record.
* ``PERMISSION_DENIED``: the full head was asked for and the owner shares only the Gram matrix.
* ``DATA_LOSS``: the owner's model store failed verification (the store never loads a
  damaged file).
* ``INTERNAL``: anything unexpected (details stay in the owner's log).

Who may call (the coordinator; requesters only ``PutRecords`` and ``DeleteRecords``) is
enforced by the server's :class:`jacfusion_fed.rpc.auth.AuthInterceptor`, see
:mod:`jacfusion_fed.clients.serve`.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

import grpc

from jacfusion_fed.owner import OwnerWorkspace, UnknownVersionError
from jacfusion_fed.owner.calibration import workspace_calibration
from jacfusion_fed.owner.input_spec import RecordError
from jacfusion_fed.owner.live import RetiredPseudonymError
from jacfusion_fed.privacy.pseudonyms import first_non_pseudonym
from jacfusion_fed.rpc.calibration_codec import encode_calibration
from jacfusion_fed.rpc.jacfusion.v1 import modality_pb2, modality_pb2_grpc
from jacfusion_fed.rpc.matrix import encode_matrix
from jacfusion_fed.rpc.status_details import FieldViolation, abort_with_violations
from jacfusion_fed.rpc.tensor import TensorDecodeError, decode_tensor
from jacfusion_fed.store import CorruptFileError
from jacfusion_fed.store.record_store import RecordConflictError

__all__ = [
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_PUT_RECORDS",
    "DEFAULT_MAX_STREAM_BATCH",
    "DEFAULT_STREAM_CHUNK",
    "ModalityServicer",
]

log = logging.getLogger(__name__)

#: Most ids one GetLogits call may carry (64-character ids: about 4.3 MB).
DEFAULT_MAX_BATCH = 65_536
#: Most ids one StreamLogits call may carry (about 34 MB of ids, under the 64 MiB limit).
DEFAULT_MAX_STREAM_BATCH = 524_288
#: Default samples per StreamLogits message.
DEFAULT_STREAM_CHUNK = 4_096
#: Most records one PutRecords or DeleteRecords call may carry.
DEFAULT_MAX_PUT_RECORDS = 4_096

_F = TypeVar("_F", bound=Callable[..., Any])


class _Abort(Exception):
    """A refused call; ``violations`` (field, description) become the ``INVALID_ARGUMENT``
    status's ``google.rpc.BadRequest`` details."""

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        violations: tuple[FieldViolation, ...] = (),
    ) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.violations = violations


def _fail(servicer: ModalityServicer, context: grpc.ServicerContext, exc: Exception) -> None:
    """Abort the RPC with the status code for ``exc`` (the one place that maps them)."""
    modality = servicer.modality
    if isinstance(exc, _Abort):
        if exc.violations and exc.code == grpc.StatusCode.INVALID_ARGUMENT:
            abort_with_violations(context, exc.details, exc.violations)
        context.abort(exc.code, exc.details)
    if isinstance(exc, (UnknownVersionError, RetiredPseudonymError)):
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
    if isinstance(exc, RecordError):  # the record's position in the batch, and its problem
        violation = (f"inputs[{exc.index}]", exc.problem)
        abort_with_violations(context, f"PutRecords: {exc}", [violation])
    if isinstance(exc, TensorDecodeError):
        abort_with_violations(context, f"PutRecords: {exc}", [("inputs", str(exc))])
    if isinstance(exc, RecordConflictError):
        context.abort(grpc.StatusCode.ALREADY_EXISTS, f"PutRecords: {exc}")
    if isinstance(exc, PermissionError):
        context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
    if isinstance(exc, CorruptFileError):
        log.error("model store of %r failed verification: %s", modality, exc)
        context.abort(
            grpc.StatusCode.DATA_LOSS,
            f"the model store of modality {modality!r} failed verification",
        )
    log.error("ModalityService call failed", exc_info=exc)
    context.abort(
        grpc.StatusCode.INTERNAL, f"internal error in the owner of {modality!r} (see its log)"
    )


def _rpc(fn: _F) -> _F:
    """Unary methods: translate the workspace's exceptions into status codes."""

    @functools.wraps(fn)
    def wrapper(self: ModalityServicer, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, request, context)
        except Exception as exc:
            _fail(self, context, exc)

    return cast(_F, wrapper)


def _stream_rpc(fn: _F) -> _F:
    """Server-streaming methods: the same translation, also for errors while iterating."""

    @functools.wraps(fn)
    def wrapper(
        self: ModalityServicer, request: Any, context: grpc.ServicerContext
    ) -> Iterator[Any]:
        try:
            yield from fn(self, request, context)
        except Exception as exc:
            _fail(self, context, exc)

    return cast(_F, wrapper)


class _CurrentVersion:
    """The workspace's current model version, re-read only when its pointer file changes.

    ``ModelStore`` replaces ``<root>/CURRENT`` by an atomic rename, so a new version always
    comes with a new inode; (inode, mtime, size) of the file is the cache key. Saves a read
    and a SHA-256 verification per call on the hot path.
    """

    def __init__(self, workspace: OwnerWorkspace) -> None:
        self._workspace = workspace
        self._path = workspace.store.root / "CURRENT"
        self._lock = threading.Lock()
        self._key: tuple[int, int, int, int] | None = None
        self._version = ""

    def get(self) -> str:
        try:
            st = os.stat(self._path)
            key = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
        except FileNotFoundError:
            key = None
        with self._lock:
            if key is not None and key == self._key:
                return self._version
        version = self._workspace.current_version()  # verified read; raises if none
        with self._lock:
            self._key, self._version = key, version
        return version


class ModalityServicer(modality_pb2_grpc.ModalityServiceServicer):
    """``ModalityService`` of one owner.

    Args:
        workspace: the owner's records and model store.
        owner_name: the owner's name (its certificate's common name).
        max_batch: most ids per ``GetLogits`` call.
        max_stream_batch: most ids per ``StreamLogits`` call.
        stream_chunk: default samples per ``StreamLogits`` message.
        use_logit_cache: answer from the workspace's per-version logit cache (default); with
            ``False`` the model runs on the requested records for every call (benchmarks).
        max_put_records: most records per ``PutRecords`` / ``DeleteRecords`` call.
    """

    def __init__(
        self,
        workspace: OwnerWorkspace,
        owner_name: str,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_stream_batch: int = DEFAULT_MAX_STREAM_BATCH,
        stream_chunk: int = DEFAULT_STREAM_CHUNK,
        use_logit_cache: bool = True,
        max_put_records: int = DEFAULT_MAX_PUT_RECORDS,
    ) -> None:
        if min(max_batch, max_stream_batch, stream_chunk, max_put_records) < 1:
            raise ValueError("batch limits and the stream chunk must be >= 1")
        self.workspace = workspace
        self.modality = workspace.modality
        self.owner_name = owner_name
        self.max_batch = max_batch
        self.max_stream_batch = max_stream_batch
        self.stream_chunk = stream_chunk
        self.use_logit_cache = use_logit_cache
        self.max_put_records = max_put_records
        self._current = _CurrentVersion(workspace)
        _ = workspace.live  # opens the live records: refuses a workspace of another key now

    # --- helpers ---------------------------------------------------------------------------

    def _version(self, expected: str) -> str:
        version = self._current.get()
        if expected and expected != version:
            raise _Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"modality {self.modality!r}: expected model version {expected}, the current "
                f"version is {version}",
            )
        return version

    def _check_ids(self, ids: Any, limit: int, method: str) -> list[str]:
        n = len(ids)
        bad_request = grpc.StatusCode.INVALID_ARGUMENT
        if n == 0:
            raise _Abort(
                bad_request,
                f"{method}: empty batch (no sample ids)",
                (("sample_ids", "empty: at least one sample id is needed"),),
            )
        if n > limit:
            hint = " (use StreamLogits for large batches)" if method == "GetLogits" else ""
            raise _Abort(
                bad_request,
                f"{method}: batch of {n} sample ids exceeds the limit of {limit}{hint}",
                (("sample_ids", f"{n} ids, at most {limit}{hint}"),),
            )
        out = list(ids)
        bad = first_non_pseudonym(out)
        if bad is not None:  # name the position only: the value may be a raw patient id
            raise _Abort(
                bad_request,
                f"{method}: sample id at position {bad} is not a pseudonym (HMAC-SHA256: 64 hex "
                "digits or 52 base32 characters); pseudonymize ids with the deployment key",
                ((f"sample_ids[{bad}]", "not a pseudonym (HMAC-SHA256 of the local id)"),),
            )
        if method in ("PutRecords", "DeleteRecords") and len(set(out)) != len(out):
            first: dict[str, int] = {}
            dup = next(i for i, sid in enumerate(out) if first.setdefault(sid, i) != i)
            raise _Abort(
                bad_request,
                f"{method}: sample id at position {dup} repeats an earlier one",
                ((f"sample_ids[{dup}]", f"repeats sample_ids[{first[out[dup]]}]"),),
            )
        return out

    def _check_key(self, fingerprint: str, method: str) -> None:
        if fingerprint and fingerprint != self.workspace.key_fingerprint:
            raise _Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{method}: the ids were made with the pseudonym key of fingerprint "
                f"{fingerprint}; this owner uses the key {self.workspace.key_fingerprint} "
                "(was the key rotated?)",
            )

    def _batch(self, ids: list[str], version: str) -> modality_pb2.LogitsBatch:
        answer = self.workspace.logits(ids, version=version, cache=self.use_logit_cache)
        if answer.version != version:  # the workspace tags what it computed; never mislabel
            raise RuntimeError(f"asked for version {version}, got logits of {answer.version}")
        # the detector's p-value per row (issue 20); nothing when the owner has no detector
        pvalues = self.workspace.detection_pvalues(answer.sample_ids, answer.version)
        return modality_pb2.LogitsBatch(
            sample_ids=answer.sample_ids,
            logits=encode_matrix(answer.logits),
            unknown_sample_ids=answer.unknown_ids,
            pvalues=[] if pvalues is None else [float(v) for v in pvalues],
        )

    # --- RPCs ------------------------------------------------------------------------------

    @_rpc
    def GetInfo(
        self, request: modality_pb2.GetInfoRequest, context: grpc.ServicerContext
    ) -> modality_pb2.GetInfoResponse:
        version = self._current.get()
        head = self.workspace.head(version)
        kinds = [modality_pb2.HEAD_KIND_GRAM]
        if self.workspace.allow_full_head:
            kinds.append(modality_pb2.HEAD_KIND_FULL)
        return modality_pb2.GetInfoResponse(
            modality=self.modality,
            owner=self.owner_name,
            model_version=version,
            num_classes=head.num_classes,
            feature_dim=head.feature_dim,
            class_counts=[int(c) for c in self.workspace.class_counts(version)],
            shareable_head_kinds=kinds,
            class_names=self.workspace.class_names(),
            key_fingerprint=self.workspace.key_fingerprint,
        )

    @_rpc
    def GetHead(
        self, request: modality_pb2.GetHeadRequest, context: grpc.ServicerContext
    ) -> modality_pb2.GetHeadResponse:
        if request.kind in (modality_pb2.HEAD_KIND_UNSPECIFIED, modality_pb2.HEAD_KIND_GRAM):
            kind = "gram"
        elif request.kind == modality_pb2.HEAD_KIND_FULL:
            kind = "full"
        else:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown head kind {request.kind}")
        version = self._version(request.expected_model_version)
        head = self.workspace.head(version, kind=kind)  # type: ignore[arg-type]
        response = modality_pb2.GetHeadResponse(
            model_version=head.version, num_classes=head.num_classes
        )
        if kind == "gram":
            response.gram.gram.CopyFrom(encode_matrix(head.gram))
        else:
            response.full.weight.CopyFrom(encode_matrix(head.weight))
            response.full.bias.CopyFrom(encode_matrix(head.bias))
        cal = workspace_calibration(self.workspace, head.version)  # for robust fusion
        if cal is not None:
            response.calibration.CopyFrom(encode_calibration(cal.to_arrays()))
        return response

    @_rpc
    def GetLogits(
        self, request: modality_pb2.GetLogitsRequest, context: grpc.ServicerContext
    ) -> modality_pb2.GetLogitsResponse:
        ids = self._check_ids(request.sample_ids, self.max_batch, "GetLogits")
        version = self._version(request.expected_model_version)
        return modality_pb2.GetLogitsResponse(
            model_version=version, batch=self._batch(ids, version)
        )

    @_stream_rpc
    def StreamLogits(
        self, request: modality_pb2.StreamLogitsRequest, context: grpc.ServicerContext
    ) -> Iterator[modality_pb2.StreamLogitsResponse]:
        ids = self._check_ids(request.sample_ids, self.max_stream_batch, "StreamLogits")
        version = self._version(request.expected_model_version)  # one version for all chunks
        chunk = int(request.chunk_size) or self.stream_chunk
        for start in range(0, len(ids), chunk):
            yield modality_pb2.StreamLogitsResponse(
                model_version=version, batch=self._batch(ids[start : start + chunk], version)
            )

    @_rpc
    def PutRecords(
        self, request: modality_pb2.PutRecordsRequest, context: grpc.ServicerContext
    ) -> modality_pb2.PutRecordsResponse:
        ids = self._check_ids(request.sample_ids, self.max_put_records, "PutRecords")
        self._check_key(request.key_fingerprint, "PutRecords")
        version = self._current.get()
        if not request.HasField("inputs"):
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "PutRecords: no inputs tensor",
                (("inputs", "missing"),),
            )
        x = decode_tensor(request.inputs)
        if x.shape[0] != len(ids):
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"PutRecords: {len(ids)} sample ids but the inputs' first axis is {x.shape[0]}",
                (("inputs", f"first axis {x.shape[0]}, expected {len(ids)} (one per sample id)"),),
            )
        try:
            result = self.workspace.put_records(ids, x, replace=request.replace)
        except ValueError as exc:
            if isinstance(exc, RecordError):
                raise
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"PutRecords: {exc}") from exc
        log.info(
            "PutRecords: %d new, %d replaced, %d unchanged",
            result.stored,
            result.replaced,
            result.unchanged,
        )
        return modality_pb2.PutRecordsResponse(
            stored=result.stored,
            replaced=result.replaced,
            unchanged=result.unchanged,
            model_version=version,
        )

    @_rpc
    def DeleteRecords(
        self, request: modality_pb2.DeleteRecordsRequest, context: grpc.ServicerContext
    ) -> modality_pb2.DeleteRecordsResponse:
        ids = self._check_ids(request.sample_ids, self.max_put_records, "DeleteRecords")
        self._check_key(request.key_fingerprint, "DeleteRecords")
        try:
            deleted, unknown = self.workspace.delete_records(ids)
        except PermissionError as exc:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, f"DeleteRecords: {exc}") from exc
        log.info("DeleteRecords: %d erased, %d unknown", len(deleted), len(unknown))
        return modality_pb2.DeleteRecordsResponse(
            deleted_sample_ids=deleted, unknown_sample_ids=unknown
        )
