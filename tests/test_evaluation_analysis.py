"""The analysis scripts' shared plumbing (jacfusion_fed.evaluation.analysis) and the two-run
comparison of the unknown tables (jacfusion_fed.evaluation.variants)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jacfusion_fed.evaluation.analysis import arguments, stamp, write_result
from jacfusion_fed.evaluation.variants import compare_variants


def test_arguments_stamp_and_write_result(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ap = arguments("First line.\nmore", seeds=2)
    assert ap.description == "First line."
    args = ap.parse_args(["--out", str(tmp_path / "r.json")])
    assert args.seeds == 2 and args.out == tmp_path / "r.json"
    with pytest.raises(SystemExit):
        ap.parse_args([])  # --out is required
    s = stamp(0.0)
    assert set(s) == {"load_average", "seconds"} and s["seconds"] > 0
    write_result(args.out, {"b": 1, "a": [1.5]}, iter(["one", "two"]))
    assert args.out.read_text() == json.dumps({"a": [1.5], "b": 1}, indent=1) + "\n"
    assert capsys.readouterr().out.splitlines() == ["one", "two", f"wrote {args.out}"]


def _result(correct: dict[str, list[list[int]]], chosen: list[float]) -> dict[str, Any]:
    """A minimal run_unknown result: one setting ("clean"), rows stat and robust, S seeds."""
    seeds = list(range(len(correct["stat"])))
    pooled = {
        r: 100 * float(np.mean(correct[r])) for r in ("stat", "robust", "alone:a", "jac_oracle")
    }
    pooled |= {"label": "Clean", "coverage": 0.9, "set_size": 1.0}
    pooled |= {"robust-stat": {"mean": 0.0, "low": 0.0, "high": 0.0}}
    pooled |= {"answered": 1.0, "acc_answered": 1.0}
    pooled |= {"robust_detect-stat": {"mean": 0.0, "low": 0.0, "high": 0.0}}
    return {
        "settings": ["clean"],
        "seeds": seeds,
        "alpha": 0.1,
        "rows": ["alone:a", "stat", "jac_oracle", "robust"],
        "pooled": {"clean": pooled},
        "mean": {r: pooled[r] for r in ("stat", "robust", "jac_oracle")},
        "per_seed": {
            str(s): {
                "params": {"clean": {"robust": {"retain": chosen[s]}}},
                "table": {"clean": {"correct": {r: correct[r][s] for r in correct}}},
            }
            for s in seeds
        },
    }


def test_compare_variants_differences_and_choices() -> None:
    n = 40
    stat = [[1] * n, [1] * n]
    base = _result(
        {"stat": stat, "robust": [[1] * n, [1] * n], "alone:a": stat, "jac_oracle": stat}, [0, 0]
    )
    worse = [[0] * 10 + [1] * 30, [0] * 10 + [1] * 30]  # 25 points below on every seed
    wide = _result(
        {"stat": stat, "robust": worse, "alone:a": stat, "jac_oracle": stat}, [0.25, 0.25]
    )
    out = compare_variants({"base": base, "wide": wide}, ["robust"], lambda p: f"{p['retain']:g}")
    r = out["rows"]["robust"]
    assert r["mean"] == {"base": 100.0, "wide": 75.0}
    d = r["mean_wide_minus_base"]
    assert d["mean"] == pytest.approx(-25.0) and d["high"] < 0
    assert r["per_setting_wide_minus_base"]["clean"]["mean"] == pytest.approx(-25.0)
    assert r["clean_minus_stat"]["wide"]["mean"] == pytest.approx(-25.0)
    assert r["chosen"] == {"base": {"0": 2}, "wide": {"0.25": 2}}
    assert out["best_clean_alone_mean"] == 100.0


def test_arguments_add_resamples_only_when_asked() -> None:
    """``--resamples`` (the interval benchmarks') exists only with a default given."""
    assert arguments("Doc.", resamples=2000).parse_args(["--out", "x"]).resamples == 2000
    ns = arguments("Doc.", resamples=2000).parse_args(["--out", "x", "--resamples", "7"])
    assert ns.resamples == 7
    assert not hasattr(arguments("Doc.").parse_args(["--out", "x"]), "resamples")
