"""In-process servers: the handlers a real server registers, behind its own interceptor,
called with raw request bytes and a :class:`FakeContext`."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from jacfusion_fed.reliability.reference import CLEAR_ERROR_CODES
from jacfusion_fed.rpc.auth import AuthInterceptor

from .draw import HANG_S, Finding


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class FakeContext:
    """The parts of ``grpc.ServicerContext`` the servicers and the interceptor use."""

    def __init__(self, pem: bytes | None, timeout: float | None = None) -> None:
        self._auth = {"transport_security_type": [b"ssl"]}
        if pem is not None:
            self._auth["x509_pem_cert"] = [pem]
        self._deadline = None if timeout is None else time.monotonic() + timeout

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)

    def abort_with_status(self, status: Any) -> None:
        """A status with details (``grpc_status.rpc_status.to_status``): its code and message;
        the details must decode as a ``google.rpc.Status`` of the same code and message."""
        from google.rpc import status_pb2

        [(key, raw)] = [(k, v) for k, v in status.trailing_metadata]
        assert key == "grpc-status-details-bin", key
        decoded = status_pb2.Status.FromString(raw)
        assert decoded.code == status.code.value[0] and decoded.message == status.details
        raise Aborted(status.code, status.details)

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(self._deadline - time.monotonic(), 0.0)

    def is_active(self) -> bool:
        return True

    def invocation_metadata(self) -> tuple[Any, ...]:
        return ()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def set_code(self, code: Any) -> None:
        pass

    def set_details(self, details: Any) -> None:
        pass

    def add_callback(self, callback: Any) -> bool:
        return True


class _Capture:
    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.handlers.update({f"/{service}/{name}": h for name, h in handlers.items()})


class _Details:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str = ""
    responses: list[Any] = field(default_factory=list)


class InProcessServer:
    """A servicer behind the real interceptor, called with raw request bytes."""

    def __init__(self, add: Callable[[Any, Any], None], servicer: Any, policy: Any) -> None:
        capture = _Capture()
        add(servicer, capture)
        self.handlers = capture.handlers
        self.interceptor = AuthInterceptor(policy)

    def call(
        self, method: str, request: bytes, pem: bytes | None, *, timeout: float | None = None
    ) -> Outcome:
        handler = self.interceptor.intercept_service(
            lambda d: self.handlers.get(d.method), _Details(method)
        )
        if handler is None:
            return Outcome(grpc.StatusCode.UNIMPLEMENTED, "unknown method")
        context = FakeContext(pem, timeout)
        if handler.request_deserializer is not None:
            try:  # what grpc itself does with bytes that do not parse
                message: Any = handler.request_deserializer(request)
            except Exception:
                return Outcome(grpc.StatusCode.INTERNAL, "Exception deserializing request!")
        else:
            message = request
        t0 = time.monotonic()
        try:
            if handler.unary_unary is not None:
                responses = [handler.unary_unary(message, context)]
            else:
                responses = list(handler.unary_stream(message, context))
        except Aborted as exc:
            return Outcome(exc.code, exc.details)
        finally:
            if time.monotonic() - t0 > HANG_S:
                raise Finding(f"{method} took {time.monotonic() - t0:.1f} s (hang)")
        out = []
        for r in responses:  # the real server serializes every response
            out.append(type(r).FromString(handler.response_serializer(r)))
        return Outcome(grpc.StatusCode.OK, "", out)


def check_clear(outcome: Outcome, what: str) -> None:
    if outcome.code != grpc.StatusCode.OK and (
        outcome.code not in CLEAR_ERROR_CODES or not outcome.details
    ):
        raise Finding(f"{what}: imprecise status {outcome.code.name}: {outcome.details!r}")
