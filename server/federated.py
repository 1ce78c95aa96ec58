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
   validation and test pseudonyms (one ``query`` per owner and batch of ids; the perturbed
   modality's owner applies every perturbation of the table to its own inputs and returns
   one logit matrix per setting), choose gamma on the validation split, fuse, and build the
   paper-style robustness table (rows: unimodal nets, then Mean-w/o, Mean-w/, Stat-w/o,
   Stat-w/ (ours) = Jacobian fusion regularizing the perturbed modality).
5. **Write** ``<run-dir>/results.json`` and the Markdown/CSV/JSON reports.

Privacy, enforced here: every reply is checked by `check_reply_allowed` against the allow-list
of its message (:mod:`jacfusion_fed.federation.protocol`) before anything reads it; a reply
with any other record, field, dtype or shape is rejected and the run fails naming it. The
coordinator never holds the pseudonym key: ids arrive as pseudonyms in the requester's labels
file and are only passed on. Labels: accuracy needs ground truth, which the coordinator does not
have; the requester (the hospital) provides ``pseudonym -> label`` for the evaluation ids only.
"""

from __future__ import annotations

import json
import platform
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from jacfusion_fed.evaluation import (
    GAMMA_CANDIDATES,
    Column,
    EvaluationResult,
    Row,
    Table,
    select_gamma,
    table_to_markdown,
    write_reports,
)
from jacfusion_fed.evaluation.config import METHOD_ABBREV, PRESETS
from jacfusion_fed.evaluation.results import PAPER_MM_KINDS, ROW_NAMES
from jacfusion_fed.federation import (
    NOT_ALLOWED_CODE,
    RUN_DIR_KEY,
    RecordSpec,
    ReplyError,
    ReplyNotAllowedError,
    check_reply_allowed,
    error_code_name,
    send_and_collect,
    wait_for_nodes,
    write_run_results,
)
from jacfusion_fed.federation.protocol import (
    CLEAN,
    EVAL_LABELS_FORMAT,
    MSG_DESCRIBE,
    MSG_HEAD,
    MSG_QUERY,
    MSG_TRAIN,
    app_error_name,
    describe_reply_spec,
    head_reply_spec,
    head_request,
    is_pseudonym,
    model_template,
    query_reply_spec,
    query_request,
    round_reply_spec,
    setting_field,
    train_request,
)
from jacfusion_fed.fusion import (
    confidence_mean_fusion,
    factor_gram,
    jacobian_fusion,
    mean_fusion,
    statistical_fusion,
)
from jacfusion_fed.models import build_from_spec
from jacfusion_fed.owner.perturbation import PerturbationSpec
from jacfusion_fed.store import HeadRecord, HeadRegistry

__all__ = [
    "EVAL_LABELS_FORMAT",
    "CoordinatorError",
    "EvalColumn",
    "FlowConfig",
    "parse_columns",
    "run_coordinator",
]

_COLUMN_KEYS = {"gaussian": "w0", "missing": "w1", "bias": "w23", "fgsm": "fgsm", "pgd": "pgd"}


class CoordinatorError(RuntimeError):
    """The run cannot go on (an owner failed or sent something not allowed, bad config)."""


# ------------------------------------------------------------------------ configuration
@dataclass(frozen=True)
class EvalColumn:
    """A table column: clean, or a perturbation of the perturbed modality."""

    key: str
    spec: PerturbationSpec | None

    @property
    def label(self) -> str:
        return "Clean" if self.spec is None else self.spec.label

    @property
    def kind(self) -> str:
        if self.spec is None:
            return "clean"
        return "attack" if self.spec.is_attack else "corruption"


def parse_columns(text: str) -> list[EvalColumn]:
    """``"clean; gaussian w0=1; fgsm w4=0.03"`` -> columns (keys as in the paper presets)."""
    out: list[EvalColumn] = []
    seen: set[str] = set()
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        spec = None if part.lower() == CLEAN else PerturbationSpec.parse(part)
        key = CLEAN if spec is None else _COLUMN_KEYS[spec.kind]
        base, i = key, 2
        while key in seen:
            key, i = f"{base}_{i}", i + 1
        seen.add(key)
        out.append(EvalColumn(key, spec))
    if not out:
        raise ValueError("columns lists no column")
    return out


def _as_bool(value: Any) -> bool:
    return value is True or str(value).lower() in ("true", "1", "yes")


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

    @classmethod
    def from_context(cls, context: Context) -> FlowConfig:
        cfg = context.run_config

        def path(key: str) -> Path | None:
            value = str(cfg.get(key, "") or "")
            if not value:
                return None
            p = Path(value).expanduser()
            if not p.is_absolute():
                raise CoordinatorError(f"run config {key!r} must be an absolute path: {value!r}")
            return p

        run_dir = path(RUN_DIR_KEY) or Path.cwd() / "runs" / f"flwr-run-{context.run_id}"
        gamma_text = str(cfg.get("gamma", "auto")).strip().lower()
        gamma = None if gamma_text in ("auto", "", "select") else float(gamma_text)
        if gamma is not None and not 0 < gamma <= 1:
            raise CoordinatorError(f"gamma must lie in (0, 1] or be 'auto', got {gamma}")
        candidates = (
            tuple(float(g) for g in str(cfg.get("gamma-candidates", "0.1,0.5,0.9")).split(",") if g)
            or GAMMA_CANDIDATES
        )
        head_kind = str(cfg.get("head-kind", "gram"))
        if head_kind not in ("gram", "full"):
            raise CoordinatorError(f"head-kind must be 'gram' or 'full', got {head_kind!r}")
        try:
            columns = parse_columns(str(cfg.get("columns", CLEAN)))
        except (ValueError, KeyError) as exc:
            raise CoordinatorError(f"run config 'columns': {exc}") from None
        return cls(
            run_dir=run_dir,
            registry_dir=path("registry-dir") or run_dir / "registry",
            labels_file=path("labels-file"),
            dataset=str(cfg.get("dataset", "") or "federated"),
            expected_nodes=int(cfg.get("expected-nodes", 2)),
            node_timeout=float(cfg.get("node-timeout", 300.0)),
            reply_timeout=float(cfg.get("reply-timeout", 1800.0)),
            train=_as_bool(cfg.get("train", True)),
            training=str(cfg.get("training", "regular")),
            fedavg_rounds=max(1, int(cfg.get("fedavg-rounds", 3))),
            head_kind=head_kind,
            perturbed=str(cfg.get("perturbed", "") or ""),
            columns=columns,
            repeats=max(1, int(cfg.get("repeats", 1))),
            gamma=gamma,
            gamma_candidates=candidates,
            seed=int(cfg.get("seed", 0)),
            query_batch=max(1, int(cfg.get("query-batch-size", 10_000))),
        )


# ------------------------------------------------------------------------ messaging
@dataclass(frozen=True)
class OwnerInfo:
    node_id: int
    modality: str
    owner: str
    num_classes: int
    version: str
    model_spec: dict[str, Any]


@dataclass
class _Exchange:
    """Sends one message per node and checks every reply against that node's allow-list."""

    grid: Grid
    timeout: float
    owners: dict[int, OwnerInfo] = field(default_factory=dict)
    replies_checked: int = 0
    record_names: set[str] = field(default_factory=set)
    round_trips: int = 0

    def who(self, node_id: int) -> str:
        info = self.owners.get(node_id)
        return f"node {node_id}" + (f" ({info.owner}, {info.modality})" if info else "")

    def __call__(
        self,
        what: str,
        outgoing: Mapping[int, tuple[Message, Mapping[str, RecordSpec], Mapping[str, int]]],
    ) -> dict[int, RecordDict]:
        if not outgoing:
            return {}
        self.round_trips += 1
        raw = send_and_collect(
            self.grid, [m for m, _, _ in outgoing.values()], self.timeout, on_error="return"
        )
        good: dict[int, RecordDict] = {}
        errors: dict[int, ReplyError] = {}
        for node_id, reply in raw.items():
            if isinstance(reply, ReplyError):
                errors[node_id] = reply
                continue
            _, allowed, dims = outgoing[node_id]
            try:  # nothing reads a reply before this check
                check_reply_allowed(reply, allowed, dims)
            except ReplyNotAllowedError as exc:
                errors[node_id] = ReplyError(node_id, what, NOT_ALLOWED_CODE, str(exc))
                continue
            self.replies_checked += 1
            self.record_names.update(reply.keys())
            good[node_id] = reply
        if errors:
            lines = []
            for node_id, err in sorted(errors.items()):
                name = app_error_name(err.code) if err.code >= 100 else error_code_name(err.code)
                lines.append(f"  - {self.who(node_id)}: {name} [{err.code}]: {err.reason}")
            raise CoordinatorError(
                f"{what}: {len(errors)} of {len(outgoing)} owners failed:\n" + "\n".join(lines)
            )
        return good


