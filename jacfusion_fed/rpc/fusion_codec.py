"""The one codec of ``jacfusion.v1.FusionService`` messages, for both ends of the wire.

Request options (:class:`PredictOptions` <-> ``FusionOptions``) and answers
(:class:`~jacfusion_fed.answer.FusedAnswer` <-> ``Predictions``) are translated here and
nowhere else: the coordinator's servicer (``server/fusion_service.py``), the requester's
Python client (:class:`jacfusion_fed.requester.Requester`) and ``jacfusion-fed predict`` all
use this module.

``predict`` must start fast, so this module imports only the generated protobuf code and the
answer type: not torch, not the coordinator, not even numpy (its import alone is a quarter of
the start-up; an answer is a few rows of K values, read with :mod:`array`). Every answer is
checked once, by :func:`answer_from_proto`: the probability matrix's size, shape and finite
values, labels in range, one flag per sample.

Method names follow the proto enum: ``FUSION_METHOD_CONFIDENCE_MEAN`` <-> ``confidence_mean``.
The ``robust`` method's answer also carries, per sample, each modality's reliability in
[0, 1], the conformal prediction set (class indices) and the abstain flag.
"""

from __future__ import annotations

import math
import sys
from array import array
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from jacfusion_fed.answer import Contribution, FusedAnswer, RobustParts, SiteStatus
from jacfusion_fed.rpc.jacfusion.v1 import common_pb2, fusion_pb2

__all__ = [
    "METHOD_FROM_PROTO",
    "METHOD_TO_PROTO",
    "PredictOptions",
    "UnknownMethodError",
    "answer_from_proto",
    "method_name",
    "options_from_proto",
    "options_to_proto",
    "predictions_to_proto",
    "site_to_proto",
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
    center_logits: bool | None = None


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
        center_logits=options.center_logits if options.HasField("center_logits") else None,
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
    if options.center_logits is not None:
        msg.center_logits = options.center_logits
    if options.owner_timeout_s is not None:
        msg.owner_timeout.FromNanoseconds(round(options.owner_timeout_s * 1e9))
    return msg


def predictions_to_proto(answer: FusedAnswer) -> fusion_pb2.Predictions:
    """A :class:`FusedAnswer` -> ``Predictions`` (the robust fields only when it has them)."""
    msg = fusion_pb2.Predictions(
        sample_ids=answer.sample_ids,
        probabilities=common_pb2.Matrix(
            rows=len(answer.sample_ids), cols=answer.num_classes, data=answer.probability_data
        ),
        predicted_labels=answer.predicted_labels,
        modalities=[
            fusion_pb2.ModalityContribution(
                modality=c.modality,
                owner=c.owner,
                model_version=c.model_version,
                used=c.used,
                gamma=c.gamma,
                regularized=c.regularized,
                error=c.error,
                sites=[site_to_proto(site) for site in c.sites],
                ambiguous_sample_ids=c.ambiguous_sample_ids,
                reliability=c.reliability or [],
            )
            for c in answer.modalities
        ],
        unpredicted_sample_ids=answer.unpredicted_sample_ids,
        method=METHOD_TO_PROTO[answer.method],
    )
    if answer.robust is not None:
        msg.prediction_sets.extend(
            fusion_pb2.PredictionSet(labels=labels) for labels in answer.robust.prediction_sets
        )
        msg.abstain.extend(answer.robust.abstain)
    return msg


def _probabilities(matrix: common_pb2.Matrix, n: int) -> tuple[int, bytes]:
    """(K, data) of the ``n`` rows of a float64 little-endian ``Matrix``; ``ValueError`` if
    malformed or not finite."""
    rows, cols = int(matrix.rows), int(matrix.cols)
    data = bytes(matrix.data)
    if rows != n or len(data) != rows * cols * 8:
        raise ValueError(
            f"malformed answer: probabilities {rows} x {cols} in {len(data)} bytes for {n} samples"
        )
    values = array("d", data)
    if sys.byteorder == "big":
        values.byteswap()
    if not all(math.isfinite(v) for v in values):
        raise ValueError("malformed answer: probabilities contain NaN or infinite values")
    return cols, data


def answer_from_proto(
    msg: fusion_pb2.Predictions, local_ids: Mapping[str, str] | None = None
) -> FusedAnswer:
    """``Predictions`` -> :class:`FusedAnswer`, checked: the probability matrix's size, shape
    and finite values, labels and prediction sets in range, one flag (and reliability in
    [0, 1]) per sample and modality; a malformed message raises ``ValueError``."""
    n = len(msg.sample_ids)
    k, data = _probabilities(msg.probabilities, n)
    labels = [int(x) for x in msg.predicted_labels]
    if len(labels) != n or any(not 0 <= x < k for x in labels):
        raise ValueError(f"malformed answer: labels {labels[:10]} for {n} samples")
    method = METHOD_FROM_PROTO.get(msg.method, "unspecified")
    robust = None
    if msg.prediction_sets or msg.abstain or method == "robust":
        sets = [list(s.labels) for s in msg.prediction_sets]
        if len(sets) != n or len(msg.abstain) != n:
            raise ValueError(
                f"malformed answer: {len(sets)} prediction sets, {len(msg.abstain)} abstain "
                f"flags for {n} samples"
            )
        if any(not 0 <= x < k for s in sets for x in s):
            raise ValueError("malformed answer: a prediction set names a class out of range")
        robust = RobustParts(sets, [bool(a) for a in msg.abstain])
    modalities = []
    for c in msg.modalities:
        used = [bool(u) for u in c.used]
        if len(used) != n:
            raise ValueError(f"malformed answer: {c.modality!r} flags {len(used)} of {n}")
        rel = [float(r) for r in c.reliability]
        if rel and (len(rel) != n or not all(0.0 <= r <= 1.0 for r in rel)):
            raise ValueError(
                f"malformed answer: {c.modality!r} reliability {rel[:5]} for {n} samples"
            )
        modalities.append(
            Contribution(
                c.modality,
                c.owner,
                c.model_version,
                used,
                gamma=c.gamma,
                regularized=c.regularized,
                error=c.error,
                reliability=rel if robust is not None else (rel or None),
                sites=[_site_from_proto(site) for site in c.sites],
                ambiguous_sample_ids=list(c.ambiguous_sample_ids),
            )
        )
    return FusedAnswer(
        method=method,
        num_classes=k,
        sample_ids=list(msg.sample_ids),
        probability_data=data,
        predicted_labels=labels,
        modalities=modalities,
        unpredicted_sample_ids=list(msg.unpredicted_sample_ids),
        robust=robust,
        local_ids=dict(local_ids or {}),
    )
