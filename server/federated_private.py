"""FedAvg of one modality's sites, plain or private (the coordinator's side of
:mod:`jacfusion_fed.federation.private`, which explains the protocol and the owners' mods).

:class:`ModalityFedAvg` runs one round at a time:

- **plain**: the app's round messages, replies checked by the round allow-list, Flower's
  ``aggregate_arrayrecords`` weighted by ``num-examples``;
- **DP** (no SecAgg): the same messages built by Flower's ``DifferentialPrivacyClientSide
  FixedClipping(FedAvg)`` (Message API: it adds ``clipping_norm`` to the config), its
  ``aggregate_train`` adds the Gaussian noise;
- **SecAgg+** (with or without DP): Flower's ``SecAggPlusWorkflow`` on a ``LegacyContext``
  holding the legacy ``FedAvg`` (wrapped by the legacy DP strategy with DP) and only this
  modality's sites, over :class:`CheckedGrid`, which checks every reply of every stage against
  its allow-list (:func:`~jacfusion_fed.federation.private.secagg_reply_spec`) before Flower
  reads it and fails the run naming the owner otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping as LegacyDp
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from jacfusion_fed.audit import AuditLog, Signer, service_identity
from jacfusion_fed.federation import ReplyNotAllowedError, check_reply_allowed
from jacfusion_fed.federation.allowlist import ArraySpec, RecordSpec
from jacfusion_fed.federation.private import PrivacySettings, fitins_config, secagg_reply_spec
from jacfusion_fed.federation.protocol import (
    MSG_TRAIN,
    model_template,
    round_reply_spec,
    train_request,
)

from .federated_exchange import CoordinatorError, _Exchange, _message

__all__ = ["MOD_RANGE", "CheckedGrid", "ModalityFedAvg", "open_flow_audit"]

#: SecAgg+ parameters: masks modulo 2^32; each site's weighted parameters (weight num-examples /
#: max-weight) clipped to [-8, 8] and quantized to 2^28 levels (Flower's default is 2^22: too
#: coarse once a site's weight is small; n sites need n * 2^28 < 2^32, so at most 15 sites).
#: max-weight is MAX_WEIGHT in round 1, then the largest num-examples a site reported (in
#: clear, as Flower's FitRes carries it) in the round before, so weights stay <= 1.
MOD_RANGE = 2**32
QUANTIZATION_RANGE = 2**28
CLIPPING_RANGE = 8.0
MAX_WEIGHT = 10_000.0


@dataclass
class CheckedGrid:
    """The coordinator's grid as SecAgg+ sees it: every reply of every stage is checked
    against that stage's allow-list before the workflow reads it; errors fail the run.

    ``received`` keeps ``(stage, node_id, reply content)`` of every checked reply (what the
    coordinator learns; the privacy test reads it)."""

    ex: _Exchange
    template: Mapping[str, ArraySpec]
    sites: int
    received: list[tuple[str, int, RecordDict]] = field(default_factory=list)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        stages = {
            m.metadata.dst_node_id: str(m.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
            for m in messages
        }
        self.ex.round_trips += 1
        replies = list(self.ex.grid.send_and_receive(messages, timeout=timeout))
        problems = []
        for reply in replies:
            node = reply.metadata.src_node_id
            stage = stages.get(node, "?")
            if reply.has_error():
                reason = " ".join(str(reply.error.reason).split())[-300:]
                problems.append(f"{self.ex.who(node)}: SecAgg+ {stage}: {reason}")
                continue
            spec = secagg_reply_spec(stage, self.template, self.sites, MOD_RANGE)
            try:  # nothing reads a reply before this check
                check_reply_allowed(reply.content, spec)
            except ReplyNotAllowedError as exc:
                problems.append(f"{self.ex.who(node)}: SecAgg+ {stage}: {exc}")
                continue
            self.ex.replies_checked += 1
            self.ex.record_names.update(reply.content.keys())
            self.received.append((stage, node, reply.content))
            self.ex.record(node, "train", RecordDict(), detail={"secagg": stage})
        missing = set(stages) - {r.metadata.src_node_id for r in replies}
        problems += [f"{self.ex.who(n)}: no SecAgg+ reply" for n in sorted(missing)]
        if problems:
            raise CoordinatorError("secure aggregation failed:\n  - " + "\n  - ".join(problems))
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ex.grid, name)


@dataclass
class _Sites:
    """A grid view with only this modality's sites (for the Message-API strategy)."""

    grid: Grid
    nodes: list[int]

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)


