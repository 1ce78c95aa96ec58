"""The coordinator's owners: one :class:`OwnerLink` per configured modality (connection and
registered head), head registration and the background sync (:class:`OwnerLinks`).

Heads
    What the coordinator knows per modality (owner name, model version, K, the Gram matrix
    W W^T, class counts) lives in a :class:`~jacfusion_fed.store.HeadRegistry` and reloads on
    restart without retraining or even reaching the owners. Each registered Gram matrix is
    factored once (:func:`jacfusion_fed.fusion.factor_gram`) and kept on the fusion device.
    The class prior is the registry rule :func:`jacfusion_fed.fusion.prior_from_counts` over
    the summed class counts of the registered heads.

Model versions
    Logits are only ever fused with the head of the version that produced them: an answer
    with another version makes :meth:`OwnerLinks.refresh` fetch and register that version's
    head (``GetHead`` with ``expected_model_version``); when this fails (the owner moved on
    once more) the modality fails with ``ABORTED``.

Several sites per modality
    A modality may be served by several sites (one :class:`Site` each: its own endpoint,
    channel and last error). After FedAvg they serve one model version, whose head is
    registered once for the modality, with the class counts of every site serving that
    version summed (as the Flower path registers them). Sites that disagree are a mismatch,
    reported as the modality's ``last_error`` (health metrics, ``GetModelInfo``): the
    registered version stays current while any site serves it (see :func:`pick_version`), and
    a site serving another version is never fused with it. Every site's certificate is pinned
    to the modality, so a registration from another site of the same modality is not an
    owner change.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import grpc
import numpy as np
import torch

from jacfusion_fed.fusion import (
    FusionInputError,
    ModalityCalibration,
    factor_gram,
    prior_from_counts,
)
from jacfusion_fed.rpc.calibration_codec import decode_calibration
from jacfusion_fed.rpc.jacfusion.v1 import modality_pb2
from jacfusion_fed.rpc.matrix import MatrixDecodeError, decode_matrix
from jacfusion_fed.store import CorruptFileError, HeadRegistry

from .owner_channel import ConnectOwner, OwnerChannel, OwnerFailure, rpc_failure
from .predict_types import MAX_ABS_OWNER_VALUE, CoordinatorConfig, OwnerEndpoint, RegisteredHead

__all__ = ["OwnerLink", "OwnerLinks", "Site", "pick_version"]

log = logging.getLogger(__name__)


class Site:
    """One endpoint serving a modality: its connection and what it last said."""

    def __init__(self, endpoint: OwnerEndpoint, channel: OwnerChannel) -> None:
        self.endpoint = endpoint
        self.target = endpoint.target
        self.channel = channel
        self.version = ""  # model version of its last answer or GetInfo
        self.last_error = ""


class OwnerLink:
    """Connection(s) and head of one configured modality (one :class:`Site` per endpoint)."""

    def __init__(self, modality: str, sites: Sequence[Site]) -> None:
        self.modality = modality
        self.sites = list(sites)
        self.head: RegisteredHead | None = None
        self.class_names: list[str] = []
        self.lock = threading.Lock()  # serialises registrations of this modality
        self.last_error = ""
        self.last_sync = 0.0

    @property
    def multi_site(self) -> bool:
        return len(self.sites) > 1

    @property
    def endpoint(self) -> OwnerEndpoint:
        """The first site's endpoint (the only one of a single-site modality)."""
        return self.sites[0].endpoint

    @property
    def channel(self) -> OwnerChannel:
        return self.sites[0].channel

    @property
    def stub(self) -> object:
        return self.channel.stub

    def site(self, target: str) -> Site:
        return next(s for s in self.sites if s.target == target)


def pick_version(versions: Sequence[str], registered: str | None) -> str:
    """The version a modality's sites are fused with, from the versions they answered with
    (in configuration order, one per answering site): the registered one while any site serves
    it (so a site that moved on alone never flips the head), else the most common one (ties:
    the earliest site's)."""
    if registered is not None and registered in versions:
        return registered
    return max(dict.fromkeys(versions), key=versions.count)


def mismatch_text(modality: str, versions: Mapping[str, str], chosen: str) -> str:
    """The report of sites of ``modality`` that serve other versions than ``chosen``."""
    others = ", ".join(f"{t} serves {v}" for t, v in versions.items() if v != chosen)
    return (
        f"FAILED_PRECONDITION: model version mismatch between the sites of {modality!r}: "
        f"{others}, not {chosen} (sites of one modality must serve the same version)"
    )


