"""The coordinator's ``jacfusion.v1.FusionService`` (thin: proto <-> :class:`Coordinator`).

Translation only, through the one codec (:mod:`jacfusion_fed.rpc.fusion_codec`): request
options become :class:`PredictOptions`, the coordinator's
:class:`~jacfusion_fed.answer.FusedAnswer` becomes ``Predictions``, a :class:`PredictError`
becomes its status code. Who may call what (requesters predict) is
enforced by the server's :class:`jacfusion_fed.rpc.auth.AuthInterceptor`, see
:mod:`jacfusion_fed.server.serve`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import grpc

from jacfusion_fed.rpc.fusion_codec import (
    METHOD_TO_PROTO,
    PredictOptions,
    UnknownMethodError,
    options_from_proto,
    predictions_to_proto,
    site_to_proto,
)
from jacfusion_fed.rpc.jacfusion.v1 import fusion_pb2, fusion_pb2_grpc, modality_pb2
from jacfusion_fed.rpc.status_details import abort_with_violations

from .coordinator import Coordinator
from .predict_types import PredictError

__all__ = ["FusionServicer", "request_options"]

log = logging.getLogger(__name__)


def request_options(options: fusion_pb2.FusionOptions) -> PredictOptions:
    """A request's ``FusionOptions`` through the codec; an unknown method value is
    :class:`PredictError` (``INVALID_ARGUMENT``)."""
    try:
        return options_from_proto(options)
    except UnknownMethodError as exc:
        raise PredictError(
            grpc.StatusCode.INVALID_ARGUMENT, str(exc), (("options.method", str(exc)),)
        ) from None


def _abort(context: grpc.ServicerContext, exc: PredictError) -> None:
    """Abort with ``exc``'s code and message, and its field violations as
    ``google.rpc.BadRequest`` details."""
    if exc.violations and exc.code == grpc.StatusCode.INVALID_ARGUMENT:
        abort_with_violations(context, exc.message, exc.violations)
    context.abort(exc.code, exc.message)


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
            answer = self.coordinator.predict(
                request.sample_ids,
                request_options(request.options),
                deadline=_deadline(context),
            )
        except PredictError as exc:
            _abort(context, exc)
        except Exception:
            log.exception("Predict failed")
            context.abort(grpc.StatusCode.INTERNAL, "internal error in the coordinator")
        return fusion_pb2.PredictResponse(predictions=predictions_to_proto(answer))

    def PredictStream(
        self, request: fusion_pb2.PredictStreamRequest, context: grpc.ServicerContext
    ) -> Iterator[fusion_pb2.PredictStreamResponse]:
        try:
            for answer in self.coordinator.predict_stream(
                request.sample_ids,
                request_options(request.options),
                chunk_size=int(request.chunk_size),
                deadline=_deadline(context),
            ):
                yield fusion_pb2.PredictStreamResponse(predictions=predictions_to_proto(answer))
        except PredictError as exc:
            _abort(context, exc)
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
            entry.sites.extend(site_to_proto(site) for site in info.sites.get(record.modality, []))
        return response
