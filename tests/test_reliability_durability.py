"""Durability at the service level (the store-level checks -- atomic replace, every truncation
and bit flip detected, stale temporary files removed -- are in ``test_store_atomic.py`` and
``test_store_models.py``):

* a damaged file of an owner's model store (pointer, model, logit cache) is reported
  (DATA_LOSS to the coordinator, the file named in the owner's log, health NOT_SERVING) and
  never used; the coordinator answers from the other owners and says so;
* a damaged head-registry entry: the coordinator refuses to start and names the entry; at
  run time it is never used, and a failing registry write (a full disk) is a clear
  UNAVAILABLE that heals by itself, without killing the background sync;
* processes killed (SIGKILL) at random moments while they publish model versions and register
  heads leave stores that open, verify and load: the old or the new version, never a mix.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers_registry import flip_entry, restore_entry
from helpers_services import MODALITIES, Fed, build_fed
from helpers_wait import wait_until
from typer.testing import CliRunner

from jacfusion_fed.cli import app
from jacfusion_fed.clients.serve import serve_owner
from jacfusion_fed.owner import OwnerWorkspace
from jacfusion_fed.privacy.pseudonyms import Pseudonymizer
from jacfusion_fed.reliability import Reference, snapshot_workspace
from jacfusion_fed.rpc.auth import connect_owner
from jacfusion_fed.rpc.jacfusion.v1 import modality_pb2, modality_pb2_grpc
from jacfusion_fed.rpc.tls import create_channel
from jacfusion_fed.server.coordinator import Coordinator
from jacfusion_fed.server.predict_types import CoordinatorConfig, OwnerEndpoint, PredictError
from jacfusion_fed.store import CorruptFileError, HeadRegistry, ModelStore


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Fed:
    return build_fed(tmp_path_factory.mktemp("durability"))


def flip(path: Path, offset: int = -40) -> bytes:
    """Flip one bit in place (as a bad disk would); returns the original bytes."""
    original = path.read_bytes()
    data = bytearray(original)
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    return original


class Running:
    """In-process owners (the same server code as ``owner serve``) and a coordinator."""

    def __init__(self, fed: Fed, tmp: Path, workspaces: dict[str, OwnerWorkspace]) -> None:
        self.owners = {
            m: serve_owner(ws, fed.owner_tls(m), health_interval=0.05)
            for m, ws in workspaces.items()
        }
        self.coordinator = Coordinator(
            tmp / "registry",
            [OwnerEndpoint(m, o.target) for m, o in self.owners.items()],
            fed.coordinator_tls,
            CoordinatorConfig(retry_interval_s=0.1),
        )

    def stop(self) -> None:
        self.coordinator.close()
        for o in self.owners.values():
            o.stop(0)


@pytest.fixture
def running(fed: Fed, tmp_path: Path) -> Iterator[Running]:
    r = Running(fed, tmp_path, fed.workspaces)
    assert r.coordinator.sync() == {m: "" for m in MODALITIES}
    yield r
    r.stop()


def _reference(fed: Fed) -> Reference:
    return Reference([snapshot_workspace(fed.workspaces[m], fed.ids) for m in MODALITIES])


def _health(fed: Fed, target: str) -> int:
    stub = health_pb2_grpc.HealthStub(create_channel(target, fed.requester))
    return stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status  # type: ignore[no-any-return]


# --- an owner's model store ---------------------------------------------------------------------


def test_damaged_model_pointer_is_reported_and_never_used(
    fed: Fed, running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    ids = fed.ids[:6]
    reference = _reference(fed)
    current = fed.workspaces["audio"].store.root / "CURRENT"
    original = flip(current)
    try:
        with caplog.at_level(logging.ERROR, logger="jacfusion_fed.clients.modality_service"):
            got = running.coordinator.predict(ids)
        audio, image = got.modalities
        assert audio.error.startswith("DATA_LOSS")
        assert "model store of modality 'audio' failed verification" in audio.error
        assert not audio.used_mask.any() and image.used_mask.all()
        assert reference.classify(ids, got).kind == "partial"
        # The owner's log names the file and what is wrong with it.
        assert f"failed verification: {current}: " in caplog.text
        # Health follows: NOT_SERVING while the pointer is damaged.
        wait_until(
            lambda: _health(fed, running.owners["audio"].target) == 2,  # NOT_SERVING
            "the owner's health to turn NOT_SERVING",
            timeout=10,
        )
    finally:
        current.write_bytes(original)
    got = running.coordinator.predict(ids)
    assert reference.classify(ids, got).kind == "correct"


@pytest.mark.parametrize("which", ["model", "logits"])
def test_damaged_store_file_after_a_restart(fed: Fed, tmp_path: Path, which: str) -> None:
    """An owner restarted (a new workspace object: nothing cached in memory) over a store
    whose model file or logit cache was damaged while it was down."""
    src = fed.workspaces["audio"]
    version = src.current_version()
    path = src.store.root / ("models" if which == "model" else "logits") / f"{version}.{which}"
    original = flip(path, offset=len(path.read_bytes()) // 2)
    restarted = OwnerWorkspace(
        src.root, "audio", f"npz:{fed.data['audio']}", Pseudonymizer.from_file(fed.key)
    )
    r = Running(fed, tmp_path, {"audio": restarted, "image": fed.workspaces["image"]})
    try:
        channel = connect_owner(r.owners["audio"].target, fed.coordinator_tls, "audio")
        stub = modality_pb2_grpc.ModalityServiceStub(channel)
        if which == "model":  # the head comes from the model: refused
            with pytest.raises(grpc.RpcError) as info:
                stub.GetHead(modality_pb2.GetHeadRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.DATA_LOSS
            assert r.coordinator.sync("audio")["audio"].startswith("DATA_LOSS")
        else:  # the logits come from the cache: refused, never recomputed silently
            with pytest.raises(grpc.RpcError) as info:
                stub.GetLogits(modality_pb2.GetLogitsRequest(sample_ids=fed.ids[:2]), timeout=5)
            assert info.value.code() == grpc.StatusCode.DATA_LOSS
            assert r.coordinator.sync("audio") == {"audio": ""}
            got = r.coordinator.predict(fed.ids[:4])
            assert got.modalities[0].error.startswith("DATA_LOSS")
            assert _reference(fed).classify(fed.ids[:4], got).kind == "partial"
        assert path.read_bytes() != original  # the damaged file was not "repaired" by use
    finally:
        r.stop()
        path.write_bytes(original)


# --- the coordinator's head registry -----------------------------------------------------------


def test_coordinator_refuses_to_start_on_a_damaged_registry(fed: Fed, tmp_path: Path) -> None:
    registry = HeadRegistry(tmp_path / "registry")
    for m in MODALITIES:
        ws = fed.workspaces[m]
        registry.register(
            m, f"{m}-co", ws.current_version(), class_counts=ws.class_counts(), gram=ws.head().gram
        )
    flip_entry(tmp_path / "registry", "audio")
    result = CliRunner().invoke(
        app,
        [
            "coordinator",
            "serve",
            "--registry",
            str(tmp_path / "registry"),
            "--tls",
            str(fed.certs.coordinator_dir),
            "--port",
            "0",
            "--owner",
            "audio=127.0.0.1:9",
            "--owner",
            "image=127.0.0.1:10",
        ],
    )
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    assert "head registry is damaged, refusing to start" in flat
    assert "audio/00000001" in flat and "SHA-256 mismatch" in flat


def test_damaged_registry_entry_at_run_time_is_never_used(fed: Fed, running: Running) -> None:
    """A new model version of audio while the image entry on disk is damaged: the new head
    cannot be recorded (DATA_LOSS, the registry is damaged) and audio's new logits are not
    fused with any head; image still answers."""
    c = running.coordinator
    registry_dir = Path(c.registry.location).parent
    sequence = c.registry.get("image").sequence
    original = flip_entry(registry_dir, "image", sequence)
    ws = fed.workspaces["audio"]
    old_version = ws.current_version()
    state = {k: v.clone() for k, v in ws.load_model()[1].state_dict().items()}
    state["head.bias"] += 0.25
    from jacfusion_fed.models import model_spec

    try:
        new_version = ws.store.save(state, model_spec(ws.load_model()[1]), {"note": "bumped"})
        ws.store.set_current(new_version)
        ws.logits(fed.ids)  # the owner's cache of the new version
        got = c.predict(fed.ids[:3])
        audio = got.modalities[0]
        assert audio.error.startswith("DATA_LOSS") and "head registry is damaged" in audio.error
        assert not audio.used_mask.any() and got.modalities[1].used_mask.all()
        assert c.head("audio").version == old_version
    finally:
        restore_entry(registry_dir, "image", sequence, original)
        ws.store.set_current(old_version)
    got = c.predict(fed.ids[:3])
    assert all(m.used_mask.all() for m in got.modalities)


def test_registry_write_failure_is_clear_and_heals(
    fed: Fed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk while the coordinator records heads: UNAVAILABLE naming the cause (not
    INTERNAL), the background sync survives, and everything heals once writes work again."""
    r = Running(fed, tmp_path, fed.workspaces)
    c = r.coordinator
    real = HeadRegistry.register

    attempts: list[str] = []

    def full_disk(self: HeadRegistry, *a: Any, **k: Any) -> Any:
        attempts.append("register")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(HeadRegistry, "register", full_disk)
    try:
        errors = c.sync()
        assert all(e.startswith("UNAVAILABLE") and "No space left" in e for e in errors.values())
        with pytest.raises(PredictError) as info:
            c.predict(fed.ids[:2])
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        c.start_sync()
        tried = len(attempts)  # the background sync meets the full disk twice: it lives on
        wait_until(lambda: len(attempts) >= tried + 2, "the sync thread to retry registering")
        assert c.sync_running
        monkeypatch.setattr(HeadRegistry, "register", real)
        wait_until(
            lambda: all(c.head(m) is not None for m in MODALITIES),
            "the sync thread to recover",
            timeout=20,
        )
        got = c.predict(fed.ids[:4])
        assert _reference(fed).classify(fed.ids[:4], got).kind == "correct"
    finally:
        r.stop()


