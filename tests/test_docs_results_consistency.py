"""Every figure quoted in the README's and docs' results tables comes from a committed results
file written by the code: a stale table fails here."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
NUM = re.compile(r"-?\d[\d,]*\.?\d*(?:e[-+]?\d+)?")


def _table_after(text: str, header_start: str) -> list[list[str]]:
    """Body rows (cells stripped) of the first Markdown table whose header starts so."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(header_start):
            rows = []
            for body in lines[i + 2 :]:
                if not body.startswith("|"):
                    break
                rows.append([c.strip() for c in body.strip().strip("|").split("|")])
            return rows
    raise AssertionError(f"no table starting with {header_start!r}")


def _json(name: str) -> Any:
    return json.loads((RESULTS / name).read_text())


def _pct(values: list[float]) -> str:
    return f"{100 * sum(values) / len(values):.1f}"


def _avdigits_row(perturbed: str, group: str, name: str) -> dict[str, list[float]]:
    table = next(t for t in _json("avdigits.json")["tables"] if t["perturbed"] == perturbed)
    return next(r["acc"] for r in table["rows"] if r["group"] == group and r["name"].endswith(name))


AV_COLUMNS = {
    "audio": ["clean", "w0", "w1", "fgsm", "pgd", "fgsm_adaptive", "pgd_adaptive"],
    "image": ["clean", "w0", "w23", "fgsm", "pgd", "fgsm_adaptive", "pgd_adaptive"],
}


def _avdigits_marks(perturbed: str, kind: str = "jacobian") -> dict[str, str]:
    """Column key -> the interval-backed mark of MM (0, 1)'s cell of row ``kind``."""
    from jacfusion_fed.evaluation import EvaluationResult, arrows

    result = EvaluationResult.from_json_dict(_json("avdigits.json"))
    table = next(t for t in result.tables if t.perturbed == perturbed)
    return {c: m for (g, k, c), m in arrows(table).items() if g == "MM (0, 1)" and k == kind}


def test_readme_robustness_lab_table() -> None:
    rows = _table_after((ROOT / "README.md").read_text(), "| perturbed | Clean")
    assert [r[0] for r in rows] == ["audio", "image"]
    for row in rows:
        stat = _avdigits_row(row[0], "MM (0, 1)", "Stat-w/o")
        jac = _avdigits_row(row[0], "MM (0, 1)", "Stat-w/ (ours)")
        marks = _avdigits_marks(row[0])
        want = [f"{_pct(stat[c])} → {_pct(jac[c])} {marks[c]}" for c in AV_COLUMNS[row[0]]]
        assert row[1:] == want


@pytest.mark.parametrize(
    "perturbed, header", [("audio", "| Audio perturbed"), ("image", "| Image perturbed")]
)
def test_results_readme_headline_tables(perturbed: str, header: str) -> None:
    rows = _table_after((RESULTS / "README.md").read_text(), header)
    for row in rows:
        name = row[0]
        if name.endswith(" alone"):
            acc = _avdigits_row(perturbed, "UM", name.removesuffix(" alone"))
        else:
            acc = _avdigits_row(perturbed, "MM (0, 1)", name)
        want = [_pct(acc[c]) for c in AV_COLUMNS[perturbed]]
        if name in ("Stat-w/ (ours)", "Stat-w/ centered logits"):  # the committed marks
            kind = "jacobian" if name == "Stat-w/ (ours)" else "jacobian_centered"
            marks = _avdigits_marks(perturbed, kind)
            want = [f"{v} {marks[c]}" for v, c in zip(want, AV_COLUMNS[perturbed], strict=True)]
        assert row[1:] == want, name
    assert "Stat-w/ centered logits" in [r[0] for r in rows]


@pytest.mark.parametrize("dataset", ["avdigits", "twomoon"])
def test_paper_tables_are_the_rendering_of_their_json(dataset: str) -> None:
    """docs/results/<dataset>-<perturbed>.{md,csv} are written from the committed JSON, and
    every mark in them is backed by a paired bootstrap interval (per-sample data present)."""
    from jacfusion_fed.evaluation import EvaluationResult, arrows, table_to_csv, table_to_markdown
    from jacfusion_fed.evaluation.tables import MARKED_KINDS, intervals

    result = EvaluationResult.from_json_dict(_json(f"{dataset}.json"))
    summary = (RESULTS / f"{dataset}.md").read_text()
    for table in result.tables:
        md = table_to_markdown(table)
        assert (RESULTS / f"{dataset}-{table.perturbed}.md").read_text() == md
        assert (RESULTS / f"{dataset}-{table.perturbed}.csv").read_text() == table_to_csv(table)
        assert md in summary
        marks = arrows(table)
        ours = [
            (r.group, r.kind, c.key)
            for r in table.rows
            if r.kind in MARKED_KINDS
            for c in table.columns
        ]
        assert set(marks) == set(ours), "every marked cell needs its interval"
        assert md.count("(↑)") + md.count("(↓)") + md.count("(=)") == len(ours)
        # issue 19: at least 3 training seeds, each marked cell with its seed spread
        assert result.config["seeds"] >= 3, "Tables 1/2 need at least 3 training seeds"
        ci = intervals(table)
        assert all(v["seeds"] == result.config["seeds"] for v in ci.values())
        assert "Holm" in md and "Arrow on" not in md and "Bold" not in md


