"""Issue 20: the detection table is written by the code, and the figures quoted in
docs/calibration.md are those of the committed results file."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from jacfusion_fed.evaluation.detection import SIGNALS, auroc, detection_markdown

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "docs" / "results" / "avdigits-detection.json"


def test_auroc_matches_the_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1, 1, 40).round(1), rng.normal(0, 1, 50).round(1)  # with ties
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert auroc(pos, neg) == pytest.approx(pairs)
    assert auroc(np.ones(3), np.zeros(3)) == 1.0 and auroc(np.zeros(3), np.ones(3)) == 0.0
    with pytest.raises(ValueError, match="at least one"):
        auroc(np.ones(0), np.ones(3))


def test_committed_markdown_is_the_json_rendered() -> None:
    result = json.loads(RESULT.read_text())
    md = (RESULT.parent / "avdigits-detection.md").read_text()
    assert md == detection_markdown(result)
    assert result["adaptive_attack"]["done"] is True
    for key in result["settings"]:
        auc = result["table"][key].get("auroc")
        if auc:
            assert set(auc) == set(SIGNALS)
            assert all(0.0 <= v <= 1.0 for v in auc.values())


def test_docs_quote_the_committed_detection_figures() -> None:
    result = json.loads(RESULT.read_text())
    text = (ROOT / "docs" / "calibration.md").read_text()
    block = text.split("<!-- detection-quote -->", 1)[1].split("\n### ", 1)[0]
    rows = list(itertools.takewhile(lambda line: line.startswith("|"), block.splitlines()[3:]))
    assert len(rows) == 4  # the quoted table only (the section has further tables)
    keys = {
        "Aud FGSM": "audio:fgsm",
        "Aud PGD": "audio:pgd",
        "Img FGSM": "image:fgsm",
        "Img PGD": "image:pgd",
    }
    t = result["table"]
    for row in rows:
        name, feat, last, fisher, cons, adv_feat, adv_fisher, worst = (
            c.strip() for c in row.strip().strip("|").split("|")
        )
        cell = t[keys[name]]
        assert feat == f"{100 * cell['auroc']['feature']:.1f}"
        assert last == f"{100 * cell['auroc']['penultimate']:.1f}"
        assert fisher == f"{100 * cell['auroc']['fisher']:.1f}"
        assert cons == f"{100 * cell['auroc']['consistency']:.1f}"
        assert adv_feat == f"{100 * cell['adaptive']['auroc']['feature']:.1f}"
        assert adv_fisher == f"{100 * cell['adaptive']['auroc']['fisher']:.1f}"
        assert worst == f"{100 * cell['adaptive']['robust_acc_detect_worst']:.1f}"
        # the doc's verdicts: the combined reliability misses 0.9 on all four
        assert cell["auroc"]["fisher"] < 0.9
        image = name.startswith("Img")
        # the owner's feature p-value meets 0.9 on the image attacks only
        assert (cell["auroc"]["feature"] >= 0.9) == image
        # under the adaptive attack, >= 0.8 on image FGSM only
        assert (cell["adaptive"]["auroc"]["feature"] >= 0.8) == (name == "Img FGSM")
        if name != "Img FGSM":  # "more typical than clean ones in every signal"
            assert all(v < 0.5 for v in cell["adaptive"]["auroc"].values()), name
    assert "**missed**" in text
    prose = " ".join(block.split("The random corruptions", 1)[1].split())  # one line
    for key in ("audio:w0", "image:w0", "image:w23", "audio:w1"):
        assert f"{100 * t[key]['auroc']['fisher']:.1f}" in prose, key
    i_f, i_p = t["image:fgsm"]["auroc"], t["image:pgd"]["auroc"]
    a_f, a_p = t["audio:fgsm"]["auroc"], t["audio:pgd"]["auroc"]

    def two(a: dict[str, float], b: dict[str, float], s: str) -> str:
        return f"{100 * a[s]:.1f} and {100 * b[s]:.1f}"

    assert f"({two(i_f, i_p, 'feature')} over every layer)" in prose
    assert f"penultimate features ({two(i_f, i_p, 'penultimate')})" in prose
    assert f"(typicality {two(i_f, i_p, 'typicality')})" in prose
    assert f"(Fisher {two(i_f, i_p, 'fisher')})" in prose
    assert f"audio net typical ({two(a_f, a_p, 'feature')})" in prose
    assert max(a_f["feature"], a_p["feature"]) < 0.6  # "typical": near chance
    assert f"earlier layers ({100 * t['image:fgsm']['adaptive']['auroc']['feature']:.1f})" in prose
    clean = t["clean"]
    assert (
        f"from {100 * clean['robust_acc']:.1f} to {100 * clean['robust_acc_detect']:.1f}" in prose
    )
    alarms = [result["per_seed"][s]["clean"]["false_alarm_0.05"] for s in result["per_seed"]]
    singles = ("typicality", "feature", "consistency")
    single = max(v for a in alarms for sig in singles for v in a[sig].values())
    fisher = {m: max(a["fisher"][m] for a in alarms) for m in alarms[0]["fisher"]}
    worst_m = max(fisher, key=lambda m: fisher[m])
    assert f"up to {single:.2f} at 0.05" in prose
    assert f"{fisher[worst_m]:.2f} for the Fisher combination on the {worst_m} modality" in prose
    img_single = max(a[sig]["image"] for a in alarms for sig in singles)
    img_fisher = min(a["fisher"]["image"] for a in alarms)
    assert img_fisher > img_single  # "each signal ... at most, but Fisher at least"
    assert f"at most {img_single:.2f} of the clean samples" in prose
    assert f"Fisher's combination at least {img_fisher:.2f}" in prose
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "detectors see the AV-Digits image attacks but not the audio ones" in readme


def test_cli_evaluate_detection_twomoon_quick(tmp_path: Path) -> None:
    """The user's path: ``jacfusion-fed evaluate --detection`` prints and writes the table."""
    from typer.testing import CliRunner

    from jacfusion_fed.cli import app

    out = tmp_path / "det"
    args = ["evaluate", "--detection", "--dataset", "twomoon", "--quick", "--seeds", "1"]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "detection AUROC" in result.output and "fisher" in result.output
    res = json.loads((out / "twomoon-detection.json").read_text())
    assert (out / "twomoon-detection.md").read_text() == detection_markdown(res)
    assert res["seeds"] == [0] and res["settings"][0] == "clean" and len(res["settings"]) > 1
    missing = res["table"][next(k for k in res["settings"] if "w1" in k)]
    assert missing["auroc"]["fisher"] > 0.9  # missing entries are easy to see
    attacks = [k for k in res["settings"] if res["table"][k]["type"] in ("fgsm", "pgd")]
    assert attacks and all("adaptive" in res["table"][k] for k in attacks)
    for k in attacks:
        cell = res["table"][k]["adaptive"]
        # the per-sample worst case of two attacks is never better than either
        assert cell["robust_acc_detect_worst"] <= cell["robust_acc_detect"] + 1e-12
        assert cell["robust_acc_detect_worst"] <= res["table"][k]["robust_acc_detect"] + 1e-12