# --- SIGKILL while writing -----------------------------------------------------------------------


# One process imports torch and the store once; each round is a fork of it that publishes and
# registers without end until the test kills it (SIGKILL) at a random moment. The parent reaps
# the writer and says so, then waits for the next round.
_WRITER = textwrap.dedent(
    """
    import os, sys, numpy as np, torch
    from jacfusion_fed.store import ModelStore, HeadRegistry

    def write_forever(seed):
        store, registry = ModelStore(sys.argv[1]), HeadRegistry(sys.argv[2])
        rng = np.random.default_rng(seed)
        print("ready", os.getpid(), flush=True)
        i = 0
        while True:
            i += 1
            w = torch.from_numpy(rng.normal(size=(64, 256)))
            version = store.save({"w": w, "b": torch.zeros(64)}, {"arch": "t", "i": i}, {})
            store.save_logits(version, [f"id{j}" for j in range(500)], rng.normal(size=(500, 8)))
            store.set_current(version)
            g = rng.normal(size=(8, 8))
            registry.register("audio", "audio-co", version, class_counts=[1] * 8, gram=g @ g.T)

    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            write_forever(int(line))
        os.waitpid(pid, 0)
        print("reaped", flush=True)
    """
)


def _check_after_crash(store_dir: Path, registry_dir: Path) -> tuple[int, int]:
    store = ModelStore(store_dir)  # removes stale temporary files
    assert not [p for p in store_dir.rglob(".*.tmp")]
    version = store.current_version()
    if version is not None:
        state, _spec, _ = store.load(version)  # verified: hash of the content
        assert tuple(state["w"].shape) == (64, 256)
    for v in store.versions():
        store.load(v)
        if store.has_logits(v):
            store.load_logits(v)
    registry = HeadRegistry(registry_dir)
    entries = registry.history("audio") if "audio" in registry.modalities() else []
    return len(store.versions()), len(entries)


