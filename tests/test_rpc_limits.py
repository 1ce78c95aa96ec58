"""Per-peer limits and the stall watchdog, without a server (fake contexts, fake clock)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from jacfusion_fed.rpc.limits import (
    GuardInterceptor,
    PeerLimits,
    _Slots,
    _Stream,
    guard_options,
    peer_key,
    pool_size,
)
from jacfusion_fed.rpc.tls import TransportOptions


class FakeContext:
    def __init__(self, peer: str = "ipv4:127.0.0.1:5555") -> None:
        self._peer = peer
        self.cancelled = False

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    def peer(self) -> str:
        return self._peer

    def cancel(self) -> None:
        self.cancelled = True


def test_defaults_follow_the_worker_count() -> None:
    limits = PeerLimits.for_workers(16)
    assert (limits.max_calls_per_peer, limits.max_streams_per_peer) == (16, 4)
    assert pool_size(16, limits) == 20
    small = PeerLimits.for_workers(1)
    assert (small.max_streams_per_peer, small.reserve_workers) == (1, 2)
    assert PeerLimits.for_workers(8, stall_timeout_s=3.0).stall_timeout_s == 3.0
    for bad in ({"max_streams_per_peer": 0}, {"stall_timeout_s": 0.0}, {"reserve_workers": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            PeerLimits.for_workers(8, **bad)


def test_stream_limit_refuses_at_once() -> None:
    slots = _Slots(PeerLimits.for_workers(8, max_streams_per_peer=1))
    assert slots.acquire("alice", True, 0.0) is None
    refused = slots.acquire("alice", True, 5.0)
    assert refused is not None and "limit 1 per peer" in refused
    assert slots.acquire("bob", True, 0.0) is None  # another peer is not affected
    slots.release("alice", True)
    assert slots.acquire("alice", True, 0.0) is None
    assert slots.in_flight() == {"alice": 1, "bob": 1}


def test_unary_calls_wait_briefly_for_the_peer_s_own_slot() -> None:
    slots = _Slots(PeerLimits.for_workers(8, max_calls_per_peer=1))
    assert slots.acquire("alice", False, 0.0) is None
    start = time.monotonic()
    assert slots.acquire("alice", False, 0.2) is not None  # nobody releases: refused
    assert time.monotonic() - start >= 0.19
    timer = threading.Timer(0.1, slots.release, ("alice", False))
    timer.start()
    assert slots.acquire("alice", False, 5.0) is None  # released meanwhile: admitted
    timer.join()


def test_watchdog_cancels_only_streams_stuck_in_a_write() -> None:
    now = [100.0]
    guard = GuardInterceptor(PeerLimits.for_workers(8, stall_timeout_s=10.0), clock=lambda: now[0])
    writing, computing = FakeContext(), FakeContext()
    guard._streams = {
        1: _Stream(writing, "alice", "/s/M", waiting_since=100.0),
        2: _Stream(computing, "alice", "/s/M", waiting_since=None),
    }
    now[0] = 109.0
    assert guard.cancel_stalled() == 0 and not writing.cancelled
    now[0] = 110.5
    assert guard.cancel_stalled() == 1
    assert writing.cancelled and not computing.cancelled
    assert guard.cancel_stalled() == 0  # counted once
    guard.close()


def test_peer_of_a_plaintext_connection_is_its_address() -> None:
    ctx: Any = FakeContext("ipv4:127.0.0.1:40123")
    assert peer_key(ctx) == "address 127.0.0.1"
    ctx6: Any = FakeContext("ipv6:[::1]:40123")
    assert peer_key(ctx6) == "address ::1"


def test_guard_options_keep_explicit_settings() -> None:
    opts = guard_options(TransportOptions(extra=(("grpc.max_concurrent_streams", 8),)))
    extra = dict(opts.extra)
    assert extra["grpc.max_concurrent_streams"] == 8
    assert extra["grpc.max_connection_idle_ms"] == 300_000
    assert "grpc.max_connection_age_grace_ms" in extra
