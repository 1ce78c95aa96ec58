"""The correctness oracle: what the coordinator's answer must be, from the owners' own data.

An answer of ``FusionService.Predict`` (or :meth:`Coordinator.predict`) is **correct** when it
equals, to :data:`TOLERANCE`, the fusion library called directly on the logits the owners
serve for those ids, with the heads (Gram matrices) and class counts they serve, under the
request's options; **partial** when it is correct for the modalities it used and every
modality it left out says why (``ModalityContribution.error``); an exception is a clear
**error** when it carries a status in :data:`CLEAR_ERROR_CODES` and a message. Everything
else is **neither** (a silently wrong, incomplete or inconsistent answer, or an
``INTERNAL``/``UNKNOWN`` status); a reliable deployment answers none of those.

The owners' side is captured as :class:`OwnerSnapshot` (logits per pseudonym, Gram matrix,
class counts, model version), read through ``ModalityService`` exactly as the coordinator
reads it (:func:`snapshot_owner`, with the coordinator's certificate) or straight from an
:class:`~jacfusion_fed.owner.OwnerWorkspace` (:func:`snapshot_workspace`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import grpc
import numpy as np

from jacfusion_fed.fusion import fuse, get_method, log_prior_from_counts

__all__ = [
    "CLEAR_ERROR_CODES",
    "TOLERANCE",
    "OwnerSnapshot",
    "Plan",
    "Reference",
    "Verdict",
    "snapshot_owner",
    "snapshot_workspace",
]

#: Largest accepted |p - p_reference| of a fused probability (float64, exact solver).
TOLERANCE: Final = 1e-9
#: For K >= 48 the coordinator's ``auto`` solver is ``fast``, whose guaranteed bound is
#: 1e-6 per side; the reference may sit on the other side of the exact value.
FAST_SOLVER_TOLERANCE: Final = 2e-6
#: Status codes that count as a clear, precise error (everything but OK, UNKNOWN, INTERNAL).
CLEAR_ERROR_CODES: Final = frozenset(
    c
    for c in grpc.StatusCode
    if c not in (grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
)
#: A modality's ``error`` starts with the status of its owner's failure (any code: an owner's
#: own INTERNAL is relayed there, named as the owner's).
_ALL_CODE_NAMES: Final = frozenset(c.name for c in grpc.StatusCode)


@dataclass(frozen=True)
class OwnerSnapshot:
    """What one owner serves: its logits per pseudonym, head and class counts."""

    modality: str
    version: str
    gram: np.ndarray  # (K, K)
    class_counts: np.ndarray  # (K,)
    logits: Mapping[str, np.ndarray]  # pseudonym -> (K,)
    owner: str = ""

    @property
    def num_classes(self) -> int:
        return int(self.gram.shape[0])


def snapshot_workspace(workspace: Any, ids: Sequence[str], owner: str = "") -> OwnerSnapshot:
    """Snapshot of an :class:`~jacfusion_fed.owner.OwnerWorkspace` for ``ids`` (current
    version; unknown ids are simply absent)."""
    answer = workspace.logits(list(ids))
    head = workspace.head(answer.version)
    return OwnerSnapshot(
        modality=workspace.modality,
        version=answer.version,
        gram=np.asarray(head.gram, dtype=np.float64),
        class_counts=np.asarray(workspace.class_counts(), dtype=np.float64),
        logits=dict(zip(answer.sample_ids, np.asarray(answer.logits, np.float64), strict=True)),
        owner=owner,
    )


def snapshot_owner(
    target: str,
    tls: Any,
    modality: str,
    ids: Sequence[str],
    *,
    timeout: float = 60.0,
    chunk: int = 65_536,
) -> OwnerSnapshot:
    """Read an owner through ``ModalityService`` as the coordinator does (``tls`` is the
    coordinator's :class:`~jacfusion_fed.rpc.tls.TlsFiles`, or ``INSECURE``).

    Raises ``RuntimeError`` when the owner changes its model version while being read.
    """
    from jacfusion_fed.rpc.auth import connect_owner
    from jacfusion_fed.rpc.jacfusion.v1 import modality_pb2, modality_pb2_grpc
    from jacfusion_fed.rpc.matrix import decode_matrix
    from jacfusion_fed.rpc.tls import Insecure, create_channel

    if isinstance(tls, Insecure):
        channel = create_channel(target, tls)
    else:
        channel = connect_owner(target, tls, modality, verify_now=False)
    try:
        stub = modality_pb2_grpc.ModalityServiceStub(channel)
        info = stub.GetInfo(modality_pb2.GetInfoRequest(), timeout=timeout)
        version = info.model_version
        head = stub.GetHead(
            modality_pb2.GetHeadRequest(expected_model_version=version), timeout=timeout
        )
        k = int(head.num_classes)
        gram = decode_matrix(head.gram.gram, shape=(k, k))
        logits: dict[str, np.ndarray] = {}
        ids = list(ids)
        for start in range(0, len(ids), chunk):
            resp = stub.GetLogits(
                modality_pb2.GetLogitsRequest(
                    sample_ids=ids[start : start + chunk], expected_model_version=version
                ),
                timeout=timeout,
            )
            values = decode_matrix(resp.batch.logits, shape=(len(resp.batch.sample_ids), k))
            logits.update(zip(resp.batch.sample_ids, values, strict=True))
    except grpc.RpcError as exc:
        raise RuntimeError(f"could not read the owner of {modality!r}: {exc}") from exc
    finally:
        channel.close()
    return OwnerSnapshot(
        modality,
        version,
        gram,
        np.asarray(info.class_counts, dtype=np.float64),
        logits,
        owner=info.owner,
    )


@dataclass(frozen=True)
class Verdict:
    """How one request was answered: ``correct``, ``partial``, ``error`` or ``neither``."""

    kind: str
    detail: str = ""
    code: str = ""

    @property
    def ok(self) -> bool:
        """Correct, partial-and-said-so, or a clear error (never a silent wrong answer)."""
        return self.kind != "neither"

    @property
    def label(self) -> str:
        """``correct``, ``partial``, ``error:<CODE>`` or ``neither``."""
        return f"error:{self.code}" if self.kind == "error" else self.kind


@dataclass(frozen=True)
class Plan:
    """A request's options resolved as the coordinator resolves them (see ``_plan``)."""

    method: str
    modalities: tuple[str, ...]
    gammas: Mapping[str, float]
    regularize: frozenset[str]
    iterations: int
    require_all: bool
    skip_unknown_ids: bool

    @property
    def key(self) -> tuple[Any, ...]:
        return (
            self.method,
            self.modalities,
            tuple(sorted(self.gammas.items())),
            tuple(sorted(self.regularize)),
            self.iterations,
        )


@dataclass
class Reference:
    """The fusion library on the owners' snapshots (see the module docstring).

    Args:
        owners: one snapshot per configured modality, in the coordinator's configuration
            order; all of them count for the class prior (as registered heads do).
        default_method, default_gamma, default_iterations: the coordinator's defaults.
        prior_modalities: the modalities whose class counts make the prior (those with a
            registered head); default: all.
    """

    owners: Sequence[OwnerSnapshot]
    default_method: str = "jacobian"
    default_gamma: float = 0.5
    default_iterations: int = 1
    prior_modalities: Sequence[str] | None = None
    _by_name: dict[str, OwnerSnapshot] = field(init=False, repr=False)
    _cache: dict[tuple[Any, ...], tuple[dict[str, int], np.ndarray]] = field(
        init=False, repr=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        self._by_name = {o.modality: o for o in self.owners}
        ks = {o.num_classes for o in self.owners if o.logits}
        if len(ks) > 1:
            raise ValueError(f"owners disagree on K: {sorted(ks)}")

    @property
    def modalities(self) -> list[str]:
        return [o.modality for o in self.owners]

    @property
    def num_classes(self) -> int:
        with_data = [o for o in self.owners if o.logits] or list(self.owners)
        return with_data[0].num_classes

    @property
    def tolerance(self) -> float:
        return FAST_SOLVER_TOLERANCE if self.num_classes >= 48 else TOLERANCE

    def log_prior(self) -> np.ndarray:
        """Log of the class prior from all owners' summed class counts, by the fusion
        registry's one rule (:func:`jacfusion_fed.fusion.log_prior_from_counts`)."""
        names = self.modalities if self.prior_modalities is None else self.prior_modalities
        counts = np.sum(
            [np.asarray(self._by_name[m].class_counts, dtype=np.float64) for m in names], axis=0
        )
        return log_prior_from_counts(counts)

    def plan(self, options: Any = None) -> Plan:
        """Resolve ``options`` (a ``PredictOptions``, a ``FusionOptions`` message or
        ``None``) with the coordinator's defaults. The options must be valid."""
        if options is not None and hasattr(options, "DESCRIPTOR"):
            from jacfusion_fed.rpc.fusion_codec import options_from_proto

            options = options_from_proto(options)
        method = getattr(options, "method", None) or self.default_method
        selected = tuple(getattr(options, "modalities", ()) or self.modalities)
        default_gamma = getattr(options, "default_gamma", None)
        if default_gamma is None:
            default_gamma = self.default_gamma
        gammas = {m: float(default_gamma) for m in selected}
        gammas.update(dict(getattr(options, "gammas", {}) or {}))
        regularize = frozenset(getattr(options, "regularize", ()) or selected)
        iterations = getattr(options, "iterations", None) or self.default_iterations
        return Plan(
            method,
            selected,
            gammas,
            regularize,
            int(iterations),
            bool(getattr(options, "require_all", False)),
            bool(getattr(options, "skip_unknown_ids", False)),
        )

    # --- the library, called directly -------------------------------------------------------

    def fuse(self, ids: Sequence[str], members: Sequence[str], plan: Plan) -> np.ndarray:
        """Fused probabilities (len(ids), K) of ``ids`` from the modalities ``members`` (in
        plan order), every id held by every member."""
        logits = [np.stack([self._by_name[m].logits[i] for i in ids]) for m in members]
        rule = get_method(plan.method)
        reg = [j for j, m in enumerate(members) if m in plan.regularize]
        options = rule.pick(
            gamma=[plan.gammas[m] for m in members], regularize=reg, iterations=plan.iterations
        )
        grams = [self._by_name[m].gram if j in reg else None for j, m in enumerate(members)]
        return fuse(rule, logits, grams, self.log_prior(), options).numpy()

    def prepare(self, ids: Sequence[str], options: Any = None) -> None:
        """Precompute the reference of every id under ``options`` for every subset of the
        selected modalities (fusion is sample-wise), so that :meth:`classify` only looks up
        rows; for load tests."""
        plan = self.plan(options)
        for r in range(1, len(plan.modalities) + 1):
            for members in itertools.combinations(plan.modalities, r):
                held = [i for i in ids if all(i in self._by_name[m].logits for m in members)]
                if held:
                    probs = self.fuse(held, members, plan)
                    index = {sid: row for row, sid in enumerate(held)}
                    self._cache[(plan.key, members)] = (index, probs)

    def expected(self, ids: Sequence[str], members: Sequence[str], plan: Plan) -> np.ndarray:
        """Reference rows for ``ids`` (precomputed when :meth:`prepare` covered them)."""
        cached = self._cache.get((plan.key, tuple(members)))
        if cached is not None:
            index, probs = cached
            try:
                return probs[[index[i] for i in ids]]
            except KeyError:
                pass
        return self.fuse(ids, members, plan)

    # --- classification ---------------------------------------------------------------------

    def classify_error(self, exc: BaseException) -> Verdict:
        """An exception of a request: a clear error or ``neither``."""
        code = getattr(exc, "code", None)
        code = code() if callable(code) else code
        details = getattr(exc, "details", None)
        details = details() if callable(details) else (details or getattr(exc, "message", ""))
        if isinstance(code, grpc.StatusCode) and code in CLEAR_ERROR_CODES and details:
            return Verdict("error", str(details)[:300], code.name)
        name = code.name if isinstance(code, grpc.StatusCode) else type(exc).__name__
        return Verdict("neither", f"{name}: {details or exc!r}"[:500], name)

    def classify(self, ids: Sequence[str], result: Any, options: Any = None) -> Verdict:
        """Classify an answer (a :class:`~jacfusion_fed.answer.FusedAnswer`) to a request for
        ``ids`` with ``options``: ``correct``, ``partial`` or ``neither``."""
        try:
            return self._classify(list(ids), result, self.plan(options))
        except Exception as exc:  # a malformed answer is never correct
            return Verdict("neither", f"unusable answer: {exc!r}"[:500])

    def _classify(self, ids: list[str], result: Any, plan: Plan) -> Verdict:
        def bad(why: str) -> Verdict:
            return Verdict("neither", why[:500])

        predicted = list(result.sample_ids)
        unpredicted = list(result.unpredicted_sample_ids)
        n = len(predicted)
        if sorted(predicted + unpredicted) != sorted(ids):
            return bad("predicted + unpredicted ids differ from the requested ids")
        predicted_set = set(predicted)
        wanted_order = [i for i in ids if i in predicted_set]
        if predicted != wanted_order:
            return bad("predicted ids are not in request order")
        if unpredicted and not plan.skip_unknown_ids:
            return bad("ids left unpredicted without skip_unknown_ids")
        if result.method != plan.method:
            return bad(f"method {result.method!r}, expected {plan.method!r}")
        mods = list(result.modalities)
        if [c.modality for c in mods] != list(plan.modalities):
            return bad(f"contributions {[c.modality for c in mods]} != {plan.modalities}")
        used = {}
        answered = []
        for c in mods:
            flags = np.asarray(c.used, dtype=bool)
            if flags.shape != (n,):
                return bad(f"{c.modality}: {flags.size} used flags for {n} samples")
            snap = self._by_name[c.modality]
            if c.error:
                if c.error.split(":", 1)[0] not in _ALL_CODE_NAMES:
                    return bad(f"{c.modality}: error without a clear status: {c.error!r}")
                if flags.any():
                    return bad(f"{c.modality}: failed but marked as used")
                if plan.require_all:
                    return bad(f"{c.modality}: failed but require_all answered")
            else:
                if c.model_version != snap.version:
                    return bad(f"{c.modality}: version {c.model_version}, owner has {snap.version}")
                held = np.array([i in snap.logits for i in predicted], dtype=bool)
                if not np.array_equal(flags, held):
                    return bad(f"{c.modality}: used flags differ from the ids the owner holds")
                answered.append(c.modality)
            used[c.modality] = flags
        # An id is left out only when no answering (require_all: some selected) owner holds it.
        for sid in unpredicted:
            holders = [m for m in answered if sid in self._by_name[m].logits]
            if (holders and not plan.require_all) or (
                plan.require_all and len(holders) == len(plan.modalities)
            ):
                return bad(f"id {sid!r} left unpredicted though it can be predicted")
        probs = np.asarray(result.probabilities, dtype=np.float64)
        k = self.num_classes
        if probs.shape != (n, k):
            return bad(f"probabilities have shape {probs.shape}, expected {(n, k)}")
        if n == 0:
            return Verdict("partial" if any(c.error for c in mods) else "correct")
        if not np.isfinite(probs).all():
            return bad("non-finite probabilities")
        if np.abs(probs.sum(axis=1) - 1.0).max() > 1e-9:
            return bad("probabilities do not sum to 1")
        labels = np.asarray(result.labels)
        if not np.array_equal(labels, probs.argmax(axis=1)):
            return bad("labels are not the arg-max of the probabilities")
        mask = np.stack([used[m] for m in plan.modalities])  # (M, n)
        if plan.require_all and not mask.all():
            return bad("require_all answered with a modality missing")
        if not mask.any(axis=0).all():
            return bad("a sample was predicted from no modality")
        worst = 0.0
        for pattern in {tuple(col) for col in mask.T.tolist()}:
            members = [m for m, u in zip(plan.modalities, pattern, strict=True) if u]
            rows = np.flatnonzero((np.array(pattern) == mask.T).all(axis=1))
            want = self.expected([predicted[r] for r in rows], members, plan)
            worst = max(worst, float(np.abs(probs[rows] - want).max()))
        if worst > self.tolerance:
            return bad(f"probabilities differ from the library by {worst:.3g}")
        kind = "partial" if any(c.error for c in mods) else "correct"
        return Verdict(kind, f"max |dp| {worst:.2g}")


def merge_counts(verdicts: Iterable[Verdict]) -> dict[str, int]:
    """Counts per :attr:`Verdict.label`."""
    out: dict[str, int] = {}
    for v in verdicts:
        out[v.label] = out.get(v.label, 0) + 1
    return out
