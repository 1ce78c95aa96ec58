"""The perturbed-modality-unknown table: bootstrap marks, provenance, detector-aware attack."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from jacfusion_fed.evaluation.unknown_report import paired_bootstrap, run_unknown, write_unknown
from jacfusion_fed.fusion import fit_calibration, robust_fusion
from jacfusion_fed.robustness.detector_aware import DetectorAwarePGD


def test_paired_bootstrap_tie_and_difference() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, 400).astype(float)
    mean, lo, hi = paired_bootstrap(a, a.copy())
    assert mean == lo == hi == 0.0  # identical rows: a tie, never a mark
    b = a.copy()
    b[:40] = 1 - b[:40]  # flip 10 %: some up, some down
    mean, lo, hi = paired_bootstrap(a, b)
    assert lo <= mean <= hi
    better = np.ones(400)
    worse = np.r_[np.ones(300), np.zeros(100)]
    mean, lo, hi = paired_bootstrap(better, worse)
    assert mean == pytest.approx(25.0) and lo > 0


@pytest.mark.slow
def test_unknown_table_twomoon_quick(tmp_path: Path) -> None:
    res = run_unknown("twomoon", [0], quick=True, repeats=1)
    paths = write_unknown(res, tmp_path)
    data = json.loads(paths[1].read_text())
    env = data["environment"]
    assert env["packages"]["torch"] == torch.__version__
    assert len(env["data_sha256"]) == 64 and "espeak_ng_version" in env
    assert data["settings"][0] == "clean" and len(data["settings"]) == 5
    md = paths[0].read_text()
    for key in data["settings"] + ["mean"]:
        cell = data["mean"] if key == "mean" else data["pooled"][key]
        ci = cell["robust-stat"]
        assert ci["low"] <= ci["mean"] <= ci["high"] and ci["seeds"] == 1
        mark = cell["robust-stat:mark"]  # Holm-corrected over the table
        assert mark in ("↑", "↓", "=")
        if mark != "=":  # a Holm mark implies the unadjusted interval excludes 0
            assert ci["low"] > 0 or ci["high"] < 0
        assert f"{cell['robust']:.1f} ±{cell['robust:seed_sd']:.1f} {mark}" in md
        assert 0.0 <= cell["coverage"] <= 1.0 and cell["set_size"] >= 1.0
        assert cell["empty_sets"] == 0.0  # the fused RAPS set always holds the arg-max
    params = data["per_seed"]["0"]["params"]
    keys = {"floor", "trust_level", "confidence", "jacobian_level", "gamma"}
    assert set(params) == set(data["settings"])
    assert all(set(p["robust"]) == keys for p in params.values())


def test_detector_aware_attack_keeps_reliability_and_raises_loss() -> None:
    torch.manual_seed(0)
    k, n = 3, 60
    net = torch.nn.Sequential(torch.nn.Linear(4, k))
    x_val, y_val = torch.rand(200, 4), torch.arange(200) % k
    z_val = net(x_val).detach()
    other_val = torch.nn.functional.one_hot(y_val, k).double() * 3
    cals = [fit_calibration(other_val + torch.randn(200, k), y_val), fit_calibration(z_val, y_val)]
    x, y = torch.rand(n, 4), torch.arange(n) % k
    other = torch.nn.functional.one_hot(y, k).double() * 3
    clean_logits = [other, net(x).detach().double()]

    def fusion(zs):  # type: ignore[no-untyped-def]
        out = robust_fusion(zs, cals)
        return out.p, out.reliability

    attack = DetectorAwarePGD(net, clean_logits, 1, fusion, eps=0.2, alpha=0.02, steps=10, lam=1.0)
    x_adv = attack(x, y, torch.Generator().manual_seed(1))
    assert float((x_adv - x).abs().max()) <= 0.2 + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    before = attack.objective(x, y).mean().detach()
    after = attack.objective(x_adv, y).mean().detach()
    assert float(after) > float(before)


def test_provenance_records_versions_and_a_data_hash_that_tracks_the_data() -> None:
    from jacfusion_fed.data import load_builtin
    from jacfusion_fed.evaluation.provenance import provenance

    splits = {s: load_builtin("twomoon", s) for s in ("train", "val", "test")}
    env = provenance(splits)
    assert env["packages"]["torch"] == torch.__version__ and env["packages"]["numpy"]
    assert "espeak_ng_version" in env  # None for TwoMoon, the version for AV-Digits
    again = provenance({s: load_builtin("twomoon", s) for s in ("train", "val", "test")})
    assert again["data_sha256"] == env["data_sha256"]
    splits["test"].modalities["y"][0, 0] += 1e-3
    assert provenance(splits)["data_sha256"] != env["data_sha256"]


def test_emergency_dataset_is_the_three_modality_examples_data(tmp_path: Path) -> None:
    """make_emergency draws exactly the arrays examples/three_modalities.py writes."""
    import importlib.util

    from jacfusion_fed.evaluation.emergency import EMERGENCY, EMERGENCY_SPLITS, make_emergency

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(
        "three_modalities", root / "examples" / "three_modalities.py"
    )
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    files = example.write_owner_files(tmp_path)
    for split in EMERGENCY_SPLITS:
        ds = make_emergency(split)
        assert ds.num_classes == 4 and len(ds.modalities) == 3
        for modality, path in files.items():
            with np.load(path) as npz:
                np.testing.assert_array_equal(ds.modalities[modality], npz[f"x_{split}"])
                np.testing.assert_array_equal(ds.labels, npz[f"y_{split}"])
                assert ds.sample_ids == list(npz[f"ids_{split}"])
    assert list(EMERGENCY.tables) == ["vitals", "labs", "scan"]
    with pytest.raises(ValueError, match="unknown split"):
        make_emergency("dev")


def test_unknown_table_refuses_an_unknown_dataset() -> None:
    from jacfusion_fed.evaluation.unknown import SeedRun

    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        SeedRun("mnist", 0)


def _cell(
    label: str, a: float, b: float, robust: float, stat: float, ci: list[float], **extra: float
) -> dict[str, object]:
    base = {"coverage": 0.9, "set_size": 1.1, "answered": 0.9, "acc_answered": 0.95}
    return {
        "label": label,
        "alone:a": a,
        "alone:b": b,
        "robust": robust,
        "stat": stat,
        "jac_oracle": stat + 1,
        "robust-stat": ci,
        **base,
        **extra,
    }


def test_targets_met_and_missed() -> None:
    from jacfusion_fed.evaluation.unknown_targets import best_clean_alone, targets

    result = {
        "alpha": 0.1,
        "settings": ["clean", "a:noise", "b:noise"],
        "rows": ["alone:a", "alone:b", "stat", "jac_oracle", "robust"],
        "pooled": {
            "clean": _cell("Clean", 80, 70, 90.2, 90.0, [0.2, -0.1, 0.5]),
            "a:noise": _cell("A noise", 20, 70, 75, 72, [3.0, 1.0, 5.0]),
            # point estimate -1.5 but the interval reaches -0.5: not "more than 1 below"
            "b:noise": _cell("B noise", 80, 30, 78.5, 80, [-1.5, -2.5, -0.5], answered=0.7),
        },
        "mean": {"robust": 81.2, "jac_oracle": 81.7, "stat": 80.7},
    }
    assert best_clean_alone(result, "clean") == 80
    assert best_clean_alone(result, "a:noise") == 70  # a is perturbed: only b counts
    t = targets(result)
    assert t["mean"]["best_clean_alone"] == (80 + 70 + 80) / 3
    assert not t["mean"]["met"]  # 81.2 < max(76.7, 81.7)
    assert t["clean"]["met"] and t["no_setting_1_below"]["met"]
    assert list(t["no_setting_1_below"]["point_below"]) == ["b:noise"]
    assert t["clean_coverage"]["met"]
    assert t["abstention"]["columns_met"] == ["clean", "a:noise"] and not t["abstention"]["met"]
    result["pooled"]["b:noise"]["robust-stat"] = [-3.0, -4.0, -2.0]  # type: ignore[index]
    result["pooled"]["clean"]["coverage"] = 0.85  # type: ignore[index]
    t = targets(result)
    assert not t["no_setting_1_below"]["met"] and not t["clean_coverage"]["met"]


def test_seed_run_pins_torch_threads_while_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 19: the nets are trained with config.threads torch threads whatever the caller's
    setting (2 threads instead of 1 changed a trained net's accuracy by 2 points)."""
    import torch

    from jacfusion_fed.evaluation import nets as nets_mod
    from jacfusion_fed.evaluation.unknown import SeedRun

    seen: list[int] = []
    real_get = nets_mod.NetZoo.get

    def spy(self: object, *args: object, **kwargs: object) -> object:
        seen.append(torch.get_num_threads())
        return real_get(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(nets_mod.NetZoo, "get", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        SeedRun("twomoon", 0, quick=True)
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2  # restored afterwards
    finally:
        torch.set_num_threads(before)


def test_hyperparameters_never_see_the_columns_perturbation_type() -> None:
    """Issue 19, item 5: per test column, robust's hyperparameters are chosen on the
    validation settings of the other perturbation types (any modality)."""
    from jacfusion_fed.evaluation.config import PRESETS
    from jacfusion_fed.evaluation.unknown import perturbation_type, settings_for

    settings = settings_for(PRESETS["avdigits"])
    types = {s.key: perturbation_type(s) for s in settings}
    assert types["clean"] is None
    assert types["audio:w0"] == types["image:w0"] == "GaussianNoise"
    assert types["audio:fgsm"] == types["image:fgsm"] == "fgsm"
    root = Path(__file__).resolve().parents[1]
    d = json.loads((root / "docs" / "results" / "twomoon-unknown.json").read_text())
    for seed in d["seeds"]:
        params = d["per_seed"][str(seed)]["params"]
        assert set(params) == set(d["settings"])  # one choice per test column


def test_robust_detect_row_is_the_per_sample_worst_of_its_attacks() -> None:
    """Issue 20's row: hyperparameters selected like robust's, and in an attacked column a
    sample counts as right only if it survives the setting-1 attack, the end-to-end attack
    through robust + detectors and the detector-aware attack on them."""
    from jacfusion_fed.evaluation.signals import SignalAwarePGD
    from jacfusion_fed.evaluation.unknown import SeedRun, perturbation_type
    from jacfusion_fed.robustness import AttackSpec

    run = SeedRun("twomoon", 0, quick=True, repeats=1)
    run.select()
    s = next(s for s in run.settings if perturbation_type(s) == "pgd")
    run.params = run.params_by_setting[s.key]
    keys = {"floor", "trust_level", "retain", "jacobian_level", "gamma", "combine"}
    assert set(run.params["robust_detect"]) == keys
    xs, zs = run.inputs(s, "test", 0)
    right = run._detect_correct(s, xs, zs, 0)
    log = run.detect_attack_log[s.key]
    assert set(log) == {"setting1", "e2e", "detector_aware"}
    assert float(right.mean()) <= min(v[0] for v in log.values()) + 1e-12
    clean = run._detect_correct(run.settings[0], run.x["test"], run.clean["test"], 0)
    assert float(clean.mean()) > float(right.mean())
    # the end-to-end attack (lam = 0) raises the cross-entropy of robust + detectors
    m = run.position(s)
    assert isinstance(s.spec, AttackSpec)
    attack = SignalAwarePGD(
        run.signals(), run.clean["test"], m, lam=0.0, spec=s.spec, hp=run.params["robust_detect"]
    )
    x, y = run.x["test"][m], run.y["test"]
    x_adv = attack(x, y, torch.Generator().manual_seed(0))
    assert float((x_adv - x).abs().max()) <= s.spec.w4 + 1e-6
    before, after = attack.objective(x, y).mean(), attack.objective(x_adv, y).mean()
    assert float(after.detach()) > float(before.detach())


def test_retain_grid_is_what_robust_selects_from() -> None:
    """The tables select retain from RETAINS (0 only: robust drops a distrusted modality);
    a wider grid (benchmarks/retain_selection.py) is searched by both robust rows."""
    from jacfusion_fed.evaluation.unknown import RETAINS, SeedRun

    assert RETAINS == (0.0,)
    run = SeedRun("twomoon", 0, quick=True, repeats=1)
    chosen = run.select()
    assert {p[r]["retain"] for p in chosen.values() for r in ("robust", "robust_detect")} == {0.0}
    wide = SeedRun("twomoon", 0, quick=True, repeats=1, retains=(0.0, 0.9))
    picked = {p[r]["retain"] for p in wide.select().values() for r in ("robust", "robust_detect")}
    assert picked <= {0.0, 0.9}
    # the option reaches the fusion: a distrusted modality's evidence is not dropped
    zs = wide.logits(next(s for s in wide.settings if s.spec is not None), "test", 0)
    p0 = wide.robust(zs, aps=False, retain=0.0, floor=0.0, trust_level=0.1).p
    p9 = wide.robust(zs, aps=False, retain=0.9, floor=0.0, trust_level=0.1).p
    assert not torch.allclose(p0, p9)


def test_robust_candidates_tie_the_jacobian_level_to_the_trust_level() -> None:
    """TIED_JACOBIAN_GRID's level is each candidate's own trust level; the tables' grid keeps
    its levels; the Jacobian pairs are the outer loop (the order ties are broken in)."""
    from jacfusion_fed.evaluation.unknown import (
        JACOBIAN_GRID,
        ROBUST_GRID,
        TIED_JACOBIAN_GRID,
        robust_candidates,
    )

    gate = {**ROBUST_GRID, "retain": (0.0,)}
    combos = int(np.prod([len(v) for v in gate.values()]))
    tied = robust_candidates(gate, TIED_JACOBIAN_GRID)
    assert len(tied) == len(TIED_JACOBIAN_GRID) * combos
    for c in tied:
        if c["gamma"] < 1.0:
            assert c["jacobian_level"] == c["trust_level"], c
        else:
            assert c["jacobian_level"] == 0.0, c
    own = robust_candidates(gate, JACOBIAN_GRID)
    assert len(own) == len(JACOBIAN_GRID) * combos
    pairs = [(c["jacobian_level"], c["gamma"]) for c in own[::combos]]
    assert pairs == list(JACOBIAN_GRID)
    assert all(c["jacobian_level"] in (0.0, 0.1, 0.3, 0.6) for c in own)


def test_seed_run_trains_the_owners_nets_with_the_method_it_is_given() -> None:
    """``SeedRun(method=)`` (benchmarks/robust_owners.py): the owners' nets come from that
    training method; an unknown method is refused by name."""
    from jacfusion_fed.evaluation.unknown import SeedRun

    with pytest.raises(ValueError, match="unknown training method 'nope'"):
        SeedRun("twomoon", 0, quick=True, method="nope")
    run = SeedRun("twomoon", 0, quick=True, repeats=1, method="mixup")
    assert {info["recipe"]["method"] for info in run.models.values()} == {"mixup"}
    assert all(name.endswith("-mixT") for name in run.models), sorted(run.models)