class OwnerLinks:
    """The owners of a coordinator, their registered heads and the class prior.

    Args:
        registry: where heads persist.
        endpoints: one per site (several for a modality served by several sites), in
            configuration order; a (modality, target) pair at most once.
        connect: opens the connection to one owner (the injection point).
        config: timeouts and sync intervals.
        device: the fusion device (Gram factors live there).
    """

    def __init__(
        self,
        registry: HeadRegistry,
        endpoints: Sequence[OwnerEndpoint],
        connect: ConnectOwner,
        config: CoordinatorConfig,
        device: torch.device,
    ) -> None:
        self.registry = registry
        self.config = config
        self.device = device
        grouped: dict[str, list[OwnerEndpoint]] = {}
        for e in endpoints:
            grouped.setdefault(e.modality, []).append(e)
        for modality, group in grouped.items():
            targets = [e.target for e in group]
            if len(set(targets)) != len(targets):
                raise ValueError(f"modality {modality!r} lists a site twice: {targets}")
        self._links = {
            m: OwnerLink(m, [Site(e, connect(e)) for e in group]) for m, group in grouped.items()
        }
        self._state_lock = threading.Lock()
        self._log_prior: torch.Tensor | None = None
        self._prior = np.zeros(0)
        self._listeners: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._sync_thread: threading.Thread | None = None
        self._load_registered()

    # --- access ----------------------------------------------------------------------------

    def __getitem__(self, modality: str) -> OwnerLink:
        return self._links[modality]

    def __contains__(self, modality: object) -> bool:
        return modality in self._links

    def __iter__(self) -> Iterator[OwnerLink]:
        return iter(self._links.values())

    @property
    def modalities(self) -> list[str]:
        return list(self._links)

    def prior(self) -> tuple[np.ndarray, torch.Tensor | None]:
        """(class prior (K,) or empty, ln prior on the fusion device or None)."""
        with self._state_lock:
            return self._prior.copy(), self._log_prior

    def log_prior(self) -> torch.Tensor | None:
        """ln prior on the fusion device (None before any head is registered)."""
        with self._state_lock:
            return self._log_prior

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    # --- lifecycle -------------------------------------------------------------------------

    def start_sync(self) -> None:
        """Background thread: register owners without a head, notice new model versions."""
        if self._sync_thread is None:
            self._sync_thread = threading.Thread(
                target=self._sync_loop, name="jacfusion-coordinator-sync", daemon=True
            )
            self._sync_thread.start()

    @property
    def sync_running(self) -> bool:
        return self._sync_thread is not None and self._sync_thread.is_alive()

    def close(self) -> None:
        self._stop.set()
        for link in self._links.values():
            for site in link.sites:
                site.channel.close()

    def _load_registered(self) -> None:
        for modality, link in self._links.items():
            try:
                record = self.registry.get(modality)
            except KeyError:
                continue
            try:
                factor = factor_gram(record.gram_matrix(), f"Gram matrix of {modality!r}")
            except FusionInputError as exc:
                log.error("registered head of %r is unusable: %s", modality, exc)
                continue
            link.head = RegisteredHead(record, factor.to(self.device))
            link.class_names = list(record.class_names)  # labels as the registry names them
            log.info("loaded head of %r, version %s", modality, record.model_version)
        self._update_prior()

    def _update_prior(self) -> None:
        heads = [link.head for link in self._links.values() if link.head is not None]
        if not heads:
            with self._state_lock:
                self._prior, self._log_prior = np.zeros(0), None
            return
        counts = np.sum([np.asarray(h.record.class_counts, dtype=np.float64) for h in heads], 0)
        if (counts <= 0).any():
            log.warning("a class has no training samples; the prior's add-one smoothing keeps it")
        prior = prior_from_counts(counts)
        with self._state_lock:
            self._prior = prior
            self._log_prior = torch.from_numpy(np.log(prior)).to(self.device)

    def _changed(self) -> None:
        self._update_prior()
        for listener in self._listeners:
            try:
                listener()
            except Exception:
                log.exception("head-change listener failed")

    # --- registration ----------------------------------------------------------------------

    def _register(
        self, link: OwnerLink, site: Site, version: str | None, timeout: float
    ) -> RegisteredHead:
        """Fetch the site's current head (of ``version`` when given) and register it."""
        modality, target = link.modality, site.target
        name = site.channel.identity(timeout)
        stub = site.channel.stub
        try:
            info = stub.GetInfo(modality_pb2.GetInfoRequest(), timeout=timeout)
            if info.modality != modality:
                raise OwnerFailure(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"server at {target} serves modality {info.modality!r}, expected {modality!r}",
                )
            wanted, version = version, info.model_version
            head = stub.GetHead(
                modality_pb2.GetHeadRequest(
                    kind=modality_pb2.HEAD_KIND_GRAM, expected_model_version=version
                ),
                timeout=timeout,
            )
        except grpc.RpcError as exc:
            failure = rpc_failure(modality, target, exc)
            if failure.code == grpc.StatusCode.FAILED_PRECONDITION:
                failure.code = grpc.StatusCode.ABORTED  # the version moved on: retryable
            raise failure from exc
        k = int(info.num_classes)
        if head.model_version != version or head.WhichOneof("head") != "gram":
            raise OwnerFailure(
                grpc.StatusCode.DATA_LOSS,
                f"owner of {modality!r} answered GetHead with version {head.model_version} / "
                f"kind {head.WhichOneof('head')}, expected the Gram matrix of {version}",
            )
        try:
            gram = decode_matrix(head.gram.gram, shape=(k, k), name=f"Gram matrix of {modality!r}")
            if gram.size and (largest := float(np.abs(gram).max())) > MAX_ABS_OWNER_VALUE:
                raise FusionInputError(
                    f"Gram matrix of {modality!r} has entries of magnitude up to {largest:.3g} "
                    f"(more than {MAX_ABS_OWNER_VALUE:g})"
                )
            factor = factor_gram(gram, f"Gram matrix of {modality!r}")
            calibration = decode_calibration(head, k, f"calibration of {modality!r}")
            if calibration is not None:  # checked now: a bad one never reaches the registry
                ModalityCalibration.from_arrays(calibration)
        except (MatrixDecodeError, FusionInputError) as exc:
            raise OwnerFailure(grpc.StatusCode.DATA_LOSS, str(exc)) from exc
        for other in self._links.values():
            if other is not link and other.head is not None and other.head.num_classes != k:
                raise OwnerFailure(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"K mismatch between owners: modality {modality!r} has K={k} classes but "
                    f"{other.modality!r} has K={other.head.num_classes}",
                )
        owner, counts = name or info.owner or f"{modality}-owner", list(info.class_counts)
        if link.multi_site:
            owner, counts = self._site_totals(link, site, version, owner, counts, timeout)
        try:
            record = self.registry.register(
                modality,
                owner,
                version,
                class_counts=counts,
                gram=gram,
                class_names=list(info.class_names) if len(info.class_names) == k else [],
                allow_owner_change=link.multi_site,  # each site is pinned to the modality
                calibration=calibration,
            )
        except ValueError as exc:
            raise OwnerFailure(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"cannot register the head of {modality!r}: {exc}",
            ) from exc
        except CorruptFileError as exc:  # a damaged registry entry is never used
            raise OwnerFailure(
                grpc.StatusCode.DATA_LOSS,
                f"cannot register the head of {modality!r}: the head registry is damaged: {exc}",
            ) from exc
        except OSError as exc:  # e.g. the disk is full: retried by the next request or sync
            raise OwnerFailure(
                grpc.StatusCode.UNAVAILABLE,
                f"cannot record the head of {modality!r} in the head registry: {exc}",
            ) from exc
        registered = RegisteredHead(record, factor.to(self.device))
        link.head = registered
        link.class_names = list(info.class_names)
        site.version, site.last_error = version, ""
        if not link.multi_site:
            link.last_error = ""
        link.last_sync = time.monotonic()
        log.info("registered head of %r: owner %r, version %s", modality, record.owner, version)
        self._changed()
        if wanted is not None and wanted != version:
            # The logits at hand came from a version the owner no longer serves; its current
            # head is registered now (for the next request), these logits are not fused.
            raise OwnerFailure(
                grpc.StatusCode.ABORTED,
                f"owner of {modality!r} answered with model version {wanted} but its current "
                f"version is {version}; retry",
            )
        return registered

    @staticmethod
    def _site_totals(
        link: OwnerLink, site: Site, version: str, owner: str, counts: list[int], timeout: float
    ) -> tuple[str, list[int]]:
        """Owner name and class counts of a modality's head registered from ``site``: those of
        every site that serves ``version`` now, as the Flower path registers them (names
        joined by ``+``, counts summed), so the class prior counts every site's patients."""
        names, total = [owner], np.asarray(counts, dtype=np.int64)
        for other in link.sites:
            if other is site:
                continue
            try:
                info = other.channel.stub.GetInfo(modality_pb2.GetInfoRequest(), timeout=timeout)
                if info.model_version != version or len(info.class_counts) != total.size:
                    continue  # another version: reported by the sync, not counted
                names.append(other.channel.identity(timeout) or info.owner or other.target)
                total = total + np.asarray(info.class_counts, dtype=np.int64)
            except (grpc.RpcError, OwnerFailure) as exc:  # down now: its patients not counted
                log.info(
                    "site %s of %r not counted in the head's class counts: %s",
                    other.target,
                    link.modality,
                    exc,
                )
        return "+".join(sorted(set(names))), [int(c) for c in total]

    def refresh(
        self, modality: str, version: str, timeout: float, target: str | None = None
    ) -> RegisteredHead:
        """The head of ``version`` of ``modality``, registered now (from the site at
        ``target``, default the first) unless known already."""
        link = self._links[modality]
        site = link.sites[0] if target is None else link.site(target)
        with link.lock:
            head = link.head
            if head is not None and head.version == version:
                return head  # registered meanwhile by another request
            return self._register(link, site, version, timeout)

    def sync(self, modality: str | None = None, timeout: float | None = None) -> dict[str, str]:
        """Register the current head of every (or one) owner whose version changed.

        Returns modality -> error text (empty when in sync). With several sites: every site
        is asked; a site that fails or serves another version than the others is reported
        (the modality's error names it) without keeping the others from being registered.
        """
        timeout = timeout or self.config.registration_timeout_s
        out: dict[str, str] = {}
        for name, link in self._links.items():
            if modality is not None and name != modality:
                continue
            with link.lock:
                errors = []
                versions: dict[str, str] = {}
                for site in link.sites:
                    try:
                        info = site.channel.stub.GetInfo(
                            modality_pb2.GetInfoRequest(), timeout=timeout
                        )
                        link.class_names = list(info.class_names)  # also for a loaded head
                        site.version, site.last_error = info.model_version, ""
                        versions[site.target] = info.model_version
                    except grpc.RpcError as exc:
                        site.last_error = self._site_failure(name, site, exc, timeout).text
                        errors.append(site.last_error)
                if versions:
                    registered = link.head.version if link.head is not None else None
                    chosen = pick_version(list(versions.values()), registered)
                    try:
                        if chosen != registered:
                            first = next(t for t, v in versions.items() if v == chosen)
                            self._register(link, link.site(first), None, timeout)
                    except grpc.RpcError as exc:  # the site went away meanwhile
                        errors.append(self._site_failure(name, link.sites[0], exc, timeout).text)
                    except OwnerFailure as exc:
                        errors.append(exc.text)
                    if len(set(versions.values())) > 1:
                        errors.append(mismatch_text(name, versions, chosen))
                link.last_sync = time.monotonic()
                link.last_error = "; ".join(errors)
                out[name] = link.last_error
        return out

    @staticmethod
    def _site_failure(name: str, site: Site, exc: grpc.RpcError, timeout: float) -> OwnerFailure:
        failure = rpc_failure(name, site.target, exc)
        if failure.code == grpc.StatusCode.UNAVAILABLE:
            try:  # say so when the address is served by someone else
                site.channel.identity(timeout)
            except OwnerFailure as found:
                if found.code == grpc.StatusCode.PERMISSION_DENIED:
                    failure = found
        return failure

    def _sync_loop(self) -> None:
        cfg = self.config
        while not self._stop.is_set():
            now = time.monotonic()
            for name, link in self._links.items():
                due = (
                    cfg.retry_interval_s
                    if link.head is None or link.last_error
                    else cfg.sync_interval_s
                )
                if now - link.last_sync >= due:
                    previous = link.last_error
                    try:
                        error = self.sync(name).get(name, "")
                    except Exception as exc:  # never let the sync thread die
                        log.exception("sync of owner %r failed", name)
                        error = link.last_error = f"INTERNAL: sync failed: {exc!r}"
                    link.last_sync = time.monotonic()
                    if error and error != previous:
                        log.warning("owner of %r: %s", name, error)
                    elif previous and not error:
                        log.info("owner of %r answers again", name)
            self._stop.wait(min(cfg.retry_interval_s, cfg.sync_interval_s, 1.0))
