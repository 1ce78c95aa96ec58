"""The requester's side of ``FusionService`` messages, without the coordinator's code.

``predict`` must start fast, so this module imports only the generated protobuf code, numpy
and the matrix codec (never torch or the coordinator). Method names follow the proto enum:
``FUSION_METHOD_CONFIDENCE_MEAN`` <-> ``confidence_mean``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jacfusion_fed.cli.render import method_name
from jacfusion_fed.rpc.jacfusion.v1 import fusion_pb2
from jacfusion_fed.rpc.matrix import decode_matrix

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


@dataclass
class Contribution:
    """What one modality contributed to an answer (``used``: one flag per sample)."""

    modality: str
    owner: str
    model_version: str
    gamma: float
    regularized: bool
    error: str
    used: np.ndarray


@dataclass
class Answer:
    """``Predictions`` (one response, or the chunks of a stream appended) as arrays."""

    method: str = ""
    sample_ids: list[str] = field(default_factory=list)
    probabilities: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    contributions: list[Contribution] = field(default_factory=list)
    unpredicted: list[str] = field(default_factory=list)

    def add(self, msg: fusion_pb2.Predictions) -> None:
        """Append one ``Predictions`` message (checked: a malformed one raises ``ValueError``)."""
        n = len(msg.sample_ids)
        probs = decode_matrix(msg.probabilities, shape=(n, None), name="probabilities")
        labels = np.asarray(msg.predicted_labels, dtype=np.int64)
        if labels.shape != (n,):
            raise ValueError(f"malformed answer: {labels.size} labels for {n} samples")
        first = not self.sample_ids and not self.contributions
        self.method = method_name(fusion_pb2.FusionMethod.Name(msg.method))
        self.sample_ids += list(msg.sample_ids)
        self.probabilities = probs if first else np.concatenate([self.probabilities, probs])
        self.labels = np.concatenate([self.labels, labels])
        self.unpredicted += list(msg.unpredicted_sample_ids)
        for i, c in enumerate(msg.modalities):
            used = np.asarray(c.used, dtype=bool)
            if used.shape != (n,):
                raise ValueError(f"malformed answer: {c.modality!r} flags {used.size} of {n}")
            if first:
                self.contributions.append(
                    Contribution(
                        c.modality, c.owner, c.model_version, c.gamma, c.regularized, c.error, used
                    )
                )
            else:
                known = self.contributions[i]
                known.used = np.concatenate([known.used, used])
                known.error = known.error or c.error

    def to_json(self, names: list[str], local: dict[str, str]) -> dict[str, Any]:
        """The answer with the names the table shows (class names, method, versions)."""
        samples = []
        for i, sid in enumerate(self.sample_ids):
            label = int(self.labels[i])
            samples.append(
                {
                    "sample_id": sid,
                    **({"local_id": local[sid]} if sid in local else {}),
                    "label": names[label] if label < len(names) else str(label),
                    "label_index": label,
                    "probabilities": self.probabilities[i].tolist(),
                    "modalities": [c.modality for c in self.contributions if c.used[i]],
                }
            )
        return {
            "method": self.method,
            "class_names": names,
            "modalities": [
                {**{k: getattr(c, k) for k in _SHOWN}, "samples_used": int(c.used.sum())}
                for c in self.contributions
            ],
            "samples": samples,
            "unpredicted_sample_ids": [local.get(s, s) for s in self.unpredicted],
        }
