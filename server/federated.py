"""The coordinator's flow in a federated run (the body of the Flower ``ServerApp``).

1. **Discover** the owners (``query.describe``): node id -> modality, owner name, K, model
   architecture. Owners of the same modality are *sites* of that modality.
2. **Train** (``train``): a modality held by one owner trains alone and publishes its model;
   a modality held by several sites trains one network with FedAvg (Flower's
   ``aggregate_arrayrecords``) over ``fedavg-rounds`` rounds, starting from one initial model
   built here from the architecture the sites described, then every site publishes the same
   (content-hashed) version. Every owner replies with its head: by default only the K x K Gram
   matrix W W^T, the class counts, the model version and training metrics.
   With ``train = false`` the current heads are fetched instead (``query.head``).
3. **Register** the heads in the persisted, versioned :class:`HeadRegistry` and derive the
   class frequencies from the class counts.
4. **Evaluate** (when the requester's ``labels-file`` is given): gather the logits of the
   validation and test pseudonyms, choose gamma, fuse, and build the paper-style robustness
   table (:mod:`jacfusion_fed.server.federated_eval`).
5. **Write** ``<run-dir>/results.json`` and the Markdown/CSV/JSON reports.

Privacy, enforced here and in the modules named: every reply is checked by
`check_reply_allowed` against the allow-list of its message
(:mod:`jacfusion_fed.federation.protocol`) before anything reads it
(:mod:`jacfusion_fed.server.federated_exchange`); a reply with any other record, field, dtype or
shape is rejected and the run fails naming it. The coordinator never holds the pseudonym key:
ids arrive as pseudonyms in the requester's labels file and are only passed on
(:mod:`jacfusion_fed.server.federated_eval`). Labels: accuracy needs ground truth, which the
coordinator does not have; the requester (the hospital) provides ``pseudonym -> label`` for the
evaluation ids only.
"""

from __future__ import annotations

import json
import platform
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from jacfusion_fed.evaluation import EvaluationResult, write_reports
from jacfusion_fed.federation import wait_for_nodes, write_run_results
from jacfusion_fed.federation.calibration import CALIBRATION_RECORD, calibration_from_record
from jacfusion_fed.federation.private import PrivacySettings
from jacfusion_fed.federation.protocol import (
    MSG_DESCRIBE,
    MSG_HEAD,
    MSG_TRAIN,
    describe_reply_spec,
    head_reply_spec,
    head_request,
    train_request,
)
from jacfusion_fed.federation.run_config import RunConfig
from jacfusion_fed.models import build_from_spec
from jacfusion_fed.store import HeadRecord, HeadRegistry

from .federated_eval import EvalColumn, evaluate, parse_columns
from .federated_exchange import CoordinatorError, OwnerInfo, _Exchange, _message
from .federated_private import ModalityFedAvg, open_flow_audit

__all__ = ["FlowConfig", "run_coordinator"]


# ------------------------------------------------------------------------ configuration
@dataclass(frozen=True)
class FlowConfig:
    """The run config as the coordinator reads it (keys of ``[tool.flwr.app.config]``)."""

    run_dir: Path
    registry_dir: Path
    labels_file: Path | None
    dataset: str
    expected_nodes: int
    node_timeout: float
    reply_timeout: float
    train: bool
    training: str
    fedavg_rounds: int
    head_kind: str
    perturbed: str
    columns: list[EvalColumn]
    repeats: int
    gamma: float | None
    gamma_candidates: tuple[float, ...]
    seed: int
    query_batch: int
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    audit_log: Path | None = None
    audit_tls: Path | None = None

    @classmethod
    def from_context(cls, context: Context) -> FlowConfig:
        """Read and check the run config (`RunConfigError` on a bad key or value)."""
        rc = RunConfig.from_mapping(context.run_config)

        def path(value: str) -> Path | None:
            return Path(value).expanduser() if value else None

        run_dir = path(rc.run_dir) or Path.cwd() / "runs" / f"flwr-run-{context.run_id}"
        return cls(
            run_dir=run_dir,
            registry_dir=path(rc.registry_dir) or run_dir / "registry",
            labels_file=path(rc.labels_file),
            dataset=rc.dataset or "federated",
            expected_nodes=rc.expected_nodes,
            node_timeout=rc.node_timeout,
            reply_timeout=rc.reply_timeout,
            train=rc.train,
            training=rc.training,
            fedavg_rounds=rc.fedavg_rounds,
            head_kind=rc.head_kind,
            perturbed=rc.perturbed,
            columns=parse_columns(rc.columns),
            repeats=rc.repeats,
            gamma=rc.gamma,
            gamma_candidates=rc.gamma_candidates,
            seed=rc.seed,
            query_batch=rc.query_batch_size,
            privacy=PrivacySettings(rc.secagg, rc.dp_clip, rc.dp_noise),
            audit_log=path(rc.audit_log),
            audit_tls=path(rc.audit_tls),
        )


