"""The one registry of fusion methods: their names, what each needs, and one entry point.

Every caller that picks a fusion rule by name (the coordinator, federated evaluation, the
reference oracle, the adaptive attacks, the evaluation pipeline) goes through :func:`fuse`, and
every class prior comes from :func:`log_prior_from_counts`. A new method is added here, in one
:func:`register` call: it declares the inputs it needs (``grams``, ``calibrations``), the ones it
uses when given (``log_prior``, ...), and its keyword options; :func:`fuse` checks them, and the
callers derive their option checks from :class:`FusionMethod` instead of listing names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import torch

from ._validation import ArrayLike, FusionInputError
from .jacobian import jacobian_fusion
from .robust import RobustFusion, robust_fusion
from .statistical import confidence_mean_fusion, mean_fusion, statistical_fusion

__all__ = [
    "INPUTS",
    "METHODS",
    "Fused",
    "FusionMethod",
    "fuse",
    "fuse_full",
    "get_method",
    "log_prior_from_counts",
    "methods",
    "prior_from_counts",
    "register",
]

#: Inputs besides the logits that a method may need or use, by the keyword ``apply`` takes.
INPUTS: Final = ("grams", "calibrations", "log_prior")


@dataclass(frozen=True)
class FusionMethod:
    """One fusion rule: ``apply(logits, **inputs, **options) -> probabilities (N, K)`` (or a
    :class:`Fused` when the rule says more per sample than its probabilities).

    Attributes:
        name: the name used in options, the CLI, the proto enum (``FUSION_METHOD_<NAME>``)
            and the JSON output.
        apply: the rule; receives the logits (M arrays (N, K)), then as keywords the inputs it
            declares (only those given, for ``uses``) and the options.
        needs: inputs without which the method cannot run (subset of :data:`INPUTS`).
        uses: inputs passed on when given and ignored otherwise (subset of :data:`INPUTS`).
        options: keyword options the method accepts (anything else is an error).
        summary: one line for help texts.
    """

    name: str
    apply: Callable[..., torch.Tensor | Fused]
    needs: frozenset[str] = frozenset()
    uses: frozenset[str] = frozenset()
    options: tuple[str, ...] = ()
    summary: str = ""

    def __post_init__(self) -> None:
        unknown = (self.needs | self.uses) - set(INPUTS)
        if unknown:
            raise ValueError(f"method {self.name!r} declares unknown inputs {sorted(unknown)}")
        if not self.name.isidentifier() or self.name != self.name.lower():
            raise ValueError(f"method name {self.name!r} must be a lower-case identifier")

    def takes(self, option: str) -> bool:
        """Whether ``option`` applies to this method."""
        return option in self.options

    def pick(self, **settings: Any) -> dict[str, Any]:
        """The ``settings`` this method takes, for a caller that holds one set of settings
        (gamma, regularize, ...) for whichever method it runs; the others are left out."""
        return {name: value for name, value in settings.items() if name in self.options}


_REGISTRY: dict[str, FusionMethod] = {}


def register(method: FusionMethod) -> FusionMethod:
    """Add ``method`` to the registry (names are unique); returns it."""
    if method.name in _REGISTRY:
        raise ValueError(f"fusion method {method.name!r} is registered already")
    _REGISTRY[method.name] = method
    return method


def methods() -> tuple[str, ...]:
    """Registered method names, in registration order."""
    return tuple(_REGISTRY)


def get_method(name: str) -> FusionMethod:
    """The registered method ``name``; :class:`FusionInputError` naming the choices otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise FusionInputError(
            f"unknown fusion method {name!r}; expected one of {', '.join(_REGISTRY)}"
        ) from None


@dataclass(frozen=True)
class Fused:
    """What :func:`fuse_full` returns: the probabilities and, for rules that give them (the
    ``robust`` method), per sample and modality the reliability, the conformal prediction set
    and the abstain flag (None otherwise).

    Attributes:
        p: fused probabilities (N, K).
        reliability: (N, M) in [0, 1], modalities in the order of the logits.
        prediction_set: (N, K) bool.
        abstain: (N,) bool.
    """

    p: torch.Tensor
    reliability: torch.Tensor | None = None
    prediction_set: torch.Tensor | None = None
    abstain: torch.Tensor | None = None


def fuse(
    method: str | FusionMethod,
    logits: Sequence[ArrayLike],
    grams: Sequence[Any] | None = None,
    log_prior: ArrayLike | None = None,
    options: Mapping[str, Any] | None = None,
    *,
    calibrations: Any = None,
) -> torch.Tensor:
    """Fuse ``logits`` with the registered ``method``.

    Args:
        method: a registered name (or a :class:`FusionMethod`).
        logits: M arrays of shape (N, K), one per modality.
        grams: per modality a Gram matrix (K, K), a :class:`~jacfusion_fed.fusion.GramFactor`
            or None; for methods that need or use them.
        log_prior: ln freq (K,) (see :func:`log_prior_from_counts`); ignored by methods that
            do not use a prior.
        options: the method's keyword options (e.g. ``gamma``, ``regularize``, ``iterations``
            of ``"jacobian"``); an option the method does not take is an error.
        calibrations: per-modality calibration data, for methods that need them.

    Returns:
        Fused probabilities (N, K) on the first array's device (:func:`fuse_full` also gives
        what else the method says per sample).

    Raises:
        FusionInputError: unknown method, a needed input missing, an option that does not
            apply, or bad input (from the method itself).
    """
    return fuse_full(method, logits, grams, log_prior, options, calibrations=calibrations).p


