"""The modality owner's ClientApp, called in-process (no Ray, no processes except the restart
check): replies pass the coordinator's allow-lists; unknown ids, a stale version and malformed
requests get error replies with clear reasons, not crashes; a restarted owner (a fresh Python
process) serves the same model version, with the same logits, from its store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from jacfusion_fed.cli.deploy import write_app_manifest
from jacfusion_fed.clients.client_app import app as client_app
from jacfusion_fed.federation import check_reply_allowed, load_app_run_config
from jacfusion_fed.federation.calibration import calibration_from_record
from jacfusion_fed.federation.protocol import (
    MSG_DESCRIBE,
    MSG_HEAD,
    MSG_QUERY,
    MSG_TRAIN,
    AppErrorCode,
    app_error_name,
    describe_reply_spec,
    head_reply_spec,
    head_request,
    query_reply_spec,
    query_request,
    train_request,
)
from jacfusion_fed.federation.scenario import DEFAULT_RUN_CONFIG, requester_splits
from jacfusion_fed.owner.perturbation import PerturbationSpec
from jacfusion_fed.privacy import Pseudonymizer, generate_key, write_key
from jacfusion_fed.server.federated_eval import parse_columns

REPO = Path(__file__).resolve().parents[1]
DATA = "builtin:twomoon?quick=1&seed=0"
K = 2
RUN_CONFIG = {**DEFAULT_RUN_CONFIG, "epochs": 3, "lr": 0.01, "dataset": "twomoon"}


@pytest.fixture(autouse=True)
def _task_identity() -> Iterator[None]:
    """``Message(...)`` reads the process's task identity (set by Flower's runtimes)."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


class Owner:
    """One owner's node config + a way to send it messages as the coordinator would."""

    def __init__(self, root: Path, modality: str = "y", **extra: object) -> None:
        self.key_file = root / "secrets" / "pseudonym.key"
        if not self.key_file.exists():
            self.key_file.parent.mkdir(parents=True, exist_ok=True)
            write_key(self.key_file, generate_key())
        self.node_config = {
            "modality": modality,
            "data": DATA,
            "workdir": str(root / f"owner-{modality}"),
            "key-file": str(self.key_file),
            "owner": f"{modality}-owner",
            **extra,
        }
        self.pseudonymizer = Pseudonymizer.from_file(self.key_file)
        splits = requester_splits(DATA, modality)
        self.ids = {s: self.pseudonymizer.many(ds.sample_ids) for s, ds in splits.items()}
        self.local_ids = {s: list(ds.sample_ids) for s, ds in splits.items()}

    def send(self, message_type: str, content: RecordDict, **run: object) -> Message:
        msg = Message(content, dst_node_id=7, message_type=message_type)
        msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
        context = Context(
            run_id=1,
            node_id=7,
            node_config=dict(self.node_config),  # type: ignore[arg-type]
            state=RecordDict(),
            run_config={**RUN_CONFIG, **run},  # type: ignore[arg-type]
        )
        return client_app(msg, context)


def _error(reply: Message) -> tuple[str, str]:
    assert reply.has_error(), reply.content
    return app_error_name(reply.error.code), reply.error.reason


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Owner, str]:
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    owner = Owner(tmp_path_factory.mktemp("owner"))
    # before training: a clear "no model" error, not a crash
    name, reason = _error(owner.send(MSG_QUERY, query_request(owner.ids["test"][:3], "")))
    assert name == "NO_MODEL" and "no trained model" in reason
    reply = owner.send(MSG_TRAIN, train_request("local"))
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
    assert not reply.has_error(), reply.error
    check_reply_allowed(reply.content, head_reply_spec("gram"), {"K": K})
    return owner, str(reply.content["info"]["version"])


def test_train_reply_is_only_the_head(trained: tuple[Owner, str]) -> None:
    owner, version = trained
    reply = owner.send(MSG_HEAD, head_request(version))
    content = reply.content
    check_reply_allowed(content, head_reply_spec("gram"), {"K": K})
    # the head, its metrics and info, and exactly one more record: the owner's calibration
    # (aggregates of its clean validation split, for robust fusion; docs/calibration.md)
    assert sorted(content.keys()) == ["calibration", "head", "info", "metrics"]
    assert sorted(content["head"].keys()) == ["class-counts", "gram"]
    assert sorted(content["calibration"].keys()) == [
        "class-means",
        "conformity-scores",
        "precision",
        "typicality-scores",
    ]
    calibration = calibration_from_record(content["calibration"])
    assert calibration.num_classes == K
    gram = content["head"]["gram"].numpy()
    np.testing.assert_allclose(gram, gram.T)
    assert content["head"]["class-counts"].numpy().sum() == 200  # TwoMoon quick train split
    assert content["info"]["version"] == version
    assert content["metrics"]["num-examples"] == 200

    described = owner.send(MSG_DESCRIBE, RecordDict())
    check_reply_allowed(described.content, describe_reply_spec())
    info = described.content["info"]
    assert (info["modality"], info["version"], info["num-classes"]) == ("y", version, K)
    assert json.loads(str(info["model-spec"]))["input_shape"] == [1]


