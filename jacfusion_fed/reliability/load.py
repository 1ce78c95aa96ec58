"""A bounded load generator for ``FusionService.Predict``: a fixed number of requests from many
concurrent clients; every answer classified by the oracle; latency, throughput and the
coordinator's memory (RSS from ``/proc``) measured.

It stops by itself: ``requests`` calls in total (plus ``warmup`` untimed ones), each with a
deadline of ``timeout_s``; no call can outlive that.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .reference import Reference, Verdict

__all__ = ["LoadConfig", "LoadResult", "rss_bytes", "run_load"]


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` (``VmRSS`` in ``/proc/<pid>/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass(frozen=True)
class LoadConfig:
    """What to send.

    Attributes:
        requests: Predict calls in total (timed and classified).
        clients: concurrent requester threads, each with its own channel.
        batch: ids per request (random distinct ids of the pool, in random order).
        warmup: untimed calls first (connections, caches, allocator pools).
        timeout_s: deadline of every call.
        options: ``FusionOptions`` of every call (``None``: the coordinator's defaults).
        unknown_fraction: share of requests that also carry one id no owner holds (with
            ``skip_unknown_ids`` set in ``options`` they are still answered).
        seed: seed of the id draws.
        rss_every_s: how often the coordinator's RSS is sampled for the peak.
        error_backoff_s: a client that got an error waits this long before its next call
            (as a real client would; keeps an outage from turning into a busy loop).
    """

    requests: int = 2000
    clients: int = 16
    batch: int = 16
    warmup: int = 200
    timeout_s: float = 10.0
    options: Any = None
    unknown_fraction: float = 0.0
    seed: int = 0
    rss_every_s: float = 0.25
    error_backoff_s: float = 0.0


@dataclass
class LoadResult:
    requests: int
    clients: int
    batch: int
    seconds: float
    requests_per_s: float
    samples_per_s: float
    latency_ms: dict[str, float]
    outcomes: dict[str, int]
    neither: int
    neither_examples: list[str] = field(default_factory=list)
    rss_start_mb: float | None = None
    rss_end_mb: float | None = None
    rss_peak_mb: float | None = None
    rss_growth_mb: float | None = None
    #: (seconds into the timed run, RSS in MB), at most 12 points: a leak grows steadily, a
    #: warm-up effect levels off.
    rss_timeline_mb: list[tuple[float, float]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _percentiles(seconds: list[float]) -> dict[str, float]:
    if not seconds:
        return {}
    ms = np.asarray(seconds) * 1e3
    return {
        "p50": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)),
        "max": float(ms.max()),
        "mean": float(ms.mean()),
    }


def run_load(
    make_stub: Callable[[], Any],
    ids: Sequence[str],
    cfg: LoadConfig,
    reference: Reference | None = None,
    *,
    pid: int | None = None,
    classify: Callable[[list[str], Any, BaseException | None], Verdict] | None = None,
    progress: Callable[[str], None] = lambda _m: None,
    stop: threading.Event | None = None,
) -> LoadResult:
    """Send ``cfg.requests`` Predict calls from ``cfg.clients`` threads and classify each.

    Args:
        make_stub: returns a new ``FusionServiceStub`` (one per client: its own channel).
        ids: the pool of pseudonymous ids requests draw from.
        cfg: the load.
        reference: the oracle; every answer is classified with it (``None``: answers are
            only counted, as ``answered``).
        pid: the coordinator's process id, for its RSS (``None``: not measured).
        classify: ``(ids, response, exception) -> Verdict`` overriding the oracle.
        stop: when set, clients stop early (after their call in flight); for fault runs that
            send "until the scenario is over", with ``cfg.requests`` as the upper bound.
    """
    from jacfusion_fed.rpc.fusion_codec import answer_from_proto
    from jacfusion_fed.rpc.jacfusion.v1 import fusion_pb2

    if cfg.batch > len(ids):
        raise ValueError(f"batch {cfg.batch} exceeds the id pool ({len(ids)})")
    pool = list(ids)
    if reference is not None:
        reference.prepare(pool, cfg.options)

    def default_classify(req_ids: list[str], resp: Any, exc: BaseException | None) -> Verdict:
        if exc is not None:
            if reference is None:
                code = getattr(exc, "code", lambda: None)()
                return Verdict("error", "", getattr(code, "name", type(exc).__name__))
            return reference.classify_error(exc)
        if reference is None:
            return Verdict("correct", "answered (not checked)")
        return reference.classify(req_ids, answer_from_proto(resp.predictions), cfg.options)

    judge = classify or default_classify
    lock = threading.Lock()
    issued = [0]
    latencies: list[float] = []
    verdicts: list[Verdict] = []
    options = cfg.options

    def next_index(limit: int) -> int | None:
        with lock:
            if issued[0] >= limit or (stop is not None and stop.is_set()):
                return None
            issued[0] += 1
            return issued[0] - 1

    def request_for(rng: random.Random) -> list[str]:
        chosen = rng.sample(pool, cfg.batch)
        if cfg.unknown_fraction and rng.random() < cfg.unknown_fraction:
            # a well-formed pseudonym (64 hex digits) that no owner holds: raw ids are refused
            chosen[rng.randrange(len(chosen))] = f"{rng.getrandbits(256):064x}"
        return chosen

    def client(worker: int, limit: int, timed: bool) -> None:
        rng = random.Random(cfg.seed * 1_000_003 + 2 * worker + int(timed))
        stub = make_stub()
        while next_index(limit) is not None:
            req_ids = request_for(rng)
            request = fusion_pb2.PredictRequest(sample_ids=req_ids, options=options)
            t0 = time.perf_counter()
            resp, err = None, None
            try:
                resp = stub.Predict(request, timeout=cfg.timeout_s)
            except Exception as exc:  # classified below
                err = exc
            elapsed = time.perf_counter() - t0
            if err is not None and cfg.error_backoff_s:
                time.sleep(cfg.error_backoff_s)
            if not timed:
                continue
            verdict = judge(req_ids, resp, err)
            with lock:
                latencies.append(elapsed)
                verdicts.append(verdict)

    def run_clients(limit: int, timed: bool) -> float:
        issued[0] = 0
        threads = [
            threading.Thread(target=client, args=(w, limit, timed), daemon=True)
            for w in range(cfg.clients)
        ]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(cfg.timeout_s * (limit + 1) + 60)  # bounded even if every call times out
        return time.perf_counter() - t0

    if cfg.warmup:
        progress(f"warm-up: {cfg.warmup} requests")
        run_clients(cfg.warmup, timed=False)
    rss: list[int] = []
    rss_times: list[float] = []
    stop_sampler = threading.Event()
    t_start = time.perf_counter()

    def sample_rss() -> None:
        assert pid is not None
        while not stop_sampler.wait(cfg.rss_every_s):
            try:
                rss.append(rss_bytes(pid))
                rss_times.append(time.perf_counter() - t_start)
            except (OSError, RuntimeError):
                return

    start_rss = rss_bytes(pid) if pid is not None else None
    t_start = time.perf_counter()
    sampler = threading.Thread(target=sample_rss, daemon=True)
    if pid is not None:
        sampler.start()
    progress(f"load: {cfg.requests} requests of {cfg.batch} ids from {cfg.clients} clients")
    seconds = run_clients(cfg.requests, timed=True)
    stop_sampler.set()
    if pid is not None:
        sampler.join(5)
    end_rss = rss_bytes(pid) if pid is not None else None
    outcomes: dict[str, int] = {}
    for v in verdicts:
        outcomes[v.label] = outcomes.get(v.label, 0) + 1
    neither = [v for v in verdicts if not v.ok]
    mb = 1 / (1024 * 1024)
    done = len(verdicts)
    return LoadResult(
        requests=done,
        clients=cfg.clients,
        batch=cfg.batch,
        seconds=seconds,
        requests_per_s=done / seconds,
        samples_per_s=done * cfg.batch / seconds,
        latency_ms=_percentiles(latencies),
        outcomes=dict(sorted(outcomes.items())),
        neither=len(neither),
        neither_examples=[v.detail for v in neither[:5]],
        rss_start_mb=start_rss * mb if start_rss is not None else None,
        rss_end_mb=end_rss * mb if end_rss is not None else None,
        rss_peak_mb=max([*rss, start_rss or 0, end_rss or 0]) * mb if pid is not None else None,
        rss_growth_mb=(end_rss - start_rss) * mb
        if start_rss is not None and end_rss is not None
        else None,
        rss_timeline_mb=[
            (round(rss_times[i], 1), round(rss[i] * mb, 1))
            for i in sorted({int(j) for j in np.linspace(0, len(rss) - 1, min(len(rss), 12))})
        ]
        if rss
        else [],
    )
