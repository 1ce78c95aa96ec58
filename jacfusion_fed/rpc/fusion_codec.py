"""The one codec of ``jacfusion.v1.FusionService`` messages, for both ends of the wire.

Request options (:class:`PredictOptions` <-> ``FusionOptions``) and answers (a coordinator's
result -> ``Predictions`` -> :class:`Answer`) are translated here and nowhere else: the
coordinator's servicer (``server/fusion_service.py``), the requester's Python client
(:class:`jacfusion_fed.client.Requester`) and ``jacfusion-fed predict`` all use this module.

``predict`` must start fast, so this module imports only the generated protobuf code at
start: not torch, not the coordinator, not even numpy (its import alone is a quarter of the
start-up; an answer is a few rows of K values, read with :mod:`array`). numpy is imported
only by the functions that produce or return arrays (:func:`predictions_to_proto`,
:func:`decode_predictions`). Every answer is checked once, by :meth:`Answer.add`: the
probability matrix's size, shape and finite values, labels in range, one flag per sample.

Method names follow the proto enum: ``FUSION_METHOD_CONFIDENCE_MEAN`` <-> ``confidence_mean``.
The ``robust`` method's answer also carries, per sample, each modality's reliability in
[0, 1], the conformal prediction set (class indices) and the abstain flag.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from jacfusion_fed.rpc.jacfusion.v1 import common_pb2, fusion_pb2

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "METHOD_FROM_PROTO",
    "METHOD_TO_PROTO",
    "Answer",
    "Contribution",
    "DecodedContribution",
    "DecodedPredictions",
    "PredictOptions",
    "UnknownMethodError",
    "decode_predictions",
    "method_name",
    "options_from_proto",
    "options_to_proto",
    "predictions_to_proto",
]


def method_name(proto_name: str) -> str:
    """``FUSION_METHOD_CONFIDENCE_MEAN`` -> ``confidence_mean`` (the name options use)."""
    return proto_name.removeprefix("FUSION_METHOD_").lower()


#: Method name -> ``FusionMethod`` enum value, for every method fusion.proto names (the
#: coordinator serves those of them its fusion registry has).
METHOD_TO_PROTO: Final[dict[str, fusion_pb2.FusionMethod.ValueType]] = {
    method_name(v.name): fusion_pb2.FusionMethod.Value(v.name)
    for v in fusion_pb2.FusionMethod.DESCRIPTOR.values
    if v.number != fusion_pb2.FUSION_METHOD_UNSPECIFIED
}
METHOD_FROM_PROTO: Final[dict[fusion_pb2.FusionMethod.ValueType, str]] = {
    v: k for k, v in METHOD_TO_PROTO.items()
}


@dataclass(frozen=True)
class SiteStatus:
    """One site of a modality served by several sites (``SiteStatus`` in fusion.proto)."""

    target: str
    model_version: str = ""
    error: str = ""
    samples: int = 0  # predicted samples of the batch whose logits came from this site


def site_to_proto(site: SiteStatus) -> fusion_pb2.SiteStatus:
    return fusion_pb2.SiteStatus(
        target=site.target,
        model_version=site.model_version,
        error=site.error,
        samples=site.samples,
    )


def _site_from_proto(msg: fusion_pb2.SiteStatus) -> SiteStatus:
    return SiteStatus(msg.target, msg.model_version, msg.error, int(msg.samples))


class UnknownMethodError(ValueError):
    """A ``FusionMethod`` value (or name) this codec does not know."""


@dataclass(frozen=True)
class PredictOptions:
    """Options of one request; ``None`` / empty means the coordinator's default."""

    method: str | None = None
    default_gamma: float | None = None
    gammas: Mapping[str, float] = field(default_factory=dict)
    regularize: tuple[str, ...] = ()
    iterations: int | None = None
    require_all: bool = False
    modalities: tuple[str, ...] = ()
    owner_timeout_s: float | None = None
    skip_unknown_ids: bool = False


