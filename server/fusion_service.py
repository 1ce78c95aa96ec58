"""The coordinator's ``jacfusion.v1.FusionService`` (thin: proto <-> :class:`Coordinator`).

Translation only: request options become :class:`PredictOptions`, a
:class:`PredictResult` becomes ``Predictions``, a :class:`PredictError` becomes its status
code. Who may call what (requesters predict) is enforced by the server's
:class:`jacfusion_fed.rpc.auth.AuthInterceptor`, see :mod:`jacfusion_fed.server.serve`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from jacfusion_fed.rpc.jacfusion.v1 import fusion_pb2, fusion_pb2_grpc, modality_pb2
from jacfusion_fed.rpc.matrix import decode_matrix, encode_matrix

from .coordinator import Coordinator
from .predict_types import METHODS, PredictError, PredictOptions, PredictResult, SiteStatus

__all__ = [
    "METHOD_FROM_PROTO",
    "METHOD_TO_PROTO",
    "DecodedContribution",
    "DecodedPredictions",
    "FusionServicer",
    "decode_predictions",
    "options_from_proto",
    "options_to_proto",
    "predictions_to_proto",
]

log = logging.getLogger(__name__)

#: Registry method name -> ``FusionMethod`` enum value (``FUSION_METHOD_<NAME>``); a registered
#: method is served once fusion.proto has its enum value.
METHOD_TO_PROTO = {
    m: fusion_pb2.FusionMethod.Value(f"FUSION_METHOD_{m.upper()}")
    for m in METHODS
    if f"FUSION_METHOD_{m.upper()}" in fusion_pb2.FusionMethod.DESCRIPTOR.values_by_name
}
METHOD_FROM_PROTO = {v: k for k, v in METHOD_TO_PROTO.items()}


def options_from_proto(options: fusion_pb2.FusionOptions) -> PredictOptions:
    """``FusionOptions`` -> :class:`PredictOptions`; unknown method values raise
    :class:`PredictError` (``INVALID_ARGUMENT``)."""
    method = None
    if options.method != fusion_pb2.FUSION_METHOD_UNSPECIFIED:
        try:
            method = METHOD_FROM_PROTO[options.method]
        except KeyError:
            raise PredictError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unknown fusion method {options.method}; expected one of "
                + ", ".join(f"{fusion_pb2.FusionMethod.Name(v)} ({v})" for v in METHOD_FROM_PROTO),
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
    """:class:`PredictOptions` -> ``FusionOptions`` (for requesters)."""
    msg = fusion_pb2.FusionOptions(
        method=METHOD_TO_PROTO[options.method]
        if options.method
        else fusion_pb2.FUSION_METHOD_UNSPECIFIED,
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


def _site_to_proto(site: SiteStatus) -> fusion_pb2.SiteStatus:
    return fusion_pb2.SiteStatus(
        target=site.target, model_version=site.model_version, error=site.error,
        samples=site.samples,
    )  # fmt: skip


def predictions_to_proto(result: PredictResult) -> fusion_pb2.Predictions:
    return fusion_pb2.Predictions(
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
                sites=[_site_to_proto(site) for site in c.sites],
                ambiguous_sample_ids=c.ambiguous_sample_ids,
            )
            for c in result.modalities
        ],
        unpredicted_sample_ids=result.unpredicted_sample_ids,
        method=METHOD_TO_PROTO[result.method],
    )


@dataclass
class DecodedContribution:
    modality: str
    owner: str
    model_version: str
    used: np.ndarray
    gamma: float
    regularized: bool
    error: str
    sites: list[SiteStatus] = field(default_factory=list)
    ambiguous_sample_ids: list[str] = field(default_factory=list)


@dataclass
class DecodedPredictions:
    """``Predictions`` as arrays (requester side)."""

    sample_ids: list[str]
    probabilities: np.ndarray
    labels: np.ndarray
    modalities: list[DecodedContribution]
    unpredicted_sample_ids: list[str]
    method: str

    def to_json(self, local_ids: dict[str, str] | None = None) -> dict[str, Any]:
        """Per sample: id (local id when known), label, probabilities, modalities used."""
        samples = []
        for i, sid in enumerate(self.sample_ids):
            samples.append(
                {
                    "sample_id": sid,
                    **({"local_id": local_ids[sid]} if local_ids and sid in local_ids else {}),
                    "label": int(self.labels[i]),
                    "probabilities": self.probabilities[i].tolist(),
                    "modalities": [c.modality for c in self.modalities if c.used[i]],
                }
            )
        return {
            "method": self.method,
            "modalities": [
                {
                    "modality": c.modality,
                    "owner": c.owner,
                    "model_version": c.model_version,
                    "samples_used": int(c.used.sum()),
                    "gamma": c.gamma,
                    "regularized": c.regularized,
                    "error": c.error,
                    **({"sites": [vars(s) for s in c.sites]} if c.sites else {}),
                    **(
                        {"ambiguous_sample_ids": c.ambiguous_sample_ids}
                        if c.ambiguous_sample_ids
                        else {}
                    ),
                }
                for c in self.modalities
            ],
            "samples": samples,
            "unpredicted_sample_ids": list(self.unpredicted_sample_ids),
        }


def decode_predictions(msg: fusion_pb2.Predictions) -> DecodedPredictions:
    """Check and decode ``Predictions`` (raises ``ValueError`` on a malformed message)."""
    n = len(msg.sample_ids)
    probs = decode_matrix(msg.probabilities, shape=(n, None), name="probabilities")
    labels = np.asarray(msg.predicted_labels, dtype=np.int64)
    if labels.shape != (n,):
        raise ValueError(f"{labels.size} labels for {n} samples")
    mods = []
    for c in msg.modalities:
        used = np.asarray(c.used, dtype=bool)
        if used.shape != (n,):
            raise ValueError(f"modality {c.modality!r}: {used.size} used flags for {n} samples")
        mods.append(
            DecodedContribution(
                c.modality,
                c.owner,
                c.model_version,
                used,
                c.gamma,
                c.regularized,
                c.error,
                [SiteStatus(s.target, s.model_version, s.error, s.samples) for s in c.sites],
                list(c.ambiguous_sample_ids),
            )
        )
    return DecodedPredictions(
        list(msg.sample_ids), probs, labels, mods, list(msg.unpredicted_sample_ids),
        METHOD_FROM_PROTO.get(msg.method, "unspecified"),
    )  # fmt: skip


def _deadline(context: grpc.ServicerContext) -> float | None:
    remaining: float | None = context.time_remaining()
    if remaining is None or remaining > 1e8:  # no deadline set
        return None
    return time.monotonic() + remaining


class FusionServicer(fusion_pb2_grpc.FusionServiceServicer):
    """``FusionService`` over a :class:`Coordinator`."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator

    def Predict(
        self, request: fusion_pb2.PredictRequest, context: grpc.ServicerContext
    ) -> fusion_pb2.PredictResponse:
        try:
            result = self.coordinator.predict(
                request.sample_ids, options_from_proto(request.options),
                deadline=_deadline(context),
            )  # fmt: skip
        except PredictError as exc:
            context.abort(exc.code, exc.message)
        except Exception:
            log.exception("Predict failed")
            context.abort(grpc.StatusCode.INTERNAL, "internal error in the coordinator")
        return fusion_pb2.PredictResponse(predictions=predictions_to_proto(result))

    def PredictStream(
        self, request: fusion_pb2.PredictStreamRequest, context: grpc.ServicerContext
    ) -> Iterator[fusion_pb2.PredictStreamResponse]:
        try:
            for result in self.coordinator.predict_stream(
                request.sample_ids, options_from_proto(request.options),
                chunk_size=int(request.chunk_size), deadline=_deadline(context),
            ):  # fmt: skip
                yield fusion_pb2.PredictStreamResponse(predictions=predictions_to_proto(result))
        except PredictError as exc:
            context.abort(exc.code, exc.message)
        except Exception:
            log.exception("PredictStream failed")
            context.abort(grpc.StatusCode.INTERNAL, "internal error in the coordinator")

    def GetModelInfo(
        self, request: fusion_pb2.GetModelInfoRequest, context: grpc.ServicerContext
    ) -> fusion_pb2.GetModelInfoResponse:
        info = self.coordinator.model_info()
        response = fusion_pb2.GetModelInfoResponse(
            num_classes=info.num_classes,
            class_prior=info.class_prior.tolist(),
            class_names=info.class_names,
            default_method=METHOD_TO_PROTO[info.default_method],
        )
        for record in info.heads:
            entry = response.modalities.add(
                modality=record.modality,
                owner=record.owner,
                model_version=record.model_version,
                num_classes=record.num_classes,
                class_counts=list(record.class_counts),
                head_kind=modality_pb2.HEAD_KIND_FULL
                if record.head_kind == "full"
                else modality_pb2.HEAD_KIND_GRAM,
            )
            entry.registered_at.FromDatetime(record.registered_at)
            entry.sites.extend(_site_to_proto(site) for site in info.sites.get(record.modality, []))
        return response
