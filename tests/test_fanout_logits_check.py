"""The coordinator's check of an owner's logits (``fanout.logits_of``): the one-pass fast path
accepts exactly what the naming path accepts, and returns a writable native float64 copy."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from jacfusion_fed.rpc.jacfusion.v1 import modality_pb2
from jacfusion_fed.rpc.matrix import encode_matrix
from jacfusion_fed.server.fanout import logits_of
from jacfusion_fed.server.owner_channel import OwnerFailure
from jacfusion_fed.server.predict_types import MAX_ABS_OWNER_VALUE

IDS = [f"{i:064x}" for i in range(4)]


def _batch(values: np.ndarray) -> modality_pb2.LogitsBatch:
    return modality_pb2.LogitsBatch(sample_ids=IDS, logits=encode_matrix(values))


def test_good_logits_come_back_exact_and_writable() -> None:
    values = np.random.default_rng(0).normal(size=(4, 3)) * 50
    values[0, 0] = MAX_ABS_OWNER_VALUE
    values[1, 1] = -MAX_ABS_OWNER_VALUE
    got = logits_of("audio", _batch(values), 4, 3, "v1")
    assert got.dtype == np.float64 and got.flags.writeable and got.flags.c_contiguous
    np.testing.assert_array_equal(got, values)


@pytest.mark.parametrize(
    "bad", [np.nan, np.inf, -np.inf, 2 * MAX_ABS_OWNER_VALUE, -2 * MAX_ABS_OWNER_VALUE]
)
def test_bad_values_are_data_loss_naming_the_sample(bad: float) -> None:
    values = np.zeros((4, 3))
    values[2, 1] = bad
    with pytest.raises(OwnerFailure) as info:
        logits_of("audio", _batch(values), 4, 3, "v1")
    assert info.value.code == grpc.StatusCode.DATA_LOSS
    assert IDS[2][:8] in info.value.text


def test_wrong_row_count_is_data_loss() -> None:
    with pytest.raises(OwnerFailure) as info:
        logits_of("audio", _batch(np.zeros((3, 3))), 4, 3, "v1")
    assert info.value.code == grpc.StatusCode.DATA_LOSS
