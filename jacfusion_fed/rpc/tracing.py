"""OpenTelemetry traces across the parties: requester -> coordinator -> owners.

A ``Predict`` is one trace: the requester's client span (``jacfusion.v1.FusionService/Predict``,
:func:`client_call`), the coordinator's server span, its steps ``plan``, ``gather`` (with one
client span per owner ``GetLogits``, :func:`traced_call`), ``group``, ``fuse`` and
``finish`` (:func:`span`), and each owner's ``GetLogits`` server span. The context crosses
processes as the W3C ``traceparent`` gRPC metadata (OpenTelemetry's global propagator).

Configuration (:func:`configure`, called by ``owner serve``, ``coordinator serve`` and
``predict``):

* the standard ``OTEL_*`` environment variables: spans go to an OTLP exporter when
  ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT``) is set, or
  ``OTEL_TRACES_EXPORTER`` names ``otlp`` or ``console``; the exporter reads its own variables
  (endpoint, headers, certificate, protocol ``grpc``); ``OTEL_SERVICE_NAME``,
  ``OTEL_RESOURCE_ATTRIBUTES`` and ``OTEL_TRACES_SAMPLER`` apply; ``OTEL_SDK_DISABLED=true``
  turns all of it off;
* ``--trace-file PATH``: every span is appended to PATH as OTLP JSON lines (one
  ``{"resourceSpans": [...]}`` object a line, the OTLP/JSON encoding of
  ``opentelemetry-exporter-otlp-json-file``), written when the span ends: for offline sites
  and tests.

With neither, nothing of OpenTelemetry is imported and every hook here is a no-op (one
check per call). A program that set up the OpenTelemetry SDK itself (a global tracer
provider) gets the spans too: the hooks follow the global provider.

Why our own interceptor rather than ``opentelemetry-instrumentation-grpc``: its server
interceptor wraps the ``ServicerContext`` that our guard, authorisation and audit
interceptors and the servicers use, and records no error status for calls ended with
``abort_with_status`` (every call carrying rich error details, :mod:`status_details`); its
client interceptor follows the calling thread's context, while the coordinator's owner calls
run on a thread pool (the parent ``gather`` span is handed over explicitly here). The wire
format (W3C trace context in the metadata) is the same, so traces join with services that use
the instrumentation.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Final

import grpc

__all__ = [
    "TRACER_NAME",
    "TracingInterceptor",
    "client_call",
    "configure",
    "enabled",
    "env_requests_export",
    "shutdown",
    "span",
    "traced_call",
]

log = logging.getLogger(__name__)

TRACER_NAME: Final = "jacfusion_fed"
#: Calls never traced: health checks and reflection (polled, no patient data).
_UNTRACED: Final = ("/grpc.health.v1.Health/", "/grpc.reflection.")

_provider: Any = None  # the SDK TracerProvider that configure() installed


def env_requests_export(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the ``OTEL_*`` variables ask for exported spans (see the module docstring)."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters:
        return any(e.strip() not in ("", "none") for e in exporters.split(","))
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def _exporters(environ: Mapping[str, str]) -> list[Any]:
    names = [e.strip() for e in environ.get("OTEL_TRACES_EXPORTER", "otlp").lower().split(",")]
    out: list[Any] = []
    for name in names:
        if name in ("", "none"):
            continue
        if name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            out.append(ConsoleSpanExporter())
        elif name == "otlp":
            protocol = environ.get(
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            )
            if protocol not in (None, "", "grpc"):
                raise ValueError(
                    f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol}: only grpc is installed "
                    "(or write spans with --trace-file)"
                )
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            out.append(OTLPSpanExporter())
        else:
            raise ValueError(f"OTEL_TRACES_EXPORTER={name}: expected otlp, console or none")
    return out


def configure(
    service: str, trace_file: Path | None = None, *, environ: Mapping[str, str] | None = None
) -> bool:
    """Install the SDK's tracer provider for ``service`` when the environment or
    ``trace_file`` asks for spans; returns whether tracing is on.

    ``OTEL_SERVICE_NAME`` overrides ``service``. Raises ``ValueError`` for an exporter the
    environment names that is not available.
    """
    global _provider
    env = os.environ if environ is None else environ
    export = env_requests_export(env)
    if trace_file is None and not export:
        return False
    exporters = _exporters(env) if export else []  # a bad setting fails before any change
    from opentelemetry import trace
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    attributes = {} if env.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service}
    provider = TracerProvider(resource=Resource.create(attributes))
    if trace_file is not None:
        from opentelemetry.exporter.otlp.json.file import FileSpanExporter

        trace_file.parent.mkdir(parents=True, exist_ok=True)
        # Written as each span ends: a service stopped by a signal loses nothing.
        provider.add_span_processor(SimpleSpanProcessor(FileSpanExporter(trace_file)))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _provider = provider
    return True


def shutdown() -> None:
    """Flush and stop the provider :func:`configure` installed (before a service exits)."""
    global _provider
    if _provider is not None:
        try:
            _provider.shutdown()
        except Exception:  # never fail a stop for a trace exporter
            log.debug("tracing shutdown failed", exc_info=True)
        _provider = None


def enabled() -> bool:
    """Whether spans are recorded: :func:`configure` installed a provider, or the program set
    a global one itself. False without importing OpenTelemetry when it was never imported."""
    if _provider is not None:
        return True
    api = sys.modules.get("opentelemetry.trace")
    if api is None:
        return False
    return not isinstance(api.get_tracer_provider(), api.ProxyTracerProvider)


def _tracer() -> Any:
    from opentelemetry import trace

    return trace.get_tracer(TRACER_NAME)


def span(name: str, attributes: Mapping[str, Any] | None = None) -> AbstractContextManager[Any]:
    """An internal span around a step (the current span's child); a no-op when tracing is
    off."""
    if not enabled():
        return nullcontext()
    manager: AbstractContextManager[Any] = _tracer().start_as_current_span(
        name, attributes=dict(attributes or {})
    )
    return manager


def _rpc_attributes(method: str) -> dict[str, Any]:
    service, _, name = method.strip("/").rpartition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


def _end_status(span_: Any, code: grpc.StatusCode | None, details: str | None) -> None:
    from opentelemetry.trace import Status, StatusCode

    if code is None:
        return
    span_.set_attribute("rpc.grpc.status_code", code.value[0])
    if code != grpc.StatusCode.OK:
        span_.set_status(Status(StatusCode.ERROR, f"{code.name}: {details or ''}"))


@contextmanager
def _client_span(
    method: str, attributes: Mapping[str, Any], parent: Any = None
) -> Iterator[tuple[tuple[str, str], ...]]:
    from opentelemetry import propagate, trace

    with _tracer().start_as_current_span(
        method,
        context=parent,
        kind=trace.SpanKind.CLIENT,
        attributes={**_rpc_attributes(method), **attributes},
        record_exception=False,
        set_status_on_exception=False,
    ) as current:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        try:
            yield tuple(carrier.items())
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
            _end_status(current, code, exc.details() if hasattr(exc, "details") else str(exc))
            raise
        _end_status(current, grpc.StatusCode.OK, None)


def client_call(
    method: str, attributes: Mapping[str, Any] | None = None
) -> AbstractContextManager[tuple[tuple[str, str], ...] | None]:
    """A client span around one call of ``method`` (``/pkg.Service/Method`` or
    ``pkg.Service/Method``); yields the metadata that carries the trace context (pass it as
    the call's ``metadata``), or ``None`` when tracing is off."""
    if not enabled():
        return nullcontext()
    return _client_span(method.lstrip("/"), attributes or {})


def traced_call(
    call: Callable[..., Any], method: str, attributes: Mapping[str, Any] | None = None
) -> Callable[..., Any]:
    """``call`` (a unary multi-callable, ``call(request, timeout=...)``) in a client span
    whose parent is the span current *now*, whatever thread later runs it (the coordinator's
    fan-out pool); ``call`` itself when tracing is off."""
    if not enabled():
        return call
    from opentelemetry import context

    parent = context.get_current()
    attrs = dict(attributes or {})

    def traced(request: Any, **kwargs: Any) -> Any:
        with _client_span(method.lstrip("/"), attrs, parent) as metadata:
            return call(request, metadata=metadata, **kwargs)

    return traced


class TracingInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """A server span per call (not for health checks and reflection), child of the caller's
    span when its metadata carries a trace context; status code and error on the span.

    :func:`~jacfusion_fed.rpc.serving.start_server` puts it first, so calls refused by the
    guard or the authorisation interceptor are traced too. A no-op while tracing is off.
    """

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(_UNTRACED) or not enabled():
            return handler
        carrier = {k: v for k, v in handler_call_details.invocation_metadata or () if k}
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, carrier, handler.unary_unary), **kwargs
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(method, carrier, handler.stream_unary), **kwargs
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(method, carrier, handler.unary_stream), **kwargs
            )
        return grpc.stream_stream_rpc_method_handler(
            self._streaming(method, carrier, handler.stream_stream), **kwargs
        )

    @staticmethod
    @contextmanager
    def _server_span(
        method: str, carrier: Mapping[str, str], context: grpc.ServicerContext
    ) -> Iterator[None]:
        from opentelemetry import propagate, trace

        with _tracer().start_as_current_span(
            method.lstrip("/"),
            context=propagate.extract(dict(carrier)),
            kind=trace.SpanKind.SERVER,
            attributes=_rpc_attributes(method),
            record_exception=False,
            set_status_on_exception=False,
        ) as current:
            try:
                yield
            except BaseException as exc:
                code = context.code() if hasattr(context, "code") else None
                if code is None and isinstance(exc, GeneratorExit):  # a stream cut short
                    code = grpc.StatusCode.CANCELLED
                elif code is None:  # not an abort: the servicer raised
                    code = grpc.StatusCode.UNKNOWN
                    current.record_exception(exc)
                details = context.details() if hasattr(context, "details") else None
                _end_status(
                    current, code, details.decode() if isinstance(details, bytes) else details
                )
                raise
            code = context.code() if hasattr(context, "code") else None
            _end_status(current, code or grpc.StatusCode.OK, None)

    def _unary(
        self, method: str, carrier: Mapping[str, str], inner: Callable[..., Any]
    ) -> Callable[..., Any]:
        def behavior(request: Any, context: grpc.ServicerContext) -> Any:
            with self._server_span(method, carrier, context):
                return inner(request, context)

        return behavior

    def _streaming(
        self, method: str, carrier: Mapping[str, str], inner: Callable[..., Any]
    ) -> Callable[..., Any]:
        def behavior(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            with self._server_span(method, carrier, context):
                yield from inner(request, context)

        return behavior
