"""Fair sharing of a gRPC server between its peers (one misbehaving client cannot lock out
the others), and the server settings that reap dead or stalled connections.

Why this is needed: gRPC's synchronous Python server runs every call on a fixed pool of
handler threads, and a server-streaming call keeps its thread while it waits for the client
to read (``_send_response`` blocks until the reply is written). A client that opens
``max_workers`` streams and stops reading at the TCP level therefore holds every thread:
every other call, health checks included, waits until its deadline.

:class:`GuardInterceptor` prevents that:

* **per-peer limits** (:class:`PeerLimits`): a peer (its client certificate's identity, else
  its address) may run at most ``max_streams_per_peer`` streaming calls and at most
  ``max_calls_per_peer`` calls of any kind at once; beyond that it is answered
  ``RESOURCE_EXHAUSTED`` naming the limit, with a ``google.rpc.RetryInfo`` detail
  (``retry_after_s``, :mod:`~jacfusion_fed.rpc.status_details`). A unary call over the
  limit first waits up to ``admission_wait_s`` for one of the peer's own calls to finish
  (unary calls end by themselves; this keeps a busy but honest client from being refused in
  bursts);
* **stalled writes are bounded**: a stream whose client has not taken a reply for
  ``stall_timeout_s`` is cancelled, which frees its thread;
* **health checks are exempt** and the handler pool gets ``reserve_workers`` threads beyond
  what one peer may hold (:func:`pool_size`), so health and the other peers keep being served;
* it also records what :class:`jacfusion_fed.rpc.metrics.ServiceMetrics` exports.

:func:`guard_options` adds the channel arguments that reap dead connections (server keepalive,
idle and age limits, a per-connection stream limit).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import grpc

from jacfusion_fed.rpc.identity import AuthError, principal_from_context
from jacfusion_fed.rpc.status_details import abort_with_retry
from jacfusion_fed.rpc.tls import TransportOptions

if TYPE_CHECKING:
    from jacfusion_fed.rpc.metrics import ServiceMetrics

__all__ = [
    "EXEMPT_PREFIXES",
    "GuardInterceptor",
    "PeerLimits",
    "guard_options",
    "peer_key",
    "pool_size",
]

#: Methods never limited nor cancelled: health checks must answer whatever a peer does.
EXEMPT_PREFIXES: Final = ("/grpc.health.v1.Health/",)


@dataclass(frozen=True)
class PeerLimits:
    """Per-peer limits of one server (see the module docstring).

    :meth:`for_workers` derives them from the server's ``max_workers``.
    """

    max_calls_per_peer: int
    max_streams_per_peer: int
    reserve_workers: int
    stall_timeout_s: float = 10.0
    admission_wait_s: float = 2.0
    #: The delay a refused peer is told to wait (RetryInfo of RESOURCE_EXHAUSTED).
    retry_after_s: float = 1.0

    def __post_init__(self) -> None:
        for name in ("max_calls_per_peer", "max_streams_per_peer"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.reserve_workers < 1:
            raise ValueError(f"reserve_workers must be at least 1, got {self.reserve_workers}")
        if not self.stall_timeout_s > 0:
            raise ValueError(f"stall_timeout_s must be positive, got {self.stall_timeout_s}")
        if not self.admission_wait_s >= 0:
            raise ValueError(f"admission_wait_s must be >= 0, got {self.admission_wait_s}")
        if not self.retry_after_s >= 0:
            raise ValueError(f"retry_after_s must be >= 0, got {self.retry_after_s}")

    @classmethod
    def for_workers(cls, max_workers: int, **overrides: Any) -> PeerLimits:
        """Defaults for a server with ``max_workers`` handler threads.

        One peer may hold ``max_workers`` threads with calls but only a quarter (at least
        one) with streams, the only calls a client can stall by not reading; the pool gets a
        reserve of a quarter more (at least two) for health checks and the other peers.
        """
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers}")
        base = cls(
            max_calls_per_peer=max_workers,
            max_streams_per_peer=max(1, max_workers // 4),
            reserve_workers=max(2, max_workers // 4),
        )
        return dataclasses.replace(base, **overrides)


def pool_size(max_workers: int, limits: PeerLimits) -> int:
    """Handler threads to create: ``max_workers`` plus the reserve."""
    return max_workers + limits.reserve_workers


def guard_options(options: TransportOptions | None = None) -> TransportOptions:
    """``options`` plus server arguments that reap dead and stalled connections.

    * ``grpc.max_connection_idle_ms`` (5 min): connections without calls are closed with
      GOAWAY (gRPC clients reconnect transparently);
    * ``grpc.max_connection_age_ms`` (1 h) and ``..._grace_ms`` (5 min): every connection is
      recycled, and a call still running 5 min after that is cut, so no connection, however
      stuck, outlives 65 min;
    * ``grpc.max_concurrent_streams`` (64): calls one connection may run at once (gRPC
      clients queue the rest);
    * keepalive (from ``options``): a peer that stops answering pings is dropped after
      ``keepalive_time_ms + keepalive_timeout_ms``.
    """
    opts = options or TransportOptions()
    extra = (
        ("grpc.max_connection_idle_ms", 5 * 60_000),
        ("grpc.max_connection_age_ms", 60 * 60_000),
        ("grpc.max_connection_age_grace_ms", 5 * 60_000),
        ("grpc.max_concurrent_streams", 64),
    )
    have = {name for name, _ in opts.extra}
    return dataclasses.replace(
        opts, extra=(*opts.extra, *(item for item in extra if item[0] not in have))
    )


def peer_key(context: grpc.ServicerContext) -> str:
    """Who is calling, for fair sharing: the certificate's identity, else the peer address.

    ``requester 'alice'`` for every connection made with alice's certificate;
    ``address 127.0.0.1`` for a plaintext peer (the port differs per connection).
    """
    try:
        return principal_from_context(context).describe()
    except AuthError:
        pass
    peer = context.peer() or "unknown"
    kind, _, address = peer.partition(":")
    host = address.rsplit(":", 1)[0] if kind in ("ipv4", "ipv6") else peer
    return f"address {host.strip('[]')}"


@dataclass
class _Stream:
    """A running stream, as the stall watchdog sees it."""

    context: grpc.ServicerContext
    peer: str
    method: str
    waiting_since: float | None = None  # set while gRPC writes a reply to the client


class _Slots:
    """Calls and streams in flight per peer (thread-safe)."""

    def __init__(self, limits: PeerLimits) -> None:
        self.limits = limits
        self.cond = threading.Condition()
        self.calls: dict[str, int] = {}
        self.streams: dict[str, int] = {}

    def acquire(self, peer: str, stream: bool, wait_s: float) -> str | None:
        """Take a slot; returns ``None``, or why the call is refused."""
        lim = self.limits
        with self.cond:
            if stream and self.streams.get(peer, 0) >= lim.max_streams_per_peer:
                return f"streams (limit {lim.max_streams_per_peer} per peer)"
            deadline = time.monotonic() + wait_s
            while self.calls.get(peer, 0) >= lim.max_calls_per_peer:
                left = deadline - time.monotonic()
                if stream or left <= 0:
                    return f"calls (limit {lim.max_calls_per_peer} per peer)"
                self.cond.wait(left)
            self.calls[peer] = self.calls.get(peer, 0) + 1
            if stream:
                self.streams[peer] = self.streams.get(peer, 0) + 1
            return None

    def release(self, peer: str, stream: bool) -> None:
        with self.cond:
            self.calls[peer] -= 1
            if not self.calls[peer]:
                del self.calls[peer]
            if stream:
                self.streams[peer] -= 1
                if not self.streams[peer]:
                    del self.streams[peer]
            self.cond.notify_all()

    def in_flight(self) -> dict[str, int]:
        with self.cond:
            return dict(self.calls)


class GuardInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Per-peer limits, stalled-stream cancellation and metrics (see the module docstring).

    Put it first in the server's interceptors (before the authorisation interceptor) so that
    refused and unauthorised calls are counted too.

    Args:
        limits: the per-peer limits.
        metrics: where requests, latencies, calls in flight and refusals are recorded.
        clock: monotonic clock (tests).
    """

    def __init__(
        self,
        limits: PeerLimits,
        metrics: ServiceMetrics | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self.metrics = metrics
        self.clock = clock
        self.slots = _Slots(limits)
        self._streams: dict[int, _Stream] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self.cancelled_stalls = 0
        if metrics is not None:
            metrics.watch_in_flight(self.slots.in_flight)

    # --- the stall watchdog --------------------------------------------------------------------

    def _ensure_watchdog(self) -> None:
        with self._lock:
            if self._watchdog is None:
                self._watchdog = threading.Thread(
                    target=self._watch, name="jacfusion-stall-watchdog", daemon=True
                )
                self._watchdog.start()

    def _watch(self) -> None:
        period = min(0.5, self.limits.stall_timeout_s / 4)
        while not self._stop.wait(period):
            self.cancel_stalled()

    def cancel_stalled(self) -> int:
        """Cancel every stream whose client has not read a reply for ``stall_timeout_s``."""
        now = self.clock()
        with self._lock:
            stalled = [
                s
                for s in self._streams.values()
                if s.waiting_since is not None
                and now - s.waiting_since > self.limits.stall_timeout_s
            ]
        for stream in stalled:
            stream.waiting_since = None
            self.cancelled_stalls += 1
            if self.metrics is not None:
                self.metrics.refused(stream.peer, "stalled")
            stream.context.cancel()  # the blocked write fails, the handler thread is freed
        return len(stalled)

    def close(self) -> None:
        """Stop the watchdog thread."""
        self._stop.set()

    # --- wrapping ------------------------------------------------------------------------------

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(EXEMPT_PREFIXES):
            return handler
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary), **kwargs
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(method, handler.stream_unary, stream=True), **kwargs
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(method, handler.unary_stream), **kwargs
            )
        return grpc.stream_stream_rpc_method_handler(
            self._streaming(method, handler.stream_stream), **kwargs
        )

    def _admit(self, method: str, context: grpc.ServicerContext, stream: bool) -> str:
        peer = peer_key(context)
        wait = self.limits.admission_wait_s
        remaining = context.time_remaining()
        if remaining is not None:
            wait = min(wait, max(remaining, 0.0))
        refused = self.slots.acquire(peer, stream, 0.0 if stream else wait)
        if refused is not None:
            if self.metrics is not None:
                self.metrics.refused(peer, "streams" if refused.startswith("streams") else "calls")
                self.metrics.finished(method, grpc.StatusCode.RESOURCE_EXHAUSTED, 0.0)
            abort_with_retry(
                context,
                f"{method}: too many concurrent {refused} from {peer}; retry when some of "
                "your calls have finished",
                self.limits.retry_after_s,
            )
        return peer

    def _finish(
        self,
        method: str,
        context: grpc.ServicerContext,
        start: float,
        ok: bool,
        default: grpc.StatusCode = grpc.StatusCode.UNKNOWN,
    ) -> None:
        if self.metrics is None:
            return
        code = context.code() if hasattr(context, "code") else None
        if code is None:  # not set by the servicer: it returned, or raised / was cut off
            code = grpc.StatusCode.OK if ok else default
        self.metrics.finished(method, code, self.clock() - start)

    def _unary(
        self, method: str, inner: Callable[..., Any], *, stream: bool = False
    ) -> Callable[..., Any]:
        def behavior(request: Any, context: grpc.ServicerContext) -> Any:
            start = self.clock()
            peer = self._admit(method, context, stream)
            ok = False
            try:
                response = inner(request, context)
                ok = True
                return response
            finally:
                self.slots.release(peer, stream)
                self._finish(method, context, start, ok)

        return behavior

    def _streaming(self, method: str, inner: Callable[..., Any]) -> Callable[..., Any]:
        def behavior(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            start = self.clock()
            peer = self._admit(method, context, True)
            self._ensure_watchdog()
            entry = _Stream(context, peer, method)
            released = threading.Event()

            def release() -> None:
                if not released.is_set():
                    released.set()
                    with self._lock:
                        self._streams.pop(id(entry), None)
                    self.slots.release(peer, True)

            with self._lock:
                self._streams[id(entry)] = entry
            # Runs when the call ends in any way, also if gRPC drops the iterator unread
            # (a generator never started runs no ``finally``); False: it has ended already.
            if not context.add_callback(release):
                release()
            try:
                replies = inner(request, context)
            except BaseException:  # e.g. refused by the authorisation interceptor
                release()
                self._finish(method, context, start, False)
                raise
            return self._relay(method, context, replies, entry, start, release)

        return behavior

    def _relay(
        self,
        method: str,
        context: grpc.ServicerContext,
        replies: Iterator[Any],
        entry: _Stream,
        start: float,
        release: Callable[[], None],
    ) -> Iterator[Any]:
        """Yield ``replies``, noting while each one is being written to the client."""
        ok = False
        cut = grpc.StatusCode.UNKNOWN
        try:
            for reply in replies:
                entry.waiting_since = self.clock()
                yield reply  # gRPC writes it before asking for the next one
                entry.waiting_since = None
            ok = True
        except GeneratorExit:  # gRPC stopped asking: the call was cancelled
            cut = grpc.StatusCode.CANCELLED
            raise
        finally:
            entry.waiting_since = None
            release()
            self._finish(method, context, start, ok, cut)
