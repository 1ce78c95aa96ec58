"""Simulation scenarios of the jacfusion Flower app: who owns which modality and which data.

`prepare_run` lays out a run folder the way the parties of a deployment would:

    <run>/secrets/pseudonym.key        HMAC key (0600) of the owners and the requester; the
                                       coordinator never gets it (not in its run config)
    <run>/owners/<name>/               each owner's workspace (model store, logit cache)
    <run>/requester/eval-labels.json   the requester's pseudonym -> label file for the
                                       evaluation ids (val and test splits), no patient ids
    <run>/coordinator/                 the ServerApp's results, reports and head registry
    <run>/ray/                         Ray's temporary files (Simulation Engine)

`run_scenario` then runs the app's ``ServerApp`` and ``ClientApp`` (the components named in
``[tool.flwr.app.components]``) under Flower's Simulation Engine with one simulated SuperNode
per owner, and reads back the coordinator's results.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jacfusion_fed.atomicio import atomic_write_bytes
from jacfusion_fed.data.presets import BUILTIN_PRESETS
from jacfusion_fed.evaluation import Column, Row, Table
from jacfusion_fed.owner.source import DataSource, load_records
from jacfusion_fed.privacy import Pseudonymizer, generate_key, write_key

from .config import ConfigValue, validate_config
from .protocol import EVAL_LABELS_FORMAT
from .results import RUN_DIR_KEY, read_run_results
from .run_config import RunConfig
from .simulation import SimulationResult, run_simulation_app

__all__ = [
    "BUILTIN_PRESETS",
    "DEFAULT_RUN_CONFIG",
    "EVAL_LABELS_FORMAT",
    "OwnerSpec",
    "PreparedRun",
    "Scenario",
    "ScenarioResult",
    "prepare_run",
    "run_scenario",
    "write_eval_labels",
]

SERVER_APP_REF = "jacfusion_fed.server.server_app:app"
CLIENT_APP_REF = "jacfusion_fed.clients.client_app:app"

#: The app's run config defaults in Flower's mapping form (``RunConfig().to_mapping()``: the
#: same keys and values as ``[tool.flwr.app.config]`` of ``pyproject.toml``, a test keeps them
#: equal), so a simulation sees what ``flwr run`` sees.
DEFAULT_RUN_CONFIG: dict[str, ConfigValue] = RunConfig().to_mapping()


@dataclass(frozen=True)
class OwnerSpec:
    """One modality owner (one SuperNode): its name, modality and data source string."""

    name: str
    modality: str
    data: str
    allow_full_head: bool = False


@dataclass
class Scenario:
    """Owners plus run config overrides (keys of `DEFAULT_RUN_CONFIG`).

    ``requester_data``: the data source whose val/test patients and labels the requester
    knows (default: the first owner's source without its site slicing).
    """

    owners: list[OwnerSpec]
    run_config: dict[str, ConfigValue] = field(default_factory=dict)
    requester_data: str | None = None

    def __post_init__(self) -> None:
        names = [o.name for o in self.owners]
        if len(set(names)) != len(names):
            raise ValueError(f"owner names must be unique, got {names}")
        if len({o.modality for o in self.owners}) < 2:
            raise ValueError("a scenario needs owners of at least two modalities")
        unknown = set(self.run_config) - set(DEFAULT_RUN_CONFIG)
        if unknown:
            raise KeyError(f"unknown run config keys {sorted(unknown)}")
        RunConfig.from_mapping(self.run_config)  # RunConfigError on a bad value, before any run

    @classmethod
    def builtin(
        cls,
        dataset: str = "avdigits",
        *,
        quick: bool = False,
        sites_per_modality: int | Mapping[str, int] = 1,
        seed: int = 0,
        owner_names: Sequence[str] | None = None,
        **run_config: ConfigValue,
    ) -> Scenario:
        """A built-in dataset, one owner per modality (or ``sites_per_modality`` sites each,
        holding disjoint patients; an int for every modality or a dict per modality).
        ``run_config`` keys use underscores for dashes (``fedavg_rounds=2``)."""
        if dataset not in BUILTIN_PRESETS:
            raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(BUILTIN_PRESETS)}")
        preset = BUILTIN_PRESETS[dataset]
        names = list(owner_names or preset.owners)
        if len(names) != len(preset.modalities):
            raise ValueError(f"owner_names needs {len(preset.modalities)} names")
        query = f"seed={seed}" + ("&quick=1" if quick else "")
        owners = []
        for name, modality in zip(names, preset.modalities, strict=True):
            sites = (
                sites_per_modality.get(modality, 1)
                if isinstance(sites_per_modality, Mapping)
                else int(sites_per_modality)
            )
            if sites < 1:
                raise ValueError("sites_per_modality must be >= 1")
            for site in range(sites):
                data = f"builtin:{dataset}?{query}"
                if sites > 1:
                    data += f"&site={site}&sites={sites}"
                owners.append(
                    OwnerSpec(f"{name}-site{site}" if sites > 1 else name, modality, data)
                )
        config: dict[str, ConfigValue] = {
            "dataset": dataset,
            "perturbed": preset.perturbed,
            "columns": preset.columns,
            "epochs": preset.quick_epochs if quick else preset.epochs,
            "lr": preset.lr,
            "batch-size": preset.batch_size,
            "repeats": 1 if quick else preset.repeats,
            "seed": seed,
        }
        config.update({k.replace("_", "-"): v for k, v in run_config.items()})
        return cls(owners, config)


@dataclass(frozen=True)
class PreparedRun:
    run_dir: Path
    key_file: Path
    labels_file: Path
    coordinator_dir: Path
    node_configs: list[dict[str, ConfigValue]]
    run_config: dict[str, ConfigValue]


def write_eval_labels(path: Path, pseudonymizer: Any, splits: Mapping[str, Any]) -> Path:
    """The requester's labels file: per split (``val``, ``test``) the pseudonyms of its
    patients and their labels; what a hospital hands the coordinator for evaluation."""
    data = {
        "format": EVAL_LABELS_FORMAT,
        "splits": {
            split: {
                "ids": pseudonymizer.many(ds.sample_ids),
                "labels": [int(v) for v in ds.labels],
            }
            for split, ds in splits.items()
            if split in ("val", "test")
        },
    }
    atomic_write_bytes(path, json.dumps(data).encode("utf-8"))
    return path


def requester_splits(source: str, modality: str) -> Mapping[str, Any]:
    """Val/test patients (ids, labels) of ``source`` as the requester knows them: the whole
    population, not one site's share."""
    parsed = dataclasses.replace(DataSource.parse(source), site=0, sites=1)
    records = load_records(parsed, modality)
    missing = [s for s in ("val", "test") if s not in records]
    if missing:
        raise ValueError(f"requester data {source!r} has no {missing} split(s) for evaluation")
    return {s: records[s] for s in ("val", "test")}


def prepare_run(scenario: Scenario, run_dir: Path | str) -> PreparedRun:
    """Create the run folder (see the module docstring); return node and run configs."""
    run_dir = Path(run_dir).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    secrets = run_dir / "secrets"
    secrets.mkdir(mode=0o700, exist_ok=True)
    key_file = secrets / "pseudonym.key"
    if not key_file.exists():
        write_key(key_file, generate_key())
    pseudonymizer = Pseudonymizer.from_file(key_file)
    first = scenario.owners[0]
    labels_file = write_eval_labels(
        run_dir / "requester" / "eval-labels.json",
        pseudonymizer,
        requester_splits(scenario.requester_data or first.data, first.modality),
    )
    coordinator = run_dir / "coordinator"
    node_configs: list[dict[str, ConfigValue]] = [
        validate_config(
            {
                "owner": o.name,
                "modality": o.modality,
                "data": o.data,
                "workdir": str(run_dir / "owners" / o.name),
                "key-file": str(key_file),
                "allow-full-head": o.allow_full_head,
            },
            f"node config of {o.name}",
        )
        for o in scenario.owners
    ]
    run_config = RunConfig.from_mapping(
        {
            **scenario.run_config,
            RUN_DIR_KEY: str(coordinator),
            "registry-dir": str(coordinator / "registry"),
            "labels-file": str(labels_file),
            "expected-nodes": len(scenario.owners),
        }
    ).to_mapping()
    return PreparedRun(run_dir, key_file, labels_file, coordinator, node_configs, run_config)


@dataclass
class ScenarioResult:
    run_dir: Path
    prepared: PreparedRun
    results: dict[str, Any]
    simulation: SimulationResult
    wall_s: float

    def table(self) -> Any:
        """The robustness table (:class:`jacfusion_fed.evaluation.Table`), or None."""
        data = (self.results.get("evaluation") or {}).get("table")
        if not data:
            return None
        return Table(
            **{k: v for k, v in data.items() if k not in ("columns", "rows")},
            columns=[Column(**c) for c in data["columns"]],
            rows=[Row(**r) for r in data["rows"]],
        )


def _load(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def run_scenario(
    scenario: Scenario,
    run_dir: Path | str,
    *,
    server_app: Any = None,
    client_app: Any = None,
    verbose: bool = False,
    ray_num_cpus: int | None = None,
) -> ScenarioResult:
    """Prepare the run folder and run the app under the Simulation Engine (Ray on 127.0.0.1,
    its temp dir in ``<run>/ray``); raises whatever the coordinator raised."""
    t0 = time.perf_counter()
    prepared = prepare_run(scenario, run_dir)
    sim = run_simulation_app(
        server_app or _load(SERVER_APP_REF),
        client_app or _load(CLIENT_APP_REF),
        len(scenario.owners),
        prepared.node_configs,
        prepared.run_config,
        prepared.run_dir,
        ray_num_cpus=ray_num_cpus,
        verbose=verbose,
    )
    results = read_run_results(prepared.coordinator_dir)
    return ScenarioResult(prepared.run_dir, prepared, results, sim, time.perf_counter() - t0)
