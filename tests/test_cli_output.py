"""One dialect and quiet, consistent output across the CLI.

Help texts, the shared ``--log-level``, one default coordinator port (code and README), the
same names in tables and JSON, tables that do not wrap when piped, deprecated option names
that still work, quiet gRPC/Flower logging, and a ``predict`` that starts without torch.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from jacfusion_fed.answer import FusedAnswer
from jacfusion_fed.cli import app, logs, plain_help
from jacfusion_fed.cli.coordinator import info_payload
from jacfusion_fed.cli.errors import CliError
from jacfusion_fed.cli.evaluate import _gamma_choice
from jacfusion_fed.cli.options import DEFAULT_COORDINATOR_PORT, DEFAULT_OWNER_PORT
from jacfusion_fed.cli.predict import _print_tables
from jacfusion_fed.rpc.fusion_codec import answer_from_proto
from jacfusion_fed.rpc.jacfusion.v1 import fusion_pb2, modality_pb2
from jacfusion_fed.rpc.matrix import encode_matrix

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _commands() -> list[tuple[list[str], click.Command]]:
    found: list[tuple[list[str], click.Command]] = []

    def walk(cmd: click.Command, path: list[str]) -> None:
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                walk(sub, [*path, name])
        else:
            found.append((path, cmd))

    walk(typer.main.get_command(app), [])
    return found


def test_every_command_has_log_level_and_plain_help() -> None:
    commands = _commands()
    assert len(commands) >= 14
    for path, cmd in commands:
        names = {o for p in cmd.params for o in getattr(p, "opts", [])}
        assert "--log-level" in names, path
        text = cmd.help or ""
        assert text, f"{path}: no help"
        for markup in ("``", ":class:", ":func:", ":data:", ":mod:"):
            assert markup not in text, (path, markup)
        for paragraph in text.split("\n\n"):
            assert "\n" not in paragraph, (path, paragraph)  # no docstring line breaks
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)


def test_plain_help_joins_lines_and_drops_rst() -> None:
    doc = """First line
    continues here with ``code`` and :class:`~pkg.Thing`.

    Second paragraph."""
    assert (
        plain_help(doc) == "First line continues here with `code` and Thing.\n\nSecond paragraph."
    )


def test_one_default_coordinator_port_in_code_and_readme() -> None:
    defaults = {}
    for path, cmd in _commands():
        for p in cmd.params:
            if "--coordinator" in getattr(p, "opts", []):
                if path == ["certs"]:  # the renamed --coordinator-name, kept for one release
                    assert getattr(p, "hidden", False), "certs --coordinator must stay hidden"
                    continue
                defaults[" ".join(path)] = p.default
            if path[-1:] == ["serve"] and "--port" in getattr(p, "opts", []):
                defaults[" ".join(path) + " --port"] = p.default
    assert defaults == {
        # no hidden loopback default: the address is required, its port defaults (issue 15)
        "coordinator info": None,
        "predict": None,
        "coordinator serve --port": DEFAULT_COORDINATOR_PORT,
        "owner serve --port": DEFAULT_OWNER_PORT,
    }
    texts = {"README.md": (ROOT / "README.md").read_text()}
    texts |= {f"examples/{p.name}": p.read_text() for p in sorted((ROOT / "examples").glob("*.py"))}
    ports: list[str] = []
    for name, text in texts.items():
        commands, mentions = _shell_commands(text)
        for command in commands:
            if re.match(r"jacfusion-fed (predict|coordinator info)\b", command):
                assert "--coordinator " in command, (name, command)  # required, no hidden default
            if command.startswith("jacfusion-fed coordinator serve"):
                ports += re.findall(r"--port (\d+)", command)
        for command in commands + mentions:
            for value in re.findall(r"--coordinator \"?([^\s\"]+)", command):
                ports += re.findall(r":(\d+)", value)  # HOST:PORT[,HOST:PORT] (any host)
    assert ports and set(ports) == {str(DEFAULT_COORDINATOR_PORT)}, ports
    # Owners: the multi-host walkthrough (one owner per machine) uses the owner default.
    multi_host = texts["README.md"].split("Deployment across machines", 1)[1]
    owner_ports = [
        port
        for command in _shell_commands(multi_host.split("## Online inference", 1)[0])[0]
        if command.startswith("jacfusion-fed owner serve")
        for port in re.findall(r"--port (\d+)", command)
    ]
    assert owner_ports and set(owner_ports) == {str(DEFAULT_OWNER_PORT)}, owner_ports


def _shell_commands(text: str) -> tuple[list[str], list[str]]:
    """The ``jacfusion-fed ...`` command lines of a text (continuation lines joined), and the
    inline mentions such as `` `predict --coordinator a:p,b:p` ``."""
    joined = re.sub(r"\\\n\s*", " ", text)
    commands = re.findall(r"jacfusion-fed [^\n`]*", joined)
    mentions = re.findall(r"`((?:predict|coordinator \w+) [^`]*)`", joined)
    return commands, mentions


def _predictions() -> fusion_pb2.Predictions:
    probs = np.array([[0.1, 0.9], [0.8, 0.2]])
    return fusion_pb2.Predictions(
        sample_ids=["a" * 64, "b" * 64],
        probabilities=encode_matrix(probs),
        predicted_labels=[1, 0],
        modalities=[
            fusion_pb2.ModalityContribution(
                modality="audio",
                owner="audio-co",
                model_version="eb4f0123456789ab",
                used=[True, True],
                gamma=0.5,
            )
        ],
        method=fusion_pb2.FUSION_METHOD_CONFIDENCE_MEAN,
    )


def test_json_and_table_show_the_same_names(capsys: pytest.CaptureFixture[str]) -> None:
    local = {"a" * 64: "patient-1"}
    answer = answer_from_proto(_predictions(), local)
    payload = answer.to_json(["cat", "dog"])
    assert payload["method"] == "confidence_mean"
    assert [s["label"] for s in payload["samples"]] == ["dog", "cat"]
    assert [s["label_index"] for s in payload["samples"]] == [1, 0]
    assert payload["modalities"][0]["model_version"] == "eb4f0123456789ab"
    assert payload["samples"][0]["local_id"] == "patient-1"
    _print_tables(answer, ["cat", "dog"])
    table = capsys.readouterr().out
    assert "(confidence_mean)" in table and "dog" in table and "cat" in table
    assert "eb4f0123456789ab" in table  # the one form of a model version, never cut
    assert "b" * 64 in table  # a piped table never wraps or cuts a cell
    assert "\x1b[" not in table  # no ANSI escapes in a pipe


def test_info_names_method_and_head_kind_like_everything_else() -> None:
    info = fusion_pb2.GetModelInfoResponse(
        num_classes=2,
        class_prior=[0.5, 0.5],
        class_names=["cat", "dog"],
        default_method=fusion_pb2.FUSION_METHOD_JACOBIAN,
    )
    info.modalities.add(
        modality="audio",
        owner="audio-co",
        model_version="eb4f0123456789ab",
        num_classes=2,
        class_counts=[3, 4],
        head_kind=modality_pb2.HEAD_KIND_GRAM,
    )
    payload = info_payload(info)
    assert payload["default_method"] == "jacobian"
    assert payload["modalities"][0]["head_kind"] == "gram"
    json.dumps(payload)  # serializable as is


def test_renamed_options_still_work_with_one_notice(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert _gamma_choice(["0.2", "0.6"], None) == (0.2, 0.6)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "deprecated" in err[0] and "--gamma-grid" in err[0]
    assert _gamma_choice(["auto"], "0.2,0.6") == (0.2, 0.6)
    assert _gamma_choice(["0.3"], None) == 0.3
    with pytest.raises(CliError, match="not both"):
        _gamma_choice(["0.3"], "0.2")
    # Old names are still parsed (the command then fails on a later, unrelated check).
    for args in (
        ["simulate", "--run-dir", "x", "--verbose", "--dataset", "mnist"],
        ["predict", "p", "--default-gamma", "0.3", "--gamma", "audio=0.2", "--insecure"],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "No such option" not in result.output


@pytest.mark.parametrize(
    ("old", "new", "args"),
    [
        (
            ["--coordinator", "coord@10.77.0.1"],
            ["--coordinator-name", "coord@10.77.0.1"],
            ["certs", "--owner", "o=image@10.77.0.2"],
        ),
        (["--run-dir", "x"], ["--out", "x"], ["deploy", "local", "--host", "bad host"]),
    ],
)
def test_certs_and_deploy_speak_the_dialect(
    tmp_path: Path, old: list[str], new: list[str], args: list[str]
) -> None:
    """``certs --coordinator-name`` (a certificate name, not an address) and ``deploy local
    --out``; the old names still work for one release with one notice."""
    outputs = {}
    for tag, names in (("old", old), ("new", new)):
        extra = ["--out", str(tmp_path / tag)] if args[0] == "certs" else []
        result = runner.invoke(app, [*args, *extra, *names])
        notices = [ln for ln in result.output.splitlines() if "deprecated" in ln]
        if tag == "old":
            assert len(notices) == 1 and f"use {new[0]}" in notices[0], result.output
        else:
            assert not notices, result.output
        outputs[tag] = result.exit_code
        if args[0] == "certs":
            assert result.exit_code == 0, result.output
            manifest = json.loads((tmp_path / tag / "manifest.json").read_text())
            hosts = {p["name"]: p["hosts"] for p in manifest["principals"]}
            assert hosts["coord"] == ["10.77.0.1"]
        else:  # parsed, then refused on the unrelated --host check
            assert result.exit_code == 2 and "cannot bind" in result.output, result.output
    command = args[:1] if args[0] == "certs" else args[:2]
    help_text = runner.invoke(app, [*command, "--help"]).output
    assert new[0] in help_text and f"{old[0]} " not in help_text.replace(new[0], "")


def test_serve_commands_take_metrics_port_and_stream_limit() -> None:
    from jacfusion_fed.cli.transport import peer_limits

    for path, cmd in _commands():
        if path in (["owner", "serve"], ["coordinator", "serve"]):
            names = {o for p in cmd.params for o in getattr(p, "opts", [])}
            assert {"--metrics-port", "--max-streams-per-peer"} <= names, path
    assert peer_limits(8, None, None) is None  # the server's defaults
    limits = peer_limits(8, None, 3)
    assert limits is not None and limits.max_streams_per_peer == 3
    assert limits.max_calls_per_peer == 8  # the rest as for_workers derives it


def test_coordinator_serve_exposes_metrics_on_loopback(tmp_path: Path) -> None:
    import signal
    import urllib.request

    from jacfusion_fed.processes import ProcessSet, free_port

    metrics_port = free_port()
    port_file = tmp_path / "coordinator.port"
    args = ["coordinator", "serve", "--insecure", "--registry", str(tmp_path / "registry")]
    args += ["--owner", f"audio=127.0.0.1:{free_port()}", "--port", "0"]
    args += ["--port-file", str(port_file), "--metrics-port", str(metrics_port)]
    args += ["--max-streams-per-peer", "2"]
    cli = (sys.executable, "-c", "from jacfusion_fed.cli import main; main()")
    with ProcessSet(tmp_path / "logs", prefix=cli) as procs:
        procs.start_serving("coordinator", args, port_file)
        procs.wait_port("coordinator", port_file, timeout=120)
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        assert "jacfusion_rpc_requests" in text
        assert url in procs.log("coordinator")  # the start line names it
        proc = procs.procs["coordinator"]
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 0


def test_deprecated_predict_options_print_one_notice_each() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_")}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from jacfusion_fed.cli import main; main()",
            "predict",
            "p",
            "--pseudonyms",
            "--insecure",
            "--coordinator",
            "127.0.0.1:1",
            "--default-gamma",
            "0.3",
            "--gamma",
            "audio=0.2",
            "--timeout",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 3, lines
    assert "--default-gamma is deprecated" in lines[0] and "use --gamma" in lines[0]
    assert "use --modality-gamma" in lines[1]
    assert lines[2].startswith("error: UNAVAILABLE")


def test_grpc_core_logs_off_unless_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRPC_VERBOSITY", raising=False)
    logs.configure_environment(logs.peek_level(["predict", "x"]))
    assert os.environ["GRPC_VERBOSITY"] == "ERROR"
    monkeypatch.delenv("GRPC_VERBOSITY")
    logs.configure_environment(logs.peek_level(["predict", "--log-level=DEBUG"]))
    assert os.environ["GRPC_VERBOSITY"] == "DEBUG"


def test_flower_colour_off_when_stderr_is_not_a_terminal() -> None:
    code = (
        "from jacfusion_fed.cli import logs; logs.setup('info'); logs.quiet_flower(); "
        "from flwr.common.logger import console_handler as h, log; import logging; "
        "log(logging.WARNING, 'hello'); print(h.colored)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
    assert "hello" in proc.stderr and "\x1b[" not in proc.stderr


def test_predict_imports_no_torch_flower_or_coordinator() -> None:
    """``predict`` starts fast: the CLI and everything predict imports stay light (not even
    numpy, the largest of the rest)."""
    code = (
        "import sys; from jacfusion_fed.cli import main; "
        "import jacfusion_fed.cli.predict, jacfusion_fed.rpc.fusion_codec, "
        "jacfusion_fed.cli.transport, jacfusion_fed.rpc.diagnose, jacfusion_fed.rpc.tls, "
        "jacfusion_fed.requester.requester, jacfusion_fed.answer, jacfusion_fed.rpc.channels; "
        "from jacfusion_fed.privacy.pseudonyms import Pseudonymizer; "
        "heavy = ('torch', 'flwr', 'scipy', 'ray', 'numpy', 'jacfusion_fed.server', "
        "'jacfusion_fed.fusion', 'jacfusion_fed.store'); "
        "print(' '.join(m for m in heavy if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"predict imports {proc.stdout.strip()}"


def test_model_versions_are_never_cut_in_a_narrow_terminal() -> None:
    from rich.console import Console

    from jacfusion_fed.cli.render import new_table

    table = new_table("m", ["modality", "owner", "model version", "samples", "error"])
    table.add_row("audio", "audio-company-name", "eb4f0123456789ab", "1", "a long error text")
    with open(os.devnull, "w") as sink:
        console = Console(width=50, record=True, file=sink)
        console.print(table)
    assert "eb4f0123456789ab" in console.export_text()


def test_readme_says_how_to_reach_the_installed_cli() -> None:
    readme = (ROOT / "README.md").read_text()
    assert ". .venv/bin/activate" in readme and ".venv/bin/jacfusion-fed --help" in readme


def test_log_level_shows_our_info_lines_and_other_libraries_warnings(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import logging

    root_level = logging.getLogger().level
    try:
        logs.setup("info")
        logging.getLogger("alembic.runtime").info("third-party info")
        logging.getLogger("alembic.runtime").warning("third-party warning")
        logging.getLogger("jacfusion_fed.server.serve").info("our info")
        logs.setup("warning")
        logging.getLogger("jacfusion_fed.server.serve").info("our hidden info")
    finally:
        logs.setup("info")
        logging.getLogger().setLevel(root_level)
    err = capsys.readouterr().err
    assert "third-party warning" in err and "our info" in err
    assert "third-party info" not in err and "our hidden info" not in err
    assert len(err.splitlines()) == 2


def test_malformed_answers_are_refused() -> None:
    msg = _predictions()
    msg.probabilities.data = msg.probabilities.data[:-8]
    with pytest.raises(ValueError, match="malformed answer: probabilities 2 x 2"):
        answer_from_proto(msg)
    msg = _predictions()
    msg.probabilities.CopyFrom(encode_matrix(np.array([[0.1, np.nan], [0.8, 0.2]])))
    with pytest.raises(ValueError, match="NaN"):
        answer_from_proto(msg)
    msg = _predictions()
    msg.predicted_labels[:] = [1, 2]  # K = 2: label 2 does not exist
    with pytest.raises(ValueError, match="labels"):
        answer_from_proto(msg)


def test_streamed_chunks_are_appended() -> None:
    answer = FusedAnswer.join(
        [answer_from_proto(_predictions()), answer_from_proto(_predictions())]
    )
    assert answer.predicted_labels == [1, 0, 1, 0]
    assert answer.probability_rows()[2] == [0.1, 0.9]
    assert answer.modalities[0].used == [True] * 4
    np.testing.assert_array_equal(answer.probabilities[2], [0.1, 0.9])  # the numpy accessor
