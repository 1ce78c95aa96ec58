"""A new patient, end to end: bring your own model, send the records, get a fused answer, forget.

Two companies already have models trained outside this project: the imaging company ships a
TorchScript file, the audio company safetensors weights plus the function that builds its
network (``byom_nets:audio_net``). Each imports its model into its owner workspace (no data
source at all: it answers only for records a hospital sends), and serves it over mTLS. The
hospital (a requester) sends a new patient's X-ray-like image to one company and the
recording to the other, asks the coordinator for the fused answer, then has the patient
forgotten. Every id is pseudonymized inside the hospital's client; neither company nor the
coordinator ever sees "Jane Doe 1970-01-01".

The same with the CLI, one process per server, is the README's "New patients" section (which
``make test-readme`` runs as written, with the stand-ins of ``examples/byom_files.py``).

Run:  python examples/new_patient.py        (about a minute on 2 CPU cores)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import grpc
import safetensors.torch
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the audio company's byom_nets

import byom_nets
from byom_files import train_elsewhere

from jacfusion_fed.clients.serve import serve_owner
from jacfusion_fed.data import load_builtin
from jacfusion_fed.owner import OwnerWorkspace
from jacfusion_fed.owner.input_spec import InputSpec
from jacfusion_fed.owner.model_import import import_model
from jacfusion_fed.privacy.certs import generate_deployment_certs
from jacfusion_fed.privacy.pseudonyms import Pseudonymizer, generate_key, write_key
from jacfusion_fed.requester import Requester
from jacfusion_fed.rpc.tls import TlsFiles
from jacfusion_fed.server.coordinator import Coordinator
from jacfusion_fed.server.predict_types import OwnerEndpoint
from jacfusion_fed.server.serve import serve_coordinator

PATIENT = "Jane Doe 1970-01-01"


def main(root: Path) -> dict[str, float]:
    train = load_builtin("avdigits", "train", 0, quick=True)
    test = load_builtin("avdigits", "test", 0, quick=True)
    counts = [int(c) for c in train.class_counts()]

    # --- the two companies, before this project -----------------------------------------
    image_net = train_elsewhere(byom_nets.image_net(), train.modalities["image"], train.labels, 20)
    torch.jit.save(torch.jit.script(image_net), root / "image.pt")
    audio_net = train_elsewhere(byom_nets.audio_net(), train.modalities["audio"], train.labels, 20)
    safetensors.torch.save_file(audio_net.state_dict(), str(root / "audio.safetensors"))

    # --- the deployment -------------------------------------------------------------------
    certs = generate_deployment_certs(
        root / "certs", {"radiology": "image", "audiology": "audio"}, ["clinic"]
    )
    key = write_key(root / "pseudonym.key", generate_key())
    owners = {}
    for modality, owner, model, factory in (
        ("image", "radiology", "image.pt", None),
        ("audio", "audiology", "audio.safetensors", "byom_nets:audio_net"),
    ):
        ws = OwnerWorkspace(root / f"ws-{modality}", modality, None, Pseudonymizer.from_file(key))
        spec = InputSpec.create(train.modalities[modality].shape[1:], "float32", (0.0, 1.0))
        report = import_model(
            ws, root / model, factory=factory, class_counts=counts, input_spec=spec
        )
        print(
            f"{owner}: imported {model} ({report.format}, head {report.head!r}) as "
            f"version {report.version}"
        )
        owners[modality] = serve_owner(ws, TlsFiles.from_dir(certs.owner_dirs[owner]))
    coordinator_tls = TlsFiles.from_dir(certs.coordinator_dir)
    coordinator = Coordinator(
        root / "registry", [OwnerEndpoint(m, s.target) for m, s in owners.items()], coordinator_tls
    )
    fusion = serve_coordinator(coordinator, coordinator_tls)
    accuracy: dict[str, float] = {}
    try:
        with Requester(
            coordinator=fusion.target,
            owners={m: s.target for m, s in owners.items()},
            tls=certs.requester_dirs["clinic"],
            pseudonym_key=key,
        ) as hospital:
            # --- a new patient arrives ----------------------------------------------------
            for modality in ("image", "audio"):
                hospital.submit(modality, [PATIENT], test.modalities[modality][:1])
            answer = _predict(hospital, [PATIENT])
            label = int(answer.labels[0])
            print(
                f"\n{PATIENT}: fused label {label} (p = {answer.probabilities[0, label]:.3f}), "
                f"true label {int(test.labels[0])}, modalities used "
                f"{answer.modalities_used[0]}"
            )
            hospital.forget([PATIENT])
            try:
                hospital.predict([PATIENT])
            except grpc.RpcError as exc:
                print(f"after forget: {exc.code().name} ({exc.details()[:60]}...)")

            # --- the rest of the test patients: is the fused answer worth having? ---------
            ids = [f"patient {i}" for i in range(1, len(test))]
            for modality in ("image", "audio"):
                hospital.submit(modality, ids, test.modalities[modality][1:])
            truth = dict(zip(ids, test.labels[1:].tolist(), strict=True))
            for name, options in (
                ("image alone", {"modalities": ["image"]}),
                ("audio alone", {"modalities": ["audio"]}),
                ("fused (Jacobian)", {"method": "jacobian"}),
                ("fused (statistical)", {"method": "statistical"}),
            ):
                accuracy[name] = _predict(hospital, ids, **options).accuracy(truth)
                print(f"{name:>20}: {accuracy[name]:.1%} on {len(ids)} new patients")
            hospital.forget(ids)
    finally:
        fusion.stop(0)
        for server in owners.values():
            server.stop(0)
    return accuracy


def _predict(hospital: Requester, ids: list[str], **options: object):  # type: ignore[no-untyped-def]
    import time

    deadline = time.monotonic() + 30
    while True:  # the coordinator registers the owners' heads right after it starts
        try:
            return hospital.predict(ids, **options)  # type: ignore[arg-type]
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        main(Path(tmp))
