"""Rich error details read by a plain gRPC client (``grpc_status.rpc_status.from_call``):
``RESOURCE_EXHAUSTED`` from the per-peer limits carries a ``google.rpc.RetryInfo``; the CLI's
one ``error:`` line and the requester's exception show the details.
(BadRequest field violations of the real services: tests/test_owner_records.py.)"""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from jacfusion_fed.cli.errors import describe
from jacfusion_fed.rpc.limits import GuardInterceptor, PeerLimits
from jacfusion_fed.rpc.status_details import (
    DetailedRpcError,
    ErrorDetails,
    abort_with_violations,
)

METHOD = "/test.Slow/Wait"


def _server(handler: Any, interceptors: list[Any]) -> tuple[grpc.Server, str]:
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(4),
        interceptors=interceptors,
        maximum_concurrent_rpcs=None,
    )
    generic = grpc.method_handlers_generic_handler(
        "test.Slow", {"Wait": grpc.unary_unary_rpc_method_handler(handler)}
    )
    server.add_generic_rpc_handlers((generic,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def test_resource_exhausted_carries_retry_info() -> None:
    release = threading.Event()
    entered = threading.Event()

    def wait(_request: bytes, _context: grpc.ServicerContext) -> bytes:
        entered.set()
        release.wait(10)
        return b"done"

    limits = PeerLimits(
        max_calls_per_peer=1,
        max_streams_per_peer=1,
        reserve_workers=1,
        admission_wait_s=0.0,
        retry_after_s=0.75,
    )
    guard = GuardInterceptor(limits)
    server, target = _server(wait, [guard])
    try:
        with grpc.insecure_channel(target) as channel:
            call = channel.unary_unary(METHOD)
            first = call.future(b"", timeout=10)
            assert entered.wait(10)  # the first call holds the peer's one slot
            refused: grpc.RpcError | None = None
            try:
                call(b"", timeout=10)
            except grpc.RpcError as exc:
                refused = exc
            assert refused is not None
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            status = rpc_status.from_call(refused)  # type: ignore[arg-type]
            assert status is not None and status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            infos = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
            assert len(infos) == 1
            info = error_details_pb2.RetryInfo()
            infos[0].Unpack(info)
            assert info.retry_delay.ToMilliseconds() == 750
            # the requester's exception and the CLI's one line show it
            wrapped = DetailedRpcError(refused)
            assert wrapped.retry_after_s == 0.75
            assert "retry after 0.75 s" in str(wrapped)
            line, _code = describe(refused)
            assert line.startswith("RESOURCE_EXHAUSTED: ") and line.endswith("(retry after 0.75 s)")
            release.set()
            assert first.result() == b"done"
    finally:
        release.set()
        server.stop(0)
        guard.close()


def test_bad_request_violations_in_the_cli_line() -> None:
    def refuse(_request: bytes, context: grpc.ServicerContext) -> bytes:
        abort_with_violations(
            context,
            "sample id at position 2 is not a pseudonym",
            [("sample_ids[2]", "not a pseudonym"), ("options.iterations", "must be in 1..16")],
        )

    server, target = _server(refuse, [])
    try:
        with grpc.insecure_channel(target) as channel:
            try:
                channel.unary_unary(METHOD)(b"", timeout=10)
            except grpc.RpcError as exc:
                refused = exc
            else:
                raise AssertionError("the call succeeded")
        line, _ = describe(refused)
        assert line == (
            "INVALID_ARGUMENT: sample id at position 2 is not a pseudonym "
            "(sample_ids[2]: not a pseudonym; options.iterations: must be in 1..16)"
        )
        assert DetailedRpcError(refused).violations == (
            ("sample_ids[2]", "not a pseudonym"),
            ("options.iterations", "must be in 1..16"),
        )
    finally:
        server.stop(0)


def test_no_details_reads_as_empty() -> None:
    assert not ErrorDetails()
    assert ErrorDetails().describe() == ""