def _message(node_id: int, message_type: str, content: RecordDict) -> Message:
    return Message(content, dst_node_id=node_id, message_type=message_type)


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


def _head_from_replies(
    modality: str, owners: Mapping[int, OwnerInfo], replies: Mapping[int, RecordDict], rounds: int
) -> ModalityHead:
    sites = sorted(replies)
    versions = {str(replies[n]["info"]["version"]) for n in sites}
    if len(versions) != 1:
        raise CoordinatorError(f"sites of {modality!r} published different versions {versions}")
    first = replies[sites[0]]["head"]
    gram = first["gram"].numpy() if "gram" in first else None
    weight = first["weight"].numpy() if "weight" in first else None
    bias = first["bias"].numpy() if "bias" in first else None
    counts = np.sum([replies[n]["head"]["class-counts"].numpy() for n in sites], axis=0)
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
    globals_: dict[str, ArrayRecord] = {}
    templates: dict[str, dict[str, Any]] = {}
    for modality, nodes in fedavg.items():
        specs = {json.dumps(owners[n].model_spec, sort_keys=True) for n in nodes}
        if len(specs) != 1:
            raise CoordinatorError(f"sites of {modality!r} describe different architectures")
        torch.manual_seed(cfg.seed)
        init = build_from_spec(owners[nodes[0]].model_spec)
        globals_[modality] = ArrayRecord(
            {name: t.detach().cpu() for name, t in init.state_dict().items()}
        )
        templates[modality] = model_template(globals_[modality])

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
        for modality, nodes in fedavg.items():
            spec = round_reply_spec(templates[modality])
            for n in nodes:
                content = train_request(
                    "round", round_=r, head_kind=cfg.head_kind, global_arrays=globals_[modality]
                )
                outgoing[n] = (_message(n, MSG_TRAIN, content), spec, {})
        t0 = time.perf_counter()
        replies = ex(f"train round {r}" if fedavg else "train", outgoing)
        for modality, nodes in groups.items():
            if len(nodes) == 1 and nodes[0] in replies:
                heads[modality] = _head_from_replies(
                    modality, owners, {nodes[0]: replies[nodes[0]]}, 0
                )
        for modality, nodes in fedavg.items():
            site_replies = [replies[n] for n in nodes]
            globals_[modality] = aggregate_arrayrecords(site_replies, "num-examples")
            losses = [float(rep["metrics"].get("train-loss", float("nan"))) for rep in site_replies]  # type: ignore[arg-type]
            log(
                INFO,
                "FedAvg %s round %d/%d: %d sites, local train loss %s (%.1f s)",
                modality, r, cfg.fedavg_rounds, len(nodes),
                ", ".join(f"{v:.3f}" for v in losses), time.perf_counter() - t0,
            )  # fmt: skip
    if fedavg:
        outgoing = {}
        for modality, nodes in fedavg.items():
            for n in nodes:
                content = train_request(
                    "publish",
                    round_=cfg.fedavg_rounds,
                    head_kind=cfg.head_kind,
                    global_arrays=globals_[modality],
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
            **arrays,
        )
    return out


