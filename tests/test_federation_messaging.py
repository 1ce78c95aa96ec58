"""Unit tests of the federation helpers that need no Ray and no processes: messaging over
a fake Grid, config formatting for Flower's command line, run results, app wrappers."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.config import parse_config_args
from flwr.common.constant import ErrorCode
from flwr.serverapp import ServerApp
from flwr.supercore.task_identity import TaskIdentity

from jacfusion_fed.federation import (
    NO_REPLY_CODE,
    NOT_ALLOWED_CODE,
    ArraySpec,
    NodeReplyError,
    RecordSpec,
    ReplyError,
    SimulatedNodeClientApp,
    WithRunConfigServerApp,
    format_config_arg,
    load_app_run_config,
    read_run_results,
    run_dir_from_context,
    run_simulation_app,
    send_and_collect,
    validate_config,
    wait_for_nodes,
    write_run_results,
)

Handler = Callable[[Message], "Message | None"]


@pytest.fixture(autouse=True)
def _task_identity() -> Iterator[None]:
    """``Message(...)`` reads the process's task identity, which a ServerApp/ClientApp
    process (or the Simulation Engine) sets; set one here and restore it after."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


class FakeGrid:
    """Just enough of ``flwr.serverapp.Grid`` for the helpers: replies are produced by
    ``handler`` on the first pull after a push (None: that node never replies)."""

    def __init__(self, node_ids: list[int], handler: Handler, appear_after: int = 0):
        self._node_ids = node_ids
        self._handler = handler
        self._calls = 0
        self._appear_after = appear_after
        self._inbox: dict[str, Message] = {}
        self.pulls = 0

    def get_node_ids(self) -> Iterable[int]:
        self._calls += 1
        return list(self._node_ids) if self._calls > self._appear_after else []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            # what flwr's own InMemoryGrid.push_messages does
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self._inbox[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        out = []
        for mid in list(message_ids):
            msg = self._inbox.pop(mid, None)
            if msg is not None:
                reply = self._handler(msg)
                if reply is not None:
                    out.append(reply)
        return out


def _query(node: int, mtype: str = "query") -> Message:
    return Message(RecordDict({"c": ConfigRecord({"x": 1})}), dst_node_id=node, message_type=mtype)


def _logits_reply(msg: Message, shape: tuple[int, int] = (2, 3)) -> Message:
    arr = np.full(shape, float(msg.metadata.dst_node_id), np.float32)
    return Message(RecordDict({"logits": ArrayRecord({"logits": Array(arr)})}), reply_to=msg)


LOGITS = {"logits": RecordSpec.arrays({"logits": ArraySpec(("N", "K"))})}


# ------------------------------------------------------------------ wait_for_nodes
def test_wait_for_nodes_polls_until_enough() -> None:
    grid = FakeGrid([7, 3], _logits_reply, appear_after=2)
    assert wait_for_nodes(grid, 2, timeout=5, poll_interval=0.01) == [3, 7]  # type: ignore[arg-type]


def test_wait_for_nodes_times_out_with_count() -> None:
    grid = FakeGrid([1], _logits_reply)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"only 1 of 2 nodes connected"):
        wait_for_nodes(grid, 2, timeout=0.2, poll_interval=0.05)  # type: ignore[arg-type]
    assert time.monotonic() - t0 < 2


# ------------------------------------------------------------------ send_and_collect
def test_replies_keyed_by_node() -> None:
    grid = FakeGrid([1, 2], _logits_reply)
    out = send_and_collect(grid, [_query(1), _query(2)], 5, poll_interval=0.01)  # type: ignore[arg-type]
    assert sorted(out) == [1, 2]
    for node, content in out.items():
        assert content["logits"]["logits"].numpy()[0, 0] == node


