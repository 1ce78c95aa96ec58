"""The cluster bootstrap behind every mark: seeds of one test sample are resampled together,
the seed spread is reported, and the marks of a table are Holm-corrected."""

from __future__ import annotations

import numpy as np
import pytest

from jacfusion_fed.evaluation.results import Column, Row, Table
from jacfusion_fed.evaluation.stats import (
    DOWN,
    TIE,
    UP,
    cluster_bootstrap,
    holm_adjust,
    holm_marks,
    paired_bootstrap,
)
from jacfusion_fed.evaluation.tables import arrows, intervals, table_to_markdown


def test_clustered_interval_is_wider_than_pooling_seeds_as_samples() -> None:
    # 3 seeds that agree on every one of 60 test samples: pooling them as 180 independent
    # samples pretends to three times the data; resampling the samples with their seeds
    # together does not
    rng = np.random.default_rng(1)
    b = (rng.random(60) < 0.7).astype(float)
    a = np.where(rng.random(60) < 0.15, 1.0 - b, b)
    a3, b3 = np.tile(a, (3, 1)), np.tile(b, (3, 1))
    clustered = cluster_bootstrap(a3, b3)
    pooled = paired_bootstrap(a3.ravel(), b3.ravel())
    assert clustered["mean"] == pytest.approx(pooled[0])
    width_c = clustered["high"] - clustered["low"]
    width_p = pooled[2] - pooled[1]
    assert width_c > 1.4 * width_p  # about sqrt(3) wider
    # one seed alone gives the clustered interval (the cluster is the sample)
    single = cluster_bootstrap(a, b)
    assert single["high"] - single["low"] == pytest.approx(width_c, rel=0.05)


def test_seed_spread_is_the_sd_of_per_seed_differences() -> None:
    base = np.zeros((3, 10))
    ours = np.zeros((3, 10))
    ours[0, :1], ours[1, :2], ours[2, :3] = 1, 1, 1  # +10, +20, +30 points
    r = cluster_bootstrap(ours, base)
    assert r["mean"] == pytest.approx(20.0)
    assert r["seed_sd"] == pytest.approx(10.0)
    assert r["seeds"] == 3
    with pytest.raises(ValueError, match="same shape"):
        cluster_bootstrap(ours, base[:2])


def test_holm_adjusts_the_smallest_p_value_by_the_number_of_tests() -> None:
    adj = holm_adjust({"a": 0.01, "b": 0.04, "c": 0.03})
    assert adj == {"a": pytest.approx(0.03), "c": pytest.approx(0.06), "b": pytest.approx(0.06)}
    tests = {
        "a": {"mean": 2.0, "p": 0.001},
        "b": {"mean": -2.0, "p": 0.04},  # below 0.05 alone, not after Holm over 3 tests
        "c": {"mean": 1.0, "p": 0.03},  # idem (2 x 0.03 > 0.05)
        "d": {"mean": -3.0, "p": 0.0},
    }
    assert holm_marks(tests) == {"a": UP, "b": TIE, "c": TIE, "d": DOWN}


def test_table_marks_use_every_seed_of_a_sample() -> None:
    rng = np.random.default_rng(0)
    base = (rng.random((3, 80)) < 0.6).astype(float)
    ours = base.copy()
    ours[:, :6] = 1.0 - base[:, :6] * 0  # every seed gains on the same 6 samples
    rows = [
        Row("UM", "0: Img-regT", "unimodal", {"clean": [0.8]}),
        Row(
            "MM (0, 1)",
            "Stat-w/o",
            "statistical",
            {"clean": list(base.mean(1))},
            correct={"clean": list(base.mean(0))},
            correct_seeds={"clean": base.tolist()},
            seed_acc={"clean": list(base.mean(1))},
        ),
        Row(
            "MM (0, 1)",
            "Stat-w/ (ours)",
            "jacobian",
            {"clean": list(ours.mean(1))},
            correct={"clean": list(ours.mean(0))},
            correct_seeds={"clean": ours.tolist()},
            seed_acc={"clean": list(ours.mean(1))},
        ),
    ]
    table = Table("T", "avdigits", "audio", "image", [Column("clean", "Clean", "clean")], rows, 1)
    ci = intervals(table)[("MM (0, 1)", "jacobian", "clean")]
    assert ci == cluster_bootstrap(ours, base)
    assert ci["seeds"] == 3
    assert arrows(table)[("MM (0, 1)", "jacobian", "clean")] in (UP, TIE)
    md = table_to_markdown(table)
    sd = 100 * float(np.std(ours.mean(1), ddof=1))
    assert f"± {sd:.1f}" in md  # the seed spread, not the repeat std