def test_query_clean_and_perturbed(trained: tuple[Owner, str]) -> None:
    owner, version = trained
    ids = owner.ids["val"][:20] + owner.ids["test"][:30]
    settings = [
        "clean",
        PerturbationSpec.parse("gaussian w0=0.5").to_json(),
        PerturbationSpec.parse("gaussian w0=0.5").with_draw(1).to_json(),
        PerturbationSpec.parse("fgsm w4=0.1").to_json(),
    ]
    reply = owner.send(MSG_QUERY, query_request(ids, version, settings, seed=3))
    assert not reply.has_error(), reply.error
    check_reply_allowed(reply.content, query_reply_spec(len(settings)), {"N": len(ids), "K": K})
    arrays = reply.content["logits"]
    assert arrays["known"].numpy().all()
    clean, d0, d1, fgsm = (arrays[f"s{i}"].numpy() for i in range(4))
    assert not np.allclose(clean, d0) and not np.allclose(d0, d1)
    assert not np.allclose(clean, fgsm)
    again = owner.send(MSG_QUERY, query_request(ids, version, settings, seed=3)).content
    np.testing.assert_array_equal(again["logits"]["s1"].numpy(), d0)  # same request, same draw
    # issue 20: the owner's detector p-value per row and setting, of the input the logits came
    # from, and nothing else of the features
    u = [arrays[f"u{i}"].numpy() for i in range(4)]
    assert all(x.shape == (len(ids),) and x.dtype == np.float64 for x in u)
    assert all(((x > 0) & (x <= 1)).all() for x in u)
    assert float(np.median(u[1])) < float(np.median(u[0]))  # noisy inputs look atypical
    assert set(arrays.keys()) == {
        "known",
        *(f"s{i}" for i in range(4)),
        *(f"u{i}" for i in range(4)),
    }


def test_query_reply_allow_list_covers_pvalues() -> None:
    """The p-value arrays are optional, (N,) float64 only; a features array is refused."""
    from flwr.app import Array, ArrayRecord

    from jacfusion_fed.federation import ReplyNotAllowedError

    def reply(**arrays: np.ndarray) -> RecordDict:
        base = {"s0": np.zeros((3, K)), "known": np.ones(3, dtype=bool), **arrays}
        return RecordDict(
            {
                "logits": ArrayRecord({k: Array(v) for k, v in base.items()}),
                "info": ConfigRecord({"modality": "y", "owner": "o", "version": "0" * 16}),
            }
        )

    spec, dims = query_reply_spec(1), {"N": 3, "K": K}
    check_reply_allowed(reply(), spec, dims)  # an owner without a detector
    check_reply_allowed(reply(u0=np.full(3, 0.5)), spec, dims)
    for bad in (
        {"u0": np.full(3, 0.5, dtype=np.float32)},
        {"u0": np.full(4, 0.5)},
        {"u1": np.full(3, 0.5)},
        {"features": np.zeros((3, 8))},
    ):
        with pytest.raises(ReplyNotAllowedError):
            check_reply_allowed(reply(**bad), spec, dims)


def test_error_replies_not_crashes(trained: tuple[Owner, str]) -> None:
    owner, version = trained
    ids = owner.ids["test"][:5]
    stranger = Pseudonymizer(generate_key())("someone-else")

    # unknown ids: refused by default, named in the reason
    name, reason = _error(owner.send(MSG_QUERY, query_request([*ids, stranger], version)))
    assert name == "UNKNOWN_IDS" and "1 of 6" in reason and stranger[:12] in reason
    # ... answered with a mask when the coordinator allows partial answers (multi-site)
    reply = owner.send(MSG_QUERY, query_request([*ids, stranger], version, allow_partial=True))
    assert reply.content["logits"]["known"].numpy().tolist() == [True] * 5 + [False]
    assert not reply.content["logits"]["s0"].numpy()[5].any()

    # a stale / unknown version
    name, reason = _error(owner.send(MSG_QUERY, query_request(ids, "0123456789abcdef")))
    assert name == "UNKNOWN_VERSION" and version in reason and "0123456789abcdef" in reason
    name, _ = _error(owner.send(MSG_HEAD, head_request("0123456789abcdef")))
    assert name == "UNKNOWN_VERSION"

    # malformed requests
    cases = {
        "no 'query' record": RecordDict(),
        "not pseudonyms": query_request(owner.local_ids["test"][:2], version),
        "not 16 hex digits": query_request(ids, "v1"),
        "bad perturbation setting": query_request(ids, version, ["gaussian w9=1"]),
        "duplicate sample ids": query_request([ids[0], ids[0]], version),
        "sample-ids is empty": RecordDict(
            {
                "query": ConfigRecord(
                    {
                        "sample-ids": [],
                        "version": version,
                        "settings": ["clean"],
                        "seed": 0,
                        "allow-partial": False,
                    }
                )
            }
        ),
        "has type int, expected str": RecordDict(
            {
                "query": ConfigRecord(
                    {
                        "sample-ids": ids,
                        "version": 5,
                        "settings": ["clean"],
                        "seed": 0,
                        "allow-partial": False,
                    }
                )
            }
        ),
    }
    for expected, content in cases.items():
        name, reason = _error(owner.send(MSG_QUERY, content))
        assert name == "MALFORMED_REQUEST" and expected in reason, (expected, reason)
    name, reason = _error(owner.send(MSG_TRAIN, train_request("publish")))
    assert name == "MALFORMED_REQUEST" and "needs the 'global' model" in reason

    # the full head only when the owner allows it
    name, reason = _error(owner.send(MSG_HEAD, head_request(version, "full")))
    assert name == "NOT_PERMITTED" and "Gram matrix" in reason
    assert AppErrorCode.NOT_PERMITTED == 104


