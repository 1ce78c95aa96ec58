"""The audit trail of a gRPC service: one server interceptor (:class:`AuditInterceptor`).

It runs after the authorisation interceptor (``rpc.serving.start_server(interceptors=...)``),
so every call it sees has an authenticated caller (:func:`jacfusion_fed.rpc.identity.caller`),
and writes one ``access`` entry per call of an audited method (:data:`AUDITED`): ids and
model versions from the request and the response, the caller's certificate CN, role and
fingerprint, the status code and the trace id. Calls that were refused before they reached
the servicer (``UNAUTHENTICATED``, ``PERMISSION_DENIED``) touched no data and are not logged.

Never served unrecorded: before the servicer runs, :meth:`AuditLog.check_writable` refuses
the call with ``UNAVAILABLE`` when the disk is (nearly) full; after it ran, the entry is
written *before* the response is returned, and a failed write answers ``UNAVAILABLE``
instead of the response. A server-streaming call writes its entry before its first message
(and a second one if the stream fails later).

Trace ids: :func:`set_trace_id_source` installs the function that reads a call's trace id
(OpenTelemetry's, once tracing is added); the default reads a W3C ``traceparent`` header.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from jacfusion_fed.rpc.identity import caller

from .events import Peer, access_fields
from .log import AuditLog, AuditUnavailable

__all__ = ["AUDITED", "AuditInterceptor", "MethodAudit", "set_trace_id_source"]

log = logging.getLogger(__name__)

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")


def _traceparent(context: grpc.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "traceparent" and isinstance(value, str):
            match = _TRACEPARENT.match(value.strip())
            if match and match.group(1) != "0" * 32:
                return match.group(1)
    return None


_trace_id_source: Callable[[grpc.ServicerContext], str | None] = _traceparent


def set_trace_id_source(source: Callable[[grpc.ServicerContext], str | None]) -> None:
    """Use ``source(context)`` for every entry's ``trace_id`` (the hook for OpenTelemetry:
    e.g. the current span's trace id as 32 hex digits)."""
    global _trace_id_source
    _trace_id_source = source


@functools.lru_cache(maxsize=512)
def _fingerprint(pem: bytes) -> str | None:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from .signing import certificate_fingerprint

    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None
    return certificate_fingerprint(cert.public_bytes(Encoding.DER))


def peer_of(context: grpc.ServicerContext) -> Peer:
    """The caller as the auth interceptor established it, with its certificate fingerprint."""
    principal = caller(context)
    pems = context.auth_context().get("x509_pem_cert") or []
    fingerprint = _fingerprint(bytes(pems[0])) if pems else None
    return Peer(principal.name, principal.role, principal.modality, fingerprint)


def _versions_of_predictions(response: Any) -> dict[str, str]:
    return {m.modality: m.model_version for m in response.predictions.modalities}


@dataclass(frozen=True)
class MethodAudit:
    """How to read one method's ids, versions and details (request/response -> fields)."""

    ids: Callable[[Any], Any] | None = None
    versions: Callable[[Any, str], Mapping[str, str]] | None = None
    detail: Callable[[Any, Any], Mapping[str, Any]] | None = None


def _own(response: Any, modality: str) -> dict[str, str]:
    return {modality or "model": response.model_version}


_MODALITY = "/jacfusion.v1.ModalityService/"
_FUSION = "/jacfusion.v1.FusionService/"
#: The audited methods: every call that touches patient data or a model.
AUDITED: Mapping[str, MethodAudit] = {
    _MODALITY + "GetLogits": MethodAudit(lambda r: r.sample_ids, _own),
    _MODALITY + "StreamLogits": MethodAudit(lambda r: r.sample_ids, _own),
    _MODALITY + "GetHead": MethodAudit(None, _own),
    _MODALITY + "PutRecords": MethodAudit(
        lambda r: r.sample_ids,
        _own,
        lambda q, a: {"stored": a.stored, "replaced": a.replaced, "unchanged": a.unchanged},
    ),
    _MODALITY + "DeleteRecords": MethodAudit(
        lambda r: r.sample_ids,
        None,
        lambda q, a: {"deleted": len(a.deleted_sample_ids), "unknown": len(a.unknown_sample_ids)},
    ),
    _FUSION + "Predict": MethodAudit(
        lambda r: r.sample_ids,
        lambda a, _m: _versions_of_predictions(a),
        lambda q, a: {"unpredicted": len(a.predictions.unpredicted_sample_ids)},
    ),
    _FUSION + "PredictStream": MethodAudit(
        lambda r: r.sample_ids, lambda a, _m: _versions_of_predictions(a)
    ),
}


class AuditInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Writes an ``access`` entry for every call of an audited method (module docstring).

    Args:
        audit: the service's log.
        modality: the owner's modality (names its model version); ``None`` for the
            coordinator, whose versions come per modality from the response.
        methods: what to audit (default :data:`AUDITED`).
    """

    def __init__(
        self,
        audit: AuditLog,
        *,
        modality: str | None = None,
        methods: Mapping[str, MethodAudit] = AUDITED,
    ) -> None:
        self.audit = audit
        self.modality = modality or ""
        self.methods = dict(methods)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        spec = self.methods.get(method)
        if handler is None or spec is None:
            return handler
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, spec, handler.unary_unary), **kwargs
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(method, spec, handler.unary_stream), **kwargs
            )
        return handler  # client-streaming methods carry no ids we audit

    # --- recording -------------------------------------------------------------------------

    def _record(
        self,
        method: str,
        spec: MethodAudit,
        request: Any,
        response: Any,
        context: grpc.ServicerContext,
        status: grpc.StatusCode,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        versions: Mapping[str, str] = {}
        detail: dict[str, Any] = dict(extra or {})
        if response is not None:
            if spec.versions is not None:
                versions = spec.versions(response, self.modality)
            if spec.detail is not None:
                detail.update(spec.detail(request, response))
        try:
            trace_id = _trace_id_source(context)
        except Exception:  # a broken trace hook must not fail the call
            log.exception("trace id source failed")
            trace_id = None
        self.audit.access(
            access_fields(
                method.rsplit("/", 1)[1],
                rpc=method,
                peer=peer_of(context),
                ids=spec.ids(request) if spec.ids is not None else (),
                model_versions=versions,
                status=status.name,
                trace_id=trace_id,
                detail=detail,
            )
        )

    def _refuse(self, context: grpc.ServicerContext, exc: AuditUnavailable) -> None:
        context.abort(
            grpc.StatusCode.UNAVAILABLE,
            f"the audit log cannot record this call, so it is not served: {exc}",
        )

    def _failed(
        self, method: str, spec: MethodAudit, request: Any, context: grpc.ServicerContext
    ) -> None:
        """Log a call that ended in an error (best effort: it served nothing)."""
        code = context.code() if callable(getattr(context, "code", None)) else None
        try:
            self._record(method, spec, request, None, context, code or grpc.StatusCode.UNKNOWN)
        except AuditUnavailable as exc:
            log.error("failed %s call not recorded: %s", method, exc)

    def _unary(
        self, method: str, spec: MethodAudit, inner: Callable[[Any, Any], Any]
    ) -> Callable[[Any, grpc.ServicerContext], Any]:
        def behavior(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                self.audit.check_writable()
            except AuditUnavailable as exc:
                self._refuse(context, exc)
            try:
                response = inner(request, context)
            except BaseException:
                self._failed(method, spec, request, context)
                raise
            code = context.code() or grpc.StatusCode.OK
            try:
                self._record(method, spec, request, response, context, code)
            except AuditUnavailable as exc:
                self._refuse(context, exc)
            return response

        return behavior

    def _stream(
        self, method: str, spec: MethodAudit, inner: Callable[[Any, Any], Iterator[Any]]
    ) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
        def behavior(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                self.audit.check_writable()
            except AuditUnavailable as exc:
                self._refuse(context, exc)
            sent = 0
            try:
                for response in inner(request, context):
                    if sent == 0:  # recorded before anything is served
                        try:
                            self._record(
                                method, spec, request, response, context, grpc.StatusCode.OK
                            )
                        except AuditUnavailable as exc:
                            self._refuse(context, exc)
                    sent += 1
                    yield response
            except BaseException:
                if sent == 0:
                    self._failed(method, spec, request, context)
                else:
                    code = context.code() or grpc.StatusCode.CANCELLED
                    try:
                        self._record(
                            method, spec, request, None, context, code, {"after_messages": sent}
                        )
                    except AuditUnavailable as exc:
                        log.error("failed %s stream end not recorded: %s", method, exc)
                raise

        return behavior
