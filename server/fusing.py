"""Fusion in the coordinator: one group of samples (held by the same modalities) fused through
the registry's :func:`jacfusion_fed.fusion.fuse`, batched across concurrent requests by
:class:`FusionBatcher`, on the fusion device, with the class prior of the registered heads.

A fusion whose result would not be finite in float64 (e.g. a tiny gamma with a large Gram
matrix) fails with ``DATA_LOSS`` instead of answering NaN; bad input to the fusion math is
``INVALID_ARGUMENT``.

A method that needs calibrations (``robust``) gets each member's published calibration and
needs at least two members (``FAILED_PRECONDITION`` otherwise); its group result is packed
as one array per sample, ``[p (K) | prediction set (K) | abstain (1) | reliability (M)]``
(see :func:`jacfusion_fed.server.assembly.unpack`), so the batcher splits it by rows like
plain probabilities.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import grpc
import numpy as np
import torch

from jacfusion_fed.fusion import FusionInputError, ModalityCalibration, fuse_full

from .batching import FusionBatcher, FusionKey
from .predict_types import PredictError, RegisteredHead
from .request_plan import Plan

__all__ = ["Fuser"]


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


class Fuser:
    """``fuse_group(plan, members, heads, logits) -> probs`` for :func:`assemble`.

    Args:
        device: the fusion device.
        log_prior: returns the current ln prior on ``device`` (or None before any head).
        enabled: batch concurrent requests (see :class:`FusionBatcher`).
        max_rows: largest batch fused in one call.
    """

    def __init__(
        self,
        device: torch.device,
        log_prior: Callable[[], torch.Tensor | None],
        *,
        enabled: bool = True,
        max_rows: int = 65_536,
    ) -> None:
        self.device = device
        self._log_prior = log_prior
        self.batcher = FusionBatcher(self._compute, enabled=enabled, max_rows=max_rows)

    def fuse_group(
        self,
        plan: Plan,
        members: list[str],
        heads: Mapping[str, RegisteredHead],
        logits: list[np.ndarray],
    ) -> np.ndarray:
        """Fused probabilities (n, K) of samples held by every one of ``members``."""
        options = plan.fusion_options(members)
        key = FusionKey(
            method=plan.method,
            modalities=tuple(members),
            versions=tuple(heads[m].version for m in members),
            options=tuple(sorted((k, _hashable(v)) for k, v in options.items())),
        )
        spec: Any = None
        if {"grams"} & (plan.rule.needs | plan.rule.uses):
            regularize = set(options.get("regularize", range(len(members))))
            spec = [heads[m].factor if j in regularize else None for j, m in enumerate(members)]
        if "calibrations" in plan.rule.needs:
            spec = _calibrations(plan.method, members, heads)
        try:
            probs = self.batcher.run(key, logits, spec)
        except FusionInputError as exc:
            raise PredictError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        if not np.isfinite(probs).all():
            # Never answer with NaN: the inputs are beyond float64's range for this fusion
            # (e.g. a tiny gamma with a large Gram matrix).
            bad = int((~np.isfinite(probs).all(axis=1)).sum())
            gammas = (
                ", ".join(f"{m}={plan.gammas[m]:g}" for m in members)
                if plan.rule.takes("gamma")
                else "-"
            )
            raise PredictError(
                grpc.StatusCode.DATA_LOSS,
                f"{plan.method} fusion of {', '.join(members)} is not finite in float64 for "
                f"{bad} sample(s) (gammas {gammas}): the owners' logits or Gram matrices are "
                "too large for these settings (a larger gamma may help)",
            )
        return probs

    def _compute(self, key: FusionKey, logits: list[np.ndarray], spec: Any) -> np.ndarray:
        """One fusion call on the fusion device (the batcher's ``compute``); ``spec``: the
        Gram factors, or the calibrations of a method that needs them."""
        zs = [torch.from_numpy(np.ascontiguousarray(z)).to(self.device) for z in logits]
        options = {k: list(v) if isinstance(v, tuple) else v for k, v in key.options}
        calibrated = bool(spec) and all(isinstance(c, ModalityCalibration) for c in spec)
        grams, cals = (None, spec) if calibrated else (spec, None)
        with torch.inference_mode():
            fused = fuse_full(key.method, zs, grams, self._log_prior(), options, calibrations=cals)
        columns = [fused.p]
        if fused.reliability is not None:
            assert fused.prediction_set is not None and fused.abstain is not None
            columns += [fused.prediction_set, fused.abstain[:, None], fused.reliability]
        out: np.ndarray = torch.cat([c.to(torch.float64) for c in columns], 1).cpu().numpy()
        return out


def _calibrations(
    method: str, members: list[str], heads: Mapping[str, RegisteredHead]
) -> list[ModalityCalibration]:
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
    return [c for m in members if (c := heads[m].calibration) is not None]
