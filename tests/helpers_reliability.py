"""Helpers of the reliability tests (issue #7): a deployment of real processes on 127.0.0.1
(two owners and the coordinator, started through the CLI with mTLS, as in
``helpers_services``), optionally with a :class:`FaultProxy` between the coordinator and each
owner, plus the oracle and a load runner.

Every process is stopped by PID by :meth:`Deployment.stop` (also when a test fails).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from helpers_services import MODALITIES, TIMEOUT, Fed, build_fed
from helpers_wait import port_is_free, wait_until

from jacfusion_fed.reliability import (
    FaultProxy,
    LoadConfig,
    LoadResult,
    Reference,
    rss_bytes,
    run_load,
    snapshot_workspace,
)
from jacfusion_fed.rpc.jacfusion.v1 import fusion_pb2

__all__ = ["Answers", "Deployment", "LoadInBackground", "load"]


class Deployment:
    """Owners and coordinator as processes; proxies (optional) in front of the owners."""

    def __init__(
        self,
        root: Path,
        *,
        proxies: bool = True,
        owner_timeout: float = 0.5,
        extra: tuple[str, ...] = (),
        log_level: str = "info",
        env: dict[str, str] | None = None,
    ) -> None:
        self.fed: Fed = build_fed(root)
        self.env = dict(env or {})
        self.use_proxies = proxies
        self.log_level = log_level
        self.owner_timeout = owner_timeout
        self.extra = extra
        self.proxies: dict[str, FaultProxy] = {}
        self.owner_ports: dict[str, int] = {}
        self.coordinator_port = 0
        self._reference: Reference | None = None

    # --- processes -------------------------------------------------------------------------

    def start(self) -> Deployment:
        fed = self.fed
        files = {}
        for m in MODALITIES:  # both owners start in parallel
            files[m] = fed.root / f"owner-{m}.port"
            files[m].unlink(missing_ok=True)
            self._start(f"owner-{m}", [*self.owner_args(m), "--port-file", str(files[m])])
        for m in MODALITIES:
            self.owner_ports[m] = fed.procs.wait_port(f"owner-{m}", files[m])
            upstream = f"127.0.0.1:{self.owner_ports[m]}"
            if self.use_proxies:
                self.proxies[m] = FaultProxy(upstream, seed=len(self.proxies)).start()
        self.start_coordinator()
        self.wait_registered()
        return self

    def _start(self, name: str, args: list[str]) -> None:
        """Start a CLI process with :attr:`env` added to its environment (only its)."""
        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            self.fed.procs.start(name, args)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def owner_args(self, modality: str) -> list[str]:
        """The CLI arguments of an owner (the last ``--log-level`` wins)."""
        return [*self.fed.owner_args(modality), "--log-level", self.log_level]

    def owner_target(self, modality: str) -> str:
        """What the coordinator is told: the proxy when there is one."""
        if modality in self.proxies:
            return self.proxies[modality].target
        return f"127.0.0.1:{self.owner_ports[modality]}"

    def start_coordinator(self, *, port: int | None = None) -> str:
        fed = self.fed
        port_file = fed.root / "coordinator.port"
        port_file.unlink(missing_ok=True)
        owners = [a for m in MODALITIES for a in ("--owner", f"{m}={self.owner_target(m)}")]
        self._start(
            "coordinator",
            [
                "coordinator",
                "serve",
                "--registry",
                str(fed.root / "registry"),
                "--tls",
                str(fed.certs.coordinator_dir),
                "--port-file",
                str(port_file),
                "--port",
                str(port if port is not None else self.coordinator_port),
                "--owner-timeout",
                str(self.owner_timeout),
                "--log-level",
                self.log_level,
                *owners,
                *self.extra,
            ],
        )
        self.coordinator_port = fed.procs.wait_port("coordinator", port_file)
        fed.coordinator = f"127.0.0.1:{self.coordinator_port}"
        return fed.coordinator

    def wait_registered(self, timeout: float = 60.0) -> None:
        self.fed.wait_registered(timeout)

    def kill(self, name: str) -> None:
        """SIGKILL (a crash); ``name`` is ``coordinator`` or ``owner-<modality>``."""
        self.fed.procs.kill(name)

    def restart_owner(self, modality: str) -> None:
        """Start the owner again on its old port (behind its proxy, if any)."""
        fed = self.fed
        name = f"owner-{modality}"
        port = self.owner_ports[modality]
        port_file = fed.root / f"{name}.port"
        args = [*self.owner_args(modality), "--port", str(port), "--port-file", str(port_file)]

        def started() -> bool:
            # the old socket may linger for a moment after a SIGKILL: wait until the port is
            # free, then start; a start that still loses the race is retried
            if not port_is_free(port):
                return False
            port_file.unlink(missing_ok=True)
            self._start(name, args)
            try:
                fed.procs.wait_port(name, port_file)
                return True
            except RuntimeError:
                fed.procs.procs.pop(name, None)
                return False

        wait_until(started, f"{name} to restart on port {port}", timeout=60, interval=0.1)

    def restart_coordinator(self) -> None:
        port = self.coordinator_port

        def started() -> bool:
            if not port_is_free(port):
                return False
            try:
                self.start_coordinator(port=port)
                return True
            except RuntimeError:
                self.fed.procs.procs.pop("coordinator", None)
                return False

        wait_until(started, f"the coordinator to restart on port {port}", timeout=60, interval=0.1)

    @property
    def coordinator_pid(self) -> int:
        return self.fed.procs.procs["coordinator"].pid

    def coordinator_rss_mb(self) -> float:
        return rss_bytes(self.coordinator_pid) / 2**20

    def stop(self) -> None:
        self.fed.procs.stop_all()
        for proxy in self.proxies.values():
            proxy.stop()

    # --- requests and the oracle -----------------------------------------------------------

    def reference(self) -> Reference:
        """The library on what the owners serve (read from their workspaces, which are the
        very stores the owner processes serve from)."""
        if self._reference is None:
            self._reference = Reference(
                [snapshot_workspace(self.fed.workspaces[m], self.fed.ids) for m in MODALITIES]
            )
        return self._reference

    def stub(self) -> Any:
        return self.fed.stub()

    def wait_full_answers(self, timeout: float = 60.0) -> float:
        """Until a request is answered by every owner; returns the seconds it took."""
        stub = self.stub()
        request = fusion_pb2.PredictRequest(sample_ids=self.fed.ids[:4])
        t0 = time.monotonic()

        def full() -> bool:
            try:
                resp = stub.Predict(request, timeout=TIMEOUT)
            except grpc.RpcError:
                return False
            return all(all(m.used) for m in resp.predictions.modalities)

        wait_until(full, "the deployment to answer from every owner", timeout=timeout, interval=0.1)
        return time.monotonic() - t0


class Answers:
    """What the load's clients got, counted as it happens: ``full`` (every owner used),
    ``partial`` (an owner left out) or ``error`` (the call failed). Tests wait on these
    counts (e.g. "until the load has seen the outage") instead of sleeping."""

    KINDS = ("full", "partial", "error")

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.counts = dict.fromkeys(self.KINDS, 0)
        self.closed = False

    def close(self) -> None:
        """No more answers will come (the load ended): waiters stop at once."""
        with self._changed:
            self.closed = True
            self._changed.notify_all()

    def note(self, kind: str) -> None:
        with self._changed:
            self.counts[kind] += 1
            self._changed.notify_all()

    def wait(
        self,
        kind: str,
        more: int = 1,
        *,
        timeout: float = 60.0,
        also: Callable[[], bool] = lambda: True,
    ) -> None:
        """Until ``more`` further answers of ``kind`` (or of any kind: ``"any"``) arrived,
        counted from now, and ``also`` holds (checked whenever an answer arrives, and at
        least every 0.1 s)."""

        def count() -> int:
            return sum(self.counts.values()) if kind == "any" else self.counts[kind]

        deadline = time.monotonic() + timeout
        with self._changed:
            target = count() + more
            while not (count() >= target and also()):
                if self.closed:
                    raise RuntimeError(f"the load ended; counts: {self.counts}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"the load saw no {more} more {kind!r} answer(s) (and the condition) "
                        f"in {timeout} s; counts: {self.counts}"
                    )
                self._changed.wait(min(0.1, left))

    def stub(self, stub: Any) -> Any:
        """``stub`` with its ``Predict`` answers counted here."""
        return _CountingStub(stub, self)


class _CountingStub:
    def __init__(self, stub: Any, answers: Answers) -> None:
        self._stub = stub
        self._answers = answers

    def Predict(self, request: Any, **kw: Any) -> Any:
        try:
            resp = self._stub.Predict(request, **kw)
        except BaseException:
            self._answers.note("error")
            raise
        full = all(all(m.used) for m in resp.predictions.modalities)
        self._answers.note("full" if full else "partial")
        return resp

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stub, name)


class LoadInBackground:
    """:func:`run_load` on a thread, until :meth:`finish` (bounded by ``cfg.requests``);
    :attr:`answers` counts what its clients get while it runs."""

    def __init__(self, dep: Deployment, cfg: LoadConfig) -> None:
        self.dep = dep
        self.cfg = cfg
        self.stop = threading.Event()
        self.answers = Answers()
        self.result: LoadResult | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.result = run_load(
                lambda: self.answers.stub(self.dep.stub()),
                self.dep.fed.ids,
                self.cfg,
                self.dep.reference(),
                stop=self.stop,
            )
        except BaseException as exc:
            self.error = exc
        finally:
            self.answers.close()

    def wait(
        self,
        kind: str,
        more: int = 1,
        *,
        timeout: float = 60.0,
        also: Callable[[], bool] = lambda: True,
    ) -> None:
        """See :meth:`Answers.wait`; fails as soon as the load itself ended or failed."""
        try:
            self.answers.wait(kind, more, timeout=timeout, also=also)
        except RuntimeError:
            if self.error is not None:
                raise self.error from None
            raise

    def finish(self, timeout: float = 120.0) -> LoadResult:
        self.stop.set()
        self.thread.join(timeout)
        if self.error is not None:
            raise self.error
        assert self.result is not None, "the load did not finish"
        return self.result


@contextmanager
def load(dep: Deployment, cfg: LoadConfig) -> Iterator[LoadInBackground]:
    """``with load(dep, cfg) as run: ...faults...; run.wait("partial"); result = run.finish()``."""
    runner = LoadInBackground(dep, cfg)
    runner.thread.start()
    try:
        yield runner
    finally:
        runner.stop.set()
        runner.thread.join(120)