def test_error_reply_raises_with_code_and_reason() -> None:
    def handler(msg: Message) -> Message:
        if msg.metadata.dst_node_id == 2:
            err = Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "\x1b[36mboom\x1b[39m in train")
            return Message(err, reply_to=msg)
        return _logits_reply(msg)

    grid = FakeGrid([1, 2], handler)
    with pytest.raises(NodeReplyError) as info:
        send_and_collect(grid, [_query(1, "train"), _query(2, "train")], 5, poll_interval=0.01)  # type: ignore[arg-type]
    exc = info.value
    assert sorted(exc.replies) == [1]
    assert list(exc.errors) == [2]
    assert "node 2 (train): CLIENT_APP_RAISED_EXCEPTION [2]: boom in train" in str(exc)
    assert "1 of 2 nodes failed" in str(exc)


def test_on_error_return_and_missing_reply() -> None:
    def handler(msg: Message) -> Message | None:
        return None if msg.metadata.dst_node_id == 2 else _logits_reply(msg)

    grid = FakeGrid([1, 2], handler)
    t0 = time.monotonic()
    out = send_and_collect(
        grid,  # type: ignore[arg-type]
        [_query(1), _query(2)],
        0.3,
        on_error="return",
        poll_interval=0.05,
    )
    assert time.monotonic() - t0 < 2
    assert isinstance(out[1], RecordDict)
    err = out[2]
    assert isinstance(err, ReplyError)
    assert err.code == NO_REPLY_CODE
    assert err.code_name == "NO_REPLY"
    assert "no reply within 0.3 s" in str(err)


def test_allow_list_drops_the_reply_content() -> None:
    def handler(msg: Message) -> Message:
        if msg.metadata.dst_node_id == 2:
            feats = np.zeros((2, 64), np.float32)
            content = RecordDict({"features": ArrayRecord({"f": Array(feats)})})
            return Message(content, reply_to=msg)
        return _logits_reply(msg)

    grid = FakeGrid([1, 2], handler)
    out = send_and_collect(
        grid,  # type: ignore[arg-type]
        [_query(1), _query(2)],
        5,
        on_error="return",
        allowed=LOGITS,
        dims={"N": 2, "K": 3},
        poll_interval=0.01,
    )
    assert isinstance(out[1], RecordDict)
    err = out[2]
    assert isinstance(err, ReplyError)
    assert err.code == NOT_ALLOWED_CODE
    assert err.code_name == "REPLY_NOT_ALLOWED"
    assert "record 'features' (ArrayRecord) is not in the allow-list" in err.reason


def test_one_message_per_node() -> None:
    grid = FakeGrid([1], _logits_reply)
    with pytest.raises(ValueError, match="more than one message for node 1"):
        send_and_collect(grid, [_query(1), _query(1)], 5)  # type: ignore[arg-type]
    assert send_and_collect(grid, [], 5) == {}  # type: ignore[arg-type]


# ------------------------------------------------------------------ config on the command line
@pytest.mark.parametrize(
    "config",
    [
        {"modality": "audio", "data": "/data/my folder/x.npz", "k": 3, "f": 0.5, "b": True},
        {"path": "C:\\data\\dir", "quote": "it's", "neg": -7, "small": 1e-9, "off": False},
        {"lines": "a\nb", "dq": 'say "hi"', "fusion.gamma": 0.5},
        {},
    ],
)
def test_format_config_arg_round_trips_through_flwr_parser(config: dict) -> None:
    arg = format_config_arg(config)
    assert parse_config_args([arg]) == config


@pytest.mark.parametrize(
    ("config", "error"),
    [
        ({"a..b": 1}, ValueError),
        ({".a": 1}, ValueError),
        ({"a b": 1}, ValueError),
        ({"": 1}, ValueError),
        ({"x": [1, 2]}, TypeError),
        ({"x": None}, TypeError),
        ({"x": float("nan")}, ValueError),
        ({"x": "both ' and \""}, ValueError),
    ],
)
def test_format_config_arg_refuses_what_flwr_would_misread(config: dict, error: type) -> None:
    with pytest.raises(error):
        format_config_arg(config)


def test_load_app_run_config_like_flwr_run(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        "[tool.flwr.app.config]\nepochs = 8\nrun-dir = ''\n"
        "[tool.flwr.app.config.fusion]\ngamma = 0.5\n"
    )
    cfg = load_app_run_config(tmp_path, {"epochs": 2})
    assert cfg == {"epochs": 2, "run-dir": "", "fusion.gamma": 0.5}
    with pytest.raises(KeyError, match=r"\['bogus'\] are not declared"):
        load_app_run_config(tmp_path, {"bogus": 1})