def test_cli_detection_and_unknown_exclude_each_other(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from jacfusion_fed.cli import app

    args = ["evaluate", "--detection", "--unknown", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0 and "either --unknown or --detection" in result.output
    result = CliRunner().invoke(app, ["evaluate", "--detection", "--dataset", "emergency"])
    assert result.exit_code != 0 and "unknown dataset" in result.output


def test_auroc_interval_keeps_seeds_and_pairs_together() -> None:
    """Identical seeds add no information: the clustered interval of three copies of one seed
    is that seed's interval, where pooling the copies as independent samples would narrow it."""
    from jacfusion_fed.evaluation.detection import auroc_interval

    rng = np.random.default_rng(1)
    neg = rng.normal(0.0, 1.0, 200)
    pos = neg + rng.normal(0.4, 1.0, 200)  # paired with its clean score, like a perturbation
    one = auroc_interval([pos], [neg], resamples=400)
    three = auroc_interval([pos] * 3, [neg] * 3, resamples=400)
    assert one["mean"] == pytest.approx(auroc(pos, neg))
    assert one["low"] < one["mean"] < one["high"]
    assert three["low"] == pytest.approx(one["low"]) and three["high"] == pytest.approx(one["high"])
    assert three["seed_sd"] == 0.0
    pooled = auroc_interval([np.tile(pos, 3)], [np.tile(neg, 3)], resamples=400)
    assert pooled["high"] - pooled["low"] < 0.75 * (one["high"] - one["low"])
    with pytest.raises(ValueError, match="same N"):
        auroc_interval([pos], [neg[:10]])


@pytest.mark.parametrize("a", [0.5, 0.7, 0.9, 0.99])
def test_synthetic_detector_has_the_asked_auroc(a: float) -> None:
    import torch

    from jacfusion_fed.evaluation.detection import synthetic_pvalues

    gen = torch.Generator().manual_seed(0)
    u = synthetic_pvalues(20000, 2, 1, a, gen)
    clean = synthetic_pvalues(20000, 2, None, a, gen)
    assert auroc(1 - u[:, 1].numpy(), 1 - clean[:, 1].numpy()) == pytest.approx(a, abs=0.01)
    assert auroc(1 - u[:, 0].numpy(), 1 - clean[:, 0].numpy()) == pytest.approx(0.5, abs=0.01)
    assert bool((synthetic_pvalues(5, 3, 2, 1.0, gen)[:, 2] == 0).all())
    with pytest.raises(ValueError, match=r"\[0.5, 1\]"):
        synthetic_pvalues(5, 2, 0, 0.3, gen)


def test_docs_quote_the_oracle_bound() -> None:
    result = json.loads(RESULT.read_text())
    syn = result["synthetic"]
    text = (ROOT / "docs" / "calibration.md").read_text()
    block = text.split("<!-- detection-oracle-quote -->", 1)[1]
    lines = block.strip().splitlines()[2:]
    end = next((i for i, line in enumerate(lines) if not line.startswith("|")), len(lines))
    rows = lines[:end]  # the quoted table only (the retain gate's tables follow it)

    def ci(x: dict[str, float]) -> str:
        return f"{x['mean']:+.1f} [{x['low']:+.1f}, {x['high']:+.1f}]"

    assert len(rows) == 4
    for row in rows:
        name, mean, vs_alone, clean = (c.strip() for c in row.strip().strip("|").split("|"))
        r = syn["rows"][name.split()[0]]
        assert mean == f"{r['mean']:.1f}"
        assert vs_alone == ci(r["mean_minus_best_clean_alone"])
        assert clean == ci(r["clean_minus_robust"])
    section = text.split("### What a perfect detector would buy", 1)[1].split("\n## ", 1)[0]
    prose = " ".join(section.split())
    assert f"({syn['best_clean_alone_mean']:.1f}, the issue's oracle" in prose
    oracle = syn["rows"]["1"]["mean_minus_best_clean_alone"]
    # "only ties": the oracle's interval includes 0
    assert "Even the oracle detector only ties" in prose and oracle["low"] <= 0 <= oracle["high"]
    assert syn["rows"]["0.9"]["mean_minus_best_clean_alone"]["low"] <= 0
    t = result["table"]
    attacks = [
        t[k]["auroc"]["fisher"] for k in result["settings"] if t[k]["type"] in ("fgsm", "pgd")
    ]
    assert f"{100 * min(attacks):.1f} to {100 * max(attacks):.1f}" in prose
    clean = t["clean"]["detect_minus_plain"]
    assert f"loses {-clean['mean']:.1f} points on clean data ({ci(clean)})" in prose
    assert clean["high"] < 0  # "loses": the whole interval is below 0
    unknown = json.loads((RESULT.parent / "avdigits-unknown.json").read_text())["pooled"]
    image = [k for k in unknown if k.startswith("image:")]
    beats = sum(unknown[k]["jac_oracle"] > unknown[k]["alone:audio"] for k in image)
    assert f"{['no', 'one', 'two', 'three', 'four'][beats]} of the four image columns" in prose