def options_from_proto(options: fusion_pb2.FusionOptions) -> PredictOptions:
    """``FusionOptions`` -> :class:`PredictOptions`; an unknown method value raises
    :class:`UnknownMethodError` naming the known ones."""
    method = None
    if options.method != fusion_pb2.FUSION_METHOD_UNSPECIFIED:
        try:
            method = METHOD_FROM_PROTO[options.method]
        except KeyError:
            raise UnknownMethodError(
                f"unknown fusion method {options.method}; expected one of "
                + ", ".join(f"{fusion_pb2.FusionMethod.Name(v)} ({v})" for v in METHOD_FROM_PROTO)
            ) from None
    timeout = None
    if options.HasField("owner_timeout"):
        timeout = options.owner_timeout.seconds + options.owner_timeout.nanos * 1e-9
    return PredictOptions(
        method=method,
        default_gamma=options.default_gamma if options.HasField("default_gamma") else None,
        gammas=dict(options.gammas),
        regularize=tuple(options.regularize),
        iterations=int(options.iterations) or None,
        require_all=options.require_all,
        modalities=tuple(options.modalities),
        owner_timeout_s=timeout,
        skip_unknown_ids=options.skip_unknown_ids,
    )


def options_to_proto(options: PredictOptions) -> fusion_pb2.FusionOptions:
    """:class:`PredictOptions` -> ``FusionOptions``; unset values leave the coordinator's
    defaults. An unknown method name raises :class:`UnknownMethodError`."""
    method = fusion_pb2.FUSION_METHOD_UNSPECIFIED
    if options.method:
        if options.method not in METHOD_TO_PROTO:
            raise UnknownMethodError(
                f"unknown fusion method {options.method!r}; expected one of "
                + ", ".join(METHOD_TO_PROTO)
            )
        method = METHOD_TO_PROTO[options.method]
    msg = fusion_pb2.FusionOptions(
        method=method,
        gammas=dict(options.gammas),
        regularize=list(options.regularize),
        iterations=options.iterations or 0,
        require_all=options.require_all,
        modalities=list(options.modalities),
        skip_unknown_ids=options.skip_unknown_ids,
    )
    if options.default_gamma is not None:
        msg.default_gamma = options.default_gamma
    if options.owner_timeout_s is not None:
        msg.owner_timeout.FromNanoseconds(round(options.owner_timeout_s * 1e9))
    return msg


def predictions_to_proto(result: Any) -> fusion_pb2.Predictions:
    """A coordinator's ``PredictResult`` -> ``Predictions`` (the robust fields only when the
    result has them: ``prediction_sets``/``abstain`` not None, contributions' ``reliability``)."""
    from jacfusion_fed.rpc.matrix import encode_matrix

    msg = fusion_pb2.Predictions(
        sample_ids=result.sample_ids,
        probabilities=encode_matrix(result.probabilities),
        predicted_labels=result.labels.tolist(),
        modalities=[
            fusion_pb2.ModalityContribution(
                modality=c.modality,
                owner=c.owner,
                model_version=c.model_version,
                used=c.used.tolist(),
                gamma=c.gamma,
                regularized=c.regularized,
                error=c.error,
                sites=[site_to_proto(site) for site in c.sites],
                ambiguous_sample_ids=c.ambiguous_sample_ids,
                reliability=[] if c.reliability is None else c.reliability.tolist(),
            )
            for c in result.modalities
        ],
        unpredicted_sample_ids=result.unpredicted_sample_ids,
        method=METHOD_TO_PROTO[result.method],
    )
    if result.prediction_sets is not None:
        msg.prediction_sets.extend(
            fusion_pb2.PredictionSet(labels=[int(k) for k in row.nonzero()[0]])
            for row in result.prediction_sets
        )
    if result.abstain is not None:
        msg.abstain.extend(bool(a) for a in result.abstain)
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
    """What one modality contributed to an answer (``used``: one flag per sample;
    ``reliability``: one score per sample for the robust method, else empty)."""

    modality: str
    owner: str
    model_version: str
    gamma: float
    regularized: bool
    error: str
    used: list[bool]
    reliability: list[float] = field(default_factory=list)
    #: With several sites per modality: each site's part (from the first message of a stream,
    #: errors merged over the chunks), and the ids held by more than one site.
    sites: list[SiteStatus] = field(default_factory=list)
    ambiguous: list[str] = field(default_factory=list)

    @property
    def site_errors(self) -> list[str]:
        """``"ADDRESS: error"`` of each site that failed."""
        return [f"{site.target}: {site.error}" for site in self.sites if site.error]

    def merge_sites(self, msg: fusion_pb2.ModalityContribution) -> None:
        for site in msg.sites:
            at = next((i for i, k in enumerate(self.sites) if k.target == site.target), None)
            if at is None:
                self.sites.append(_site_from_proto(site))
            else:
                known = self.sites[at]
                samples = known.samples + int(site.samples)
                error = known.error or site.error
                self.sites[at] = dataclasses.replace(known, samples=samples, error=error)
        self.ambiguous += list(msg.ambiguous_sample_ids)