# ------------------------------------------------------------------------ steps
def discover(ex: _Exchange, node_ids: Sequence[int]) -> dict[int, OwnerInfo]:
    spec = describe_reply_spec()
    replies = ex(
        "describe",
        {n: (_message(n, MSG_DESCRIBE, RecordDict()), spec, {}) for n in node_ids},
    )
    owners: dict[int, OwnerInfo] = {}
    for node_id, reply in replies.items():
        info = reply["info"]
        try:
            model_spec = json.loads(str(info["model-spec"]))
        except json.JSONDecodeError:
            raise CoordinatorError(f"{ex.who(node_id)}: model-spec is not JSON") from None
        owners[node_id] = OwnerInfo(
            node_id,
            str(info["modality"]),
            str(info["owner"]),
            int(info["num-classes"]),  # type: ignore[arg-type]
            str(info["version"]),
            model_spec if isinstance(model_spec, dict) else {},
        )
    ks = {o.num_classes for o in owners.values()}
    if len(ks) != 1:
        raise CoordinatorError(f"owners disagree on the number of classes K: {sorted(ks)}")
    names = [o.owner for o in owners.values()]
    if len(set(names)) != len(names):
        raise CoordinatorError(f"owner names must be unique, got {sorted(names)}")
    ex.owners = owners
    return owners


@dataclass
class ModalityHead:
    modality: str
    owner: str
    sites: list[int]
    version: str
    class_counts: np.ndarray
    gram: np.ndarray | None
    weight: np.ndarray | None
    bias: np.ndarray | None
    metrics: dict[str, dict[str, float]]
    fedavg_rounds: int = 0
    #: the owner's calibration arrays for robust fusion (single-site modalities that
    #: published one; FedAvg sites each calibrate their own data, so none is pooled)
    calibration: dict[str, np.ndarray] | None = None


def _head_from_replies(
    modality: str, owners: Mapping[int, OwnerInfo], replies: Mapping[int, RecordDict], rounds: int
) -> ModalityHead:
    sites = sorted(replies)
    # The reply spec (head_reply_spec) has fixed each record's kind: typed views, no casts.
    versions = {str(replies[n].config_records["info"]["version"]) for n in sites}
    if len(versions) != 1:
        raise CoordinatorError(f"sites of {modality!r} published different versions {versions}")
    first = replies[sites[0]].array_records["head"]
    gram = first["gram"].numpy() if "gram" in first else None
    weight = first["weight"].numpy() if "weight" in first else None
    bias = first["bias"].numpy() if "bias" in first else None
    counts = np.sum(
        [replies[n].array_records["head"]["class-counts"].numpy() for n in sites], axis=0
    )
    calibration = None
    if len(sites) == 1 and CALIBRATION_RECORD in replies[sites[0]]:
        record = replies[sites[0]][CALIBRATION_RECORD]
        calibration = calibration_from_record(record).to_arrays()  # type: ignore[arg-type]
    return ModalityHead(
        modality=modality,
        owner="+".join(sorted(owners[n].owner for n in sites)),
        sites=sites,
        version=versions.pop(),
        class_counts=counts.astype(np.int64),
        gram=gram,
        weight=weight,
        bias=bias,
        metrics={
            owners[n].owner: {k: float(v) for k, v in replies[n]["metrics"].items()}  # type: ignore[arg-type]
            for n in sites
        },
        fedavg_rounds=rounds,
        calibration=calibration,
    )