# ------------------------------------------------------------------------ evaluation
@dataclass(frozen=True)
class EvalLabels:
    """The requester's evaluation ids (pseudonyms) and labels, per split."""

    ids: dict[str, list[str]]
    labels: dict[str, np.ndarray]

    @classmethod
    def read(cls, path: Path, num_classes: int) -> EvalLabels:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CoordinatorError(
                f"cannot read the requester's labels file {path}: {exc}"
            ) from None
        if not isinstance(data, dict) or data.get("format") != EVAL_LABELS_FORMAT:
            raise CoordinatorError(f"{path} is not a {EVAL_LABELS_FORMAT} labels file")
        ids: dict[str, list[str]] = {}
        labels: dict[str, np.ndarray] = {}
        for split in ("val", "test"):
            entry = data.get("splits", {}).get(split)
            if not isinstance(entry, dict):
                raise CoordinatorError(f"{path}: split {split!r} missing")
            split_ids, split_labels = entry.get("ids"), entry.get("labels")
            if not isinstance(split_ids, list) or not isinstance(split_labels, list):
                raise CoordinatorError(f"{path}: split {split!r} needs 'ids' and 'labels' lists")
            if len(split_ids) != len(split_labels) or not split_ids:
                raise CoordinatorError(f"{path}: split {split!r} has mismatched or no entries")
            if not all(is_pseudonym(s) for s in split_ids):
                raise CoordinatorError(
                    f"{path}: split {split!r} holds ids that are not pseudonyms; the requester "
                    "must derive them with the deployment's pseudonym key"
                )
            y = np.asarray(split_labels, dtype=np.int64)
            if y.min() < 0 or y.max() >= num_classes:
                raise CoordinatorError(f"{path}: labels of {split!r} outside [0, {num_classes})")
            ids[split], labels[split] = [str(s) for s in split_ids], y
        all_ids = ids["val"] + ids["test"]
        if len(set(all_ids)) != len(all_ids):
            raise CoordinatorError(f"{path}: duplicate ids (val and test must be disjoint)")
        return cls(ids, labels)


