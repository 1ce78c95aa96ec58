"""Assembly (pure numpy): the owners' checked answers of one batch become a
:class:`PredictResult`.

Partial answers (never silent)
    A modality that failed is left out and its contribution says so (``error``, all ``used``
    flags false); per sample, ``used`` says which modalities' logits went into it. With
    ``require_all`` any failed modality fails the call (``UNAVAILABLE``, or the owners' own
    code when every selected owner failed the same non-transient way, see :data:`RELAYED`).

Unknown ids
    An id is unknown when no answering selected owner holds it (with ``require_all``: when
    any selected owner lacks it). By default the call fails with ``NOT_FOUND`` naming them
    (``UNAVAILABLE`` when some owner did not answer, since it might hold them); with
    ``skip_unknown_ids`` the other samples are predicted and those ids are listed in
    ``unpredicted_sample_ids``. Samples held by different sets of modalities are fused group
    by group (fusion is sample-wise).

Several sites per modality
    A modality's answer lists its sites (:class:`SiteStatus`: which failed, which served
    another model version) and the ids held by more than one of its sites (never used from
    that modality). Unpredicted ids with a failed site are ``UNAVAILABLE`` (that site might
    hold them); ids only ambiguity kept from being predicted are ``FAILED_PRECONDITION``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

import grpc
import numpy as np

from .fanout import Answer, SitesFailure
from .owner_channel import OwnerFailure
from .predict_types import Contribution, PredictError, PredictResult, RegisteredHead
from .request_plan import Plan, list_ids

__all__ = ["RELAYED", "FuseGroup", "assemble", "unpack"]

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

#: ``fuse_group(members, heads, logits) -> probs (n, K)`` for samples held by ``members``.
FuseGroup = Callable[[list[str], Mapping[str, RegisteredHead], list[np.ndarray]], np.ndarray]


def _fail_if_needed(
    plan: Plan, answers: Mapping[str, Answer], failures: Mapping[str, OwnerFailure]
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
    answers: Mapping[str, Answer],
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


def assemble(
    plan: Plan,
    ids: list[str],
    answers: Mapping[str, Answer],
    failures: Mapping[str, OwnerFailure],
    known_heads: Mapping[str, RegisteredHead | None],
    fuse_group: FuseGroup,
) -> PredictResult:
    """The result of one batch (see the module docstring).

    Args:
        plan: the request's plan.
        ids: the batch's ids, in request order.
        answers: checked answers of the modalities that answered.
        failures: why each other selected modality failed.
        known_heads: the registered head of every failed modality (for its contribution).
        fuse_group: fuses the samples held by one set of modalities.
    """
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
    n = len(ids)
    unpredicted: list[str] = []
    everywhere = np.ones(n, dtype=bool)
    extras = _Extras(ok)
    if all(answers[m].known is None for m in ok):
        # The common case: every answering modality holds every sample.
        probs = extras.take(fuse_group(ok, heads, [answers[m].logits for m in ok]), k, ok, n)
        used = {m: everywhere for m in ok}
        sample_ids = ids
    else:
        masks = np.stack(
            [known if (known := answers[m].known) is not None else everywhere for m in ok]
        )  # (M_ok, n)
        predicted = masks.all(axis=0) if plan.require_all else masks.any(axis=0)
        if not predicted.all():
            unpredicted = [ids[i] for i in np.flatnonzero(~predicted)]
            if not plan.skip_unknown_ids:
                raise _unknown(plan, unpredicted, failures, answers)
        rows = np.flatnonzero(predicted)
        masks = masks[:, rows]
        probs = np.empty((rows.size, k))
        # Fuse each group of samples with the same set of modalities on its own.
        patterns = np.zeros(rows.size, dtype=np.int64)
        for j in range(len(ok)):
            patterns |= masks[j].astype(np.int64) << j
        for pattern in np.unique(patterns):
            members = [m for j, m in enumerate(ok) if pattern >> j & 1]
            sel = np.flatnonzero(patterns == pattern)
            src = rows[sel]
            packed = fuse_group(members, heads, [answers[m].logits[src] for m in members])
            probs[sel] = extras.take(packed, k, members, rows.size, sel)
        used = {m: masks[j] for j, m in enumerate(ok)}
        sample_ids = [ids[i] for i in rows]
    labels = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=np.int64)
    takes_gamma = plan.rule.takes("gamma")
    takes_regularize = plan.rule.takes("regularize")
    contributions = []
    for m in plan.modalities:
        gamma = plan.gammas[m] if takes_gamma else 0.0
        if m in answers:
            head = answers[m].head
            regularized = takes_regularize and m in plan.regularize and bool(used[m].any())
            contributions.append(
                Contribution(
                    m,
                    head.record.owner,
                    head.version,
                    used[m],
                    gamma=gamma,
                    regularized=regularized,
                    sites=answers[m].sites,
                    ambiguous_sample_ids=answers[m].ambiguous,
                    reliability=extras.reliability.get(m),
                )
            )
        else:
            last = known_heads.get(m)
            contributions.append(
                Contribution(
                    m,
                    last.record.owner if last else "",
                    last.version if last else "",
                    np.zeros(len(probs), dtype=bool),
                    gamma=gamma,
                    error=failures[m].text,
                    sites=f.sites if isinstance(f := failures[m], SitesFailure) else [],
                    reliability=None if extras.sets is None else np.zeros(len(probs)),
                )
            )
    return PredictResult(
        sample_ids,
        probs,
        labels,
        contributions,
        unpredicted,
        plan.method,
        prediction_sets=extras.sets,
        abstain=extras.abstain,
    )


class _Extras:
    """What a calibrated method (``robust``) says per sample besides the probabilities,
    gathered over the groups of samples (see :func:`unpack`)."""

    def __init__(self, modalities: list[str]) -> None:
        self.modalities = modalities
        self.sets: np.ndarray | None = None  # (n, K) bool
        self.abstain: np.ndarray | None = None  # (n,) bool
        self.reliability: dict[str, np.ndarray] = {}  # modality -> (n,), 0 where not used

    def take(
        self, packed: np.ndarray, k: int, members: list[str], n: int, rows: Any = slice(None)
    ) -> np.ndarray:
        """Probabilities of a group's ``packed`` result; the rest is stored at ``rows``."""
        probs, sets, abstain, reliability = unpack(packed, k)
        if sets is None or abstain is None or reliability is None:
            return probs
        if self.sets is None or self.abstain is None:
            self.sets = np.zeros((n, k), dtype=bool)
            self.abstain = np.zeros(n, dtype=bool)
            self.reliability = {m: np.zeros(n) for m in self.modalities}
        self.sets[rows] = sets
        self.abstain[rows] = abstain
        for j, m in enumerate(members):
            self.reliability[m][rows] = reliability[:, j]
        return probs


def unpack(
    packed: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """``fuse_group``'s result -> probabilities (n, K) and, for a calibrated method, the
    prediction sets (n, K) bool, abstain flags (n,) bool and reliabilities (n, M)."""
    if packed.shape[1] == k:
        return packed, None, None, None
    return packed[:, :k], packed[:, k : 2 * k] > 0.5, packed[:, 2 * k] > 0.5, packed[:, 2 * k + 1 :]
