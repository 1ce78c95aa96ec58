"""Step 1 of a Predict, planning (pure functions): :func:`plan_request` checks a request's
ids and options against the coordinator's configuration and returns its :class:`Plan`: the
ids, the validated options, and the owner timeout derived from the request's deadline. Every
problem is a :class:`PredictError` with ``INVALID_ARGUMENT`` (``DEADLINE_EXCEEDED`` for a
deadline that leaves no time). A stream's plan is cut into one plan per chunk
(:meth:`Plan.chunks`), each timed when its owners are asked.

Which options apply to which method comes from the fusion registry
(:class:`jacfusion_fed.fusion.FusionMethod.options`), not from a list of names here.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

import grpc

from jacfusion_fed.fusion import FusionInputError, FusionMethod, check_gamma, get_method
from jacfusion_fed.privacy.pseudonyms import first_non_pseudonym
from jacfusion_fed.rpc.fusion_codec import PredictOptions

from .predict_types import (
    MAX_ID_LENGTH,
    MAX_OWNER_TIMEOUT_S,
    METHODS,
    CoordinatorConfig,
    PredictError,
)

__all__ = ["Plan", "check_ids", "list_ids", "owner_timeout", "plan_request"]

#: Ids named in an error message (the rest are counted).
LISTED_IDS: Final = 20
#: Time kept back from the request's deadline for fusion and the reply (at most a quarter of
#: the time left): 50 ms proved too little on 2 busy cores (the reply came after the deadline).
DEADLINE_MARGIN_S: Final = 0.15
_BAD = grpc.StatusCode.INVALID_ARGUMENT
#: Request options and the method option each one sets.
_METHOD_OPTIONS: Final = {
    "gammas": "gamma",
    "default_gamma": "gamma",
    "regularize": "regularize",
    "iterations": "iterations",
    "center_logits": "center_logits",
}


@dataclass(frozen=True)
class Plan:
    """A request's (or a stream chunk's) checked ids and validated options.

    Attributes:
        ids: the sample ids (pseudonyms), in request order, each once.
        deadline: the call's absolute ``time.monotonic()`` deadline (None: none).
        timeout: seconds the owner calls may take (``owner_timeout_s`` capped by the
            deadline, see :func:`owner_timeout`); ``until``: when they are due.
    """

    method: str
    modalities: list[str]
    gammas: dict[str, float]
    regularize: set[str]
    iterations: int
    require_all: bool
    owner_timeout_s: float
    skip_unknown_ids: bool
    ids: list[str]
    deadline: float | None
    timeout: float
    until: float
    center_logits: bool = False

    @functools.cached_property
    def index(self) -> dict[str, int]:
        """Id -> position in :attr:`ids` (built when an owner's answer needs it)."""
        return dict(zip(self.ids, range(len(self.ids)), strict=True))

    def chunks(self, size: int) -> Iterator[Plan]:
        """Plans of ``size`` ids each, each timed when it is taken (its owners are asked)."""
        for start in range(0, len(self.ids), size):
            chunk = self.ids[start : start + size]
            timeout, until = owner_timeout(self.owner_timeout_s, self.deadline)
            yield dataclasses.replace(self, ids=chunk, timeout=timeout, until=until)

    @property
    def rule(self) -> FusionMethod:
        """The method's registry entry."""
        return get_method(self.method)

    def fusion_options(self, members: Sequence[str]) -> dict[str, Any]:
        """The registry options of fusing ``members`` (in this order) under this plan."""
        return self.rule.pick(
            gamma=[self.gammas[m] for m in members],
            regularize=[j for j, m in enumerate(members) if m in self.regularize],
            iterations=self.iterations,
            center_logits=self.center_logits,
        )


def list_ids(ids: Sequence[str]) -> str:
    """The first :data:`LISTED_IDS` ids, then how many more."""
    shown = ", ".join(ids[:LISTED_IDS])
    more = len(ids) - LISTED_IDS
    return shown + (f" ... and {more} more" if more > 0 else "")


def _method(options: PredictOptions, cfg: CoordinatorConfig) -> FusionMethod:
    method = options.method or cfg.default_method
    if method not in METHODS:
        raise PredictError(
            _BAD,
            f"unknown fusion method {method!r}; expected one of {', '.join(METHODS)}",
            (("options.method", f"unknown method {method!r}"),),
        )
    rule = get_method(method)
    given = {
        "gammas": bool(options.gammas),
        "default_gamma": options.default_gamma is not None,
        "regularize": bool(options.regularize),
        "iterations": options.iterations is not None,
        "center_logits": options.center_logits is not None,
    }
    unused = [k for k, v in given.items() if v and not rule.takes(_METHOD_OPTIONS[k])]
    if unused:
        takers = [m for m in METHODS if get_method(m).takes(_METHOD_OPTIONS[unused[0]])]
        raise PredictError(
            _BAD,
            f"{', '.join(unused)} only apply to the {' and '.join(takers)} method, not {method!r}",
        )
    if rule.needs - {"grams", "log_prior", "calibrations"}:
        raise PredictError(
            _BAD,
            f"the {method} method needs {' and '.join(sorted(rule.needs))}, which the "
            "coordinator does not have",
        )
    return rule


def plan_request(
    ids: Sequence[str],
    options: PredictOptions,
    cfg: CoordinatorConfig,
    configured: Sequence[str],
    *,
    deadline: float | None = None,
    stream: bool = False,
) -> Plan:
    """Check ``options`` against ``cfg`` and the ``configured`` modalities, then the ids
    (at most ``cfg.max_stream_batch`` with ``stream``, else ``cfg.max_batch``), then the time
    ``deadline`` leaves for the owners."""
    known = ", ".join(configured)
    selected = list(options.modalities) or list(configured)
    for name in selected:
        if name not in configured:
            raise PredictError(
                _BAD,
                f"unknown modality {name!r}; registered: {known}",
                ((f"options.modalities[{selected.index(name)}]", f"unknown modality {name!r}"),),
            )
    if len(set(selected)) != len(selected):
        raise PredictError(
            _BAD,
            f"modalities lists a modality twice: {selected}",
            (("options.modalities", "lists a modality twice"),),
        )
    rule = _method(options, cfg)

    def where(name: str) -> str:
        return "unselected" if name in configured else "unknown"

    try:
        default_gamma = check_gamma(
            cfg.default_gamma if options.default_gamma is None else options.default_gamma,
            "default_gamma",
        )
        gammas = {}
        for name, value in options.gammas.items():
            if name not in selected:
                raise PredictError(
                    _BAD,
                    f"gamma given for {where(name)} modality {name!r}; "
                    f"selected: {', '.join(selected)}",
                )
            gammas[name] = check_gamma(value, f"gamma of modality {name!r}")
    except FusionInputError as exc:
        raise PredictError(_BAD, str(exc)) from exc
    for name in selected:
        gammas.setdefault(name, default_gamma)
    regularize = list(options.regularize) or selected
    for name in regularize:
        if name not in selected:
            raise PredictError(
                _BAD,
                f"regularize names {where(name)} modality {name!r}; "
                f"selected: {', '.join(selected)}",
            )
    if len(set(regularize)) != len(regularize):
        raise PredictError(_BAD, f"regularize lists a modality twice: {regularize}")
    iterations = cfg.default_iterations if options.iterations is None else options.iterations
    if not 1 <= iterations <= cfg.max_iterations:
        raise PredictError(
            _BAD,
            f"iterations must be in 1..{cfg.max_iterations}, got {iterations}",
            (("options.iterations", f"must be in 1..{cfg.max_iterations}, got {iterations}"),),
        )
    timeout = cfg.owner_timeout_s if options.owner_timeout_s is None else options.owner_timeout_s
    if not (timeout > 0 and math.isfinite(timeout)):
        raise PredictError(
            _BAD,
            f"owner_timeout must be positive, got {timeout}",
            (("options.owner_timeout", f"must be positive, got {timeout}"),),
        )
    if timeout > MAX_OWNER_TIMEOUT_S:
        raise PredictError(
            _BAD, f"owner_timeout must be at most {MAX_OWNER_TIMEOUT_S:g} s, got {timeout:g} s"
        )
    ids = list(ids)
    if stream:
        check_ids(ids, cfg.max_stream_batch, "PredictStream")
    else:
        check_ids(ids, cfg.max_batch, "Predict")
    owner_s, until = owner_timeout(timeout, deadline)
    return Plan(
        method=rule.name,
        modalities=selected,
        gammas=gammas,
        regularize=set(regularize),
        iterations=iterations,
        center_logits=bool(options.center_logits),
        require_all=options.require_all,
        owner_timeout_s=timeout,
        skip_unknown_ids=options.skip_unknown_ids,
        ids=ids,
        deadline=deadline,
        timeout=owner_s,
        until=until,
    )


def check_ids(ids: list[str], limit: int, what: str) -> None:
    """Check a batch of ids (non-empty, within ``limit``, no duplicates, no empty or overlong
    id)."""
    n = len(ids)
    if n == 0:
        raise PredictError(
            _BAD, "empty batch: no sample ids", (("sample_ids", "empty: at least one id"),)
        )
    if n > limit:
        hint = " (use PredictStream for large batches)" if what == "Predict" else ""
        raise PredictError(
            _BAD,
            f"batch of {n} sample ids exceeds the limit of {limit}{hint}",
            (("sample_ids", f"{n} ids, at most {limit}{hint}"),),
        )
    not_pseudonym = first_non_pseudonym(ids)  # before any message could echo a raw id
    if not_pseudonym is not None:
        raise PredictError(
            _BAD,
            f"sample id at position {not_pseudonym} is not a pseudonym (HMAC-SHA256: 64 hex "
            "digits or 52 base32 characters); pseudonymize ids with the deployment key",
            ((f"sample_ids[{not_pseudonym}]", "not a pseudonym (HMAC-SHA256 of the local id)"),),
        )
    distinct = set(ids)
    if len(distinct) != n:
        first: dict[str, int] = {}
        repeats = [(i, first[s]) for i, s in enumerate(ids) if first.setdefault(s, i) != i]
        dups = sorted({ids[i] for i, _ in repeats})
        raise PredictError(
            _BAD,
            f"duplicate sample ids: {list_ids(dups)}",
            tuple(
                (f"sample_ids[{i}]", f"repeats sample_ids[{j}]") for i, j in repeats[:LISTED_IDS]
            ),
        )
    if "" in distinct:
        at = ids.index("")
        raise PredictError(
            _BAD, f"empty sample id at position {at}", ((f"sample_ids[{at}]", "empty"),)
        )
    longest = max(map(len, ids))
    if longest > MAX_ID_LENGTH:
        at = next(i for i, s in enumerate(ids) if len(s) == longest)
        raise PredictError(
            _BAD,
            f"sample ids must be pseudonyms of at most {MAX_ID_LENGTH} characters; "
            f"got one of {longest}",
            ((f"sample_ids[{at}]", f"{longest} characters, at most {MAX_ID_LENGTH}"),),
        )


def owner_timeout(owner_timeout_s: float, deadline: float | None) -> tuple[float, float]:
    """(seconds for the owner calls, absolute ``time.monotonic()`` deadline): the per-owner
    timeout, capped by what the request's ``deadline`` leaves (less a margin for fusion)."""
    now = time.monotonic()
    timeout = owner_timeout_s
    if deadline is not None:
        left = deadline - now
        left -= min(DEADLINE_MARGIN_S, 0.25 * left)
        if left <= 0:
            raise PredictError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "the request's deadline leaves no time to ask the owners",
            )
        timeout = min(timeout, left)
    return timeout, now + timeout
