"""Accuracy of the README's online walkthrough, measured by following it.

Two owners train with ``owner serve --train-if-missing``'s recipe (the simulation's:
:mod:`jacfusion_fed.owner.recipe`) on ``builtin:avdigits?quick=1``, serve over mTLS, and a
coordinator fuses; the requester predicts every test patient through
:class:`jacfusion_fed.requester.Requester` and scores with its labels. Per modality alone, fused
(Jacobian, the coordinator's default, and statistical), on the same ids.

Run:  python benchmarks/walkthrough_accuracy.py --out docs/results/walkthrough.json
      (about 3 minutes on 2 shared CPU cores)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from jacfusion_fed.clients.serve import serve_owner
from jacfusion_fed.owner import OwnerWorkspace
from jacfusion_fed.owner.recipe import recipe_for, train_recommended
from jacfusion_fed.privacy.certs import generate_deployment_certs
from jacfusion_fed.privacy.pseudonyms import Pseudonymizer, generate_key, write_key
from jacfusion_fed.requester import Requester
from jacfusion_fed.rpc.tls import TlsFiles
from jacfusion_fed.server.coordinator import Coordinator
from jacfusion_fed.server.predict_types import OwnerEndpoint
from jacfusion_fed.server.serve import serve_coordinator

SOURCE = "builtin:avdigits?quick=1"
OWNERS = {"image": "radiology", "audio": "audiology"}
# A modality alone through the coordinator: statistical fusion of one modality is its own
# softmax (the net's own answer); Jacobian regularization of a lone modality can move it.
RUNS = {
    "image": {"modalities": ["image"], "method": "statistical"},
    "audio": {"modalities": ["audio"], "method": "statistical"},
    "fused_jacobian": {"method": "jacobian"},
    "fused_statistical": {"method": "statistical"},
}


def _predict(req: Requester, ids: list[str], **options: Any) -> Any:
    deadline = time.monotonic() + 60
    while True:  # the coordinator registers the owners' heads right after it starts
        try:
            return req.predict(ids, **options)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def measure(root: Path, source: str = SOURCE, split: str = "test") -> dict[str, Any]:
    """Follow the walkthrough under ``root``; return the results (see the module docstring)."""
    certs = generate_deployment_certs(root / "certs", {v: k for k, v in OWNERS.items()}, ["clinic"])
    key = write_key(root / "pseudonym.key", generate_key())
    servers, training = {}, {}
    labels: dict[str, int] = {}
    local_ids: list[str] = []
    try:
        for modality, owner in OWNERS.items():
            ws = OwnerWorkspace(
                root / f"ws-{modality}", modality, source, Pseudonymizer.from_file(key)
            )
            training[modality] = {
                "recipe": vars(recipe_for(ws)),
                "metrics": train_recommended(ws),
            }
            data = ws.records[split]
            local_ids = list(data.sample_ids)
            labels = dict(zip(local_ids, data.labels.tolist(), strict=True))
            servers[modality] = serve_owner(ws, TlsFiles.from_dir(certs.owner_dirs[owner]))
        tls = TlsFiles.from_dir(certs.coordinator_dir)
        endpoints = [OwnerEndpoint(m, s.target) for m, s in servers.items()]
        fusion = serve_coordinator(Coordinator(root / "registry", endpoints, tls), tls)
        try:
            with Requester(
                coordinator=fusion.target, tls=certs.requester_dirs["clinic"], pseudonym_key=key
            ) as req:
                accuracy = {
                    name: _predict(req, local_ids, **options).accuracy(labels)
                    for name, options in RUNS.items()
                }
        finally:
            fusion.stop(0)
    finally:
        for server in servers.values():
            server.stop(0)
    return {
        "source": source,
        "split": split,
        "samples": len(local_ids),
        "accuracy": accuracy,
        "training": training,
        "command": "python benchmarks/walkthrough_accuracy.py --out docs/results/walkthrough.json",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("walkthrough.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = measure(Path(tmp))
    args.out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    for name, acc in results["accuracy"].items():
        print(f"{name:>18}: {acc:.1%}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
