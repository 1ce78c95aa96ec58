"""Private FedAvg within a modality, with the real owner ClientApp and the coordinator's
round code in-process (a grid that calls the ClientApp directly): with SecAgg+ the coordinator
cannot recover a site's update from anything it receives (only the sum), yet the aggregate is
FedAvg's; every SecAgg+ reply passes its allow-list and a reply smuggling a plain parameter is
refused; DP clips each update (Flower's mod) and adds the wrapper's noise."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Error, Message, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_extract
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.supercore.task_identity import TaskIdentity

from jacfusion_fed.clients import task
from jacfusion_fed.clients.client_app import app as client_app
from jacfusion_fed.federation import ReplyNotAllowedError, check_reply_allowed
from jacfusion_fed.federation.private import PrivacySettings, secagg_reply_spec
from jacfusion_fed.federation.protocol import model_template
from jacfusion_fed.federation.scenario import DEFAULT_RUN_CONFIG
from jacfusion_fed.models import build_from_spec, model_spec
from jacfusion_fed.owner import OwnerWorkspace
from jacfusion_fed.privacy import Pseudonymizer, generate_key, write_key
from jacfusion_fed.server.federated_exchange import CoordinatorError, OwnerInfo, _Exchange
from jacfusion_fed.server.federated_private import (
    CLIPPING_RANGE,
    MAX_WEIGHT,
    MOD_RANGE,
    QUANTIZATION_RANGE,
    ModalityFedAvg,
)

DATA = "builtin:twomoon?quick=1&seed=0"
NODES = (11, 22)
RUN_CONFIG = {**DEFAULT_RUN_CONFIG, "epochs": 2, "lr": 0.01, "dataset": "twomoon"}


@pytest.fixture(autouse=True)
def _task_identity() -> Iterator[None]:
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


class LocalGrid:
    """Delivers each message to the owner ClientApp of its node, in-process; each node keeps
    its Context (SecAgg+ keeps its keys in ``context.state`` between stages)."""

    def __init__(self, root: Path) -> None:
        key = write_key(root / "pseudonym.key", generate_key())
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={
                    "modality": "y",
                    "data": f"{DATA}&site={i}&sites={len(NODES)}",
                    "workdir": str(root / f"site{i}"),
                    "key-file": str(key),
                    "owner": f"y-site{i}",
                },
                state=RecordDict(),
                run_config=dict(RUN_CONFIG),  # type: ignore[arg-type]
            )
            for i, node in enumerate(NODES)
        }

        self._done: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(NODES)

    def _deliver(self, sent: Message) -> Message:
        node = sent.metadata.dst_node_id  # each node gets its own copy, as over the wire
        msg = Message(
            copy.deepcopy(sent.content), dst_node_id=node, message_type=sent.metadata.message_type
        )
        msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
        try:
            return client_app(msg, self.contexts[node])
        except Exception as exc:  # what Flower's runtime answers for a crashed ClientApp
            error = Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(exc).__name__}: {exc}")
            return Message(error, reply_to=msg)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        return [self._deliver(m) for m in messages]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for sent in messages:
            reply = self._deliver(sent)
            ids.append(reply.metadata.reply_to_message_id)
            self._done[ids[-1]] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._done.pop(i) for i in list(message_ids) if i in self._done]


def _setup(tmp_path: Path, privacy: PrivacySettings) -> tuple[ModalityFedAvg, LocalGrid]:
    grid = LocalGrid(tmp_path)
    ex = _Exchange(grid, 60.0)  # type: ignore[arg-type]
    cfg = grid.contexts[NODES[0]].node_config
    ws = OwnerWorkspace(Path(str(cfg["workdir"])), "y", str(cfg["data"]), Pseudonymizer(b"k" * 32))
    spec = model_spec(ws.new_model())
    ex.owners = {n: OwnerInfo(n, "y", f"y-site{i}", 2, "", spec) for i, n in enumerate(NODES)}
    init = build_from_spec(spec)
    initial = ArrayRecord({k: v.detach().cpu() for k, v in init.state_dict().items()})
    return ModalityFedAvg(ex, "y", list(NODES), initial, "gram", privacy), grid


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, dict[str, np.ndarray], int]]:
    """What each site computed in clear (its new model and num-examples), before any mod."""
    seen: list[tuple[int, dict[str, np.ndarray], int]] = []
    real = task.train

    def train(content: RecordDict, ws: Any, context: Context) -> RecordDict:
        reply = real(content, ws, context)
        if "model" in reply:
            model = {k: v.numpy() for k, v in reply["model"].items()}  # type: ignore[union-attr]
            seen.append((context.node_id, model, int(reply["metrics"]["num-examples"])))  # type: ignore[arg-type]
        return reply

    monkeypatch.setattr(task, "train", train)
    return seen


def _fedavg(seen: list[tuple[int, dict[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
    total = sum(n for _, _, n in seen)
    return {k: sum(m[k] * (n / total) for _, m, n in seen) for k in seen[0][1]}


def _attack(run: ModalityFedAvg) -> dict[int, list[np.ndarray]]:
    """The coordinator's best view of each site's update: its masked vector minus the private
    mask it can rebuild from the shares it received (what remains are pairwise masks)."""
    assert run.last_grid is not None
    received = run.last_grid.received
    masked = {
        node: [bytes_to_ndarray(b) for b in c[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]  # type: ignore[union-attr]
        for stage, node, c in received
        if stage == "collect_masked_vectors"
    }
    shares: dict[int, list[bytes]] = {}
    for stage, _node, c in received:
        if stage == "unmask":
            conf = c[RECORD_KEY_CONFIGS]
            for owner, share in zip(conf[Key.NODE_ID_LIST], conf[Key.SHARE_LIST], strict=True):  # type: ignore[call-overload]
                shares.setdefault(owner, []).append(share)
    out = {}
    for node, vec in masked.items():
        mask = pseudo_rand_gen(combine_shares(shares[node]), MOD_RANGE, [a.shape for a in vec])
        unmasked = [(a - m) % MOD_RANGE for a, m in zip(vec, mask, strict=True)]
        out[node] = unmasked
    return out


def _weighted(vec: list[np.ndarray], n_sites: int = 1) -> list[np.ndarray]:
    """Integer vectors (factor first) back to float parameters, as the workflow does."""
    factor, params = factor_extract([v % MOD_RANGE for v in vec])
    values = dequantize(params, CLIPPING_RANGE, QUANTIZATION_RANGE)
    return [(v - (n_sites - 1) * CLIPPING_RANGE) * QUANTIZATION_RANGE / factor for v in values]


def test_secagg_hides_each_site_update(tmp_path: Path, spy: list[Any]) -> None:
    run, _ = _setup(tmp_path, PrivacySettings(secagg=True))
    run.aggregate(1, {})
    assert len(spy) == 2
    received = run.last_grid.received  # type: ignore[union-attr]
    assert {stage for stage, _, _ in received} == {
        "setup",
        "share_keys",
        "collect_masked_vectors",
        "unmask",
    }
    for _stage, _node, content in received:  # no parameter travels in clear
        assert all(len(record) == 0 for record in content.array_records.values())

    # the aggregate is FedAvg's, to quantization precision
    want = _fedavg(spy)
    got = {k: run.arrays[k].numpy() for k in want}
    worst = max(float(np.abs(got[k] - want[k]).max()) for k in want)
    total = sum(n for _, _, n in spy)
    assert worst < 50 * 2 * CLIPPING_RANGE / QUANTIZATION_RANGE * MAX_WEIGHT / total
    assert run.max_weight == max(n for _, _, n in spy)  # round 2 weighs by what it saw

    # what the coordinator can do with what it received: the sum, never one site
    views = _attack(run)
    summed = [sum(parts) % MOD_RANGE for parts in zip(*views.values(), strict=True)]
    recovered_sum = _weighted(summed, n_sites=2)
    flat_sum = np.concatenate([a.ravel() for a in recovered_sum])
    flat_want = np.concatenate([want[k].ravel() for k in want])
    assert np.abs(flat_sum - flat_want).max() < 1e-2  # the attack code itself is right
    for node, model, n in spy:
        # in integers: what the site masked (its weighted, quantized update) against the
        # coordinator's view of it; without the pairwise masks they would agree to +-1
        ratio = round(n / MAX_WEIGHT * QUANTIZATION_RANGE) / QUANTIZATION_RANGE  # round 1
        mine = quantize([model[k] * ratio for k in run.names], CLIPPING_RANGE, QUANTIZATION_RANGE)
        residual = np.concatenate(
            [((v - q) % MOD_RANGE).ravel() for v, q in zip(views[node][1:], mine, strict=True)]
        )
        centred = np.where(residual >= MOD_RANGE // 2, residual - MOD_RANGE, residual)
        assert np.mean(np.abs(centred) <= 2) < 0.01, node  # uniform mod 2^32: ~1e-9
        assert 0.4 < np.mean(residual < MOD_RANGE // 2) < 0.6  # spread over the whole range
        view = np.concatenate([a.ravel() for a in _weighted(views[node])])
        true = np.concatenate([model[k].ravel() for k in model])
        assert abs(np.corrcoef(view, true)[0, 1]) < 0.2


def test_without_secagg_the_update_is_in_clear(tmp_path: Path, spy: list[Any]) -> None:
    """The negative control: plain FedAvg hands the coordinator each site's model."""
    run, _ = _setup(tmp_path, PrivacySettings())
    replies = run.ex("train round 1", run.messages(1))
    for node, model, _n in spy:
        for k, value in model.items():
            np.testing.assert_array_equal(replies[node]["model"][k].numpy(), value)  # type: ignore[index]