def test_full_head_when_allowed(trained: tuple[Owner, str]) -> None:
    owner, version = trained
    owner.node_config["allow-full-head"] = True
    try:
        reply = owner.send(MSG_HEAD, head_request(version, "full"))
    finally:
        owner.node_config.pop("allow-full-head")
    dims = check_reply_allowed(reply.content, head_reply_spec("full"), {"K": K})
    assert dims["H"] == 64
    w = reply.content["head"]["weight"].numpy()
    gram = owner.send(MSG_HEAD, head_request(version)).content["head"]["gram"].numpy()
    np.testing.assert_allclose(w @ w.T, gram, rtol=1e-12)


RESTART = textwrap.dedent(
    """
    import json, sys, uuid
    from flwr.app import Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity
    from jacfusion_fed.clients.client_app import app
    from jacfusion_fed.federation.protocol import head_request, query_request

    node_config, run_config, ids = json.loads(sys.stdin.read())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 2, 0
    out = {}
    for name, mtype, content in (
        ("head", "query.head", head_request("")),
        ("query", "query", query_request(ids, "")),
    ):
        msg = Message(content, dst_node_id=7, message_type=mtype)
        msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
        ctx = Context(run_id=2, node_id=7, node_config=node_config, state=RecordDict(),
                      run_config=run_config)
        reply = app(msg, ctx)
        out[name] = {"version": reply.content["info"]["version"]}
        if name == "query":
            out[name]["logits"] = reply.content["logits"]["s0"].numpy().tolist()
        else:
            out[name]["gram"] = reply.content["head"]["gram"].numpy().tolist()
    print(json.dumps(out))
    """
)


def test_restarted_owner_serves_the_same_version(trained: tuple[Owner, str]) -> None:
    """A fresh process (as after a SuperNode restart, or as every message in deployment)
    finds the model in the owner's store: same version, same head, same logits."""
    owner, version = trained
    ids = owner.ids["test"][:10]
    before_logits = owner.send(MSG_QUERY, query_request(ids, version)).content["logits"]
    before_head = owner.send(MSG_HEAD, head_request(version)).content["head"]
    proc = subprocess.run(
        [sys.executable, "-c", RESTART],
        input=json.dumps([owner.node_config, RUN_CONFIG, ids]),
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = json.loads(proc.stdout.strip().splitlines()[-1])
    assert after["head"]["version"] == after["query"]["version"] == version
    np.testing.assert_array_equal(after["head"]["gram"], before_head["gram"].numpy())
    np.testing.assert_array_equal(after["query"]["logits"], before_logits["s0"].numpy())


def test_run_config_defaults_match_pyproject(tmp_path: Path) -> None:
    """The simulation's defaults are the app's `[tool.flwr.app.config]` (what `flwr run` sees),
    and so is the manifest `jacfusion-fed deploy local` submits."""
    assert load_app_run_config(REPO) == DEFAULT_RUN_CONFIG
    write_app_manifest(tmp_path / "app")
    assert load_app_run_config(tmp_path / "app") == DEFAULT_RUN_CONFIG
    columns = parse_columns(str(DEFAULT_RUN_CONFIG["columns"]))
    assert [c.key for c in columns] == ["clean", "w0", "w1", "fgsm", "pgd"]
    assert [c.label for c in columns] == ["Clean", "w0=1", "w1=8", "FGSM w4=0.03", "PGD w5=0.001"]
    pgd = columns[-1].spec
    assert pgd is not None and not pgd.deterministic and columns[3].spec.deterministic  # type: ignore[union-attr]
    assert PerturbationSpec.parse(pgd.to_json()) == pgd
    with pytest.raises(ValueError, match="unknown perturbation kind"):
        PerturbationSpec.parse("blur r=2")
    with pytest.raises(ValueError, match="w1 must be >= 0"):
        PerturbationSpec.parse("missing w1=-1")
