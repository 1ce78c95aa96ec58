"""The requester asks ``GetModelInfo`` once per coordinator connection (again when an answer
names other model versions, or after FAILED_PRECONDITION) and pseudonymizes each id once per
predict, in the library and in ``jacfusion-fed predict`` (a real FusionService in-process over
fake owners)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from typer.testing import CliRunner

from jacfusion_fed.cli import app
from jacfusion_fed.privacy.pseudonyms import Pseudonymizer, write_key
from jacfusion_fed.requester import Requester
from jacfusion_fed.rpc.fusion_codec import PredictOptions
from jacfusion_fed.rpc.tls import INSECURE
from jacfusion_fed.server.predict_types import CoordinatorConfig
from jacfusion_fed.server.serve import serve_coordinator

sys.path.insert(0, str(Path(__file__).parent / "fuzz"))
import harness as H

KEY = b"k" * 32
PATIENTS = [f"patient-{i}" for i in range(6)]


class CountingPseudonymizer(Pseudonymizer):
    calls = 0
    ids = 0

    def many(self, patient_ids: Iterable[str]) -> list[str]:
        out = super().many(patient_ids)
        type(self).calls += 1
        type(self).ids += len(out)
        return out


@dataclass
class Served:
    target: str
    owners: dict[str, H.GoodOwner]
    info_calls: list[int]


@pytest.fixture
def served() -> Iterator[Served]:
    owners = H.make_good_owners(n=len(PATIENTS))
    pz = Pseudonymizer(KEY)
    for o in owners.values():  # every owner holds every patient, by pseudonym
        values = list(o.logits.values())
        o.logits = {pz(p): values[i % len(values)] for i, p in enumerate(PATIENTS)}
    stubs = {m: H.good_stub(o) for m, o in owners.items()}
    with H.CoordinatorHarness(stubs, CoordinatorConfig()) as h:
        assert h.coordinator.sync() == {m: "" for m in owners}
        calls: list[int] = []
        real = h.coordinator.model_info

        def counted() -> Any:
            calls.append(1)
            return real()

        h.coordinator.model_info = counted  # type: ignore[method-assign]
        server = serve_coordinator(h.coordinator, INSECURE, port=0, sync=False)
        try:
            yield Served(f"127.0.0.1:{server.port}", owners, calls)
        finally:
            server.stop(0)


def test_model_info_is_asked_once_until_the_versions_move(served: Served) -> None:
    with Requester(served.target, tls=INSECURE, pseudonym_key=KEY) as client:
        first = client.model_info()
        assert client.model_info() is first and len(served.info_calls) == 1
        answer = client.predict(PATIENTS[:3])
        assert answer.ids == PATIENTS[:3]
        assert client.model_info() is first and len(served.info_calls) == 1  # same versions
        served.owners["audio"].version = "f" * 16  # the owner moves on: a new head
        moved = client.predict(PATIENTS[:3])
        assert moved.model_versions["audio"] == "f" * 16
        again = client.model_info()
        assert len(served.info_calls) == 2
        versions = {m.modality: m.model_version for m in again.modalities}
        assert versions["audio"] == "f" * 16
        # A refusal that says the heads do not fit the request drops the kept info too.
        with pytest.raises(grpc.RpcError) as err:
            client.predict(PATIENTS[:3], method="robust")  # no owner published a calibration
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        client.model_info()
        assert len(served.info_calls) == 3
        client.model_info(refresh=True)
        assert len(served.info_calls) == 4


def test_predict_pseudonymizes_each_id_once(served: Served) -> None:
    CountingPseudonymizer.calls = CountingPseudonymizer.ids = 0
    pz = CountingPseudonymizer(KEY)
    with Requester(served.target, tls=INSECURE, pseudonym_key=pz) as client:
        answer = client.predict(PATIENTS)
        assert answer.ids == PATIENTS
        np.testing.assert_allclose(answer.probabilities.sum(axis=1), 1.0)
        options = PredictOptions(method="statistical")
        answer = client.ask(PATIENTS[:2], options, stream=True, chunk_size=1)
        assert answer.ids == PATIENTS[:2]
    assert (CountingPseudonymizer.calls, CountingPseudonymizer.ids) == (2, len(PATIENTS) + 2)


def test_cli_predict_pseudonymizes_once_and_asks_model_info_once(
    served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counts = {"ids": 0, "calls": 0}
    real = Pseudonymizer.many

    def many(self: Pseudonymizer, patient_ids: Iterable[str]) -> list[str]:
        out = real(self, patient_ids)
        counts["calls"] += 1
        counts["ids"] += len(out)
        return out

    monkeypatch.setattr(Pseudonymizer, "many", many)
    key = write_key(tmp_path / "pseudonym.key", KEY)
    args = ["predict", "--coordinator", served.target, "--insecure", "--pseudonym-key", str(key)]
    result = CliRunner().invoke(app, [*args, "--json", *PATIENTS[:4]])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert [s["local_id"] for s in payload["samples"]] == PATIENTS[:4]
    assert counts == {"ids": 4, "calls": 1}
    assert len(served.info_calls) == 1
