"""What a new user hit following the README (issue 18), through the CLI as the README types it:
an owner that cannot serve refuses at start in one line, a factory that cannot be imported is
refused with the PYTHONPATH hint, a ``.pt2`` export brings its input shape, ``submit`` to the
wrong owner is diagnosed like ``predict``, ``predict --modality X`` alone is X's own answer,
``coordinator info`` does not call a refused site "ok", ``bench`` progress has no source
locations and says "missed", ``evaluate --unknown`` prints its table."""

from __future__ import annotations

import json
import sys
import textwrap
from concurrent import futures
from pathlib import Path
from typing import Any, ClassVar

import grpc
import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn
from typer.testing import CliRunner

from jacfusion_fed.cli import app
from jacfusion_fed.privacy.certs import generate_deployment_certs
from jacfusion_fed.privacy.pseudonyms import generate_key, write_key
from jacfusion_fed.rpc.tls import TlsFiles, server_credentials

ROOT = Path(__file__).resolve().parents[1]


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def _error_line(result: Any, code: int = 2, *words: str) -> str:
    """The one ``error:`` line of a failed command, checked."""
    assert result.exit_code == code, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output, result.output
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture
def key(tmp_path: Path) -> Path:
    return write_key(tmp_path / "pseudonym.key", generate_key())


def _owner_serve(workspace: Path, key: Path, *extra: str) -> Any:
    return _invoke(
        *("owner", "serve", "--workspace", str(workspace), "--modality", "audio"),
        *("--pseudonym-key", str(key), "--insecure", "--port", "0", *extra),
    )


# --- owner serve refuses at start ----------------------------------------------------------------


def test_a_data_file_without_the_arrays_is_refused_at_start(tmp_path: Path, key: Path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, something=np.zeros(3))
    result = _owner_serve(tmp_path / "ws", key, "--data", f"npz:{bad}")
    _error_line(result, 2, "data source", "no x_train/y_train arrays")
    assert "serving" not in result.output
    missing = _owner_serve(tmp_path / "ws", key, "--data", f"npz:{tmp_path / 'none.npz'}")
    _error_line(missing, 2, "does not exist")
    _error_line(_owner_serve(tmp_path / "ws", key, "--data", "csv:x"), 2, "--data", "npz:")


def test_train_if_missing_needs_data(tmp_path: Path, key: Path) -> None:
    _error_line(_owner_serve(tmp_path / "ws", key, "--train-if-missing"), 2, "needs --data")


def _factory_module(folder: Path) -> str:
    """A module ``jf_test_nets`` with a factory, importable while ``folder`` is on sys.path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "jf_test_nets.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def net():
                return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
            """
        )
    )
    return "jf_test_nets:net"