def _close(text: str, value: float, rel: float) -> bool:
    got = float(text.replace(",", ""))
    return abs(got - value) <= rel * abs(value) + 1e-300


def test_readme_fusion_throughput_table() -> None:
    rows = _table_after((ROOT / "README.md").read_text(), "| K | method | samples/s")
    bench = {r["num_classes"]: r for r in _json("bench-fusion-cpu.json")["rows"]}
    assert len(rows) == sum(len(r["methods"]) for r in bench.values())
    for k, method, rate, speedup, diff, _ref, samples in rows:
        row = bench[int(k)]
        m = row["methods"][method]
        assert _close(rate, m["samples_per_s"], 0.005), (k, method, rate)
        assert _close(speedup, row["speedup_vs_scipy_loop"][method], 0.005), (k, method)
        if diff:
            assert _close(diff, m["max_abs_diff_vs_reference"], 0.05), (k, method, diff)
        assert int(samples) == m["samples"]


def test_readme_simulate_quick_table() -> None:
    """The `simulate --quick` table equals the committed `simulate-quick.json` (written by
    `jacfusion-fed simulate --quick`, copied from the run's coordinator/results.json)."""
    res = _json("simulate-quick.json")
    rows = _table_after((ROOT / "README.md").read_text(), "| UM / MM | Model | Clean")
    table = res["evaluation"]["table"]
    keys = [c["key"] for c in table["columns"]]
    expected = {}
    for r in table["rows"]:
        expected[r["name"]] = [_pct(r["acc"][k]) for k in keys]
    for row in rows:
        name = row[1]
        cells = [NUM.match(c).group(0) for c in row[2:]]  # type: ignore[union-attr]
        assert cells == expected[name], name
        assert not any("↑" in c or "↓" in c for c in row[2:]), "marks need an interval"


@pytest.mark.parametrize("dataset", ["avdigits", "twomoon", "emergency"])
def test_unknown_tables_match_their_json(dataset: str) -> None:
    """docs/results/<dataset>-unknown.md is the rendering of the committed JSON."""
    from jacfusion_fed.evaluation.unknown_report import unknown_markdown

    path = RESULTS / f"{dataset}-unknown.json"
    if not path.exists():
        pytest.fail(f"{path.name} is not committed")
    md = (RESULTS / f"{dataset}-unknown.md").read_text()
    assert md == unknown_markdown(json.loads(path.read_text()))


def _ci_cell(ci: dict[str, float]) -> str:
    return f"{ci['mean']:+.1f} [{ci['low']:+.1f}, {ci['high']:+.1f}] ({ci['seed_sd']:.1f})"


def test_readme_unknown_summary_table() -> None:
    rows = _table_after((ROOT / "README.md").read_text(), "| dataset | Stat-w/o | Stat-w/ (oracle)")
    assert [r[0] for r in rows] == ["avdigits", "twomoon", "emergency"]
    for row in rows:
        d = _json(f"{row[0]}-unknown.json")
        assert len(d["seeds"]) >= 3, "headline tables need at least 3 training seeds"
        m, c = d["mean"], d["pooled"]["clean"]
        want = [
            f"{m['stat']:.1f}",
            f"{m['jac_oracle']:.1f}",
            f"{m['robust']:.1f}",
            _ci_cell(m["robust-stat"]),
            f"{m['robust_detect']:.1f}",
            _ci_cell(m["robust_detect-robust"]),
            f"{100 * c['coverage']:.1f}",
            f"{c['set_size']:.2f}",
            f"{100 * c['empty_sets']:.1f}",
        ]
        assert row[1:] == want, row[0]