def test_dp_clips_updates_and_adds_noise(tmp_path: Path, spy: list[Any]) -> None:
    clip = 0.05
    run, _ = _setup(tmp_path, PrivacySettings(dp_clip=clip, dp_noise=0.0))
    start = {k: run.arrays[k].numpy().copy() for k in run.names}
    replies = run.ex("train round 1", run.messages(1))
    for node, reply in replies.items():
        update = np.concatenate(
            [reply["model"][k].numpy().ravel() - start[k].ravel() for k in run.names]  # type: ignore[index]
        )
        assert np.linalg.norm(update) <= clip * 1.0001, node  # Flower's fixedclipping_mod
    run.aggregate(1, replies)
    clean = {k: run.arrays[k].numpy().copy() for k in run.names}
    noisy, _ = _setup(tmp_path / "noisy", PrivacySettings(dp_clip=clip, dp_noise=1.0))
    noisy.aggregate(1, noisy.ex("train round 1", noisy.messages(1)))
    diff = np.concatenate([noisy.arrays[k].numpy().ravel() - clean[k].ravel() for k in run.names])
    assert 0.5 * clip / 2 < diff.std() < 2 * clip / 2  # sigma * C / sites


def test_secagg_with_dp(tmp_path: Path, spy: list[Any]) -> None:
    run, _ = _setup(tmp_path, PrivacySettings(secagg=True, dp_clip=0.05, dp_noise=0.0))
    start = {k: run.arrays[k].numpy().copy() for k in run.names}
    run.aggregate(1, {})
    step = np.concatenate([run.arrays[k].numpy().ravel() - start[k].ravel() for k in run.names])
    assert np.linalg.norm(step) <= 0.05 * 1.01  # an average of clipped updates


