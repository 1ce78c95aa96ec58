"""Owner-published calibration statistics pass the reply allow-list; nothing else does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from jacfusion_fed.federation import ReplyNotAllowedError, check_reply_allowed
from jacfusion_fed.federation.calibration import (
    CALIBRATION_RECORD,
    calibration_from_record,
    calibration_record,
    calibration_reply_spec,
    owner_calibration,
)
from jacfusion_fed.federation.protocol import head_reply_spec
from jacfusion_fed.fusion import robust_fusion

K, V = 4, 40


def _calibration_and_logits() -> tuple[RecordDict, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    net = torch.nn.Linear(6, K)
    x = torch.randn(V, 6, generator=gen)
    y = np.arange(V) % K
    cal = owner_calibration(net, x, y)
    return RecordDict({CALIBRATION_RECORD: calibration_record(cal)}), net(x).detach().double()


def _head(gram_k: int = K) -> dict[str, object]:
    w = np.arange(gram_k * 3, dtype=np.float64).reshape(gram_k, 3)
    return {
        "head": ArrayRecord(
            {"gram": Array(w @ w.T), "class-counts": Array(np.ones(gram_k, np.int64))}
        ),
        "metrics": MetricRecord({"num-examples": 3}),
        "info": ConfigRecord({"modality": "audio", "owner": "o", "version": "v1"}),
    }


def test_head_reply_with_calibration_is_accepted_and_round_trips() -> None:
    rd, z = _calibration_and_logits()
    reply = RecordDict({**_head(), CALIBRATION_RECORD: rd[CALIBRATION_RECORD]})
    spec = {**head_reply_spec("gram"), **calibration_reply_spec()}
    dims = check_reply_allowed(reply, spec, {"K": K})
    assert dims["V"] == V // 2  # split conformal: the reference half's scores (issue 19)
    cal = calibration_from_record(reply[CALIBRATION_RECORD])
    out = robust_fusion([z, z], [cal, cal])
    assert out.p.shape == (V, K)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.update({"raw-logits": np.zeros((V, K))}), "not in the allow-list"),
        (lambda a: a.update({"features": np.zeros((V, 16))}), "not in the allow-list"),
        (lambda a: a.update({"class-means": np.zeros((K, 16))}), "class-means"),
        (lambda a: a.update({"typicality-scores": np.zeros(V + 1)}), "typicality-scores"),
        (lambda a: a.update({"conformity-scores": np.zeros((V, K))}), "conformity-scores"),
        (lambda a: a.update({"precision": np.zeros((K, K), np.float32)}), "precision"),
        (lambda a: a.pop("conformity-scores"), "missing"),
    ],
)
def test_anything_else_is_refused(mutate: object, message: str) -> None:
    rd, _ = _calibration_and_logits()
    arrays = {k: v.numpy() for k, v in rd[CALIBRATION_RECORD].items()}
    mutate(arrays)  # type: ignore[operator]
    bad = RecordDict({CALIBRATION_RECORD: ArrayRecord({k: Array(v) for k, v in arrays.items()})})
    with pytest.raises(ReplyNotAllowedError, match=message):
        check_reply_allowed(bad, calibration_reply_spec(), {"K": K})


def test_calibration_must_match_the_heads_k_and_be_an_array_record() -> None:
    rd, _ = _calibration_and_logits()
    with pytest.raises(ReplyNotAllowedError, match="class-means"):
        check_reply_allowed(rd, calibration_reply_spec(), {"K": K + 1})
    as_config = RecordDict({CALIBRATION_RECORD: ConfigRecord({"class-means": 1.0})})
    with pytest.raises(ReplyNotAllowedError, match="ArrayRecord"):
        check_reply_allowed(as_config, calibration_reply_spec(), {"K": K})
    with pytest.raises(ReplyNotAllowedError, match="not in the allow-list"):
        check_reply_allowed(
            RecordDict({**_head(), "extra": rd[CALIBRATION_RECORD]}),
            {**head_reply_spec("gram"), **calibration_reply_spec()},
            {"K": K},
        )