def _kill_while_writing(tmp_path: Path, rounds: int) -> list[tuple[int, int]]:
    store_dir, registry_dir = tmp_path / "store", tmp_path / "registry"
    rng = random.Random(0)
    seen = []
    forks = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(store_dir), str(registry_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,
        text=True,
    )
    assert forks.stdin is not None and forks.stdout is not None
    try:
        for i in range(rounds):
            forks.stdin.write(f"{i}\n")
            forks.stdin.flush()
            ready = forks.stdout.readline().split()
            assert ready[:1] == ["ready"], ready
            try:
                time.sleep(rng.uniform(0.05, 0.6))  # under test: a random moment to crash at
            finally:
                os.kill(int(ready[1]), signal.SIGKILL)
            assert forks.stdout.readline().strip() == "reaped"  # the writer is gone
            try:
                seen.append(_check_after_crash(store_dir, registry_dir))
            except CorruptFileError as exc:  # pragma: no cover - the failure being tested for
                pytest.fail(f"round {i}: a file was left damaged by the crash: {exc}")
    finally:
        forks.stdin.close()
        try:
            forks.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(forks.pid, signal.SIGKILL)
            forks.wait(10)
        forks.stdout.close()
    return seen


def test_sigkill_while_publishing_and_registering(tmp_path: Path) -> None:
    seen = _kill_while_writing(tmp_path, 4)
    assert seen[-1][0] > 0  # versions were written and survived


@pytest.mark.slow
def test_sigkill_while_publishing_and_registering_long(tmp_path: Path) -> None:
    seen = _kill_while_writing(tmp_path, 40)
    print(
        f"\nkill-while-writing: {len(seen)} crashes; (versions, head entries) at the end {seen[-1]}"
    )
    assert np.all(np.diff([s[1] for s in seen]) >= 0)  # history only ever grows
