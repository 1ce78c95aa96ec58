"""``owner serve`` and ``coordinator serve`` as a user runs them: one start-up line each (not
one from the command and one from the library's log), each split's accuracy after
``--train-if-missing``, a records-only owner without ``--data``, and the port file gone once
the server stops."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from jacfusion_fed.bench.deployment import ServeBenchConfig, make_dataset
from jacfusion_fed.privacy.pseudonyms import generate_key, write_key
from jacfusion_fed.processes import ProcessSet

CLI = "from jacfusion_fed.cli import main; main()"


@pytest.mark.e2e
def test_start_lines_once_and_port_files_removed_at_stop(tmp_path: Path) -> None:
    data = make_dataset(tmp_path, ServeBenchConfig(samples=64, classes=3, features=4))
    key = write_key(tmp_path / "pseudonym.key", generate_key())
    with ProcessSet(tmp_path / "logs", prefix=(sys.executable, "-c", CLI)) as procs:
        owner_port = tmp_path / "owner.port"
        owner = ["owner", "serve", "--insecure", "--workspace", str(tmp_path / "ws")]
        owner += ["--modality", "audio", "--data", f"npz:{data['audio']}", "--epochs", "1"]
        owner += ["--pseudonym-key", str(key), "--port", "0", "--port-file", str(owner_port)]
        procs.start_serving("owner", [*owner, "--train-if-missing"], owner_port)
        port = procs.wait_port("owner", owner_port)
        records_port = tmp_path / "records.port"
        records = ["owner", "serve", "--insecure", "--workspace", str(tmp_path / "ws")]
        records += ["--modality", "audio", "--pseudonym-key", str(key), "--retention", "60"]
        records += ["--port", "0", "--port-file", str(records_port)]  # no --data: records only
        coord_port = tmp_path / "coordinator.port"
        coordinator = ["coordinator", "serve", "--insecure", "--registry", str(tmp_path / "r")]
        coordinator += ["--owner", f"audio=127.0.0.1:{port}"]
        coordinator += ["--port", "0", "--port-file", str(coord_port)]
        procs.start_serving("coordinator", coordinator, coord_port)
        procs.wait_port("coordinator", coord_port)
        for name, port_file in (("owner", owner_port), ("coordinator", coord_port)):
            assert procs.stop(name, timeout=30) == 0, procs.log(name)
            assert not port_file.exists(), f"{name} left its port file behind"
        owner_log = procs.log("owner")
        assert re.search(r"audio accuracy: train [0-9.]+ %, test [0-9.]+ %", owner_log), owner_log
        for name in ("owner", "coordinator"):
            serving = [ln for ln in procs.log(name).splitlines() if " serving " in ln]
            assert len(serving) == 1, (name, serving)
        # the same workspace as a records-only owner (its model now trained), no --data
        procs.start_serving("records", records, records_port)
        procs.wait_port("records", records_port)
        assert procs.stop("records", timeout=30) == 0, procs.log("records")
        assert not records_port.exists()


@pytest.mark.e2e
def test_owner_serve_input_test_publishes_the_combined_pvalue(tmp_path: Path) -> None:
    """``owner serve --input-test`` as the README writes it: fitted once before serving and
    kept; GetLogits' p-values are min(1, 2 min(feature, input)); a restart reuses it."""
    import grpc
    import numpy as np
    import torch

    from jacfusion_fed.fusion import combine_pvalues
    from jacfusion_fed.owner import OwnerWorkspace
    from jacfusion_fed.owner.detector import INPUT_TEST_FILE, pvalues_of_inputs
    from jacfusion_fed.privacy.pseudonyms import Pseudonymizer
    from jacfusion_fed.rpc.jacfusion.v1 import modality_pb2, modality_pb2_grpc
    from jacfusion_fed.training.input_detector import from_tensors, input_pvalues

    data = "builtin:avdigits?quick=1"
    key = write_key(tmp_path / "pseudonym.key", generate_key())
    root = tmp_path / "ws-image"
    port_file = tmp_path / "owner.port"
    owner = ["owner", "serve", "--insecure", "--workspace", str(root), "--modality", "image"]
    owner += ["--data", data, "--pseudonym-key", str(key), "--train-if-missing", "--epochs", "1"]
    owner += ["--port", "0", "--port-file", str(port_file), "--input-test"]
    ws = OwnerWorkspace(root, "image", data, Pseudonymizer.from_file(key))
    ids = ws.pseudonyms("test")[:50]
    with ProcessSet(tmp_path / "logs", prefix=(sys.executable, "-c", CLI)) as procs:
        procs.start_serving("owner", owner, port_file)
        port = procs.wait_port("owner", port_file, timeout=180)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = modality_pb2_grpc.ModalityServiceStub(ch)
            batch = stub.GetLogits(modality_pb2.GetLogitsRequest(sample_ids=ids), timeout=60).batch
        assert procs.stop("owner", timeout=30) == 0, procs.log("owner")
        log = procs.log("owner")
        assert "fitting the input test for 'image' on 300 training records ..." in log, log
        assert re.search(r"input test for 'image': fitted in \d+ s, kept in \S+", log), log
        procs.start_serving("again", owner, port_file)
        procs.wait_port("again", port_file, timeout=120)
        assert procs.stop("again", timeout=30) == 0, procs.log("again")
        again = procs.log("again")
        assert "input test for 'image': fitted on these records, reused from" in again, again
        assert "fitting the input test" not in again, again
    served = np.array(batch.pvalues)
    assert list(batch.sample_ids) == ids and served.shape == (50,)
    # what the owner computes: its feature p-value and its stored input test, Bonferroni
    from safetensors.torch import load_file

    det = from_tensors(load_file(str(root / INPUT_TEST_FILE)))
    version, model = ws.load_model()
    x = torch.from_numpy(ws.records["test"].modalities["image"][:50])
    u_input = input_pvalues(det, x)
    (root / INPUT_TEST_FILE).rename(root / "kept.safetensors")  # the feature p-value alone
    u_feature = torch.from_numpy(pvalues_of_inputs(ws, version, model, x))  # type: ignore[arg-type]
    expect = combine_pvalues(torch.stack([u_feature, u_input], dim=-1), "bonferroni")
    assert np.allclose(served, expect.numpy())
    assert not np.allclose(served, u_feature.numpy())  # the input test changed some