def _weights(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    path = tmp_path / "net.safetensors"
    safetensors.torch.save_file(net.state_dict(), str(path))
    (tmp_path / "counts.json").write_text("[3, 4, 5]")
    return path


def _import(tmp_path: Path, workspace: Path, factory: str) -> Any:
    return _invoke(
        *("owner", "import-model", "--workspace", str(workspace), "--modality", "audio"),
        *("--model", str(_weights(tmp_path)), "--factory", factory),
        *("--class-counts", str(tmp_path / "counts.json"), "--input-shape", "4"),
    )


def test_a_factory_that_cannot_be_imported_is_refused_with_the_hint(tmp_path: Path) -> None:
    result = _import(tmp_path, tmp_path / "ws", "jf_not_a_module_anywhere:net")
    _error_line(result, 2, "cannot be imported", "PYTHONPATH")
    assert not (tmp_path / "ws" / "store" / "CURRENT").exists()


def test_an_owner_whose_factory_is_gone_refuses_to_start(
    tmp_path: Path, key: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "pkg"
    factory = _factory_module(folder)
    monkeypatch.syspath_prepend(str(folder))  # PYTHONPATH=pkg while importing
    result = _import(tmp_path, tmp_path / "ws", factory)
    assert result.exit_code == 0, result.output
    assert "PYTHONPATH" in result.output  # the note: serve must import it too
    monkeypatch.undo()  # serving without it on the path
    sys.modules.pop("jf_test_nets", None)
    result = _owner_serve(tmp_path / "ws", key)
    _error_line(result, 2, "cannot load the current model version", "PYTHONPATH")
    assert "serving" not in result.output


def test_a_pt2_export_brings_its_input_shape(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    path = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(net, (torch.zeros(2, 3, 4),)), path)
    (tmp_path / "counts.json").write_text("[3, 4, 5]")
    result = _invoke(
        *("owner", "import-model", "--workspace", str(tmp_path / "ws"), "--modality", "ecg"),
        *("--model", str(path), "--class-counts", str(tmp_path / "counts.json")),
    )
    assert result.exit_code == 0, result.output
    assert "(export)" in result.output and "input shape 3,4" in result.output


# --- submit and predict ---------------------------------------------------------------------------


def test_submit_to_the_owner_of_another_modality_names_the_cause(tmp_path: Path, key: Path) -> None:
    certs = generate_deployment_certs(tmp_path / "pki", {"a-co": "audio"}, ["alice"])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    owner_tls = TlsFiles.from_dir(certs.owner_dirs["a-co"])
    port = server.add_secure_port("127.0.0.1:0", server_credentials(owner_tls))
    server.start()
    try:
        inputs = tmp_path / "jane.npz"
        np.savez(inputs, ids=np.array(["Jane Doe 1970-01-01"]), x=np.zeros((1, 4), np.float32))
        result = _invoke(
            *("submit", "--owner", f"127.0.0.1:{port}", "--modality", "image"),
            *("--tls", str(certs.requester_dirs["alice"]), "--pseudonym-key", str(key)),
            *("--inputs", str(inputs)),
        )
        line = _error_line(result, 1, "UNAVAILABLE", f"127.0.0.1:{port}", "audio")
        assert "Hostname Verification" not in line
    finally:
        server.stop(0)


def test_predict_one_modality_alone_is_its_own_softmax(
    monkeypatch: pytest.MonkeyPatch, key: Path
) -> None:
    """``--modality image`` alone asks for statistical fusion of one modality (its softmax,
    no regularization); an explicit ``--method`` is kept."""
    from jacfusion_fed.requester import requester

    sent: list[Any] = []

    def ask(self: Any, ids: Any, opts: Any, **kwargs: Any) -> Any:
        sent.append(opts)
        raise grpc.RpcError()  # stop here: what was asked is what this test checks

    monkeypatch.setattr(requester.Requester, "ask", ask)
    base = ("predict", "p1", "--coordinator", "127.0.0.1:1", "--insecure")
    for extra in (("--modality", "image"), ("--modality", "image", "--method", "jacobian"), ()):
        _invoke(*base, "--pseudonym-key", str(key), *extra)
    assert [o.method for o in sent] == ["statistical", "jacobian", None]
    assert [tuple(o.modalities) for o in sent] == [("image",), ("image",), ()]


# --- coordinator info, bench, evaluate ------------------------------------------------------------


def test_coordinator_info_does_not_call_a_refused_site_ok() -> None:
    from jacfusion_fed.cli.coordinator import site_status

    assert site_status("", "aaaa", "aaaa") == "ok"
    assert site_status("UNAVAILABLE: down", "", "aaaa") == "UNAVAILABLE: down"
    refused = site_status("", "bbbb", "aaaa")
    assert refused.startswith("refused") and "bbbb" in refused and "aaaa" in refused
    assert "left out" in site_status("", "", "aaaa")


def test_bench_progress_lines_carry_no_source_location(tmp_path: Path) -> None:
    result = _invoke(
        *("bench", "fusion", "--ks", "4", "--samples", "16", "--solvers", "exact"),
        *("--budget", "0.01", "--no-forward", "--out", str(tmp_path / "b.json")),
    )
    assert result.exit_code == 0, result.output
    progress = [ln for ln in result.output.splitlines() if ln.startswith("[")]
    assert progress and all(".py:" not in ln for ln in progress), progress
    assert json.loads((tmp_path / "b.json").read_text())["rows"]


def test_bench_serve_says_missed_next_to_a_missed_target() -> None:
    from rich.console import Console

    from jacfusion_fed.bench.serve import print_results

    def mode(ratio: float, rate: float) -> dict[str, Any]:
        lat = {"p50_us": 1e3, "p99_us": 2e3}
        return {
            "latency": {
                "predict": lat,
                "echo": lat,
                "p50_ratio_vs_two_echo": ratio,
                "p99_ratio_vs_two_echo": 1.0,
            },
            "throughput": {"samples_per_s": rate, "ms_per_request": 1.0},
        }

    results = {
        "config": {"classes": 10, "method": "jacobian", "batch": 1024, "clients": 2},
        "environment": {"cpu_count": 2, "fusion_device": "cpu", "load_avg_before": [0, 0, 0]},
        "cached": mode(2.5, 60_000),
        "uncached": mode(3.43, 40_000),
    }
    console = Console(record=True, width=200)
    print_results(results, console)
    text = console.export_text()
    assert "2.50x (met)" in text and "3.43x (missed)" in text and "60,000 (met)" in text
    assert "p50 uncached: 3.43x missed" in text


def test_evaluate_unknown_prints_its_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from jacfusion_fed.evaluation import unknown_report

    committed = json.loads((ROOT / "docs/results/twomoon-unknown.json").read_text())
    monkeypatch.setattr(unknown_report, "run_unknown", lambda *a, **k: committed)
    result = _invoke("evaluate", "--unknown", "--dataset", "twomoon", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "perturbed modality unknown" in result.output
    assert "Stat-w/o" in result.output and "robust" in result.output
    assert "PosixPath" not in result.output and "twomoon-unknown.md" in result.output


def test_deploy_local_says_what_it_is_doing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each step of ``deploy local`` is a line on stderr before it starts (the SuperLink, the
    SuperNodes and ``flwr run`` are faked here: their own tests start the real processes)."""
    import jacfusion_fed.federation as federation

    steps: list[str] = []

    class Proc:
        argv: ClassVar[list[str]] = ["fake"]

    class Handle:
        process = Proc()
        node_id = 1

    class FakeDeployment:
        address = "127.0.0.1:9093"

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def __enter__(self) -> FakeDeployment:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def start_superlink(self) -> Proc:
            return Proc()

        def start_supernode(self, *args: Any, **kwargs: Any) -> Handle:
            return Handle()

        def wait_online(self, *args: Any, **kwargs: Any) -> None:
            steps.append("online")

        def run_app(self, *args: Any, **kwargs: Any) -> None:
            steps.append("run")

    results = json.loads((ROOT / "docs/results/simulate-quick.json").read_text())
    monkeypatch.setattr(federation, "LocalDeployment", FakeDeployment)
    monkeypatch.setattr(federation, "read_run_results", lambda _folder: results)
    result = _invoke(
        *("deploy", "local", "--dataset", "twomoon", "--quick", "--out", str(tmp_path / "run"))
    )
    assert result.exit_code == 0, result.output
    said = result.output
    for words in (
        "run folder",
        "certificates and SuperNode keys",
        "SuperLink on 127.0.0.1:9093",
        "waiting for 2 SuperNodes",
        "flwr run: owners training",
        "flwr run finished",
    ):
        assert words in said, (words, said)
    assert steps == ["online", "run"]
    assert said.index("waiting for 2 SuperNodes") < said.index("flwr run: owners training")


def test_scenario_examples_print_their_table_once() -> None:
    """Each example that runs a simulation quiets Flower's own log first (its table would be
    printed twice, the second time with colour codes even in a pipe); its table is printed
    once, by the example."""
    checked = []
    for path in sorted((ROOT / "examples").glob("*.py")):
        text = path.read_text()
        if "run_scenario(" not in text:
            continue
        assert "quiet_flower()" in text, path.name
        assert text.index("quiet_flower()") < text.index("run_scenario("), path.name
        assert text.count("table_to_markdown(result.table())") == 1, path.name
        checked.append(path.name)
    assert len(checked) >= 4, checked