def test_masked_reply_allow_list(tmp_path: Path) -> None:
    init = build_from_spec(
        model_spec(OwnerWorkspace(tmp_path / "ws", "y", DATA, Pseudonymizer(b"k" * 32)).new_model())
    )
    template = model_template(
        ArrayRecord({k: v.detach().cpu() for k, v in init.state_dict().items()})
    )
    from flwr.app import ConfigRecord, MetricRecord
    from flwr.common import ndarray_to_bytes

    good = [np.array([5])] + [
        np.zeros(spec.shape, dtype=np.int64)  # type: ignore[arg-type]
        for spec in template.values()
    ]

    def reply(vectors: list[np.ndarray], params: ArrayRecord | None = None) -> RecordDict:
        return RecordDict(
            {
                RECORD_KEY_CONFIGS: ConfigRecord(
                    {Key.MASKED_PARAMETERS: [ndarray_to_bytes(v) for v in vectors]}
                ),
                "fitres.parameters": params or ArrayRecord(),
                "fitres.metrics": ConfigRecord({"train-loss": 0.5}),
                "fitres.num_examples": MetricRecord({"num_examples": 100}),
                "fitres.status": ConfigRecord({"code": 0, "message": "ok"}),
            }
        )

    spec = secagg_reply_spec("collect_masked_vectors", template, 2, MOD_RANGE)
    check_reply_allowed(reply(good), spec)
    plain = [good[0]] + [np.zeros(s.shape, dtype=np.float32) for s in template.values()]  # type: ignore[arg-type]
    for bad, why in (
        (reply(plain), "dtype float32 not allowed"),
        (reply(good[:-1]), "arrays, allowed exactly"),
        (reply([good[0] - 6, *good[1:]]), "values outside"),
        (reply(good, ArrayRecord({"w": Array(np.zeros(3, np.float32))})), "not in the allow-list"),
    ):
        with pytest.raises(ReplyNotAllowedError, match=why):
            check_reply_allowed(bad, spec)


def test_a_failed_stage_fails_the_run(tmp_path: Path) -> None:
    run, grid = _setup(tmp_path, PrivacySettings(secagg=True))
    grid.contexts[NODES[1]].node_config["data"] = "builtin:nosuchdata"
    with pytest.raises(CoordinatorError, match="secure aggregation failed"):
        run.aggregate(1, {})