def _settings_plan(cfg: FlowConfig) -> tuple[list[str], dict[str, list[int]]]:
    """Settings of the perturbed modality's query and, per column, its setting indices."""
    settings = [CLEAN]
    index: dict[str, list[int]] = {}
    for col in cfg.columns:
        if col.spec is None:
            index[col.key] = [0]
            continue
        draws = 1 if col.spec.deterministic else cfg.repeats
        index[col.key] = []
        for d in range(draws):
            index[col.key].append(len(settings))
            settings.append(col.spec.with_draw(d).to_json())
    return settings, index


def gather_logits(
    ex: _Exchange,
    cfg: FlowConfig,
    groups: Mapping[str, list[int]],
    records: Mapping[str, HeadRecord],
    ids: list[str],
    perturbed: str,
    settings: list[str],
    k: int,
) -> dict[str, list[np.ndarray]]:
    """Logits (N, K) per modality and setting (other modalities: clean only), in ``ids``
    order; for a multi-site modality each id must be held by exactly one site."""
    n_total = len(ids)
    out = {
        m: [np.zeros((n_total, k)) for _ in (settings if m == perturbed else [CLEAN])]
        for m in groups
    }
    covered = {m: np.zeros(n_total, dtype=np.int64) for m in groups}
    for start in range(0, n_total, cfg.query_batch):
        chunk = ids[start : start + cfg.query_batch]
        outgoing = {}
        for modality, nodes in groups.items():
            mod_settings = settings if modality == perturbed else [CLEAN]
            spec = query_reply_spec(len(mod_settings))
            for n in nodes:
                content = query_request(
                    chunk,
                    records[modality].model_version,
                    mod_settings,
                    seed=cfg.seed,
                    allow_partial=len(nodes) > 1,
                )
                outgoing[n] = (
                    _message(n, MSG_QUERY, content),
                    spec,
                    {"N": len(chunk), "K": k},
                )
        replies = ex(f"query logits ({len(chunk)} ids)", outgoing)
        for modality, nodes in groups.items():
            for n in nodes:
                reply = replies[n]
                served = str(reply["info"]["version"])
                if served != records[modality].model_version:
                    raise CoordinatorError(
                        f"{ex.who(n)} answered with model version {served}, registered "
                        f"{records[modality].model_version}"
                    )
                arrays = reply["logits"]
                known = arrays["known"].numpy()
                sl = slice(start, start + len(chunk))
                covered[modality][sl] += known
                for i, target in enumerate(out[modality]):
                    values = arrays[setting_field(i)].numpy()
                    target[sl][known] = values[known]
    for modality, count in covered.items():
        if (count != 1).any():
            missing, doubled = int((count == 0).sum()), int((count > 1).sum())
            raise CoordinatorError(
                f"modality {modality!r}: {missing} evaluation ids held by no site, "
                f"{doubled} held by more than one"
            )
    return out


