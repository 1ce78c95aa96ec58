"""Step 3 of a Predict, grouping (pure numpy): :func:`group` turns the :class:`Gathered` logits
into the :class:`Grouped` work of the fusion step: which samples are predicted, and per set of
modalities holding them one :class:`Group` with its logits, its :class:`FusionKey` and what the
fusion needs per modality (:data:`FusionInputs`).

Partial answers (never silent)
    A modality that failed is left out (the answer says so); per sample, the mask of
    modalities whose logits go into it is kept. With ``require_all`` any failed modality fails
    the call (``UNAVAILABLE``, or the owners' own code when every selected owner failed the
    same non-transient way, see :data:`RELAYED`).

Unknown ids
    An id is unknown when no answering selected owner holds it (with ``require_all``: when
    any selected owner lacks it). By default the call fails with ``NOT_FOUND`` naming them
    (``UNAVAILABLE`` when some owner did not answer, since it might hold them); with
    ``skip_unknown_ids`` the other samples are predicted and those ids are listed as
    unpredicted. Samples held by different sets of modalities are fused group by group
    (fusion is sample-wise).

Several sites per modality
    Unpredicted ids with a failed site are ``UNAVAILABLE`` (that site might hold them); ids
    only ambiguity kept from being predicted are ``FAILED_PRECONDITION``.

Calibrated methods
    A method that needs calibrations (``robust``) gets each member's published calibration and
    needs at least two members per group (``FAILED_PRECONDITION`` otherwise).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import grpc
import numpy as np

from jacfusion_fed.fusion import GramFactor, ModalityCalibration

from .fanout import Gathered, OwnerLogits
from .owner_channel import OwnerFailure
from .predict_types import PredictError, RegisteredHead
from .request_plan import Plan, list_ids

__all__ = [
    "RELAYED",
    "CalibrationInputs",
    "FusionInputs",
    "FusionKey",
    "GramInputs",
    "Group",
    "Grouped",
    "group",
]

#: Owner failures whose code a failed request takes over when every selected owner failed
#: that way (fusion.proto); any other code of an owner (its own INTERNAL or UNKNOWN, a
#: RESOURCE_EXHAUSTED, ...) makes the request UNAVAILABLE, with the owner's status named in
#: the message, so that an owner's fault is never reported as the coordinator's.
RELAYED: Final = frozenset(
    {
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.ABORTED,
    }
)


@dataclass(frozen=True)
class FusionKey:
    """Everything that must agree for two groups to be fused in one call: the registry method,
    the modalities (in fusion order) with their head versions, and the method's options as
    sorted ``(name, value)`` pairs (hashable values: tuples, not lists)."""

    method: str
    modalities: tuple[str, ...]
    versions: tuple[str, ...]
    options: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class GramInputs:
    """Per member its Gram factor, or None where it is not regularized (``jacobian``)."""

    factors: tuple[GramFactor | None, ...]


@dataclass(frozen=True)
class CalibrationInputs:
    """Per member its published calibration (``robust``)."""

    calibrations: tuple[ModalityCalibration, ...]


#: What a method needs per modality besides the logits (None: nothing).
FusionInputs = GramInputs | CalibrationInputs | None


@dataclass(frozen=True)
class Group:
    """Samples held by the same modalities (``members``), fused in one call.

    Attributes:
        rows: positions of its samples among the predicted samples (None: all of them).
        logits: per member its (n, K) logits.
    """

    key: FusionKey
    members: tuple[str, ...]
    rows: np.ndarray | None
    logits: tuple[np.ndarray, ...]
    inputs: FusionInputs


@dataclass(frozen=True)
class Grouped:
    """The fusion step's work for one plan.

    Attributes:
        k: the number of classes.
        predicted: positions in ``plan.ids`` of the predicted samples (None: all of them).
        used: per answering modality, which predicted samples it holds.
        unpredicted: ids that are not predicted (``skip_unknown_ids``).
    """

    gathered: Gathered
    k: int
    predicted: np.ndarray | None
    used: dict[str, np.ndarray]
    unpredicted: list[str]
    groups: list[Group]

    @property
    def plan(self) -> Plan:
        return self.gathered.plan

    @property
    def rows(self) -> int:
        """How many samples are predicted."""
        return len(self.plan.ids) if self.predicted is None else len(self.predicted)


def group(gathered: Gathered) -> Grouped:
    """The groups of samples to fuse (see the module docstring); raises :class:`PredictError`."""
    plan, answers, failures = gathered.plan, gathered.answers, gathered.failures
    _fail_if_needed(plan, answers, failures)
    ok = [m for m in plan.modalities if m in answers]
    heads = {m: answers[m].head for m in ok}
    ks = {h.num_classes for h in heads.values()}
    if len(ks) > 1:
        raise PredictError(
            grpc.StatusCode.FAILED_PRECONDITION,
            "K mismatch between owners: "
            + ", ".join(f"{m!r} has K={heads[m].num_classes}" for m in ok),
        )
    k = ks.pop()
    ids = plan.ids
    n = len(ids)
    if all(answers[m].known is None for m in ok):
        # The common case: every answering modality holds every sample.
        everywhere = np.ones(n, dtype=bool)
        only = _group(plan, ok, heads, [answers[m].logits for m in ok], None)
        return Grouped(gathered, k, None, {m: everywhere for m in ok}, [], [only])
    everywhere = np.ones(n, dtype=bool)
    masks = np.stack(
        [known if (known := answers[m].known) is not None else everywhere for m in ok]
    )  # (M_ok, n)
    predicted = masks.all(axis=0) if plan.require_all else masks.any(axis=0)
    unpredicted: list[str] = []
    if not predicted.all():
        unpredicted = [ids[i] for i in np.flatnonzero(~predicted)]
        if not plan.skip_unknown_ids:
            raise _unknown(plan, unpredicted, failures, answers)
    rows = np.flatnonzero(predicted)
    masks = masks[:, rows]
    patterns = np.zeros(rows.size, dtype=np.int64)
    for j in range(len(ok)):
        patterns |= masks[j].astype(np.int64) << j
    groups = []
    for pattern in np.unique(patterns):
        members = [m for j, m in enumerate(ok) if pattern >> j & 1]
        sel = np.flatnonzero(patterns == pattern)
        src = rows[sel]
        groups.append(_group(plan, members, heads, [answers[m].logits[src] for m in members], sel))
    used = {m: masks[j] for j, m in enumerate(ok)}
    return Grouped(gathered, k, rows, used, unpredicted, groups)


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _group(
    plan: Plan,
    members: list[str],
    heads: Mapping[str, RegisteredHead],
    logits: list[np.ndarray],
    rows: np.ndarray | None,
) -> Group:
    options = plan.fusion_options(members)
    key = FusionKey(
        method=plan.method,
        modalities=tuple(members),
        versions=tuple(heads[m].version for m in members),
        options=tuple(sorted((k, _hashable(v)) for k, v in options.items())),
    )
    rule = plan.rule
    inputs: FusionInputs = None
    if "calibrations" in rule.needs:
        inputs = CalibrationInputs(_calibrations(plan.method, members, heads))
    elif "grams" in rule.needs | rule.uses:
        regularize = set(options.get("regularize", range(len(members))))
        inputs = GramInputs(
            tuple(heads[m].factor if j in regularize else None for j, m in enumerate(members))
        )
    return Group(key, tuple(members), rows, tuple(logits), inputs)


def _calibrations(
    method: str, members: list[str], heads: Mapping[str, RegisteredHead]
) -> tuple[ModalityCalibration, ...]:
    """Each member's calibration, for a method that needs them (``FAILED_PRECONDITION``
    when one has none or fewer than two modalities answered for these samples)."""
    if len(members) < 2:
        raise PredictError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"the {method} method needs at least two modalities per sample; only "
            f"{', '.join(members)} answered for some samples",
        )
    missing = [m for m in members if heads[m].calibration is None]
    if missing:
        raise PredictError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"the {method} method needs each owner's calibration; the owner of "
            f"{', '.join(missing)} published none (it needs a clean validation split)",
        )
    return tuple(c for m in members if (c := heads[m].calibration) is not None)


def _fail_if_needed(
    plan: Plan, answers: Mapping[str, OwnerLogits], failures: Mapping[str, OwnerFailure]
) -> None:
    if failures and (plan.require_all or not answers):
        codes = {f.code for f in failures.values()}
        relayed = len(codes) == 1 and codes <= RELAYED
        code = codes.pop() if relayed else grpc.StatusCode.UNAVAILABLE
        what = "require_all is set and" if answers else "no selected owner answered:"
        raise PredictError(
            code,
            f"{what} {len(failures)} of {len(plan.modalities)} selected modalities failed: "
            + "; ".join(f.text for f in failures.values()),
        )


def _unknown(
    plan: Plan,
    unpredicted: list[str],
    failures: Mapping[str, OwnerFailure],
    answers: Mapping[str, OwnerLogits],
) -> PredictError:
    held = "held by every selected owner" if plan.require_all else "held by any owner"
    site_errors = [s.error for a in answers.values() for s in a.sites if s.error]
    if failures or site_errors:
        down = [
            *failures,
            *(
                f"a site of {m}"
                for m, a in answers.items()
                if a.sites and any(s.error for s in a.sites)
            ),
        ]
        return PredictError(
            grpc.StatusCode.UNAVAILABLE,
            f"{len(unpredicted)} sample id(s) not {held} that answered, and "
            f"{', '.join(down)} did not answer ("
            + "; ".join([*(f.text for f in failures.values()), *site_errors])
            + f"): {list_ids(unpredicted)}",
        )
    ambiguous = {i for a in answers.values() for i in a.ambiguous}
    if ambiguous and ambiguous.issuperset(unpredicted):
        return PredictError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"{len(unpredicted)} sample id(s) held by more than one site of a modality (a "
            f"pseudonym must be held by one site; see each modality's ambiguous ids): "
            f"{list_ids(unpredicted)}",
        )
    return PredictError(
        grpc.StatusCode.NOT_FOUND,
        f"{len(unpredicted)} unknown sample id(s), not {held}: {list_ids(unpredicted)}",
    )
