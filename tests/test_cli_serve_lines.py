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
