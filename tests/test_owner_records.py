"""Live records end to end over mTLS: two owners serving imported models (no data source), a
coordinator, and a requester client. PutRecords then Predict is checked against the fusion
library on the imported nets' own logits; idempotence, conflicts, replace, atomic refusal of a
bad batch, erasure, expiry, restart durability, role checks, raw ids, key rotation."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from helpers_legacy_store import files_containing
from torch import nn

from jacfusion_fed.clients.serve import OwnerServer, serve_owner
from jacfusion_fed.fusion import jacobian_fusion, log_prior_from_counts, statistical_fusion
from jacfusion_fed.owner import OwnerWorkspace
from jacfusion_fed.owner.input_spec import InputSpec
from jacfusion_fed.owner.model_import import import_model
from jacfusion_fed.privacy.certs import (
    DeploymentCerts,
    generate_deployment_certs,
    owner_server_name,
)
from jacfusion_fed.privacy.pseudonyms import Pseudonymizer
from jacfusion_fed.requester import Requester
from jacfusion_fed.rpc.jacfusion.v1 import modality_pb2, modality_pb2_grpc
from jacfusion_fed.rpc.tensor import encode_tensor
from jacfusion_fed.rpc.tls import TlsFiles, create_channel
from jacfusion_fed.server.coordinator import Coordinator
from jacfusion_fed.server.predict_types import OwnerEndpoint
from jacfusion_fed.server.serve import CoordinatorServer, serve_coordinator
from jacfusion_fed.store.record_store import KeyMismatchError

K = 4
KEY = b"a" * 32
SHAPES = {"image": (1, 5, 5), "audio": (12,)}
COUNTS = {"image": [10, 20, 30, 40], "audio": [5, 5, 10, 20]}
OWNERS = {"image": "img-co", "audio": "aud-co"}
PATIENTS = [f"Patient {i} 1970-01-0{i + 1}" for i in range(5)]


def _nets() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "image": nn.Sequential(nn.Flatten(), nn.Linear(25, 16), nn.Tanh(), nn.Linear(16, K)),
        "audio": nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, K)),
    }


@dataclass
class Deployment:
    root: Path
    certs: DeploymentCerts
    nets: dict[str, nn.Module]
    owners: dict[str, OwnerServer]
    coordinator: CoordinatorServer
    x: dict[str, np.ndarray]

    def workspace(self, modality: str, key: bytes = KEY, **kw: object) -> OwnerWorkspace:
        return OwnerWorkspace(
            self.root / f"ws-{modality}",
            modality,
            None,
            Pseudonymizer(key),
            **kw,  # type: ignore[arg-type]
        )

    def start_owner(self, modality: str, ws: OwnerWorkspace | None = None) -> None:
        tls = TlsFiles.from_dir(self.certs.owner_dirs[OWNERS[modality]])
        port = self.owners[modality].port if modality in self.owners else 0
        self.owners[modality] = serve_owner(ws or self.workspace(modality), tls, port=port)

    def requester(self, key: bytes = KEY) -> Requester:
        return Requester(
            coordinator=self.coordinator.target,
            owners={m: s.target for m, s in self.owners.items()},
            tls=TlsFiles.from_dir(self.certs.requester_dirs["alice"]),
            pseudonym_key=key,
        )

    def reference(self, rows: list[int], method: str) -> np.ndarray:
        logits = [
            self.nets[m](torch.from_numpy(self.x[m][rows])).detach().double()
            for m in ("image", "audio")
        ]
        counts = np.sum([COUNTS["image"], COUNTS["audio"]], axis=0)
        prior = log_prior_from_counts(counts)
        if method == "statistical":
            return statistical_fusion(logits, prior).numpy()
        grams = [
            (lambda w: w @ w.T)(self.nets[m][-1].weight.detach().double())  # type: ignore[index]
            for m in ("image", "audio")
        ]
        return jacobian_fusion(logits, grams, prior, gamma=0.5).numpy()


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("records")
    certs = generate_deployment_certs(root / "certs", {v: k for k, v in OWNERS.items()}, ["alice"])
    nets = _nets()
    rng = np.random.default_rng(0)
    x = {m: rng.random((len(PATIENTS), *s)).astype(np.float32) for m, s in SHAPES.items()}
    dep = Deployment(root, certs, nets, {}, None, x)  # type: ignore[arg-type]
    for m, net in nets.items():
        path = root / f"{m}.pt"
        torch.jit.save(torch.jit.script(net.eval()), path)
        spec = InputSpec.create(SHAPES[m], "float32", (0.0, 1.0))
        import_model(dep.workspace(m), path, class_counts=COUNTS[m], input_spec=spec)
        dep.start_owner(m)
    coord = Coordinator(
        root / "registry",
        [OwnerEndpoint(m, s.target) for m, s in dep.owners.items()],
        TlsFiles.from_dir(certs.coordinator_dir),
    )
    dep.coordinator = serve_coordinator(coord, TlsFiles.from_dir(certs.coordinator_dir))
    yield dep
    dep.coordinator.stop(0)
    for server in dep.owners.values():
        server.stop(0)


def _code(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    raise AssertionError("the call succeeded; expected an RpcError")


def _predict_eventually(req: Requester, ids: list[str], **kw: object):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 30
    while True:  # the coordinator registers the owners' heads in the background
        try:
            return req.predict(ids, **kw)  # type: ignore[arg-type]
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_submit_then_predict_matches_the_library(dep: Deployment) -> None:
    with dep.requester() as req:
        for m in ("image", "audio"):
            sub = req.submit(m, PATIENTS[:3], dep.x[m][:3])
            assert (sub.stored, sub.replaced, sub.unchanged) == (3, 0, 0)
        for method in ("jacobian", "statistical"):
            answer = _predict_eventually(req, PATIENTS[:3], method=method)
            assert answer.ids == PATIENTS[:3]
            assert answer.modalities_used == [["image", "audio"]] * 3
            np.testing.assert_allclose(
                answer.probabilities, dep.reference([0, 1, 2], method), rtol=1e-6, atol=1e-9
            )
            np.testing.assert_array_equal(answer.labels, answer.probabilities.argmax(1))


def test_idempotent_conflict_and_replace(dep: Deployment) -> None:
    with dep.requester() as req:
        req.submit("image", PATIENTS[3:4], dep.x["image"][3:4])
        again = req.submit("image", PATIENTS[3:4], dep.x["image"][3:4])
        assert (again.stored, again.unchanged) == (0, 1)
        other = np.clip(dep.x["image"][3:4] + 0.25, 0, 1)
        code, msg = _code(lambda: req.submit("image", PATIENTS[3:4], other))
        assert code == grpc.StatusCode.ALREADY_EXISTS and "record 0" in msg
        req.submit("audio", PATIENTS[3:4], dep.x["audio"][3:4])
        before = _predict_eventually(req, PATIENTS[3:4], method="statistical").probabilities
        replaced = req.submit("image", PATIENTS[3:4], other, replace=True)
        assert replaced.replaced == 1
        after = req.predict(PATIENTS[3:4], method="statistical").probabilities
        assert not np.allclose(before, after)  # the cached logits of the old input are gone
        dep.x["image"][3] = other[0]
        np.testing.assert_allclose(after, dep.reference([3], "statistical"), rtol=1e-6)


def test_bad_batch_refused_as_a_whole(dep: Deployment) -> None:
    ids = ["Batch A", "Batch B", "Batch C"]
    x = np.random.default_rng(1).random((3, *SHAPES["audio"])).astype(np.float32)
    x[2, 4] = np.inf
    with dep.requester() as req:
        code, msg = _code(lambda: req.submit("audio", ids, x))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "record 2" in msg and "infinite" in msg
        x[2, 4] = 7.0
        code, msg = _code(lambda: req.submit("audio", ids, x))
        assert "record 2" in msg and "outside the range" in msg
        code, msg = _code(lambda: req.submit("audio", ids, np.zeros((3, 11), np.float32)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "shape" in msg
        deleted = req.forget(ids, modalities=["audio"])
        assert deleted.deleted["audio"] == []  # nothing of the refused batches was stored
        assert deleted.unknown["audio"] == ids


def test_forget_then_not_found(dep: Deployment) -> None:
    with dep.requester() as req:
        for m in ("image", "audio"):
            req.submit(m, [PATIENTS[4]], dep.x[m][4:5])
        _predict_eventually(req, [PATIENTS[4]])
        gone = req.forget([PATIENTS[4]])
        assert gone.deleted == {"audio": [PATIENTS[4]], "image": [PATIENTS[4]]}
        code, msg = _code(lambda: req.predict([PATIENTS[4]]))
        assert code == grpc.StatusCode.NOT_FOUND
        assert PATIENTS[4] not in msg
    ws_root = dep.root / "ws-image" / "live"
    sid = Pseudonymizer(KEY)(PATIENTS[4])
    assert not list(ws_root.rglob(f"{sid}*"))
    row = np.ascontiguousarray(dep.x["image"][4], dtype="<f4").tobytes()
    assert files_containing(ws_root, {"input": row}) == {}  # no byte of it in any file


def test_roles_on_the_new_rpcs(dep: Deployment) -> None:
    target = dep.owners["image"].target
    request = modality_pb2.PutRecordsRequest(
        sample_ids=[Pseudonymizer(KEY)("x")],
        inputs=encode_tensor(np.zeros((1, *SHAPES["image"]), np.float32)),
    )
    for tls_dir in (dep.certs.coordinator_dir, dep.certs.owner_dirs["aud-co"]):
        channel = create_channel(
            target, TlsFiles.from_dir(tls_dir), server_name=owner_server_name("image")
        )
        stub = modality_pb2_grpc.ModalityServiceStub(channel)
        delete = modality_pb2.DeleteRecordsRequest(sample_ids=list(request.sample_ids))
        for call in (
            lambda s=stub: s.PutRecords(request, timeout=5),
            lambda s=stub, d=delete: s.DeleteRecords(d, timeout=5),
        ):
            assert _code(call)[0] == grpc.StatusCode.PERMISSION_DENIED
        channel.close()
    channel = create_channel(  # a requester may not read logits
        target,
        TlsFiles.from_dir(dep.certs.requester_dirs["alice"]),
        server_name=owner_server_name("image"),
    )
    stub = modality_pb2_grpc.ModalityServiceStub(channel)
    get = modality_pb2.GetLogitsRequest(sample_ids=list(request.sample_ids))
    assert _code(lambda: stub.GetLogits(get, timeout=5))[0] == grpc.StatusCode.PERMISSION_DENIED
    channel.close()


def test_raw_ids_refused_and_not_echoed(dep: Deployment) -> None:
    raw = "Jane Doe 1970-01-01"
    tls = TlsFiles.from_dir(dep.certs.requester_dirs["alice"])
    owner = modality_pb2_grpc.ModalityServiceStub(
        create_channel(dep.owners["image"].target, tls, server_name=owner_server_name("image"))
    )
    request = modality_pb2.PutRecordsRequest(
        sample_ids=[Pseudonymizer(KEY)("ok"), raw],
        inputs=encode_tensor(np.zeros((2, *SHAPES["image"]), np.float32)),
    )
    code, msg = _code(lambda: owner.PutRecords(request, timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "position 1" in msg
    assert "Jane" not in msg and "1970" not in msg
    from jacfusion_fed.rpc.channels import connect_coordinator
    from jacfusion_fed.rpc.jacfusion.v1 import fusion_pb2, fusion_pb2_grpc

    fusion = fusion_pb2_grpc.FusionServiceStub(connect_coordinator(dep.coordinator.target, tls))
    code, msg = _code(
        lambda: fusion.Predict(fusion_pb2.PredictRequest(sample_ids=[raw, raw]), timeout=5)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "position 0" in msg
    assert "Jane" not in msg and "1970" not in msg


def test_import_while_serving_is_a_model_update(dep: Deployment) -> None:
    """A new imported version is picked up like a retrain: the coordinator fuses the new
    logits with the new version's head, never with the old one."""
    ids = ["Update A", "Update B"]
    with dep.requester() as req:
        for m in ("image", "audio"):
            req.submit(m, ids, dep.x[m][:2])
        before = _predict_eventually(req, ids, method="jacobian")
        torch.manual_seed(7)
        net = nn.Sequential(nn.Flatten(), nn.Linear(25, 16), nn.Tanh(), nn.Linear(16, K)).eval()
        path = dep.root / "image-v2.pt"
        torch.jit.save(torch.jit.script(net), path)
        spec = InputSpec.create(SHAPES["image"], "float32", (0.0, 1.0))
        report = import_model(
            dep.workspace("image"), path, class_counts=COUNTS["image"], input_spec=spec
        )
        dep.nets["image"] = net
        after = req.predict(ids, method="jacobian")
        assert after.model_versions["image"] == report.version
        assert report.version != before.model_versions["image"]
        np.testing.assert_allclose(
            after.probabilities, dep.reference([0, 1], "jacobian"), rtol=1e-6, atol=1e-9
        )


