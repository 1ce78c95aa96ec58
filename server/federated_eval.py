"""Evaluation in the coordinator's flow (step 4 of :mod:`jacfusion_fed.server.federated`),
when the requester's ``labels-file`` is given: gather the logits of the validation and test
pseudonyms (one ``query`` per owner and batch of ids; the perturbed modality's owner applies
every perturbation of the table to its own inputs and returns one logit matrix per setting),
choose gamma on the validation split, fuse, and build the paper-style robustness table (rows:
unimodal nets, then Mean-w/o, Mean-w/, Stat-w/o, Stat-w/ (ours) = Jacobian fusion regularizing
the perturbed modality). The table's columns are the run config's ``columns``.

The coordinator never holds the pseudonym key: ids arrive as pseudonyms in the requester's labels
file and are only passed on. Labels: accuracy needs ground truth, which the coordinator does not
have; the requester (the hospital) provides ``pseudonym -> label`` for the evaluation ids only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from logging import INFO
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from flwr.common.logger import log

from jacfusion_fed.data.presets import BUILTIN_PRESETS
from jacfusion_fed.evaluation import Column, Row, Table, select_gamma, table_to_markdown
from jacfusion_fed.evaluation.config import METHOD_ABBREV, PRESETS
from jacfusion_fed.evaluation.results import PAPER_MM_KINDS, ROW_NAMES
from jacfusion_fed.federation.protocol import (
    CLEAN,
    EVAL_LABELS_FORMAT,
    MSG_QUERY,
    is_pseudonym,
    query_reply_spec,
    query_request,
    setting_field,
)
from jacfusion_fed.fusion import (
    ModalityCalibration,
    factor_gram,
    fuse,
    get_method,
    log_prior_from_counts,
    prior_from_counts,
)
from jacfusion_fed.owner.perturbation import PerturbationSpec
from jacfusion_fed.store import HeadRecord

from .federated_exchange import CoordinatorError, _Exchange, _message

__all__ = [
    "EvalColumn",
    "EvalLabels",
    "EvalSettings",
    "build_table",
    "eval_prior",
    "evaluate",
    "fused_probabilities",
    "gather_logits",
    "parse_columns",
]

_COLUMN_KEYS = {"gaussian": "w0", "missing": "w1", "bias": "w23", "fgsm": "fgsm", "pgd": "pgd"}


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


class EvalSettings(Protocol):
    """What the evaluation reads of the flow's run config
    (:class:`jacfusion_fed.server.federated.FlowConfig` has these, and more)."""

    @property
    def labels_file(self) -> Path | None: ...
    @property
    def dataset(self) -> str: ...
    @property
    def training(self) -> str: ...
    @property
    def perturbed(self) -> str: ...
    @property
    def columns(self) -> list[EvalColumn]: ...
    @property
    def repeats(self) -> int: ...
    @property
    def gamma(self) -> float | None: ...
    @property
    def gamma_candidates(self) -> tuple[float, ...]: ...
    @property
    def seed(self) -> int: ...
    @property
    def query_batch(self) -> int: ...


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


def _settings_plan(cfg: EvalSettings) -> tuple[list[str], dict[str, list[int]]]:
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
    cfg: EvalSettings,
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
                # The reply spec has fixed each record's kind: typed views, no casts.
                served = str(reply.config_records["info"]["version"])
                if served != records[modality].model_version:
                    raise CoordinatorError(
                        f"{ex.who(n)} answered with model version {served}, registered "
                        f"{records[modality].model_version}"
                    )
                arrays = reply.array_records["logits"]
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


def eval_prior(
    records: Mapping[str, HeadRecord], order: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """(prior, ln prior) (K,) from the summed class counts of the registered heads, by the
    fusion registry's one rule (add-one smoothing), as in the coordinator's Predict."""
    counts = np.sum([np.asarray(records[m].class_counts, dtype=np.float64) for m in order], 0)
    return prior_from_counts(counts), log_prior_from_counts(counts)


def fused_probabilities(
    kind: str,
    logits: Sequence[np.ndarray],
    factors: Sequence[Any],
    log_prior: np.ndarray,
    gamma: float,
    regularize: Sequence[int],
    calibrations: Sequence[Any] | None = None,
) -> torch.Tensor:
    """One table cell's fusion: the registry's ``kind`` on logits in table order (gamma and
    the regularized modalities apply to methods that take them; ``calibrations``, in table
    order, to those that need them)."""
    rule = get_method(kind)
    options = rule.pick(gamma=gamma, regularize=list(regularize))
    return fuse(rule, logits, factors, log_prior, options, calibrations=calibrations)


def _calibrations(
    records: Mapping[str, HeadRecord], order: Sequence[str]
) -> list[ModalityCalibration] | None:
    """Every modality's published calibration in table order, or None if one has none."""
    arrays = [records[m].calibration for m in order]
    if any(a is None for a in arrays):
        return None
    return [ModalityCalibration.from_arrays(a) for a in arrays if a is not None]


def build_table(
    cfg: EvalSettings,
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
    cals = _calibrations(records, order)  # the robust row when every owner published one
    kinds = (*PAPER_MM_KINDS, "robust") if cals is not None else PAPER_MM_KINDS
    names = {**ROW_NAMES, "robust": "Robust (mod. unknown)"}
    mm = {kind: Row(group, names[kind], kind) for kind in kinds}
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
            for kind in kinds:
                probs = fused_probabilities(kind, z, factors, log_prior, gamma, [p], cals)
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
        rows=rows + [mm[k] for k in kinds],
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


def _default_perturbed(dataset: str, modalities: Iterable[str]) -> str:
    """The built-in dataset's perturbed modality (what ``simulate`` uses), else the last by
    name: an empty ``perturbed`` gives the same table on every path."""
    names = sorted(modalities)
    preset = BUILTIN_PRESETS.get(dataset)
    return preset.perturbed if preset is not None and preset.perturbed in names else names[-1]


def _modality_order(modalities: Iterable[str], perturbed: str) -> list[str]:
    rest = sorted(m for m in modalities if m != perturbed)
    return [*rest, perturbed]


def evaluate(
    ex: _Exchange,
    cfg: EvalSettings,
    groups: Mapping[str, list[int]],
    records: Mapping[str, HeadRecord],
    k: int,
    timings: dict[str, float],
) -> tuple[dict[str, Any], Table]:
    assert cfg.labels_file is not None
    labels = EvalLabels.read(cfg.labels_file, k)
    perturbed = cfg.perturbed or _default_perturbed(cfg.dataset, groups)
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
        len(ids),
        sum(len(v) for v in groups.values()),
        len(settings),
        perturbed,
        timings["gather_logits_s"],
    )
    prior, log_prior = eval_prior(records, order)
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