#: Per-modality fields of the JSON output, in the order the table shows them.
_SHOWN = ("modality", "owner", "model_version", "gamma", "regularized", "error")


@dataclass
class Answer:
    """``Predictions`` (one response, or the chunks of a stream appended): per sample its
    probabilities (K values), label and, per modality, whether it was used; for the robust
    method also the prediction set and the abstain flag per sample."""

    method: str = ""
    sample_ids: list[str] = field(default_factory=list)
    probabilities: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    contributions: list[Contribution] = field(default_factory=list)
    unpredicted: list[str] = field(default_factory=list)
    prediction_sets: list[list[int]] = field(default_factory=list)
    abstain: list[bool] = field(default_factory=list)
    num_classes: int = 0

    @property
    def robust(self) -> bool:
        """Whether the answer carries reliabilities, prediction sets and abstain flags."""
        return bool(self.abstain) or (self.method == "robust" and not self.sample_ids)

    def add(self, msg: fusion_pb2.Predictions) -> None:
        """Append one ``Predictions`` message (checked: a malformed one raises ``ValueError``)."""
        n = len(msg.sample_ids)
        probs = _rows(msg.probabilities, n)
        labels = [int(k) for k in msg.predicted_labels]
        if len(labels) != n or any(not 0 <= k < len(p) for k, p in zip(labels, probs, strict=True)):
            raise ValueError(f"malformed answer: labels {labels[:10]} for {n} samples")
        sets = [list(s.labels) for s in msg.prediction_sets]
        abstain = [bool(a) for a in msg.abstain]
        if (sets or abstain) and (len(sets) != n or len(abstain) != n):
            raise ValueError(
                f"malformed answer: {len(sets)} prediction sets, {len(abstain)} abstain flags "
                f"for {n} samples"
            )
        if any(not 0 <= k < len(p) for s, p in zip(sets, probs, strict=False) for k in s):
            raise ValueError("malformed answer: a prediction set names a class out of range")
        first = not self.sample_ids and not self.contributions
        self.num_classes = self.num_classes or int(msg.probabilities.cols)
        self.method = METHOD_FROM_PROTO.get(msg.method, "unspecified")
        self.sample_ids += list(msg.sample_ids)
        self.probabilities += probs
        self.labels += labels
        self.unpredicted += list(msg.unpredicted_sample_ids)
        self.prediction_sets += sets
        self.abstain += abstain
        for i, c in enumerate(msg.modalities):
            used = [bool(u) for u in c.used]
            if len(used) != n:
                raise ValueError(f"malformed answer: {c.modality!r} flags {len(used)} of {n}")
            rel = [float(r) for r in c.reliability]
            if rel and (len(rel) != n or not all(0.0 <= r <= 1.0 for r in rel)):
                raise ValueError(
                    f"malformed answer: {c.modality!r} reliability {rel[:5]} for {n} samples"
                )
            if first:
                self.contributions.append(
                    Contribution(
                        c.modality,
                        c.owner,
                        c.model_version,
                        c.gamma,
                        c.regularized,
                        c.error,
                        used,
                        rel,
                    )
                )
            else:
                known = self.contributions[i]
                known.used += used
                known.reliability += rel
                known.error = known.error or c.error
            self.contributions[i].merge_sites(c)

    def to_json(self, names: Sequence[str], local: Mapping[str, str]) -> dict[str, Any]:
        """The answer with the names the table shows (class names, method, versions)."""

        def label_name(label: int) -> str:
            return names[label] if label < len(names) else str(label)

        samples = []
        for i, sid in enumerate(self.sample_ids):
            label = self.labels[i]
            sample: dict[str, Any] = {
                "sample_id": sid,
                **({"local_id": local[sid]} if sid in local else {}),
                "label": label_name(label),
                "label_index": label,
                "probabilities": self.probabilities[i],
                "modalities": [c.modality for c in self.contributions if c.used[i]],
            }
            if self.abstain:
                sample["reliability"] = {
                    c.modality: c.reliability[i]
                    for c in self.contributions
                    if c.used[i] and c.reliability
                }
                sample["prediction_set"] = [label_name(k) for k in self.prediction_sets[i]]
                sample["abstain"] = self.abstain[i]
            samples.append(sample)
        return {
            "method": self.method,
            "class_names": list(names),
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


@dataclass
class DecodedContribution:
    """:class:`Contribution` with numpy arrays (``reliability`` None unless robust)."""

    modality: str
    owner: str
    model_version: str
    used: np.ndarray  # (n,) bool
    gamma: float
    regularized: bool
    error: str
    reliability: np.ndarray | None = None  # (n,) float64
    sites: list[SiteStatus] = field(default_factory=list)
    ambiguous_sample_ids: list[str] = field(default_factory=list)


@dataclass
class DecodedPredictions:
    """:class:`Answer` as numpy arrays (for callers that compute with the answer)."""

    sample_ids: list[str]
    probabilities: np.ndarray  # (n, K) float64
    labels: np.ndarray  # (n,) int64
    modalities: list[DecodedContribution]
    unpredicted_sample_ids: list[str]
    method: str
    prediction_sets: np.ndarray | None = None  # (n, K) bool, robust only
    abstain: np.ndarray | None = None  # (n,) bool, robust only


def decode_predictions(msg: fusion_pb2.Predictions | Answer) -> DecodedPredictions:
    """Check and decode ``Predictions`` (or an :class:`Answer` gathered from a stream) into
    arrays; a malformed message raises ``ValueError``."""
    import numpy as np

    answer = msg if isinstance(msg, Answer) else Answer()
    if not isinstance(msg, Answer):
        answer.add(msg)
    n = len(answer.sample_ids)
    probs = np.asarray(answer.probabilities, dtype=np.float64).reshape(n, answer.num_classes)
    sets = None
    if answer.abstain:
        sets = np.zeros(probs.shape, dtype=bool)
        for i, labels in enumerate(answer.prediction_sets):
            sets[i, labels] = True
    return DecodedPredictions(
        sample_ids=list(answer.sample_ids),
        probabilities=probs,
        labels=np.asarray(answer.labels, dtype=np.int64),
        modalities=[
            DecodedContribution(
                c.modality,
                c.owner,
                c.model_version,
                np.asarray(c.used, dtype=bool),
                c.gamma,
                c.regularized,
                c.error,
                np.asarray(c.reliability, dtype=np.float64) if c.reliability else None,
                list(c.sites),
                list(c.ambiguous),
            )
            for c in answer.contributions
        ],
        unpredicted_sample_ids=list(answer.unpredicted),
        method=answer.method,
        prediction_sets=sets,
        abstain=np.asarray(answer.abstain, dtype=bool) if answer.abstain else None,
    )