def test_cli_predict_prints_accuracy(dep: Deployment, tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from jacfusion_fed.cli import app
    from jacfusion_fed.privacy.pseudonyms import write_key

    key = write_key(tmp_path / "k.key", KEY)
    want = dep.reference([0, 1], "statistical").argmax(1)
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({PATIENTS[0]: int(want[0]), PATIENTS[1]: int(want[1] + 1) % K}))
    result = CliRunner().invoke(
        app,
        [
            "predict",
            *PATIENTS[:2],
            "--coordinator",
            dep.coordinator.target,
            "--tls",
            str(dep.certs.requester_dirs["alice"]),
            "--pseudonym-key",
            str(key),
            "--method",
            "statistical",
            "--labels",
            str(labels),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "accuracy: 50.0% (1 of 2 labelled samples)" in result.output


def test_restart_durability_and_key_rotation(dep: Deployment) -> None:
    """Records survive an owner restart; a new key is refused until a rotation re-keys them;
    after it, the old key's pseudonyms are refused and the new ones answer."""
    ids = ["Rot A", "Rot B"]
    with dep.requester() as req:
        for m in ("image", "audio"):
            req.submit(m, ids, dep.x[m][:2])
        first = _predict_eventually(req, ids, method="statistical").probabilities
    dep.owners["image"].stop(0)
    dep.start_owner("image")  # same port, fresh process state, same workspace
    with dep.requester() as req:
        np.testing.assert_allclose(req.predict(ids, method="statistical").probabilities, first)
    new_key = b"b" * 32
    dep.owners["image"].stop(0)
    with pytest.raises(KeyMismatchError, match="fingerprint"):  # never serves the old cache
        dep.start_owner("image", dep.workspace("image", new_key))
    old = dep.workspace("image")
    mapping = Requester(
        tls=TlsFiles.from_dir(dep.certs.requester_dirs["alice"]), pseudonym_key=KEY
    ).rekey_map(ids, new_key)
    renamed, erased = old.rekey(Pseudonymizer(new_key), mapping)
    assert renamed == 2 and erased > 0  # the other tests' records had no mapping
    dep.start_owner("image", dep.workspace("image", new_key))
    with dep.requester(new_key) as req:
        assert req.submit("image", ["Rot C"], dep.x["image"][:1]).stored == 1
    with dep.requester() as req:  # old key: refused by fingerprint at the owner
        code, msg = _code(lambda: req.submit("image", ["Rot C"], dep.x["image"][:1]))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "fingerprint" in msg
        code, msg = _code(lambda: req.predict(ids, modalities=["image"]))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "retired" in msg
    ws = dep.workspace("image", new_key)
    answer = ws.logits(Pseudonymizer(new_key).many(ids))
    assert len(answer.sample_ids) == 2
    want = dep.nets["image"](torch.from_numpy(dep.x["image"][:2])).detach().double().numpy()
    np.testing.assert_allclose(answer.logits, want, rtol=1e-5)


def test_expiry(tmp_path: Path) -> None:
    net = _nets()["audio"].eval()
    path = tmp_path / "a.pt"
    torch.jit.save(torch.jit.script(net), path)
    ws = OwnerWorkspace(tmp_path / "ws", "audio", None, Pseudonymizer(KEY), retention_s=0.5)
    import_model(ws, path, class_counts=COUNTS["audio"], input_spec=InputSpec.create((12,)))
    sid = Pseudonymizer(KEY)("Short stay")
    ws.put_records([sid], np.zeros((1, 12), np.float32))
    assert ws.logits([sid]).sample_ids == [sid]
    time.sleep(0.7)
    assert ws.logits([sid]).unknown_ids == [sid]
    assert not list((tmp_path / "ws" / "live").rglob(f"{sid}*"))
    assert sid not in ws.live.store.ids(purge=False)  # erased, not only hidden


def test_flower_query_does_not_echo_raw_ids() -> None:
    from jacfusion_fed.federation.protocol import (
        MalformedRequestError,
        parse_query_request,
        query_request,
    )

    ids = [Pseudonymizer(KEY)("x"), "Jane Doe 1970-01-01"]
    with pytest.raises(MalformedRequestError, match="position 1") as info:
        parse_query_request(query_request(ids, "0123456789abcdef"))
    assert "Jane" not in str(info.value)


def _violations(call: object) -> list[tuple[str, str]]:
    """The ``google.rpc.BadRequest`` field violations of a refused call, read by a plain
    client (``rpc_status.from_call``)."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc
        status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    else:
        raise AssertionError("the call succeeded; expected INVALID_ARGUMENT")
    assert status is not None, "no google.rpc.Status details"
    out = []
    for detail in status.details:
        assert detail.Is(error_details_pb2.BadRequest.DESCRIPTOR), detail.type_url
        request = error_details_pb2.BadRequest()
        detail.Unpack(request)
        out += [(v.field, v.description) for v in request.field_violations]
    return out


def test_invalid_argument_names_record_and_field(dep: Deployment, tmp_path: Path) -> None:
    """Plain gRPC clients read BadRequest field violations naming the record index and the
    field; the requester's exceptions and the CLI's one line show them."""
    from typer.testing import CliRunner

    from jacfusion_fed.cli import app
    from jacfusion_fed.privacy.pseudonyms import write_key
    from jacfusion_fed.rpc.channels import connect_coordinator
    from jacfusion_fed.rpc.jacfusion.v1 import fusion_pb2, fusion_pb2_grpc
    from jacfusion_fed.rpc.record_batches import SubmitError
    from jacfusion_fed.rpc.status_details import DetailedRpcError

    tls = TlsFiles.from_dir(dep.certs.requester_dirs["alice"])
    owner = modality_pb2_grpc.ModalityServiceStub(
        create_channel(dep.owners["audio"].target, tls, server_name=owner_server_name("audio"))
    )
    pz = Pseudonymizer(KEY)
    x = np.random.default_rng(3).random((3, *SHAPES["audio"])).astype(np.float32)
    x[2, 4] = np.inf
    request = modality_pb2.PutRecordsRequest(
        sample_ids=pz.many(["Rich A", "Rich B", "Rich C"]), inputs=encode_tensor(x)
    )
    [(field, text)] = _violations(lambda: owner.PutRecords(request, timeout=5))
    assert field == "inputs[2]" and "infinite" in text
    request = modality_pb2.PutRecordsRequest(
        sample_ids=[pz("ok"), "Jane Doe 1970-01-01"], inputs=encode_tensor(x[:2])
    )
    [(field, text)] = _violations(lambda: owner.PutRecords(request, timeout=5))
    assert field == "sample_ids[1]" and "pseudonym" in text and "Jane" not in text

    fusion = fusion_pb2_grpc.FusionServiceStub(connect_coordinator(dep.coordinator.target, tls))
    ids = pz.many(["Rich A", "Rich B"])
    predict = fusion_pb2.PredictRequest(sample_ids=[ids[0], ids[1], ids[0]])
    assert _violations(lambda: fusion.Predict(predict, timeout=5)) == [
        ("sample_ids[2]", "repeats sample_ids[0]")
    ]
    predict = fusion_pb2.PredictRequest(
        sample_ids=ids, options=fusion_pb2.FusionOptions(iterations=999)
    )
    [(field, text)] = _violations(lambda: fusion.Predict(predict, timeout=5))
    assert field == "options.iterations" and "999" in text

    with dep.requester() as req:  # the requester's exceptions carry and show them
        try:
            req.submit(
                "audio", ["Rich A", "Rich B", "Rich C", "Rich D"], np.concatenate([x, x[:1]])
            )
        except SubmitError as exc:
            assert exc.violations[0][0] == "inputs[2]"
            assert "inputs[2]: " in str(exc)
        else:
            raise AssertionError("submit succeeded")
        try:
            req.predict(["Rich A", "Rich B"], iterations=999)
        except DetailedRpcError as exc:
            assert exc.violations[0][0] == "options.iterations"
            assert "(options.iterations: must be in 1.." in str(exc)
        else:
            raise AssertionError("predict succeeded")

    key = write_key(tmp_path / "k.key", KEY)
    result = CliRunner().invoke(
        app,
        [
            "predict",
            "Rich A",
            "--coordinator",
            dep.coordinator.target,
            "--tls",
            str(dep.certs.requester_dirs["alice"]),
            "--pseudonym-key",
            str(key),
            "--iterations",
            "999",
        ],
    )
    assert result.exit_code == 1, result.output
    [line] = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert line.startswith("error: INVALID_ARGUMENT: iterations must be in 1..")
    assert "(options.iterations: must be in 1.." in line, line