def test_results_readme_unknown_table() -> None:
    """docs/results/README.md's "perturbed modality unknown" summary (all three datasets)."""
    from jacfusion_fed.evaluation.unknown_targets import targets

    rows = _table_after((RESULTS / "README.md").read_text(), "| dataset | M | seeds")
    assert [r[0] for r in rows] == ["avdigits", "twomoon", "emergency"]
    for row in rows:
        d = _json(f"{row[0]}-unknown.json")
        t = targets(d)
        m, c = d["mean"], d["pooled"]["clean"]
        modalities = sum(r.startswith("alone:") for r in d["rows"])
        want = [
            str(modalities),
            str(len(d["seeds"])),
            f"{t['mean']['best_clean_alone']:.1f}",
            f"{m['stat']:.1f}",
            f"{m['jac_oracle']:.1f}",
            f"{m['robust']:.1f}",
            _ci_cell(m["robust-stat"]),
            f"{m['robust_detect']:.1f}",
            _ci_cell(m["robust_detect-robust"]),
            f"{100 * c['coverage']:.1f}",
            f"{c['set_size']:.2f}",
            f"{100 * c['empty_sets']:.1f}",
            f"{len(t['abstention']['columns_met'])} / {len(d['settings'])}",
        ]
        assert row[1:] == want, row[0]
        # the README's reading: ties robust on AV-Digits, just above on TwoMoon, below on
        # the three-modality example
        d_r = m["robust_detect-robust"]
        want_sign = {"avdigits": 0, "twomoon": 1, "emergency": -1}[row[0]]
        sign = 1 if d_r["low"] > 0 else (-1 if d_r["high"] < 0 else 0)
        assert sign == want_sign, row[0]


def test_unknown_reading_quotes_the_files() -> None:
    """The figures and marks of the "Reading" paragraph (docs/results/README.md) and of the
    README's paragraph under the same table are those of the committed files."""
    av, tm, em = (
        _json(f"{d}-unknown.json")["pooled"] for d in ("avdigits", "twomoon", "emergency")
    )
    reading = " ".join((RESULTS / "README.md").read_text().split("**Reading.**", 1)[1].split())
    reading = reading.split("## Run time", 1)[0]
    readme = " ".join((ROOT / "README.md").read_text().split())
    g, w1, tg = av["image:w0"], av["audio:w1"], tm["y:w0"]
    mark = "robust-stat:mark"
    assert (
        f"AV-Digits image Gaussian {g['robust']:.1f} against Stat-w/o {g['stat']:.1f} and the "
        f"oracle Stat-w/ {g['jac_oracle']:.1f}" in reading
    )
    assert (
        f"(w1 = 8) {w1['robust']:.1f} {w1[mark]} against Stat-w/o {w1['stat']:.1f} and the "
        f"oracle {w1['jac_oracle']:.1f}" in reading
    )
    assert (
        f"TwoMoon Gaussian {tg['robust']:.1f} {tg[mark]} against Stat-w/o {tg['stat']:.1f} and "
        f"the oracle {tg['jac_oracle']:.1f}" in reading
    )
    attacks = [k for k in av if k.split(":")[-1] in ("fgsm", "pgd")]
    assert all(av[k][mark] == "=" for k in attacks)  # "ties Stat-w/o under every attack"
    assert tm["y:pgd"][mark] == "↓"  # "significantly below Stat-w/o under TwoMoon's PGD"
    assert em["scan:fgsm"][mark] == em["scan:pgd"][mark] == "↑"
    v = em["vitals:w1"]
    assert v[mark] == "=" and v["robust"] < v["stat"]
    tie = f"({v['robust']:.1f} against {v['stat']:.1f}, a tie after Holm's correction"
    assert tie in reading and tie in readme
    marks = sum(k.endswith(":mark") for c in em.values() for k in c) + 3  # + the Mean column
    assert f"over the table's {marks} marks" in reading

    def ci(x: dict[str, float]) -> str:
        return f"{x['mean']:+.1f} [{x['low']:+.1f}, {x['high']:+.1f}]"

    means = {
        d: _json(f"{d}-unknown.json")["mean"]["robust_detect-robust"]
        for d in ("avdigits", "twomoon", "emergency")
    }
    assert f"ties robust on AV-Digits ({ci(means['avdigits'])})" in reading
    assert f"just above it on TwoMoon ({ci(means['twomoon'])}," in reading
    assert f"three-modality example ({ci(means['emergency'])})" in reading
    assert round(means["twomoon"]["mean"], 1) == 0.1  # "0.1 points above it on TwoMoon"
    assert "is 0.1 points above it on TwoMoon" in readme
    # "significantly below Stat-w/o under the (FGSM and PGD) attacks on the vital signs and
    # the lab panel"; nowhere else, and nowhere on AV-Digits
    below = sorted(k for k, c in em.items() if c["robust_detect-stat:mark"] == "↓")
    assert below == ["labs:fgsm", "labs:pgd", "vitals:fgsm", "vitals:pgd"]
    assert not any(c["robust_detect-stat:mark"] == "↓" for c in av.values())
    assert "under the FGSM and PGD attacks on the vital signs and the lab panel" in reading
    assert "under the attacks on the vital signs and the lab panel" in readme


