"""Constants and value types of the coordinator's prediction API: owner endpoints, the
coordinator's configuration, its errors, registered heads and model info (used by
:class:`jacfusion_fed.server.coordinator.Coordinator` and its gRPC face). Its answer is the one
answer type, :class:`jacfusion_fed.answer.FusedAnswer`.

Status codes of :class:`PredictError`: ``INVALID_ARGUMENT`` (empty, oversized or duplicate
batch; bad ids; unknown method or modality; gamma outside (0, 1]; options that do not apply to
the method; iterations out of range; owner_timeout outside (0, 3600] s), ``NOT_FOUND``
(unknown ids), ``UNAVAILABLE`` (owners down or late where they were needed),
``DEADLINE_EXCEEDED`` (the request's own deadline left no time to ask the owners), and, when
every selected owner failed for the same non-transient reason, that reason's code
(``DATA_LOSS`` for non-finite, malformed or implausibly large (over 1e8) logits or Gram
matrices, ``FAILED_PRECONDITION`` for a K mismatch between owners, ``PERMISSION_DENIED`` for
an owner whose certificate names another modality, ``ABORTED`` for a model version that could
not be matched with its head). A fusion whose
result would not be finite in float64 (e.g. a tiny gamma with a large Gram matrix) fails with
``DATA_LOSS`` instead of answering NaN.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

import grpc
import numpy as np

from jacfusion_fed.answer import SiteStatus
from jacfusion_fed.fusion import METHODS, GramFactor, ModalityCalibration, check_gamma
from jacfusion_fed.privacy.certs import validate_modality_name
from jacfusion_fed.store import HeadRecord

__all__ = [
    "MAX_ABS_OWNER_VALUE",
    "MAX_ID_LENGTH",
    "MAX_OWNER_TIMEOUT_S",
    "METHODS",
    "OWNER_RECONNECT",
    "CoordinatorConfig",
    "ModelInfo",
    "OwnerEndpoint",
    "PredictError",
    "RegisteredHead",
]

# METHODS (the fusion rules, by the names used in options, the CLI and the JSON output) is
# the fusion registry's (jacfusion_fed.fusion.METHODS), re-exported as part of this API.
#: Longest accepted sample id (pseudonyms are 64 hex or 52 base32 characters).
MAX_ID_LENGTH: Final = 256
#: Longest accepted per-owner timeout (seconds). gRPC turns a timeout into an absolute
#: deadline in int64 nanoseconds; from about 7.5e9 s on that overflows and every owner call
#: would fail at once with DEADLINE_EXCEEDED, so longer timeouts are refused outright.
MAX_OWNER_TIMEOUT_S: Final = 3600.0
#: Largest accepted magnitude of a logit or of a Gram matrix entry from an owner. Far beyond
#: anything a trained network produces, and well inside the range where fusion stays finite
#: in float64 (measured: the Jacobian solver overflows once (1/gamma - 1) * |Gram| nears
#: 1e15, and from |logit| near 1e300); an owner sending more is left out with DATA_LOSS.
MAX_ABS_OWNER_VALUE: Final = 1e8
#: Owner channels retry a lost connection after 0.2 s, backing off to at most 2 s (gRPC's
#: defaults, 1 s to 120 s, would keep a restarted owner out for minutes).
OWNER_RECONNECT: Final = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
)


# --- configuration and results -----------------------------------------------------------------


@dataclass(frozen=True)
class OwnerEndpoint:
    """Where the owner of ``modality`` serves ``ModalityService``."""

    modality: str
    target: str

    def __post_init__(self) -> None:
        validate_modality_name(self.modality)
        host, sep, port = self.target.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"owner target {self.target!r} must look like host:port")

    @classmethod
    def parse(cls, text: str) -> OwnerEndpoint:
        """``"audio=127.0.0.1:50051"``."""
        modality, sep, target = text.partition("=")
        if not sep:
            raise ValueError(f"owner {text!r} must look like MODALITY=HOST:PORT")
        return cls(modality.strip(), target.strip())


@dataclass(frozen=True)
class CoordinatorConfig:
    """Defaults and limits of a coordinator (requests may override the defaults)."""

    default_method: str = "jacobian"
    default_gamma: float = 0.5
    default_iterations: int = 1
    max_iterations: int = 16
    #: Per-owner timeout for logit requests (seconds).
    owner_timeout_s: float = 2.0
    #: Timeout for head registration calls (seconds).
    registration_timeout_s: float = 5.0
    #: Most ids per Predict call.
    max_batch: int = 65_536
    #: Most ids per PredictStream call.
    max_stream_batch: int = 524_288
    #: Default ids per PredictStream response.
    stream_chunk: int = 4_096
    #: Most ids per GetLogits call to one owner (larger batches are split; must not exceed
    #: the owners' own limit).
    owner_chunk: int = 65_536
    #: "cpu", "cuda", "cuda:1", ...; None picks CUDA when available.
    device: str | None = None
    #: Fuse concurrent requests with the same options as one batch.
    batch_fusion: bool = True
    #: Threads for concurrent owner calls (each blocks for one call's round trip).
    fanout_threads: int = 32
    #: Most rows fused in one call by the batcher.
    max_fusion_rows: int = 65_536
    #: Seconds between version checks of registered owners, and between tries to register
    #: owners that have no head yet.
    sync_interval_s: float = 30.0
    retry_interval_s: float = 2.0

    def __post_init__(self) -> None:
        if self.default_method not in METHODS:
            raise ValueError(
                f"default_method must be one of {METHODS}, got {self.default_method!r}"
            )
        check_gamma(self.default_gamma, "default_gamma")
        if not 1 <= self.default_iterations <= self.max_iterations:
            raise ValueError("need 1 <= default_iterations <= max_iterations")
        for name in ("max_batch", "max_stream_batch", "stream_chunk", "owner_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not 0 < self.owner_timeout_s <= MAX_OWNER_TIMEOUT_S:
            raise ValueError(f"owner_timeout_s must be in (0, {MAX_OWNER_TIMEOUT_S:g}]")


class PredictError(Exception):
    """A request that cannot be answered; ``code`` is the gRPC status to return;
    ``violations`` (field, description), for ``INVALID_ARGUMENT``, name the request fields at
    fault (``sample_ids[3]``, ``options.iterations``) as ``google.rpc.BadRequest`` details."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        violations: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.violations = violations


@dataclass(frozen=True)
class RegisteredHead:
    """A registry record and its Gram factor on the fusion device."""

    record: HeadRecord
    factor: GramFactor

    @functools.cached_property
    def calibration(self) -> ModalityCalibration | None:
        """The owner's calibration for robust fusion (None when it published none)."""
        arrays = self.record.calibration
        return None if arrays is None else ModalityCalibration.from_arrays(arrays)

    @property
    def version(self) -> str:
        return self.record.model_version

    @property
    def num_classes(self) -> int:
        return self.record.num_classes


@dataclass(frozen=True)
class ModelInfo:
    """What ``GetModelInfo`` reports."""

    num_classes: int
    class_prior: np.ndarray
    class_names: list[str]
    heads: list[HeadRecord]
    default_method: str
    sites: Mapping[str, list[SiteStatus]] = field(default_factory=dict)  # several sites only