def fuse_full(
    method: str | FusionMethod,
    logits: Sequence[ArrayLike],
    grams: Sequence[Any] | None = None,
    log_prior: ArrayLike | None = None,
    options: Mapping[str, Any] | None = None,
    *,
    calibrations: Any = None,
) -> Fused:
    """:func:`fuse` (same arguments and checks), returning a :class:`Fused`."""
    rule = method if isinstance(method, FusionMethod) else get_method(method)
    given = {"grams": grams, "calibrations": calibrations, "log_prior": log_prior}
    missing = [name for name in sorted(rule.needs) if given[name] is None]
    if missing:
        raise FusionInputError(f"the {rule.name} method needs {' and '.join(missing)}")
    opts = dict(options or {})
    extra = sorted(set(opts) - set(rule.options))
    if extra:
        takes = f"it takes {', '.join(rule.options)}" if rule.options else "it takes none"
        raise FusionInputError(
            f"option(s) {', '.join(extra)} do not apply to the {rule.name} method ({takes})"
        )
    inputs = {
        name: value
        for name, value in given.items()
        if name in rule.needs or (name in rule.uses and value is not None)
    }
    out = rule.apply(logits, **inputs, **opts)
    return out if isinstance(out, Fused) else Fused(out)


def prior_from_counts(counts: ArrayLike | Sequence[float]) -> np.ndarray:
    """Class frequencies from training class counts, with add-one (Laplace) smoothing.

    For counts n_k >= 0 of K classes::

        freq_k = (n_k + 1) / (sum_j n_j + K)

    the posterior mean of the class frequencies under a uniform Dirichlet(1, ..., 1) prior.
    Every class, an empty one included, gets a positive frequency, so ln freq is finite and
    the (M - 1) ln freq term of statistical and Jacobian fusion (Lemma 1) is defined; with
    equal counts it is exactly uniform, and with many samples per class it differs from
    n_k / N by O(1/n_k). This is the only rule used for a prior anywhere in the project.

    Args:
        counts: (K,) non-negative, finite class counts (summed over the owners).

    Returns:
        freq, float64 array of shape (K,), summing to 1.

    Raises:
        FusionInputError: counts not a finite, non-negative vector of K >= 2 entries.
    """
    try:
        c = np.asarray(
            counts.detach().cpu().numpy() if isinstance(counts, torch.Tensor) else counts,
            dtype=np.float64,
        )
    except (TypeError, ValueError) as exc:
        raise FusionInputError(f"class counts must be numbers: {exc}") from exc
    if c.ndim != 1 or c.size < 2:
        raise FusionInputError(f"class counts must have shape (K,) with K >= 2, got {c.shape}")
    if not np.isfinite(c).all() or (c < 0).any():
        raise FusionInputError(f"class counts must be finite and non-negative, got {c.tolist()}")
    smoothed = c + 1.0
    freq: np.ndarray = smoothed / smoothed.sum()
    return freq


def log_prior_from_counts(counts: ArrayLike | Sequence[float]) -> np.ndarray:
    """ln freq (K,), float64, of :func:`prior_from_counts` (add-one smoothing, see there)."""
    out: np.ndarray = np.log(prior_from_counts(counts))
    return out


# --- the built-in methods (paper, Section 5.1: Mean-w/o, Mean-w/, Stat-w/o, Stat-w/) ----------


def _statistical(logits: Sequence[ArrayLike], log_prior: Any = None) -> torch.Tensor:
    return statistical_fusion(logits, log_prior)


def _mean(logits: Sequence[ArrayLike]) -> torch.Tensor:
    return mean_fusion(logits)


def _confidence_mean(logits: Sequence[ArrayLike]) -> torch.Tensor:
    return confidence_mean_fusion(logits)


register(
    FusionMethod(
        "statistical",
        _statistical,
        uses=frozenset({"log_prior"}),
        summary="softmax(sum_m z_m - (M-1) ln freq) (Stat-w/o, Lemma 1)",
    )
)
register(
    FusionMethod(
        "jacobian",
        jacobian_fusion,  # called as it is: fuse_full -> jacobian_fusion, no wrapper
        needs=frozenset({"grams"}),
        uses=frozenset({"log_prior"}),
        options=("gamma", "regularize", "iterations", "solver", "tol", "center_logits"),
        summary="sample-wise Jacobian-regularized statistical fusion (Stat-w/, Algorithm 1)",
    )
)


def _robust(
    logits: Sequence[ArrayLike],
    calibrations: Sequence[Any],
    log_prior: Any = None,
    **options: Any,
) -> Fused:
    r: RobustFusion = robust_fusion(logits, calibrations, log_prior, **options)
    return Fused(r.p, r.reliability, r.prediction_set, r.abstain)


register(FusionMethod("mean", _mean, summary="mean of the softmaxes (Mean-w/o)"))
register(
    FusionMethod(
        "confidence_mean", _confidence_mean, summary="entropy-confidence weighted mean (Mean-w/)"
    )
)

register(
    FusionMethod(
        "robust",
        _robust,
        needs=frozenset({"calibrations"}),
        uses=frozenset({"log_prior"}),
        options=("alpha", "floor", "trust_level", "confidence", "consistency", "retain"),
        summary="reliability-gated statistical fusion with a conformal set and abstention",
    )
)

#: Every method name. Register new methods in this module, above this line, so that this
#: constant (used for CLI choices and proto names) lists them.
METHODS: Final = methods()
