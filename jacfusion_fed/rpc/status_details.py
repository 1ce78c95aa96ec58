"""Machine-readable error details (``google.rpc.Status``, through ``grpcio-status``).

A refused call carries, besides its one-line message, the standard details a gRPC client of
any language can read (``grpc-status-details-bin`` trailer, ``rpc_status.from_call`` in
Python):

* ``INVALID_ARGUMENT``: a ``google.rpc.BadRequest`` whose field violations name the request
  field and, for a repeated field, the index (``sample_ids[3]``, ``inputs[2]``,
  ``options.iterations``);
* ``RESOURCE_EXHAUSTED``: a ``google.rpc.RetryInfo`` with the delay after which a retry may
  succeed (the per-peer limits of :mod:`~jacfusion_fed.rpc.limits`).

Servers abort through :func:`abort_with_violations` and :func:`abort_with_retry`; clients
read the details with :func:`read_details` (a :class:`ErrorDetails`, empty when the call
carried none). The requester's client raises :class:`DetailedRpcError` (a ``grpc.RpcError``
whose ``str`` adds the details) and the CLI's one ``error:`` line ends with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

__all__ = [
    "DetailedRpcError",
    "ErrorDetails",
    "FieldViolation",
    "abort_with_retry",
    "abort_with_violations",
    "bad_request_status",
    "detailed",
    "read_details",
    "retry_status",
    "with_details",
]

#: ``(field, description)``: the field as a path into the request (``sample_ids[3]``).
FieldViolation = tuple[str, str]


def _status(code: grpc.StatusCode, message: str, detail: Any) -> grpc.Status:
    packed = any_pb2.Any()
    packed.Pack(detail)
    proto = status_pb2.Status(code=code.value[0], message=message, details=[packed])
    status: grpc.Status = rpc_status.to_status(proto)
    return status


def bad_request_status(message: str, violations: Sequence[FieldViolation]) -> grpc.Status:
    """``INVALID_ARGUMENT`` with ``message`` and a ``BadRequest`` of ``violations``."""
    request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=name, description=text)
            for name, text in violations
        ]
    )
    return _status(grpc.StatusCode.INVALID_ARGUMENT, message, request)


def retry_status(message: str, retry_after_s: float) -> grpc.Status:
    """``RESOURCE_EXHAUSTED`` with ``message`` and a ``RetryInfo`` of ``retry_after_s``."""
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(max(retry_after_s, 0.0) * 1e9))
    return _status(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        message,
        error_details_pb2.RetryInfo(retry_delay=delay),
    )


def abort_with_violations(
    context: grpc.ServicerContext, message: str, violations: Sequence[FieldViolation]
) -> NoReturn:
    """Abort the call ``INVALID_ARGUMENT`` with ``message`` and its field violations."""
    if not violations:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
    context.abort_with_status(bad_request_status(message, violations))
    raise AssertionError("abort_with_status returned")  # pragma: no cover


def abort_with_retry(context: grpc.ServicerContext, message: str, retry_after_s: float) -> NoReturn:
    """Abort the call ``RESOURCE_EXHAUSTED`` with ``message`` and a ``RetryInfo``."""
    context.abort_with_status(retry_status(message, retry_after_s))
    raise AssertionError("abort_with_status returned")  # pragma: no cover


@dataclass(frozen=True)
class ErrorDetails:
    """What a failed call's ``google.rpc.Status`` details said."""

    violations: tuple[FieldViolation, ...] = ()
    retry_after_s: float | None = None

    def __bool__(self) -> bool:
        return bool(self.violations) or self.retry_after_s is not None

    def describe(self) -> str:
        """One line: ``sample_ids[3]: not a pseudonym; retry after 0.5 s`` ("" when empty)."""
        parts = [f"{name}: {text}" for name, text in self.violations]
        if self.retry_after_s is not None:
            parts.append(f"retry after {self.retry_after_s:g} s")
        return "; ".join(parts)


def read_details(call: Any) -> ErrorDetails:
    """The details of a failed call (a ``grpc.RpcError`` that is a ``grpc.Call``); an empty
    :class:`ErrorDetails` when it carried none or is no call."""
    if not hasattr(call, "trailing_metadata"):
        return ErrorDetails()
    try:
        status = rpc_status.from_call(call)
    except (ValueError, TypeError):  # trailer inconsistent with the call's code or message
        return ErrorDetails()
    if status is None:
        return ErrorDetails()
    violations: list[FieldViolation] = []
    retry: float | None = None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            request = error_details_pb2.BadRequest()
            detail.Unpack(request)
            violations += [(v.field, v.description) for v in request.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            retry = info.retry_delay.ToNanoseconds() / 1e9
    return ErrorDetails(tuple(violations), retry)


def with_details(message: str, call: Any) -> str:
    """``message``, followed by the call's details in parentheses when it carried any."""
    details = read_details(call)
    return f"{message} ({details.describe()})" if details else message


class DetailedRpcError(grpc.RpcError):  # type: ignore[misc]
    """A failed call, its status details read (:attr:`violations`, :attr:`retry_after_s`).

    ``code()``, ``details()`` and the metadata are the call's (so ``rpc_status.from_call``
    still reads it); ``str()`` is ``CODE: message (field: description; retry after N s)``.
    """

    def __init__(self, call: Any) -> None:
        super().__init__(call)
        self.call = call
        self.error_details = read_details(call)

    @property
    def violations(self) -> tuple[FieldViolation, ...]:
        return self.error_details.violations

    @property
    def retry_after_s(self) -> float | None:
        return self.error_details.retry_after_s

    def code(self) -> grpc.StatusCode:
        code: grpc.StatusCode = self.call.code()
        return code

    def details(self) -> str | None:
        details: str | None = self.call.details()
        return details

    def trailing_metadata(self) -> Any:
        return self.call.trailing_metadata() if hasattr(self.call, "trailing_metadata") else None

    def initial_metadata(self) -> Any:
        return self.call.initial_metadata() if hasattr(self.call, "initial_metadata") else None

    def debug_error_string(self) -> str:
        debug = getattr(self.call, "debug_error_string", None)
        return str(debug()) if debug is not None else ""

    def __str__(self) -> str:
        return with_details(f"{self.code().name}: {self.details()}", self.call)


def detailed(exc: grpc.RpcError) -> grpc.RpcError:
    """``exc`` as a :class:`DetailedRpcError` (unchanged when it is one, or is no call)."""
    if isinstance(exc, DetailedRpcError) or not hasattr(exc, "code"):
        return exc
    return DetailedRpcError(exc)