def test_paper_table_mark_counts_in_results_readme() -> None:
    """The counts of ↑ / = / ↓ quoted for the two AV-Digits tables."""
    from collections import Counter

    from jacfusion_fed.evaluation import EvaluationResult, arrows

    text = " ".join((RESULTS / "README.md").read_text().split())
    for table in EvaluationResult.from_json_dict(_json("avdigits.json")).tables:
        marks = arrows(table)
        n = Counter(m for (_g, k, _c), m in marks.items() if k == "jacobian")
        ties = Counter(g for (g, k, _c), m in marks.items() if k == "jacobian" and m == "=")
        per_pair = ", ".join(
            f"{g.removeprefix('MM ')} {ties[g]}" for g in table.groups() if g != "UM"
        )
        # the "=" parenthetical lists every tie of the table (issue 19: it accounted for 11 of 13)
        assert sum(ties.values()) == n["="]
        quoted = (
            f"{table.perturbed} perturbed: {n['↑']} ↑, {n['=']} =, {n['↓']} ↓ "
            f"(ties per pair: {per_pair})"
        )
        assert quoted in text, quoted


def test_results_readme_committed_run_time() -> None:
    rows = _table_after((RESULTS / "README.md").read_text(), "| Run | Wall | CPU s")
    t = _json("avdigits.json")["timings"]
    assert rows[0][1:3] == [
        f"{t['total_s']:.0f} s",
        f"{t['cpu_main_s']:.0f} + {t['cpu_workers_s']:.0f}",
    ]


def test_readme_command_durations() -> None:
    """The README's wall times of `make demo`, `make test` and `make test-e2e` are those of
    `docs/results/ci-durations.json` (written by `benchmarks/ci_durations.py` from a clean
    clone), each step of which passed."""
    data = _json("ci-durations.json")
    readme = (ROOT / "README.md").read_text()
    for step, result in data["steps"].items():
        assert result["exit_code"] == 0, (step, result)
        quoted = re.search(rf"`{re.escape(step)}`: (\d+) s", readme)
        assert quoted is not None, f"README does not quote {step}'s duration"
        assert int(quoted.group(1)) == round(result["seconds"]), (step, quoted.group(0))


def test_readme_bench_serve_table() -> None:
    """The README's `bench serve` table is `docs/results/bench-serve.json`."""
    data = _json("bench-serve.json")
    rows = {r[0]: r[1:] for r in _table_after((ROOT / "README.md").read_text(), "| | owners")}
    for col, key in enumerate(("cached", "uncached")):
        lat, thr = data[key]["latency"], data[key]["throughput"]
        assert rows["Predict p50 / p99, 1 sample (ms)"][col] == (
            f"{lat['predict']['p50_us'] / 1e3:.2f} / {lat['predict']['p99_us'] / 1e3:.2f}"
        )
        assert rows["echo round trip p50 (ms)"][col] == f"{lat['echo']['p50_us'] / 1e3:.2f}"
        ratio = "p50 / two sequential echo round trips (target ≤ 3x)"
        assert rows[ratio][col] == f"{lat['p50_ratio_vs_two_echo']:.2f}x"
        samples = "samples/s, batches of 1024 (target ≥ 50,000)"
        assert rows[samples][col] == f"{thr['samples_per_s']:,.0f}"


