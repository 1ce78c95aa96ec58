"""Step 5 of a Predict, finishing (pure numpy): :func:`finish` turns the :class:`Fused` groups
into the one answer type, :class:`~jacfusion_fed.answer.FusedAnswer`: the probabilities and
labels of the predicted samples in request order, the unpredicted ids, and each selected
modality's contribution (which samples used it, its gamma, its error when it failed; with
several sites each site's status and the ids two sites hold; for ``robust`` its reliability
per sample, and per sample the prediction set and abstain flag).
"""

from __future__ import annotations

import numpy as np

from jacfusion_fed.answer import Contribution, FusedAnswer, RobustParts

from .fanout import SitesFailure
from .fusing import Fused

__all__ = ["finish"]


def finish(fused: Fused) -> FusedAnswer:
    """The answer of one plan (see the module docstring)."""
    grouped = fused.grouped
    plan, gathered = grouped.plan, grouped.gathered
    n, k = grouped.rows, grouped.k
    robust = any(g.abstain is not None for g in fused.groups)
    ok = [m for m in plan.modalities if m in gathered.answers]
    if len(fused.groups) == 1 and grouped.groups[0].rows is None:
        only = fused.groups[0]
        probs = only.p
        sets, abstain = only.prediction_set, only.abstain
        reliability = (
            {m: only.reliability[:, j] for j, m in enumerate(ok)}
            if only.reliability is not None
            else {}
        )
    else:
        probs = np.empty((n, k))
        sets = np.zeros((n, k), dtype=bool) if robust else None
        abstain = np.zeros(n, dtype=bool) if robust else None
        reliability = {m: np.zeros(n) for m in ok} if robust else {}
        for g, out in zip(grouped.groups, fused.groups, strict=True):
            rows = slice(None) if g.rows is None else g.rows
            probs[rows] = out.p
            if sets is not None and abstain is not None and out.abstain is not None:
                assert out.prediction_set is not None and out.reliability is not None
                sets[rows] = out.prediction_set
                abstain[rows] = out.abstain
                for j, m in enumerate(g.members):
                    reliability[m][rows] = out.reliability[:, j]
    takes_gamma = plan.rule.takes("gamma")
    takes_regularize = plan.rule.takes("regularize")
    contributions = []
    for m in plan.modalities:
        gamma = plan.gammas[m] if takes_gamma else 0.0
        if m in gathered.answers:
            answer = gathered.answers[m]
            used = grouped.used[m]
            rel = reliability.get(m)
            contributions.append(
                Contribution(
                    m,
                    answer.head.record.owner,
                    answer.head.version,
                    used.tolist(),
                    gamma=gamma,
                    regularized=takes_regularize and m in plan.regularize and bool(used.any()),
                    reliability=None if rel is None else rel.tolist(),
                    sites=answer.sites,
                    ambiguous_sample_ids=answer.ambiguous,
                )
            )
        else:
            last = gathered.last_heads.get(m)
            failure = gathered.failures[m]
            contributions.append(
                Contribution(
                    m,
                    last.record.owner if last else "",
                    last.version if last else "",
                    [False] * n,
                    gamma=gamma,
                    error=failure.text,
                    reliability=[0.0] * n if robust else None,
                    sites=failure.sites if isinstance(failure, SitesFailure) else [],
                )
            )
    ids = plan.ids
    return FusedAnswer(
        method=plan.method,
        num_classes=k,
        sample_ids=ids if grouped.predicted is None else [ids[i] for i in grouped.predicted],
        probability_data=np.ascontiguousarray(probs, dtype="<f8").tobytes(),
        predicted_labels=probs.argmax(axis=1).tolist() if n else [],
        modalities=contributions,
        unpredicted_sample_ids=grouped.unpredicted,
        robust=None
        if sets is None or abstain is None
        else RobustParts([np.flatnonzero(row).tolist() for row in sets], abstain.tolist()),
    )