def train_heads(
    ex: _Exchange, cfg: FlowConfig, groups: Mapping[str, list[int]], k: int
) -> dict[str, ModalityHead]:
    """Local training for single-owner modalities, FedAvg for multi-site ones; every
    round is one batch of messages to all owners involved."""
    owners = ex.owners
    head_spec = head_reply_spec(cfg.head_kind)
    dims = {"K": k}
    fedavg = {m: nodes for m, nodes in groups.items() if len(nodes) > 1}
    runs: dict[str, ModalityFedAvg] = {}
    for modality, nodes in fedavg.items():
        specs = {json.dumps(owners[n].model_spec, sort_keys=True) for n in nodes}
        if len(specs) != 1:
            raise CoordinatorError(f"sites of {modality!r} describe different architectures")
        torch.manual_seed(cfg.seed)
        init = build_from_spec(owners[nodes[0]].model_spec)
        initial = ArrayRecord({name: t.detach().cpu() for name, t in init.state_dict().items()})
        runs[modality] = ModalityFedAvg(ex, modality, nodes, initial, cfg.head_kind, cfg.privacy)

    heads: dict[str, ModalityHead] = {}
    local_msgs = {
        nodes[0]: (
            _message(nodes[0], MSG_TRAIN, train_request("local", head_kind=cfg.head_kind)),
            head_spec,
            dims,
        )
        for m, nodes in groups.items()
        if len(nodes) == 1
    }
    for r in range(1, cfg.fedavg_rounds + 1 if fedavg else 2):
        outgoing = dict(local_msgs) if r == 1 else {}
        for run in runs.values():
            outgoing.update(run.messages(r))
        t0 = time.perf_counter()
        replies = ex(f"train round {r}" if fedavg else "train", outgoing)
        for modality, nodes in groups.items():
            if len(nodes) == 1 and nodes[0] in replies:
                heads[modality] = _head_from_replies(
                    modality, owners, {nodes[0]: replies[nodes[0]]}, 0
                )
        for modality, run in runs.items():
            losses = run.aggregate(r, replies)
            log(
                INFO,
                "FedAvg %s round %d/%d (%s): %d sites, local train loss %s (%.1f s)",
                modality,
                r,
                cfg.fedavg_rounds,
                cfg.privacy.describe(),
                len(run.nodes),
                ", ".join(f"{v:.3f}" for v in losses),
                time.perf_counter() - t0,
            )
    if fedavg:
        outgoing = {}
        for modality, nodes in fedavg.items():
            for n in nodes:
                content = train_request(
                    "publish",
                    round_=cfg.fedavg_rounds,
                    head_kind=cfg.head_kind,
                    global_arrays=runs[modality].arrays,
                )
                outgoing[n] = (_message(n, MSG_TRAIN, content), head_spec, dims)
        replies = ex("publish FedAvg models", outgoing)
        for modality, nodes in fedavg.items():
            heads[modality] = _head_from_replies(
                modality, owners, {n: replies[n] for n in nodes}, cfg.fedavg_rounds
            )
    return heads


def fetch_heads(
    ex: _Exchange, cfg: FlowConfig, groups: Mapping[str, list[int]], k: int
) -> dict[str, ModalityHead]:
    """The owners' current heads, without training (e.g. after a coordinator restart)."""
    spec = head_reply_spec(cfg.head_kind)
    outgoing = {
        n: (_message(n, MSG_HEAD, head_request("", cfg.head_kind)), spec, {"K": k})
        for nodes in groups.values()
        for n in nodes
    }
    replies = ex("fetch heads", outgoing)
    return {
        m: _head_from_replies(m, ex.owners, {n: replies[n] for n in nodes}, 0)
        for m, nodes in groups.items()
    }


def register_heads(
    registry: HeadRegistry, heads: Mapping[str, ModalityHead]
) -> dict[str, HeadRecord]:
    out = {}
    for modality, head in sorted(heads.items()):
        arrays: dict[str, Any] = (
            {"gram": head.gram}
            if head.gram is not None
            else {"weight": head.weight, "bias": head.bias}
        )
        out[modality] = registry.register(
            modality,
            head.owner,
            head.version,
            class_counts=[int(c) for c in head.class_counts],
            calibration=head.calibration,
            **arrays,
        )
    return out