def test_readme_bench_sweep_tables() -> None:
    """The README's `bench sweep` tables are `docs/results/bench-serve-sweep.json`: every
    (K, owners) row, and each target with its measured figure and verdict."""
    data = _json("bench-serve-sweep.json")
    readme = (ROOT / "README.md").read_text()
    rows = _table_after(readme, "| K | owners | Predict p50")
    want = [
        [
            str(r["classes"]),
            str(r["owners"]),
            f"{r['latency']['predict']['p50_us'] / 1e3:.2f}",
            f"{r['latency']['echo']['p50_us'] / 1e3:.2f}",
            f"{r['latency']['p50_ratio_vs_two_echo']:.2f}x",
            f"{r['throughput']['samples_per_s']:,.0f}",
            f"{r['load_avg_before'][0]:.2f}",
        ]
        for r in data["rows"]
        if "error" not in r
    ]
    assert rows == want
    targets = _table_after(readme, "| target (issue 24) | measured")
    assert len(targets) == len(data["targets"]) > 0
    for row, t in zip(targets, data["targets"], strict=True):
        k, n = t["classes"], t["owners"]
        if t["what"] == "p50_ratio_vs_two_echo":
            label = f"K = {k}, {n} owners: p50 ≤ {t['target']:g}x two echo round trips"
            measured = f"{t['measured']:.2f}x"
        elif t["what"] == "samples_per_s":
            label = f"K = {k}, {n} owners: ≥ {t['target']:,.0f} samples/s"
            measured = f"{t['measured']:,.0f}"
        else:
            fewest = min(r["owners"] for r in data["rows"] if "error" not in r)
            label = f"K = {k}: {n} owners ≥ {t['target']:g}x the samples/s of {fewest}"
            measured = f"{t['measured']:.2f}x"
        assert row == [label, measured, "met" if t["met"] else "missed"]
    env = data["environment"]
    load = f"load average {env['load_avg_before'][0]:.2f} before and {env['load_avg_after'][0]:.2f}"
    assert load in " ".join(readme.split())


def _flat(path: Path) -> str:
    return " ".join(path.read_text().split())


def test_centered_logits_comparison_is_the_files() -> None:
    """README and docs/results/README.md quote the centered-vs-paper comparison of the
    committed tables (cluster bootstrap, Holm), and the tables' markdown carries it."""
    from collections import Counter

    from jacfusion_fed.evaluation import EvaluationResult
    from jacfusion_fed.evaluation.tables import compare_rows

    text = _flat(RESULTS / "README.md")
    readme = _flat(ROOT / "README.md")
    total: Counter[str] = Counter()
    for table in EvaluationResult.from_json_dict(_json("avdigits.json")).tables:
        cmp = compare_rows(table, "jacobian_centered", "jacobian")
        assert len(cmp) == 35
        n = Counter(v["mark"] for v in cmp.values())
        total += n
        quoted = f"{table.perturbed} perturbed {n['↑']} ↑, {n['=']} =, {n['↓']} ↓"
        assert quoted in text, quoted
    quoted = f"{total['↑']} ↑ / {total['=']} = / {total['↓']} ↓"
    assert quoted in readme, quoted


def test_refuted_paper_claim_is_stated_with_the_files_figures() -> None:
    """Regular nets + Jacobian fusion (MM (0, 1) Stat-w/) against an adversarially trained
    audio net fused plainly (MM (0, 2) Stat-w/o), audio perturbed."""
    cols = ["w0", "w1", "fgsm", "pgd"]
    ours = " / ".join(_pct(_avdigits_row("audio", "MM (0, 1)", "Stat-w/ (ours)")[c]) for c in cols)
    adv = " / ".join(_pct(_avdigits_row("audio", "MM (0, 2)", "Stat-w/o")[c]) for c in cols)
    text = _flat(RESULTS / "README.md")
    assert f"Stat-w/ (regular nets, Jacobian fusion) scores {ours}" in text
    assert f"against {adv} for MM (0, 2) Stat-w/o" in text
    assert "does not reproduce" in text


def test_w1_share_against_the_paper() -> None:
    from jacfusion_fed.data.avdigits import AVDigitsConfig
    from jacfusion_fed.evaluation.config import PRESETS

    col = next(c for c in PRESETS["avdigits"].tables["audio"].columns if c.key == "w1")
    assert col.corruption is not None
    w1, frames = col.corruption.w1, AVDigitsConfig().n_frames  # type: ignore[attr-defined]
    text = _flat(RESULTS / "README.md")
    assert f"{w1} of {frames} frames is {100 * w1 / frames:.0f} %" in text
    assert f"the paper's 10 of 112 is {100 * 10 / 112:.0f} %" in text


def test_claims_without_a_file_are_gone() -> None:
    """Issue 19, item 7: claims that no file backs, or that the files contradict."""
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    sources = [
        ROOT / "jacfusion_fed" / "evaluation" / "runner.py",
        ROOT / "jacfusion_fed" / "evaluation" / "tables.py",
    ]
    for path in docs + sources:
        text = _flat(path)
        for stale in (
            "0 of the 400",
            "none of the 400",
            "300x300 grid",
            "does nothing useful",
            "beyond the oracle",
            "displayed mean is >= the best",
            "Bold: best displayed mean",
        ):
            assert stale not in text, (path.name, stale)
    for path in [ROOT / "README.md", RESULTS / "README.md"]:
        text = _flat(path)
        assert "confounded" in text and "Holm" in text, path.name
