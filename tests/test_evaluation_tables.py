"""Table builder (rows, columns, arrows, bold, CSV), result JSON round trip, gamma selection."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch

from jacfusion_fed.evaluation import (
    Column,
    EvaluationConfig,
    EvaluationResult,
    Row,
    Table,
    arrows,
    gamma_scores,
    intervals,
    select_gamma,
    table_to_csv,
    table_to_markdown,
)
from jacfusion_fed.evaluation.tables import MARK_NOTE
from jacfusion_fed.fusion import gram_of, jacobian_fusion

_BASE = [1.0] * 140 + [0.0] * 60  # 70 % correct


def _synthetic_table() -> Table:
    cols = [Column("clean", "Clean", "clean"), Column("w0", "w0=1", "corruption")]
    better = [1.0] * 180 + [0.0] * 20  # the same samples right, and 40 more: +20 points
    flip = [0.0] * 10 + _BASE[10:140] + [1.0] * 10 + _BASE[150:]  # 10 lost, 10 gained: a tie
    worse = [0.0] * 30 + _BASE[30:]  # 30 of the base's right answers lost: -15 points
    rows = [
        Row("UM", "0: Img-regT", "unimodal", {"clean": [0.70], "w0": [0.70]}),
        Row("UM", "1: Aud-regT", "unimodal", {"clean": [0.80, 0.80], "w0": [0.50, 0.60]}),
        Row("MM (0, 1)", "Mean-w/o", "mean", {"clean": [0.90], "w0": [0.70, 0.74]}),
        Row("MM (0, 1)", "Mean-w/", "confidence_mean", {"clean": [0.88], "w0": [0.71, 0.71]}),
        Row(
            "MM (0, 1)",
            "Stat-w/o",
            "statistical",
            {"clean": [0.91], "w0": [0.72, 0.72]},
            correct={"clean": _BASE, "w0": _BASE},
        ),
        # clean: clearly better (interval above 0) => up; w0: a tie => "="
        Row(
            "MM (0, 1)",
            "Stat-w/ (ours)",
            "jacobian",
            {"clean": [0.9102], "w0": [0.70, 0.70]},
            {"clean": 0.9, "w0": 0.1},
            correct={"clean": better, "w0": flip},
        ),
        Row("MM (0, 1)", "Stat-w/ on clean mod.", "jacobian_clean", {"clean": [0.99], "w0": [0.5]}),
        # clean: worse => down; w0: no per-sample data => no mark
        Row(
            "MM (0, 2)",
            "Stat-w/o",
            "statistical",
            {"clean": [0.80], "w0": [0.60]},
            correct={"clean": _BASE},
        ),
        Row(
            "MM (0, 2)",
            "Stat-w/ (ours)",
            "jacobian",
            {"clean": [0.79], "w0": [0.65]},
            correct={"clean": worse},
        ),
    ]
    return Table("Synthetic", "avdigits", "audio", "image", cols, rows, repeats=2)


def test_marks_need_a_paired_interval_that_excludes_zero() -> None:
    table = _synthetic_table()
    assert arrows(table) == {
        ("MM (0, 1)", "jacobian", "clean"): "↑",
        ("MM (0, 1)", "jacobian", "w0"): "=",
        ("MM (0, 2)", "jacobian", "clean"): "↓",
    }
    ci = intervals(table)
    assert ci[("MM (0, 1)", "jacobian", "clean")]["mean"] == pytest.approx(20.0)
    assert ci[("MM (0, 1)", "jacobian", "w0")]["mean"] == pytest.approx(0.0)
    w0 = ci[("MM (0, 1)", "jacobian", "w0")]
    assert w0["low"] < 0 < w0["high"]
    assert ci[("MM (0, 2)", "jacobian", "clean")]["high"] < 0
    # the displayed means do not matter, only the paired per-sample differences: a row that
    # shows a higher mean but carries no per-sample data gets no mark
    assert ("MM (0, 2)", "jacobian", "w0") not in arrows(table)


def test_markdown_layout_rows_columns_marks_and_std() -> None:
    md = table_to_markdown(_synthetic_table())
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| UM / MM"))
    assert header == "| UM / MM | Model | Clean | w0=1 |"
    body = [line for line in lines if line.startswith("| ") and "---" not in line][1:]
    assert body[0].startswith("| UM Nets | 0: Img-regT |")
    assert body[1].startswith("|  | 1: Aud-regT | 80.0 ± 0.0 | 55.0 ± 5.0 |")
    assert body[2].startswith("| MM (0, 1) | Mean-w/o |")
    ours = next(line for line in body if "MM" not in line and "Stat-w/ (ours)" in line)
    assert "91.0 (↑)" in ours and "70.0 ± 0.0 (=)" in ours
    assert MARK_NOTE in md
    # the best mean of a column gets no bold mark (a tie within noise is no evidence)
    assert "| 99.0 |" in md and "| 72.0 ± 0.0 |" in md and "**9" not in md and "**7" not in md
    # no arrow on the extra row, gammas listed
    extra = next(line for line in body if "on clean mod." in line)
    assert "↑" not in extra and "↓" not in extra
    assert "| MM (0, 1) | Stat-w/ (ours) | 0.9 | 0.1 |" in md


def test_csv_long_format() -> None:
    rows = list(csv.DictReader(io.StringIO(table_to_csv(_synthetic_table()))))
    assert len(rows) == 18  # 9 rows x 2 columns
    ours = [r for r in rows if r["model"] == "Stat-w/ (ours)" and r["group"] == "MM (0, 1)"]
    assert [r["arrow"] for r in ours] == ["↑", "="]
    ci = json.loads(ours[0]["diff_vs_stat_pct"])
    mean, lo, hi = ci["mean"], ci["low"], ci["high"]
    assert mean == pytest.approx(20.0) and 0 < lo < mean < hi
    assert 0 <= ci["p"] < 0.05 and ci["seed_sd"] == 0.0 and ci["seeds"] == 1
    assert ours[1]["gamma"] == "0.1" and ours[1]["mean_pct"] == "70.00"
    assert json.loads(ours[1]["values"]) == [0.7, 0.7]
    assert rows[0]["column_label"] == "Clean"


def test_result_json_round_trip() -> None:
    res = EvaluationResult(config={"dataset": "avdigits"}, tables=[_synthetic_table()])
    back = EvaluationResult.from_json_dict(json.loads(json.dumps(res.to_json_dict())))
    assert back.tables[0].rows[5].acc == res.tables[0].rows[5].acc
    assert back.tables[0].rows[5].correct == res.tables[0].rows[5].correct
    assert table_to_markdown(back.tables[0]) == table_to_markdown(res.tables[0])


# ----------------------------------------------------------------------------- gamma
def test_select_gamma_picks_best_validation_accuracy_and_breaks_ties_upwards() -> None:
    g = torch.Generator().manual_seed(0)
    n, k = 400, 4
    y = torch.randint(0, k, (n,), generator=g)
    clean = torch.nn.functional.one_hot(y, k).double() * 2.0 + 0.5 * torch.randn(n, k, generator=g)
    noisy = torch.randn(n, k, generator=g, dtype=torch.float64) * 4.0  # pure noise modality
    weight = torch.randn(k, 8, generator=g, dtype=torch.float64)
    grams = [None, gram_of(weight)]
    scores = gamma_scores([clean, noisy], grams, y, None, (0.1, 0.5, 0.9))
    expected = {
        gam: float(
            (jacobian_fusion([clean, noisy], grams, gamma=gam).argmax(1) == y).double().mean()
        )
        for gam in (0.1, 0.5, 0.9)
    }
    assert scores == pytest.approx(expected)
    best = select_gamma([clean, noisy], grams, y, None, (0.1, 0.5, 0.9))
    assert scores[best] == max(scores.values())
    # a perturbation callable is used instead of the clean logits
    calls: list[int] = []

    def perturb(draw: int) -> list[torch.Tensor]:
        calls.append(draw)
        return [clean, noisy]

    assert select_gamma([clean, clean], grams, y, perturb, (0.1, 0.5), draws=2) in (0.1, 0.5)
    assert calls == [0, 1]
    # all candidates equal (gamma has no effect without a regularized modality) -> largest
    assert select_gamma([clean, noisy], [None, None], y, None, (0.1, 0.5, 0.9)) == 0.9


def test_select_gamma_rejects_bad_arguments() -> None:
    z = [np.zeros((3, 2)), np.zeros((3, 2))]
    with pytest.raises(ValueError, match="candidates"):
        select_gamma(z, [None, None], np.zeros(3, dtype=np.int64), None, ())
    with pytest.raises(ValueError, match="draws"):
        select_gamma(z, [None, None], np.zeros(3, dtype=np.int64), None, (0.5,), draws=0)


def test_evaluation_config_validates() -> None:
    with pytest.raises(ValueError, match="dataset"):
        EvaluationConfig(dataset="mnist")
    with pytest.raises(ValueError, match="repeats"):
        EvaluationConfig(repeats=0)
    with pytest.raises(ValueError, match="gamma"):
        EvaluationConfig(gamma=1.5)
    with pytest.raises(ValueError, match="methods"):
        EvaluationConfig(methods=("regular", "dropout"))
    with pytest.raises(ValueError, match="perturbed modality"):
        EvaluationConfig(dataset="twomoon", perturbed=("audio",))


# ----------------------------------------------------------------------------- heatmaps
def test_jacobian_norm_matches_explicit_frobenius_norm() -> None:
    from jacfusion_fed.evaluation.heatmaps import jacobian_norm

    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=1)
    weight = torch.randn(4, 6, generator=g, dtype=torch.float64)
    w_a = torch.randn(5, 4, 4, generator=g, dtype=torch.float64)
    j = p.unsqueeze(-1) * p.unsqueeze(-2) - torch.diag_embed(p)
    expected = torch.linalg.matrix_norm(j @ w_a @ weight)
    assert torch.allclose(jacobian_norm(p, weight @ weight.T, w_a), expected)
    assert torch.allclose(jacobian_norm(p, weight @ weight.T), torch.linalg.matrix_norm(j @ weight))


def test_unimodal_binary_heatmap_nearly_keeps_predictions_and_lowers_heat() -> None:
    """Section 4 / Supplementary A.4 claim W_x never changes a unimodal binary prediction. It
    holds except for samples whose logit margin is tiny next to the logits' common offset (the
    proof treats the non-symmetric matrix of (S13) as if it were symmetric; W_x mixes the common
    offset unevenly when W W^T is not a multiple of I), so: at most a few flips; the heat
    ||J' W_x W||_F shrinks with gamma."""
    from jacfusion_fed.evaluation.heatmaps import unimodal_heatmaps
    from jacfusion_fed.models import build_model
    from jacfusion_fed.robustness import GaussianNoise

    torch.manual_seed(0)
    net = build_model("mlp", (2,), 2).eval()
    g = np.random.default_rng(0)
    xy = g.random((200, 2)).astype(np.float32)
    labels = (xy[:, 1] > 0.5).astype(np.int64)
    panels = unimodal_heatmaps(
        net,
        xy,
        labels,
        GaussianNoise(0.3),
        (1.0, 0.5, 0.1),
        resolution=20,
        generator=torch.Generator().manual_seed(0),
    )
    assert list(panels) == ["clean", "gamma=1", "gamma=0.5", "gamma=0.1"]
    clean = [panels[k]["clean_acc"] for k in panels]
    noisy = [panels[k]["noisy_acc"] for k in panels if k != "clean"]
    assert max(clean) - min(clean) <= 0.02 and max(noisy) - min(noisy) <= 0.02
    heat = [float(panels[k]["heat"].mean()) for k in ("gamma=1", "gamma=0.5", "gamma=0.1")]
    assert heat[0] > heat[1] > heat[2]
    assert np.allclose(panels["clean"]["heat"], panels["gamma=1"]["heat"])