def _accuracy(probs: torch.Tensor | np.ndarray, y: np.ndarray) -> float:
    pred = np.asarray(torch.as_tensor(probs).argmax(dim=1).cpu())
    return float((pred == y).mean())


def _row_name(i: int, modality: str, dataset: str, training: str, sites: int) -> str:
    preset = PRESETS.get(dataset)
    abbrev = preset.abbrev.get(modality, modality) if preset else modality
    name = f"{i}: {abbrev}-{METHOD_ABBREV.get(training, training)}"
    return name + (f" (FedAvg, {sites} sites)" if sites > 1 else "")


def build_table(
    cfg: FlowConfig,
    order: list[str],
    logits: Mapping[str, list[np.ndarray]],
    plan: Mapping[str, list[int]],
    records: Mapping[str, HeadRecord],
    labels: EvalLabels,
    log_prior: np.ndarray,
    sites: Mapping[str, int],
) -> tuple[Table, dict[str, float]]:
    """The robustness table from gathered logits (perturbed modality last in ``order``)."""
    p = len(order) - 1
    perturbed = order[p]
    n_val = len(labels.ids["val"])
    y_val, y_test = labels.labels["val"], labels.labels["test"]
    factors = [factor_gram(records[m].gram_matrix()) for m in order]

    def view(split: str, setting: int) -> list[np.ndarray]:
        sl = slice(0, n_val) if split == "val" else slice(n_val, None)
        return [logits[m][0][sl] for m in order[:p]] + [logits[perturbed][setting][sl]]

    rows = [
        Row("UM", _row_name(i, m, cfg.dataset, cfg.training, sites[m]), "unimodal")
        for i, m in enumerate(order)
    ]
    group = f"MM ({', '.join(str(i) for i in range(len(order)))})"
    mm = {kind: Row(group, ROW_NAMES[kind], kind) for kind in PAPER_MM_KINDS}
    clean_acc = {m: _accuracy(logits[m][0][n_val:], y_test) for m in order}
    for col in cfg.columns:
        settings = plan[col.key]
        for i, m in enumerate(order[:p]):
            rows[i].acc[col.key] = [clean_acc[m]]
        if cfg.gamma is not None:
            gamma = cfg.gamma
        else:
            gamma = select_gamma(
                view("val", settings[0]),
                factors,
                y_val,
                lambda d, s=settings: view("val", s[d]),  # type: ignore[misc]
                cfg.gamma_candidates,
                log_prior=log_prior,
                regularize=[p],
                draws=len(settings),
            )
        mm["jacobian"].gamma[col.key] = float(gamma)
        for s in settings:
            z = view("test", s)
            rows[p].acc.setdefault(col.key, []).append(_accuracy(z[p], y_test))
            fused = {
                "mean": mean_fusion(z),
                "confidence_mean": confidence_mean_fusion(z),
                "statistical": statistical_fusion(z, log_prior),
                "jacobian": jacobian_fusion(z, factors, log_prior, gamma=gamma, regularize=[p]),
            }
            for kind, probs in fused.items():
                mm[kind].acc.setdefault(col.key, []).append(_accuracy(probs, y_test))
    table = Table(
        title=(
            f"{cfg.dataset}, {perturbed} perturbed (federated: {len(order)} modalities, "
            f"{sum(sites.values())} owners)"
        ),
        dataset=cfg.dataset,
        perturbed=perturbed,
        clean=",".join(order[:p]),
        columns=[Column(c.key, c.label, c.kind) for c in cfg.columns],  # type: ignore[arg-type]
        rows=rows + [mm[k] for k in PAPER_MM_KINDS],
        repeats=cfg.repeats,
        notes=[
            "Federated run: each owner trained its own unimodal net on its own data; the "
            "coordinator saw only heads (Gram matrices), class counts and logits of "
            "pseudonymous ids.",
            f"The owner of {perturbed!r} applied every perturbation to its own inputs (attacks: "
            "setting 1, against its own net) and sent back only logits.",
            "Accuracy in % on the requester's test ids; mean ± std over "
            f"{cfg.repeats} draw(s) of the random perturbations; FGSM is computed once.",
            (
                f"gamma fixed at {cfg.gamma:g}"
                if cfg.gamma is not None
                else "gamma selected per column from {"
                + ", ".join(f"{g:g}" for g in cfg.gamma_candidates)
                + "} by validation accuracy under the same perturbation (ties: larger gamma)"
            )
            + ".",
        ],
    )
    return table, clean_acc


