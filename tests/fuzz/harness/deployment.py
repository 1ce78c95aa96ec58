"""Certificates, a tiny owner workspace and a time budget for the fuzz runs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .draw import K


def deployment_pems(root: Path) -> dict[str, bytes]:
    """Certificates (PEM) of one requester, one owner and the coordinator of a new CA."""
    from jacfusion_fed.privacy.certs import generate_deployment_certs

    certs = generate_deployment_certs(root, {"audio-co": "audio"}, ["alice"])
    return {
        "requester": (certs.requester_dirs["alice"] / "cert.pem").read_bytes(),
        "owner": (certs.owner_dirs["audio-co"] / "cert.pem").read_bytes(),
        "coordinator": (certs.coordinator_dir / "cert.pem").read_bytes(),
    }


def tiny_workspace(root: Path) -> Any:
    """A trained owner workspace (audio, K=4, 240 records) for the owner target."""
    from jacfusion_fed.bench.deployment import ServeBenchConfig, make_dataset
    from jacfusion_fed.owner import OwnerWorkspace
    from jacfusion_fed.privacy.pseudonyms import Pseudonymizer, generate_key

    root.mkdir(parents=True, exist_ok=True)
    data = make_dataset(root, ServeBenchConfig(samples=240, classes=K, features=8))
    ws = OwnerWorkspace(root / "ws", "audio", f"npz:{data['audio']}", Pseudonymizer(generate_key()))
    ws.train(epochs=1, seed=0)
    ws.logits(ws.pseudonyms("train"))  # fill the logit cache
    return ws


def time_budget(seconds: float) -> Iterator[int]:
    """0, 1, 2, ... until ``seconds`` have passed."""
    t0 = time.monotonic()
    i = 0
    while time.monotonic() - t0 < seconds:
        yield i
        i += 1