# ------------------------------------------------------------------------ the flow
def run_coordinator(grid: Grid, context: Context) -> dict[str, Any]:
    """The whole coordinator run (see the module docstring); returns what it wrote."""
    t_start = time.perf_counter()
    cfg = FlowConfig.from_context(context)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    results: dict[str, Any] = {
        "status": "running",
        "run_id": int(context.run_id),
        "dataset": cfg.dataset,
        "run_config": dict(context.run_config),
        "timings": timings,
    }
    ex = _Exchange(grid, cfg.reply_timeout, audit=open_flow_audit(cfg.audit_log, cfg.audit_tls))
    try:
        _flow(ex, cfg, results, timings)
    except Exception as exc:
        results["status"] = "failed"
        results["error"] = f"{type(exc).__name__}: {exc}"
        timings["total_s"] = time.perf_counter() - t_start
        write_run_results(cfg.run_dir, results)
        log(WARNING, "Coordinator run failed: %s", exc)
        raise
    finally:
        if ex.audit is not None:
            ex.audit.close()
    results["status"] = "completed"
    timings["total_s"] = time.perf_counter() - t_start
    results["privacy"] = {
        "replies_checked": ex.replies_checked,
        "reply_records_seen": sorted(ex.record_names),
        "round_trips": ex.round_trips,
    }
    path = write_run_results(cfg.run_dir, results)
    log(INFO, "Coordinator results written to %s", path)
    return results


def _flow(
    ex: _Exchange, cfg: FlowConfig, results: dict[str, Any], timings: dict[str, float]
) -> None:
    t0 = time.perf_counter()
    node_ids = wait_for_nodes(ex.grid, cfg.expected_nodes, cfg.node_timeout)
    owners = discover(ex, node_ids)
    timings["discover_s"] = time.perf_counter() - t0
    k = next(iter(owners.values())).num_classes
    groups: dict[str, list[int]] = defaultdict(list)
    for node_id, info in sorted(owners.items()):
        groups[info.modality].append(node_id)
    groups = dict(sorted(groups.items()))
    log(
        INFO,
        "Discovered %d owners: %s",
        len(owners),
        ", ".join(f"{m}: {'+'.join(owners[n].owner for n in ns)}" for m, ns in groups.items()),
    )
    results["owners"] = [
        {"node_id": o.node_id, "modality": o.modality, "owner": o.owner} for o in owners.values()
    ]
    if cfg.labels_file is not None:  # fail before training, not after
        if len(groups) < 2:
            raise CoordinatorError(f"fusion needs at least two modalities, got {sorted(groups)}")
        if cfg.perturbed and cfg.perturbed not in groups:
            raise CoordinatorError(
                f"perturbed modality {cfg.perturbed!r} has no owner; modalities: {sorted(groups)}"
            )

    t0 = time.perf_counter()
    heads = train_heads(ex, cfg, groups, k) if cfg.train else fetch_heads(ex, cfg, groups, k)
    timings["train_s"] = time.perf_counter() - t0
    registry = HeadRegistry(cfg.registry_dir)
    records = register_heads(registry, heads)
    for modality, head in heads.items():
        for node in head.sites:
            ex.record(node, "RegisterHead", RecordDict(), model_versions={modality: head.version})
        log(
            INFO,
            "Registered head of %s: owner %s, version %s, K=%d (%s)",
            modality,
            head.owner,
            head.version,
            k,
            f"FedAvg, {len(head.sites)} sites" if head.fedavg_rounds else "one owner",
        )
    results["heads"] = {
        m: {
            "owner": rec.owner,
            "version": rec.model_version,
            "num_classes": rec.num_classes,
            "head_kind": rec.head_kind,
            "class_counts": list(rec.class_counts),
            "sequence": rec.sequence,
            "sites": len(heads[m].sites),
            "fedavg_rounds": heads[m].fedavg_rounds,
            "metrics": heads[m].metrics,
        }
        for m, rec in records.items()
    }
    results["registry_dir"] = str(cfg.registry_dir)

    if cfg.labels_file is None:
        log(INFO, "No labels-file in the run config: heads registered, no evaluation")
        return
    evaluation, table = evaluate(ex, cfg, groups, records, k, timings)
    results["evaluation"] = evaluation
    models = {}
    for row, modality in zip(table.rows, evaluation["order"], strict=False):
        metrics = next(iter(heads[modality].metrics.values()), {})
        models[row.name] = {
            "cached": False,
            "train_seconds": float(
                sum(v.get("seconds", 0.0) for v in heads[modality].metrics.values())
            ),
            "train_accuracy": float(metrics.get("train-accuracy", float("nan"))),
            "test_accuracy": evaluation["clean_test_accuracy"][modality],
        }
    report = EvaluationResult(
        config={
            "dataset": cfg.dataset,
            "quick": False,
            "seed": cfg.seed,
            "repeats": cfg.repeats,
            "gamma": cfg.gamma,
            "federated": True,
        },
        tables=[table],
        timings=dict(timings),
        models=models,
        environment={
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
        },
    )
    written = write_reports(report, cfg.run_dir / "reports")
    results["reports"] = [str(p) for p in written]