class ModalityFedAvg:
    """FedAvg over ``nodes`` (the sites of ``modality``) from ``initial`` (module docstring)."""

    def __init__(
        self,
        ex: _Exchange,
        modality: str,
        nodes: list[int],
        initial: ArrayRecord,
        head_kind: str,
        privacy: PrivacySettings,
        run_id: int = 0,
    ) -> None:
        self.ex, self.modality, self.nodes = ex, modality, list(nodes)
        self.arrays = initial
        self.names = list(initial.keys())
        self.dtypes = {k: initial[k].numpy().dtype for k in self.names}
        self.template = model_template(initial)
        self.head_kind, self.privacy, self.run_id = head_kind, privacy, run_id
        self.last_grid: CheckedGrid | None = None
        self.max_weight = MAX_WEIGHT
        n = len(self.nodes)
        if privacy.secagg and n * QUANTIZATION_RANGE >= MOD_RANGE:
            raise CoordinatorError(
                f"SecAgg+ of {modality!r}: {n} sites are more than this quantization allows "
                f"({MOD_RANGE // QUANTIZATION_RANGE - 1})"
            )
        self._dp = (
            DifferentialPrivacyClientSideFixedClipping(
                FedAvg(
                    fraction_evaluate=0.0,
                    min_train_nodes=n,
                    min_evaluate_nodes=n,
                    min_available_nodes=n,
                    weighted_by_key="num-examples",
                    arrayrecord_key="global",
                    configrecord_key="train",
                ),
                noise_multiplier=privacy.dp_noise,
                clipping_norm=privacy.dp_clip,
                num_sampled_clients=n,
            )
            if privacy.dp and not privacy.secagg
            else None
        )

    def messages(
        self, round_: int
    ) -> dict[int, tuple[Message, dict[str, RecordSpec], dict[str, int]]]:
        """This round's messages for the exchange (none with SecAgg+: the workflow sends)."""
        if self.privacy.secagg:
            return {}
        spec = round_reply_spec(self.template)
        if self._dp is not None:
            config = ConfigRecord({"stage": "round", "round": round_, "head-kind": self.head_kind})
            sites = cast(Grid, _Sites(self.ex.grid, self.nodes))
            built = self._dp.configure_train(round_, self.arrays, config, sites)
            return {m.metadata.dst_node_id: (m, spec, {}) for m in built}
        content = train_request(
            "round", round_=round_, head_kind=self.head_kind, global_arrays=self.arrays
        )
        return {n: (_message(n, MSG_TRAIN, content), spec, {}) for n in self.nodes}

    def aggregate(self, round_: int, replies: Mapping[int, RecordDict]) -> list[float]:
        """Aggregate this round (run it, with SecAgg+); returns the sites' train losses."""
        if self.privacy.secagg:
            return self._secure_round(round_)
        site_replies = [replies[n] for n in self.nodes]
        if self._dp is not None:
            wrapped = [
                Message(r, dst_node_id=n, message_type=MSG_TRAIN) for n, r in replies.items()
            ]
            arrays, _ = self._dp.aggregate_train(round_, wrapped)
            if arrays is None:
                raise CoordinatorError(f"DP aggregation of {self.modality!r} round {round_} failed")
            self.arrays = self._typed(arrays)
        else:
            self.arrays = aggregate_arrayrecords(site_replies, "num-examples")
        return [float(r["metrics"].get("train-loss", float("nan"))) for r in site_replies]  # type: ignore[arg-type]

    def _typed(self, arrays: ArrayRecord) -> ArrayRecord:
        return ArrayRecord(
            {k: Array(np.asarray(arrays[k].numpy(), dtype=self.dtypes[k])) for k in self.names}
        )

    def _secure_round(self, round_: int) -> list[float]:
        n = len(self.nodes)
        names, head_kind = self.names, self.head_kind
        strategy: LegacyStrategy = LegacyFedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=n,
            min_evaluate_clients=n,
            min_available_clients=n,
            on_fit_config_fn=lambda r: fitins_config(r, head_kind, names),
            fit_metrics_aggregation_fn=lambda _metrics: {},  # logged per site instead
            accept_failures=False,
        )
        if self.privacy.dp:
            strategy = LegacyDp(strategy, self.privacy.dp_noise, self.privacy.dp_clip, n)
        grid = CheckedGrid(self.ex, self.template, n)
        self.last_grid = grid
        manager = SimpleClientManager()
        for node in self.nodes:
            manager.register(GridClientProxy(node, cast(Grid, grid), self.run_id))
        context = LegacyContext(
            Context(self.run_id, 0, {}, RecordDict(), {}), strategy=strategy, client_manager=manager
        )
        params = ndarrays_to_parameters([self.arrays[k].numpy() for k in names])
        before = compat.parameters_to_arrayrecord(params, keep_input=True)
        context.state.array_records[MAIN_PARAMS_RECORD] = before
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: round_}
        )
        workflow = SecAggPlusWorkflow(
            num_shares=1.0,
            reconstruction_threshold=0.5,
            max_weight=self.max_weight,
            clipping_range=CLIPPING_RANGE,
            quantization_range=QUANTIZATION_RANGE,
            modulus_range=MOD_RANGE,
            timeout=self.ex.timeout,
        )
        workflow(cast(Grid, grid), context)
        after = context.state.array_records[MAIN_PARAMS_RECORD]
        if after is before:
            raise CoordinatorError(
                f"secure aggregation of {self.modality!r} round {round_} halted (see the log)"
            )
        arrays = parameters_to_ndarrays(compat.arrayrecord_to_parameters(after, keep_input=True))
        self.arrays = ArrayRecord(
            {
                k: Array(np.asarray(a, dtype=self.dtypes[k]))
                for k, a in zip(names, arrays, strict=True)
            }
        )
        counts = [
            int(content.metric_records["fitres.num_examples"]["num_examples"])  # type: ignore[arg-type]
            for stage, _node, content in grid.received
            if stage == "collect_masked_vectors"
        ]
        self.max_weight = float(max(counts, default=int(MAX_WEIGHT)))
        return [
            float(content.config_records["fitres.metrics"].get("train-loss", float("nan")))  # type: ignore[arg-type]
            for stage, _node, content in grid.received
            if stage == "collect_masked_vectors"
        ]


def open_flow_audit(path: Path | None, tls: Path | None) -> AuditLog | None:
    """The ServerApp's audit log (run config ``audit-log``), its checkpoints signed with the
    key of the certificate directory ``audit-tls`` (the SuperLink's, in a deployment)."""
    if path is None:
        return None
    signer = Signer.from_files(tls / "cert.pem", tls / "key.pem") if tls is not None else None
    name = signer.describe()["cn"] if signer is not None else "coordinator"
    service = service_identity("coordinator", name) | {"app": "flower"}
    return AuditLog(path, service=service, signer=signer).start()
