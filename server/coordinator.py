"""The coordinator's online-inference front: :class:`Coordinator`.

One Predict is a straight line of five steps, each a function of the previous step's value
(:meth:`Coordinator.predict`)::

    plan = plan_request(ids, options, ...)   # request_plan.py: ids and options checked
    gathered = fanout.gather(plan)           # fanout.py: the owners' logits, checked
    grouped = group(gathered)                # grouping.py: samples grouped by modalities held
    fused = fuser.fuse(grouped)              # fusing.py: the fusion registry, batched
    return finish(fused)                     # assembly.py: the FusedAnswer

(a new model version's head is registered by :mod:`~jacfusion_fed.server.owner_links` while
the owners' answers are checked). With tracing on (:mod:`jacfusion_fed.rpc.tracing`) each step
is a span of the Predict's trace, and ``gather`` has one client span per owner call.

:class:`Coordinator` is transport-agnostic towards requesters (the gRPC face is
:mod:`jacfusion_fed.server.fusion_service`); towards owners it uses one injection point,
``connect`` (:data:`~jacfusion_fed.server.owner_channel.ConnectOwner`), by default a
``ModalityService`` client over mTLS pinned to each owner's modality. Failures raise
:class:`~jacfusion_fed.server.predict_types.PredictError` (status codes listed there).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from jacfusion_fed.answer import FusedAnswer, SiteStatus
from jacfusion_fed.rpc import tracing
from jacfusion_fed.rpc.fusion_codec import PredictOptions
from jacfusion_fed.rpc.tls import Security, TlsFiles, TransportOptions
from jacfusion_fed.store import HeadRegistry

from .assembly import finish
from .fanout import FanOut
from .fusing import Fuser
from .grouping import group
from .owner_channel import ConnectOwner, grpc_connector
from .owner_links import OwnerLinks
from .predict_types import (
    OWNER_RECONNECT,
    CoordinatorConfig,
    ModelInfo,
    OwnerEndpoint,
    RegisteredHead,
)
from .request_plan import plan_request

__all__ = ["Coordinator"]


class Coordinator:
    """Owner links, fan-out and fusion (see the module docstring).

    Args:
        registry: the :class:`HeadRegistry` (or its directory) where heads persist.
        owners: the configured owners: one endpoint per site, so several for a modality
            served by several sites (see :mod:`~jacfusion_fed.server.fanout`).
        security: the coordinator's :class:`TlsFiles` (its client identity towards owners)
            or :data:`jacfusion_fed.rpc.tls.INSECURE`.
        config: defaults and limits.
        transport: message-size, keepalive and reconnect settings of the owner channels
            (default: :class:`TransportOptions` with :data:`OWNER_RECONNECT`).
        connect: opens the connection to one owner (default: :func:`grpc_connector` over
            ``security`` and ``transport``); tests pass fake owners here.
    """

    def __init__(
        self,
        registry: HeadRegistry | str | Path,
        owners: Sequence[OwnerEndpoint],
        security: Security | str | Path,
        config: CoordinatorConfig | None = None,
        *,
        transport: TransportOptions | None = None,
        connect: ConnectOwner | None = None,
    ) -> None:
        self.config = config or CoordinatorConfig()
        self.registry = registry if isinstance(registry, HeadRegistry) else HeadRegistry(registry)
        if not owners:
            raise ValueError("a coordinator needs at least one owner")
        if isinstance(security, (str, Path)):
            security = TlsFiles.from_dir(security)
        self.security: Security = security
        self.transport = transport or TransportOptions(extra=OWNER_RECONNECT)
        self.device = torch.device(
            self.config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        )
        connect = connect or grpc_connector(self.security, self.transport)
        self.owners = OwnerLinks(self.registry, owners, connect, self.config, self.device)
        self._fanout = FanOut(self.owners, self.config)
        self._fuser = Fuser(
            self.device,
            self.owners.log_prior,
            enabled=self.config.batch_fusion,
            max_rows=self.config.max_fusion_rows,
        )

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def modalities(self) -> list[str]:
        """Configured modalities, in configuration order."""
        return self.owners.modalities

    @property
    def batcher(self) -> Fuser:
        """The fusion step (its ``calls``/``jobs`` counters are read by benchmarks)."""
        return self._fuser

    @property
    def sync_running(self) -> bool:
        """Whether the background sync thread (:meth:`start_sync`) is alive."""
        return self.owners.sync_running

    def head(self, modality: str) -> RegisteredHead | None:
        return self.owners[modality].head

    def has_heads(self) -> bool:
        return any(link.head is not None for link in self.owners)

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` whenever a head is (re)registered."""
        self.owners.on_change(listener)

    def start_sync(self) -> None:
        """Background thread: register owners without a head, notice new model versions."""
        self.owners.start_sync()

    def sync(self, modality: str | None = None, timeout: float | None = None) -> dict[str, str]:
        """Register the current head of every (or one) owner whose version changed.

        Returns modality -> error text (empty when in sync).
        """
        return self.owners.sync(modality, timeout)

    def close(self) -> None:
        self._fanout.close()
        self.owners.close()

    def model_info(self) -> ModelInfo:
        heads = [link.head.record for link in self.owners if link.head is not None]
        names = next((link.class_names for link in self.owners if link.class_names), [])
        prior, _log_prior = self.owners.prior()
        return ModelInfo(
            num_classes=heads[0].num_classes if heads else 0,
            class_prior=prior,
            class_names=list(names) if heads and len(names) == heads[0].num_classes else [],
            heads=heads,
            default_method=self.config.default_method,
            sites={
                link.modality: [SiteStatus(s.target, s.version, s.last_error) for s in link.sites]
                for link in self.owners
                if link.multi_site
            },
        )

    # --- prediction --------------------------------------------------------------------------

    def predict(
        self,
        ids: Sequence[str],
        options: PredictOptions | None = None,
        *,
        deadline: float | None = None,
    ) -> FusedAnswer:
        """Fuse the owners' logits for ``ids`` (the five steps of the module docstring).

        Args:
            ids: pseudonymous sample ids.
            options: request options.
            deadline: absolute ``time.monotonic()`` by which the answer is due (the gRPC
                call's deadline); owner calls never outlast it.

        Raises:
            PredictError: with the status code and message to return.
        """
        with tracing.span("plan", {"jacfusion.ids": len(ids)}):
            plan = plan_request(
                ids, options or PredictOptions(), self.config, self.modalities, deadline=deadline
            )
        with tracing.span("gather", {"jacfusion.modalities": plan.modalities}):
            gathered = self._fanout.gather(plan)
        with tracing.span("group"):
            grouped = group(gathered)
        with tracing.span("fuse", {"jacfusion.method": plan.method}):
            fused = self._fuser.fuse(grouped)
        with tracing.span("finish"):
            return finish(fused)

    def predict_stream(
        self,
        ids: Sequence[str],
        options: PredictOptions | None = None,
        *,
        chunk_size: int = 0,
        deadline: float | None = None,
    ) -> Iterator[FusedAnswer]:
        """:meth:`predict` in chunks of ``chunk_size`` ids (0: the configured default).

        All ids and options are validated before the first chunk; the owners of chunk i+1 are
        asked while chunk i is fused. Unknown ids fail the stream at the chunk that holds them
        (earlier chunks have been delivered by then) unless ``skip_unknown_ids``.
        """
        plan = plan_request(
            ids,
            options or PredictOptions(),
            self.config,
            self.modalities,
            deadline=deadline,
            stream=True,
        )
        size = min(chunk_size or self.config.stream_chunk, self.config.max_batch)
        chunks = plan.chunks(size)
        pending = self._fanout.ask(next(chunks))
        for chunk in chunks:
            current, pending = pending, self._fanout.ask(chunk)
            yield finish(self._fuser.fuse(group(self._fanout.collect(current))))
        yield finish(self._fuser.fuse(group(self._fanout.collect(pending))))
