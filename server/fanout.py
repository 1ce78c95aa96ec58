"""Step 2 of a Predict, gathering: :meth:`FanOut.gather` asks every selected owner for the
logits of a plan's ids, concurrently, checks each answer and returns the :class:`Gathered`
logits (an :class:`OwnerLogits` per modality that answered, an :class:`OwnerFailure` per
modality that did not). A stream asks the owners of its next chunk (:meth:`FanOut.ask`) before
it collects the current one (:meth:`FanOut.collect`).

Owners are called with a deadline (the per-owner timeout, capped by the request's own
deadline). An owner's answer is checked before anything reads it: one model version across
its calls (its head is registered first when that version is new), K as registered, finite
logits of plausible magnitude (at most :data:`MAX_ABS_OWNER_VALUE`), only requested ids, each
once. A failing owner becomes an :class:`OwnerFailure`, never a silent gap.

A modality served by several sites asks every site for every id (a site answers the ids it
holds and lists the others as unknown), so each sample's logits come from the site that holds
it. A site that fails, or serves another model version than the modality's other sites
(:func:`~jacfusion_fed.server.owner_links.pick_version`), is left out and named in the
answer's :class:`SiteStatus` list: only its own samples go missing. An id held by two sites is
used from neither and listed as ambiguous (never a silent pick); the modality fails only when
every site failed (:class:`SitesFailure`).
"""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from jacfusion_fed.answer import SiteStatus
from jacfusion_fed.rpc import tracing
from jacfusion_fed.rpc.jacfusion.v1 import modality_pb2
from jacfusion_fed.rpc.matrix import MatrixDecodeError, decode_matrix

from .owner_channel import OwnerFailure, rpc_failure
from .owner_links import OwnerLink, OwnerLinks, pick_version
from .predict_types import MAX_ABS_OWNER_VALUE, CoordinatorConfig, RegisteredHead
from .request_plan import Plan, list_ids

__all__ = ["Asked", "FanOut", "Gathered", "OwnerLogits", "SitesFailure"]

#: modality -> site target -> [(start, stop, future of the GetLogits reply)]
Calls = dict[str, dict[str, list[tuple[int, int, Any]]]]


@dataclass(frozen=True)
class Asked:
    """A plan's owner calls, in flight."""

    plan: Plan
    calls: Calls


@dataclass(frozen=True)
class OwnerLogits:
    """One modality's checked logits for a plan's ids."""

    modality: str
    head: RegisteredHead
    logits: np.ndarray  # (n, K), zero rows where not known
    known: np.ndarray | None  # (n,) bool; None when every id is known
    sites: list[SiteStatus] = field(default_factory=list)  # several sites only
    ambiguous: list[str] = field(default_factory=list)  # ids held by two or more sites


@dataclass(frozen=True)
class Gathered:
    """What the owners answered for a plan (modalities in the plan's order).

    Attributes:
        answers: the checked logits of each modality that answered.
        failures: why each other selected modality failed.
        last_heads: the registered head of each failed modality (None: none yet), for its
            contribution to the answer.
    """

    plan: Plan
    answers: dict[str, OwnerLogits]
    failures: dict[str, OwnerFailure]
    last_heads: dict[str, RegisteredHead | None]


class SitesFailure(OwnerFailure):
    """Every site of a modality failed; ``sites`` says how each one did."""

    def __init__(self, code: grpc.StatusCode, message: str, sites: list[SiteStatus]) -> None:
        super().__init__(code, message)
        self.sites = sites


def _get_logits(stub: Any, modality: str, target: str) -> Any:
    """``stub.GetLogits``; with tracing on, in a client span (child of the span current now,
    the Predict's ``gather``, whichever pool thread runs it) whose context goes to the owner."""
    return tracing.traced_call(
        stub.GetLogits,
        "jacfusion.v1.ModalityService/GetLogits",
        {"jacfusion.modality": modality, "server.address": target},
    )


