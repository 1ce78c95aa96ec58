"""The requester's side of ``FusionService`` messages, without the coordinator's code.

``predict`` must start fast, so this module imports only the generated protobuf code: not
torch, not the coordinator, not even numpy (its import alone is a quarter of the start-up; an
answer is a few rows of K values, read with :mod:`array`). The probabilities are checked as
:func:`jacfusion_fed.rpc.matrix.decode_matrix` checks them: size, shape, finite values.
Method names follow the proto enum: ``FUSION_METHOD_CONFIDENCE_MEAN`` <-> ``confidence_mean``.
"""

from __future__ import annotations

import math
import sys
from array import array
from dataclasses import dataclass, field
from typing import Any

from jacfusion_fed.cli.render import method_name
from jacfusion_fed.rpc.jacfusion.v1 import common_pb2, fusion_pb2

__all__ = ["Answer", "Contribution", "fusion_options"]

#: Per-modality fields of the JSON output, in the order the table shows them.
_SHOWN = ("modality", "owner", "model_version", "gamma", "regularized", "error")


def fusion_options(
    *,
    method: str | None,
    gamma: float | None,
    modality_gammas: dict[str, float],
    regularize: list[str],
    iterations: int | None,
    modalities: list[str],
    require_all: bool,
    skip_unknown: bool,
    owner_timeout: float | None,
) -> fusion_pb2.FusionOptions:
    """``FusionOptions`` of a request; unset values leave the coordinator's defaults."""
    msg = fusion_pb2.FusionOptions(
        method=fusion_pb2.FusionMethod.Value(f"FUSION_METHOD_{method.upper()}")
        if method
        else fusion_pb2.FUSION_METHOD_UNSPECIFIED,
        gammas=modality_gammas,
        regularize=regularize,
        iterations=iterations or 0,
        require_all=require_all,
        modalities=modalities,
        skip_unknown_ids=skip_unknown,
    )
    if gamma is not None:
        msg.default_gamma = gamma
    if owner_timeout is not None:
        msg.owner_timeout.FromNanoseconds(round(owner_timeout * 1e9))
    return msg


def _rows(matrix: common_pb2.Matrix, n: int) -> list[list[float]]:
    """The ``n`` rows of a float64 little-endian ``Matrix``; ``ValueError`` if malformed."""
    rows, cols = int(matrix.rows), int(matrix.cols)
    if rows != n or len(matrix.data) != rows * cols * 8:
        raise ValueError(
            f"malformed answer: probabilities {rows} x {cols} in {len(matrix.data)} bytes "
            f"for {n} samples"
        )
    values = array("d", matrix.data)
    if sys.byteorder == "big":
        values.byteswap()
    if not all(math.isfinite(v) for v in values):
        raise ValueError("malformed answer: probabilities contain NaN or infinite values")
    return [values[i * cols : (i + 1) * cols].tolist() for i in range(rows)]


@dataclass
class Contribution:
    """What one modality contributed to an answer (``used``: one flag per sample)."""

    modality: str
    owner: str
    model_version: str
    gamma: float
    regularized: bool
    error: str
    used: list[bool]
    #: With several sites per modality: "ADDRESS: error" of each site that failed, and the
    #: ids held by more than one site (not used from this modality).
    site_errors: list[str] = field(default_factory=list)
    ambiguous: list[str] = field(default_factory=list)


@dataclass
class Answer:
    """``Predictions`` (one response, or the chunks of a stream appended): per sample its
    probabilities (K values), label and, per modality, whether it was used."""

    method: str = ""
    sample_ids: list[str] = field(default_factory=list)
    probabilities: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    contributions: list[Contribution] = field(default_factory=list)
    unpredicted: list[str] = field(default_factory=list)

    def add(self, msg: fusion_pb2.Predictions) -> None:
        """Append one ``Predictions`` message (checked: a malformed one raises ``ValueError``)."""
        n = len(msg.sample_ids)
        probs = _rows(msg.probabilities, n)
        labels = [int(k) for k in msg.predicted_labels]
        if len(labels) != n or any(not 0 <= k < len(p) for k, p in zip(labels, probs, strict=True)):
            raise ValueError(f"malformed answer: labels {labels[:10]} for {n} samples")
        first = not self.sample_ids and not self.contributions
        self.method = method_name(fusion_pb2.FusionMethod.Name(msg.method))
        self.sample_ids += list(msg.sample_ids)
        self.probabilities += probs
        self.labels += labels
        self.unpredicted += list(msg.unpredicted_sample_ids)
        for i, c in enumerate(msg.modalities):
            used = [bool(u) for u in c.used]
            if len(used) != n:
                raise ValueError(f"malformed answer: {c.modality!r} flags {len(used)} of {n}")
            if first:
                self.contributions.append(
                    Contribution(
                        c.modality, c.owner, c.model_version, c.gamma, c.regularized, c.error, used
                    )
                )
            known = self.contributions[i]
            if not first:
                known.used += used
                known.error = known.error or c.error
            for site in c.sites:
                text = f"{site.target}: {site.error}"
                if site.error and text not in known.site_errors:
                    known.site_errors.append(text)
            known.ambiguous += list(c.ambiguous_sample_ids)

    def to_json(self, names: list[str], local: dict[str, str]) -> dict[str, Any]:
        """The answer with the names the table shows (class names, method, versions)."""
        samples = []
        for i, sid in enumerate(self.sample_ids):
            label = self.labels[i]
            samples.append(
                {
                    "sample_id": sid,
                    **({"local_id": local[sid]} if sid in local else {}),
                    "label": names[label] if label < len(names) else str(label),
                    "label_index": label,
                    "probabilities": self.probabilities[i],
                    "modalities": [c.modality for c in self.contributions if c.used[i]],
                }
            )
        return {
            "method": self.method,
            "class_names": names,
            "modalities": [
                {
                    **{k: getattr(c, k) for k in _SHOWN},
                    "samples_used": sum(c.used),
                    **({"site_errors": c.site_errors} if c.site_errors else {}),
                    **({"ambiguous_sample_ids": c.ambiguous} if c.ambiguous else {}),
                }
                for c in self.contributions
            ],
            "samples": samples,
            "unpredicted_sample_ids": [local.get(s, s) for s in self.unpredicted],
        }