def test_validate_config_returns_plain_dict() -> None:
    assert validate_config({"a": 1, "b": "x"}) == {"a": 1, "b": "x"}


# ------------------------------------------------------------------ run results
def _context(run_config: dict, node_config: dict | None = None) -> Context:
    node_config = node_config or {}
    return Context(1, 5, node_config=node_config, state=RecordDict(), run_config=run_config)


def test_results_round_trip(tmp_path: Path) -> None:
    ctx = _context({"run-dir": str(tmp_path / "out")})
    assert run_dir_from_context(ctx) == tmp_path / "out"
    path = write_run_results(ctx, {"acc": 0.9, "nodes": [1, 2]})
    assert path == tmp_path / "out" / "results.json"
    assert read_run_results(tmp_path / "out") == {"acc": 0.9, "nodes": [1, 2]}
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["results.json"]  # no temp left
    write_run_results(tmp_path / "out", {"x": 1}, name="extra.json")
    assert read_run_results(tmp_path / "out", "extra.json") == {"x": 1}


def test_results_errors(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="run-dir"):
        run_dir_from_context(_context({}))
    with pytest.raises(ValueError, match="absolute"):
        run_dir_from_context(_context({"run-dir": "relative/dir"}))
    with pytest.raises(FileNotFoundError, match="no results file"):
        read_run_results(tmp_path)
    with pytest.raises(ValueError, match="plain file name"):
        write_run_results(tmp_path, {}, name="../x.json")
    (tmp_path / "results.json").write_text(json.dumps([1]))
    with pytest.raises(ValueError, match="JSON object"):
        read_run_results(tmp_path)


# ------------------------------------------------------------------ app wrappers
def test_simulated_node_sees_its_node_config_and_the_run_config() -> None:
    inner = ClientApp()
    seen: list[tuple[dict, dict]] = []

    @inner.query()
    def query(msg: Message, context: Context) -> Message:
        seen.append((dict(context.node_config), dict(context.run_config)))
        return Message(RecordDict(), reply_to=msg)

    app = SimulatedNodeClientApp(inner, [{"modality": "audio"}, {"modality": "video"}], {"k": 4})
    ctx = _context({}, {"partition-id": 1, "num-partitions": 2})
    msg = Message(RecordDict(), dst_node_id=5, message_type="query")
    msg.metadata.__dict__["_message_id"] = "m1"
    app(msg, ctx)
    assert seen == [({"partition-id": 1, "num-partitions": 2, "modality": "video"}, {"k": 4})]
    # restored: Flower refuses a ClientApp that changes run_config
    assert ctx.run_config == {}
    assert ctx.node_config == {"partition-id": 1, "num-partitions": 2}

    bad = _context({}, {"partition-id": 2, "num-partitions": 3})
    with pytest.raises(RuntimeError, match="partition-id 2 has no node config"):
        app(msg, bad)


def test_server_wrapper_merges_run_config() -> None:
    inner = ServerApp()
    seen: list[dict] = []

    @inner.main()
    def main(grid: object, context: Context) -> None:
        seen.append(dict(context.run_config))

    app = WithRunConfigServerApp(inner, {"run-dir": "/x", "k": 2})
    app(None, _context({"k": 1, "other": True}))  # type: ignore[arg-type]
    assert seen == [{"k": 2, "other": True, "run-dir": "/x"}]
    assert app.last_context is not None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_supernodes": 0, "node_configs": None}, "num_supernodes"),
        ({"num_supernodes": 2, "node_configs": [{}]}, "1 entries for 2 supernodes"),
        ({"num_supernodes": 1, "node_configs": [{"partition-id": 3}]}, "Simulation Engine owns"),
    ],
)
def test_run_simulation_app_validates_before_starting_ray(
    tmp_path: Path, kwargs: dict, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        run_simulation_app(ServerApp(), ClientApp(), run_config={}, run_dir=tmp_path, **kwargs)
    assert not (tmp_path / "ray").exists()