class FanOut:
    """Concurrent ``GetLogits`` calls to the owners of :class:`OwnerLinks`."""

    def __init__(self, links: OwnerLinks, config: CoordinatorConfig) -> None:
        self.links = links
        self.config = config
        self._pool = concurrent.futures.ThreadPoolExecutor(
            config.fanout_threads, thread_name_prefix="jacfusion-fanout"
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def gather(self, plan: Plan) -> Gathered:
        """Ask the owners (:meth:`ask`, the last call on this thread) and collect the answers."""
        return self.collect(self.ask(plan, inline=True))

    def ask(self, plan: Plan, *, inline: bool = False) -> Asked:
        """Ask every selected owner for the logits of the plan's ids, concurrently.

        The calls run on the fan-out pool as blocking unary calls (grpc's ``.future()``
        starts a channel thread per call when none is in flight, which costs more than a pool
        hand-off). With ``inline`` the last call runs on the caller's thread meanwhile, so a
        lone owner costs one round trip and no hand-off at all.
        """
        ids, timeout = plan.ids, plan.timeout
        step = self.config.owner_chunk
        requests = [
            (
                s,
                min(s + step, len(ids)),
                modality_pb2.GetLogitsRequest(sample_ids=ids[s : s + step]),
            )
            for s in range(0, len(ids), step)
        ]
        jobs = [
            (name, site.target, start, stop, _get_logits(site.channel.stub, name, site.target), req)
            for name in plan.modalities
            for site in self.links[name].sites
            for start, stop, req in requests
        ]
        calls: Calls = {
            name: {site.target: [] for site in self.links[name].sites} for name in plan.modalities
        }
        last = jobs.pop() if inline else None
        for name, target, start, stop, method, req in jobs:
            calls[name][target].append(
                (start, stop, self._pool.submit(method, req, timeout=timeout))
            )
        if last is not None:
            name, target, start, stop, method, req = last
            done: concurrent.futures.Future[Any] = concurrent.futures.Future()
            try:
                done.set_result(method(req, timeout=timeout))
            except Exception as exc:
                done.set_exception(exc)
            calls[name][target].append((start, stop, done))
        return Asked(plan, calls)

    def collect(self, asked: Asked) -> Gathered:
        """Wait for the owners' answers and check them (a failed modality's error is kept as
        its owner's ``last_error``, which health and metrics report)."""
        answers: dict[str, OwnerLogits] = {}
        failures: dict[str, OwnerFailure] = {}
        for name in asked.plan.modalities:
            link = self.links[name]
            try:
                if link.multi_site:
                    answers[name] = self._collect_sites(asked, link)
                else:
                    target = link.endpoint.target
                    responses = self._responses(asked, name, target, link.last_error)
                    head = self._head(asked, name, self._version(name, responses), target)
                    answers[name] = self._answer(asked.plan, name, head, responses)
            except OwnerFailure as exc:
                failures[name] = exc
                if not link.multi_site:  # several: each site's own last_error
                    link.last_error = exc.text
        last_heads = {m: self.links[m].head for m in failures}
        return Gathered(asked.plan, answers, failures, last_heads)

    def _responses(
        self, asked: Asked, name: str, target: str, last_error: str
    ) -> list[tuple[int, int, Any]]:
        """One site's replies, in request order; raises :class:`OwnerFailure`."""
        calls = asked.calls[name][target]
        responses = []
        for start, stop, future in calls:
            try:
                responses.append((start, stop, future.result()))
            except grpc.RpcError as exc:
                for _s, _e, other in calls:
                    other.cancel()  # not started yet: no need to ask any more
                raise _known_cause(rpc_failure(name, target, exc), last_error) from exc
            except Exception as exc:  # e.g. the pool or channel shut down
                raise OwnerFailure(
                    grpc.StatusCode.UNAVAILABLE, f"owner of {name!r} at {target}: {exc!r}"
                ) from exc
        return responses

    @staticmethod
    def _version(name: str, responses: list[tuple[int, int, Any]]) -> str:
        """The one model version of a site's replies (``ABORTED`` when it changed)."""
        version: str = responses[0][2].model_version
        if any(resp.model_version != version for _s, _e, resp in responses):
            versions = sorted({resp.model_version for _s, _e, resp in responses})
            raise OwnerFailure(
                grpc.StatusCode.ABORTED,
                f"owner of {name!r} changed its model version during the request "
                f"({', '.join(versions)}); retry",
            )
        return version

    def _head(self, asked: Asked, name: str, version: str, target: str) -> RegisteredHead:
        """The head of ``version`` (registered from the site at ``target`` when new)."""
        head = self.links[name].head
        if head is None or head.version != version:
            timeout = max(asked.plan.until - time.monotonic(), 0.0) or 0.001
            head = self.links.refresh(
                name, version, min(timeout, self.config.registration_timeout_s), target
            )
        return head

    def _collect_sites(self, asked: Asked, link: OwnerLink) -> OwnerLogits:
        """A modality of several sites: every site's answer, merged (module docstring)."""
        name = link.modality
        failed: dict[str, OwnerFailure] = {}
        replies: dict[str, tuple[str, list[tuple[int, int, Any]]]] = {}
        for site in link.sites:
            try:
                responses = self._responses(asked, name, site.target, site.last_error)
                replies[site.target] = (self._version(name, responses), responses)
            except OwnerFailure as exc:
                failed[site.target] = exc
        answers: dict[str, OwnerLogits] = {}
        if replies:
            versions = {t: v for t, (v, _r) in replies.items()}
            registered = link.head.version if link.head is not None else None
            chosen = pick_version(list(versions.values()), registered)
            for t, v in versions.items():
                if v != chosen:
                    failed[t] = OwnerFailure(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"site of {name!r} at {t} serves model version {v}, the other sites "
                        f"{chosen} (sites of one modality must serve the same version)",
                    )
            first = next(t for t, v in versions.items() if v == chosen)
            head = self._head(asked, name, chosen, first)  # raises: the modality fails
            for t, (v, responses) in replies.items():
                if v == chosen:
                    try:
                        answers[t] = self._answer(asked.plan, name, head, responses)
                    except OwnerFailure as exc:
                        failed[t] = exc
        for site in link.sites:
            site.last_error = failed[site.target].text if site.target in failed else ""
            if site.target in replies:
                site.version = replies[site.target][0]
        if not answers:
            codes = {f.code for f in failed.values()}
            statuses = [SiteStatus(s.target, s.version, failed[s.target].text) for s in link.sites]
            raise SitesFailure(
                codes.pop() if len(codes) == 1 else grpc.StatusCode.UNAVAILABLE,
                f"all {len(link.sites)} sites of {name!r} failed: "
                + "; ".join(f.text for f in failed.values()),
                statuses,
            )
        return _merge(asked.plan.ids, link, answers, failed)

    @staticmethod
    def _answer(
        plan: Plan, name: str, head: RegisteredHead, responses: list[tuple[int, int, Any]]
    ) -> OwnerLogits:
        """One site's checked logits for the batch (zero rows where not known)."""
        ids = plan.ids
        version = head.version
        k = head.num_classes
        n = len(ids)
        if len(responses) == 1:
            batch = responses[0][2].batch
            if (
                len(batch.sample_ids) == n
                and not batch.unknown_sample_ids
                and list(batch.sample_ids) == ids
            ):
                # The common case: one call, every id known, in request order (a reply that
                # also lists ids as unknown contradicts itself: checked below).
                return OwnerLogits(name, head, logits_of(name, batch, n, k, version), None)
        logits = np.zeros((n, k))
        known = np.zeros(n, dtype=bool)
        for start, stop, resp in responses:
            batch = resp.batch
            rows_known = len(batch.sample_ids)
            if rows_known + len(batch.unknown_sample_ids) != stop - start:
                raise OwnerFailure(
                    grpc.StatusCode.DATA_LOSS,
                    f"owner of {name!r} accounted for {rows_known + len(batch.unknown_sample_ids)}"
                    f" sample ids, {stop - start} were requested",
                )
            if not rows_known:
                continue
            values = logits_of(name, batch, rows_known, k, version)
            if rows_known == stop - start and list(batch.sample_ids) == ids[start:stop]:
                logits[start:stop] = values
                known[start:stop] = True
                continue
            index = plan.index
            try:
                rows = np.fromiter((index[s] for s in batch.sample_ids), np.int64, rows_known)
            except KeyError as exc:
                raise OwnerFailure(
                    grpc.StatusCode.DATA_LOSS,
                    f"owner of {name!r} sent logits for sample id {exc.args[0]!r}, which was "
                    "not requested",
                ) from exc
            if rows.min() < start or rows.max() >= stop or np.unique(rows).size != rows_known:
                raise OwnerFailure(
                    grpc.StatusCode.DATA_LOSS,
                    f"owner of {name!r} sent logits for ids outside its request or twice",
                )
            logits[rows] = values
            known[rows] = True
        return OwnerLogits(name, head, logits, None if known.all() else known)


def _merge(
    ids: list[str],
    link: OwnerLink,
    answers: dict[str, OwnerLogits],
    failed: dict[str, OwnerFailure],
) -> OwnerLogits:
    """The answers of a modality's sites as one: each id from the one site that holds it."""
    n = len(ids)
    everywhere = np.ones(n, dtype=bool)
    masks = {t: a.known if a.known is not None else everywhere for t, a in answers.items()}
    holders = np.sum(list(masks.values()), axis=0)  # (n,) sites holding each id
    ambiguous = holders > 1
    head = next(iter(answers.values())).head
    logits = np.zeros((n, head.num_classes))
    for t, a in answers.items():
        logits[masks[t] & ~ambiguous] = a.logits[masks[t] & ~ambiguous]
    known = holders == 1
    statuses = [
        SiteStatus(
            s.target,
            s.version,
            failed[s.target].text if s.target in failed else "",
            int((masks[s.target] & known).sum()) if s.target in masks else 0,
        )
        for s in link.sites
    ]
    return OwnerLogits(
        link.modality,
        head,
        logits,
        None if known.all() else known,
        statuses,
        [ids[i] for i in np.flatnonzero(ambiguous)],
    )


def _known_cause(failure: OwnerFailure, last_error: str) -> OwnerFailure:
    """The pinned handshake fails (UNAVAILABLE to gRPC) when the owner holds another
    certificate, as the sync's identity check found: say so (fusion.proto documents
    PERMISSION_DENIED), in the status message and not only in the log."""
    denied = "PERMISSION_DENIED: "
    if failure.code == grpc.StatusCode.UNAVAILABLE and last_error.startswith(denied):
        return OwnerFailure(grpc.StatusCode.PERMISSION_DENIED, last_error.removeprefix(denied))
    return failure


def logits_of(name: str, batch: Any, rows: int, k: int, version: str) -> np.ndarray:
    """The (rows, K) logits of a ``LogitsBatch``: right shape, all finite, plausible size."""
    matrix = batch.logits
    if matrix.cols != k:
        raise OwnerFailure(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"K mismatch: owner of {name!r} sent {matrix.cols} logits per sample, but its "
            f"registered head (version {version}) has K={k}",
        )
    pvalues = batch.pvalues  # the owner's detector p-values (issue 20): checked, not used yet
    if len(pvalues) and (
        len(pvalues) != rows
        or not all(0.0 < v <= 1.0 for v in pvalues)  # NaN fails both comparisons
    ):
        raise OwnerFailure(
            grpc.StatusCode.DATA_LOSS,
            f"owner of {name!r} sent {len(pvalues)} detector p-values for {rows} rows, or "
            "values outside (0, 1]",
        )
    # The common case in one pass over the message's bytes (read once: each read of a bytes
    # field copies it): a view, its range checked by max and min (a NaN fails both
    # comparisons, an infinity the bound), then one copy into a writable native float64 array
    # for the fusion. Anything else takes the path below, which names the bad rows.
    data = matrix.data
    if matrix.rows == rows and len(data) == rows * k * 8:
        view = np.frombuffer(data, dtype="<f8").reshape(rows, k)
        if not view.size or (
            float(view.min()) >= -MAX_ABS_OWNER_VALUE and float(view.max()) <= MAX_ABS_OWNER_VALUE
        ):
            return view.astype(np.float64)
    try:
        values = decode_matrix(matrix, shape=(rows, k), name=f"logits of {name!r}")
    except MatrixDecodeError as exc:
        # Only a matrix of the right shape and size can be read to name the bad rows
        # (np.frombuffer itself fails on a size that is not a multiple of 8 bytes).
        if matrix.rows != rows or len(matrix.data) != rows * k * 8:
            raise OwnerFailure(grpc.StatusCode.DATA_LOSS, str(exc)) from exc
        values = np.frombuffer(matrix.data, dtype="<f8")
        finite = np.isfinite(values.reshape(rows, k)).all(axis=1)
        bad = [batch.sample_ids[i] for i in np.flatnonzero(~finite)]
        raise OwnerFailure(
            grpc.StatusCode.DATA_LOSS,
            f"owner of {name!r} sent non-finite logits (NaN or Inf) for {len(bad)} "
            f"sample(s): {list_ids(bad)}",
        ) from exc
    if values.size and (largest := float(np.abs(values).max())) > MAX_ABS_OWNER_VALUE:
        out = np.abs(values).max(axis=1) > MAX_ABS_OWNER_VALUE
        bad = [batch.sample_ids[i] for i in np.flatnonzero(out)]
        raise OwnerFailure(
            grpc.StatusCode.DATA_LOSS,
            f"owner of {name!r} sent logits of magnitude up to {largest:.3g} (more than "
            f"{MAX_ABS_OWNER_VALUE:g}) for {len(bad)} sample(s): {list_ids(bad)}",
        )
    return values
