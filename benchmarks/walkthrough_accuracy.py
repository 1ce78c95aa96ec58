"""Accuracy of the README's online walkthrough, measured by following it through the CLI.

The README's commands, as a user types them: ``certs``, ``deploy key``, two ``owner serve
--train-if-missing`` (the simulation's recipe, :mod:`jacfusion_fed.owner.recipe`) on
``builtin:avdigits?quick=1``, ``coordinator serve``, ``deploy labels``, then ``predict
--labels`` on every test patient: each modality alone (``--modality``: its own softmax), fused
with Jacobian (the default) and statistical fusion, on the same ids. Servers bind free ports
(``--port 0 --port-file``) instead of the README's, and are stopped by PID.

Run:  python benchmarks/walkthrough_accuracy.py --out docs/results/walkthrough.json
      (about 3 minutes on 2 shared CPU cores)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from jacfusion_fed.processes import ProcessSet

SOURCE = "builtin:avdigits?quick=1"
OWNERS = {"image": "radiology", "audio": "audiology"}
CLI = (sys.executable, "-c", "from jacfusion_fed.cli import main; main()")
RUNS: dict[str, list[str]] = {
    "image": ["--modality", "image"],
    "audio": ["--modality", "audio"],
    "fused_jacobian": [],
    "fused_statistical": ["--method", "statistical"],
}
ACCURACY = re.compile(r"accuracy: ([0-9.]+)% \((\d+) of (\d+) labelled samples\)")
SPLITS = re.compile(r"(\w+) accuracy: (.*)")


def _cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    run = subprocess.run([*CLI, *args], cwd=root, capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        raise RuntimeError(f"jacfusion-fed {' '.join(args)}: {run.stderr.strip()}")
    return run


def _wait_registered(root: Path, target: str, tls: list[str], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = subprocess.run(
            [*CLI, "coordinator", "info", "--coordinator", target, *tls, "--json"],
            cwd=root,
            capture_output=True,
            text=True,
        )
        if run.returncode == 0 and len(json.loads(run.stdout)["modalities"]) == len(OWNERS):
            return
        time.sleep(1)
    raise TimeoutError("the coordinator registered no head of every owner in time")


def _training(log: str, modality: str) -> dict[str, float]:
    """``image accuracy: train 84.7 %, val 76.0 %, test 81.0 %`` (owner serve's line)."""
    for name, rest in SPLITS.findall(log):
        if name == modality:
            return {
                split: float(value) / 100 for split, value in re.findall(r"(\w+) ([0-9.]+) %", rest)
            }
    raise RuntimeError(f"owner serve printed no accuracy line for {modality}:\n{log[-2000:]}")


def measure(root: Path, source: str = SOURCE) -> dict[str, Any]:
    """Follow the walkthrough under ``root``; return the results (see the module docstring)."""
    owners = [f"--owner={owner}={modality}" for modality, owner in OWNERS.items()]
    _cli(root, "certs", "--out", "certs", *owners, "--requester", "clinic")
    _cli(root, "deploy", "key", "--out", "pseudonym.key")
    commands: list[str] = []
    procs = ProcessSet(root / "logs", prefix=CLI)
    try:
        targets = {}
        for modality, owner in OWNERS.items():
            args = ["owner", "serve", "--workspace", f"ws-{modality}", "--modality", modality]
            args += ["--data", source, "--pseudonym-key", "pseudonym.key"]
            args += ["--tls", f"certs/owners/{owner}", "--port", "0"]
            args += ["--port-file", f"{modality}.port", "--train-if-missing"]
            procs.start(modality, args, cwd=root)
            commands.append("jacfusion-fed " + " ".join(args))
        for modality in OWNERS:  # both train side by side, as in the README's two terminals
            port = procs.wait_port(modality, root / f"{modality}.port", timeout=1200)
            targets[modality] = f"127.0.0.1:{port}"
        args = ["coordinator", "serve", "--registry", "registry", "--tls", "certs/coordinator"]
        args += [f"--owner={m}={t}" for m, t in targets.items()]
        args += ["--port", "0", "--port-file", "coordinator.port"]
        procs.start("coordinator", args, cwd=root)
        coordinator = f"127.0.0.1:{procs.wait_port('coordinator', root / 'coordinator.port')}"
        clinic = ["--tls", "certs/requesters/clinic"]
        _wait_registered(root, coordinator, clinic)
        _cli(root, "deploy", "labels", "--data", source, "--modality", "image",
             "--pseudonym-key", "pseudonym.key", "--out", "labels.json")  # fmt: skip
        ids = [f"avdigits-test-{i:06d}" for i in range(100)]
        (root / "test-ids.txt").write_text("\n".join(ids) + "\n")
        accuracy, versions = {}, {}
        for name, extra in RUNS.items():
            args = ["predict", "--ids-file", "test-ids.txt", "--coordinator", coordinator]
            args += [*clinic, "--pseudonym-key", "pseudonym.key", "--labels", "labels.json"]
            args += [*extra, "--json"]
            run = _cli(root, *args)
            match = ACCURACY.search(run.stderr)
            if match is None:
                raise RuntimeError(f"predict printed no accuracy: {run.stderr}")
            accuracy[name] = int(match.group(2)) / int(match.group(3))
            answer = json.loads(run.stdout)
            versions[name] = {m["modality"]: m["model_version"] for m in answer["modalities"]}
            assert answer["method"] == ("statistical" if name != "fused_jacobian" else "jacobian")
            commands.append("jacfusion-fed " + " ".join(args))
        training = {m: _training(procs.log(m), m) for m in OWNERS}
    finally:
        procs.stop_all()
    return {
        "source": source,
        "split": "test",
        "samples": len(ids),
        "accuracy": accuracy,
        "training_accuracy": training,
        "model_versions": versions,
        "commands": commands,
        "environment": {
            "python": platform.python_version(),
            "torch": _version("torch"),
            "cpu_count": os.cpu_count(),
            "load_avg": list(os.getloadavg()),
        },
        "command": "python benchmarks/walkthrough_accuracy.py --out docs/results/walkthrough.json",
    }


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


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
