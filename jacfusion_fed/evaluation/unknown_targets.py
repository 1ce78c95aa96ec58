"""The targets of issue 11, measured on a "perturbed modality unknown" result (all in one run).

* mean accuracy of ``robust`` over the settings >= max(best clean modality alone, the oracle
  Stat-w/), both measured in the same run. "Best clean modality alone" is, per setting, the
  best net among the modalities that are not perturbed (every modality for the clean column):
  an oracle as well, it knows which modality to ignore;
* clean accuracy within 0.5 points of Stat-w/o;
* no setting more than 1 point below Stat-w/o by the paired interval (its upper end >= -1);
* conformal coverage on clean test >= 1 - alpha - 0.02, with mean set size <= 1.5;
* with abstention, in every column: accuracy on answered samples >= the best clean modality's
  accuracy, answering >= 80 % of the samples.
"""

from __future__ import annotations

from typing import Any

__all__ = ["best_clean_alone", "targets", "targets_markdown"]


def best_clean_alone(result: dict[str, Any], key: str) -> float:
    """Accuracy % of the best modality alone that is not perturbed in setting ``key``."""
    cell = result["pooled"][key]
    perturbed = None if key == "clean" else key.split(":", 1)[0]
    alone = [r for r in result["rows"] if r.startswith("alone:") and r != f"alone:{perturbed}"]
    return max(float(cell[r]) for r in alone)


def _ci(v: Any) -> list[float]:
    """``[mean, low, high]`` of a cluster bootstrap result (or an old ``(mean, low, high)``)."""
    return [v["mean"], v["low"], v["high"]] if isinstance(v, dict) else list(v)


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """Every target's measured value and whether it is met (JSON-ready)."""
    settings, pooled, mean = result["settings"], result["pooled"], result["mean"]
    oracle_alone = sum(best_clean_alone(result, k) for k in settings) / len(settings)
    bar = max(oracle_alone, float(mean["jac_oracle"]))
    clean = pooled["clean"]
    cis = {k: _ci(pooled[k]["robust-stat"]) for k in settings}
    below = {k: v for k, v in cis.items() if v[2] < -1.0}
    point = {k: v for k, v in cis.items() if v[0] < -1.0}
    cov_min = 1.0 - float(result["alpha"]) - 0.02
    abst = {
        k: (100 * pooled[k]["acc_answered"] >= best_clean_alone(result, k) - 1e-9)
        and pooled[k]["answered"] >= 0.8
        for k in settings
    }
    out: dict[str, Any] = {
        "mean": {
            "robust": float(mean["robust"]),
            "best_clean_alone": oracle_alone,
            "jac_oracle": float(mean["jac_oracle"]),
            "stat": float(mean["stat"]),
            "met": float(mean["robust"]) >= bar,
        },
        "clean": {
            "robust_minus_stat": _ci(clean["robust-stat"]),
            "met": abs(float(clean["robust"]) - float(clean["stat"])) <= 0.5,
        },
        "no_setting_1_below": {"violations": below, "point_below": point, "met": not below},
        "clean_coverage": {
            "coverage": float(clean["coverage"]),
            "set_size": float(clean["set_size"]),
            "min_coverage": cov_min,
            "met": clean["coverage"] >= cov_min and clean["set_size"] <= 1.5,
        },
        "abstention": {
            "columns_met": [k for k, ok in abst.items() if ok],
            "met": all(abst.values()),
        },
    }
    if "robust_detect" in mean:  # issue 20's targets for robust + detectors
        d = _ci(clean["robust_detect-stat"])
        out["detect"] = {
            "mean": float(mean["robust_detect"]),
            "bar": bar,
            "mean_met": float(mean["robust_detect"]) >= bar,
            "clean_minus_stat": d,
            "clean_met": d[1] <= 0.0 <= d[2] and d[0] >= -0.3,
        }
    return out


def targets_markdown(result: dict[str, Any]) -> list[str]:
    """The targets as Markdown bullet lines (met / missed, with the measured values)."""
    t = targets(result)
    labels = {k: result["pooled"][k]["label"] for k in result["settings"]}

    def ok(entry: dict[str, Any]) -> str:
        return "met" if entry["met"] else "missed"

    m, c, cc, a = t["mean"], t["clean"], t["clean_coverage"], t["abstention"]
    below = t["no_setting_1_below"]["violations"]
    point = t["no_setting_1_below"]["point_below"]

    def listed(cells: dict[str, list[float]]) -> str:
        return (
            ", ".join(
                f"{labels[k]} {v[0]:+.1f} [{v[1]:+.1f}, {v[2]:+.1f}]" for k, v in cells.items()
            )
            or "none"
        )

    return [
        "Targets of issue 11 (measured in this run):",
        f"- mean accuracy of robust {m['robust']:.1f} vs max(best clean modality alone "
        f"{m['best_clean_alone']:.1f}, oracle Stat-w/ {m['jac_oracle']:.1f}): {ok(m)}",
        f"- clean: robust − Stat-w/o {c['robust_minus_stat'][0]:+.1f} (within 0.5): {ok(c)}",
        "- no setting more than 1 point below Stat-w/o by the paired interval (whole interval "
        f"below −1: {listed(below)}): {ok(t['no_setting_1_below'])}; point estimate below −1: "
        + listed(point),
        f"- clean conformal coverage {100 * cc['coverage']:.1f} % (≥ {100 * cc['min_coverage']:.0f}"
        f" %), set size {cc['set_size']:.2f} (≤ 1.5): {ok(cc)}",
        f"- abstention (answered accuracy ≥ best clean modality, ≥ 80 % answered, every column): "
        f"{ok(a)} (met in {len(a['columns_met'])} of {len(labels)} columns)",
        *(_detect_lines(t["detect"]) if "detect" in t else []),
    ]


def _detect_lines(d: dict[str, Any]) -> list[str]:
    def ok(met: bool) -> str:
        return "met" if met else "missed"

    c = d["clean_minus_stat"]
    return [
        "Targets of issue 20 for robust + detectors (measured in this run):",
        f"- mean accuracy {d['mean']:.1f} vs max(best clean modality alone, oracle Stat-w/) "
        f"{d['bar']:.1f}: {ok(d['mean_met'])}",
        f"- clean: robust + detectors − Stat-w/o {c[0]:+.1f} [{c[1]:+.1f}, {c[2]:+.1f}] "
        f"(interval includes 0 and point ≥ −0.3): {ok(d['clean_met'])}",
    ]