def _modality_order(modalities: Iterable[str], perturbed: str) -> list[str]:
    rest = sorted(m for m in modalities if m != perturbed)
    return [*rest, perturbed]


def evaluate(
    ex: _Exchange,
    cfg: FlowConfig,
    groups: Mapping[str, list[int]],
    registry: HeadRegistry,
    records: Mapping[str, HeadRecord],
    k: int,
    timings: dict[str, float],
) -> tuple[dict[str, Any], Table]:
    assert cfg.labels_file is not None
    labels = EvalLabels.read(cfg.labels_file, k)
    perturbed = cfg.perturbed or sorted(groups)[-1]
    if perturbed not in groups:
        raise CoordinatorError(
            f"perturbed modality {perturbed!r} has no owner; modalities: {sorted(groups)}"
        )
    if len(groups) < 2:
        raise CoordinatorError("fusion needs at least two modalities")
    order = _modality_order(groups, perturbed)
    settings, plan = _settings_plan(cfg)
    ids = labels.ids["val"] + labels.ids["test"]
    t0 = time.perf_counter()
    logits = gather_logits(ex, cfg, groups, records, ids, perturbed, settings, k)
    timings["gather_logits_s"] = time.perf_counter() - t0
    log(
        INFO,
        "Gathered logits of %d pseudonymous ids from %d owners (%d settings for %r) in %.1f s",
        len(ids), sum(len(v) for v in groups.values()), len(settings), perturbed,
        timings["gather_logits_s"],
    )  # fmt: skip
    prior = registry.class_prior(order)
    log_prior = np.log(np.clip(prior, 1e-6, None))
    t0 = time.perf_counter()
    table, clean_acc = build_table(
        cfg, order, logits, plan, records, labels, log_prior, {m: len(groups[m]) for m in order}
    )
    timings["fusion_s"] = time.perf_counter() - t0
    return {
        "table": asdict(table),
        "markdown": table_to_markdown(table),
        "perturbed": perturbed,
        "order": order,
        "settings": settings,
        "num_val": len(labels.ids["val"]),
        "num_test": len(labels.ids["test"]),
        "clean_test_accuracy": clean_acc,
        "class_prior": prior.tolist(),
    }, table


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
    ex = _Exchange(grid, cfg.reply_timeout)
    try:
        _flow(ex, cfg, results, timings)
    except Exception as exc:
        results["status"] = "failed"
        results["error"] = f"{type(exc).__name__}: {exc}"
        timings["total_s"] = time.perf_counter() - t_start
        write_run_results(cfg.run_dir, results)
        log(WARNING, "Coordinator run failed: %s", exc)
        raise
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
        log(
            INFO,
            "Registered head of %s: owner %s, version %s, K=%d (%s)",
            modality, head.owner, head.version, k,
            f"FedAvg, {len(head.sites)} sites" if head.fedavg_rounds else "one owner",
        )  # fmt: skip
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
    evaluation, table = evaluate(ex, cfg, groups, registry, records, k, timings)
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
