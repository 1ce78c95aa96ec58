"""The README runner (tests/readme_runner.py, ``make test-readme``): its conventions, and that a
documented option that disappears fails the run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import readme_runner as rr

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _doc(tmp_path: Path, text: str, name: str = "DOC.md") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _run(tmp_path: Path, text: str) -> rr.Outcome:
    doc = _doc(tmp_path, text)
    return rr.run_documents([doc], tmp_path, tmp_path / "work", echo=lambda _line: None)


# --- parsing -----------------------------------------------------------------------------------


def test_parse_skip_markers_directives_and_languages(tmp_path: Path) -> None:
    text = """# t

```bash
echo one
```

> Not run by `make test-readme`: it needs a GPU.

```bash
echo two
```

<!-- readme-run: background parallel ready="serving" timeout=60 -->
```sh
echo serving
```

```python
print("not a shell block")
```

<!-- readme-run: figures='acc ([0-9.]+)' quoted=81,55 tolerance=4 status=1 expect=X -->
```shell
echo acc 80
```
"""
    blocks = rr.parse(text, "t.md")
    assert [b.line for b in blocks] == [3, 9, 14, 23]
    assert blocks[0].skip is None and blocks[1].skip == "it needs a GPU."
    bg = blocks[2]
    assert bg.background and bg.parallel and bg.ready == "serving" and bg.timeout == 60
    fig = blocks[3].figures
    assert fig is not None and fig.quoted == (81.0, 55.0) and fig.tolerance == 4
    assert blocks[3].status == 1 and blocks[3].expect == "X"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<!-- readme-run: nonsense -->\n```bash\ntrue\n```\n", "unknown readme-run directive"),
        ("<!-- readme-run: background -->\n```bash\ntrue\n```\n", "needs ready=REGEX"),
        ("<!-- readme-run: timeout=1 -->\n\ntext\n\n```bash\ntrue\n```\n", "right before"),
        ("> Not run by `make test-readme`:\n\n```bash\ntrue\n```\n", "needs its reason"),
        ("<!-- readme-run: figures='(' quoted=1 tolerance=1 -->\n```bash\ntrue\n```\n", "bad"),
    ],
)
def test_parse_refuses_broken_conventions(text: str, message: str) -> None:
    with pytest.raises(rr.ReadmeError, match=message):
        rr.parse(text, "t.md")


# --- running -----------------------------------------------------------------------------------


def test_shell_state_carries_from_block_to_block(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    outcome = _run(
        tmp_path,
        """```bash
X=1; export Y="two words"; hello() { echo hi; }
cd sub
```

```bash
test "$X" = 1 && test "$Y" = "two words" && test "$(hello)" = hi
test "$(basename "$PWD")" = sub && test "$(printenv Y)" = "two words"
```
""",
    )
    assert len(outcome.ran) == 2 and not outcome.skipped


def test_servers_start_wait_and_stop_by_pid(tmp_path: Path) -> None:
    outcome = _run(
        tmp_path,
        """<!-- readme-run: background ready="serving" -->
```bash
echo $$ > server.pid
sleep 0.5; echo "serving"; exec sleep 600
```

```bash
test -s server.pid
```
""",
    )
    assert len(outcome.ran) == 2
    pid = int((tmp_path / "server.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # stopped at the end of the document


def test_a_server_that_dies_fails_the_run(tmp_path: Path) -> None:
    with pytest.raises(rr.ReadmeError, match="exited"):
        _run(
            tmp_path,
            '<!-- readme-run: background ready="never" -->\n```bash\necho bye; exit 3\n```\n\n'
            "```bash\ntrue\n```\n",
        )


def test_stop_directive_stops_the_matching_server(tmp_path: Path) -> None:
    outcome = _run(
        tmp_path,
        """<!-- readme-run: background ready="up" -->
```bash
echo $$ > a.pid; echo up; exec sleep 600 # server a
```

<!-- readme-run: stop="server a" -->
```bash
sleep 0.2; ! kill -0 "$(cat a.pid)" 2>/dev/null
```
""",
    )
    assert len(outcome.ran) == 2


def test_failures_name_the_block(tmp_path: Path) -> None:
    with pytest.raises(rr.ReadmeError, match=r"DOC\.md:5: exit status 1"):
        _run(tmp_path, "# t\n\ntext\n\n```bash\necho before\nfalse\necho after\n```\n")
    outcome = _run(
        tmp_path,
        '<!-- readme-run: status=2 expect="went wrong" -->\n'
        "```bash\necho 'it went wrong' >&2; exit 2\n```\n",
    )
    assert len(outcome.ran) == 1
    with pytest.raises(rr.ReadmeError, match="no 'other' in the output"):
        _run(tmp_path, '<!-- readme-run: expect="other" -->\n```bash\necho this\n```\n')


def test_quoted_figures_are_checked_within_the_tolerance(tmp_path: Path) -> None:
    block = "```bash\necho 'accuracy: 80.0%'; echo 'accuracy: 57.0%'\n```\n"
    fine = "<!-- readme-run: figures='accuracy: ([0-9.]+)%' quoted=81,55 tolerance=2 -->\n"
    outcome = _run(tmp_path, fine + block)
    assert len(outcome.figures) == 2 and all(line.endswith("ok") for line in outcome.figures)
    off = "<!-- readme-run: figures='accuracy: ([0-9.]+)%' quoted=81,60 tolerance=2 -->\n"
    with pytest.raises(rr.ReadmeError, match=r"figure 57 vs quoted 60 \(tolerance 2\): OFF"):
        _run(tmp_path, off + block)
    many = "<!-- readme-run: figures='accuracy: ([0-9.]+)%' quoted=1,2,3 tolerance=9 -->\n"
    with pytest.raises(rr.ReadmeError, match="expected 3 figure"):
        _run(tmp_path, many + block)


# --- the documents themselves ------------------------------------------------------------------


def _blocks() -> list[rr.Block]:
    return [b for doc in rr.documents(ROOT) for b in rr.parse(doc.read_text(), doc.name)]


def test_the_walkthroughs_the_issue_names_run_unmarked() -> None:
    """Online walkthrough, New patients (both formats, records only, submit, predict, forget,
    rekey), robust predict, metrics, replicas, several sites and small bench runs: none of
    their blocks carries a skip marker."""
    blocks = [b for b in rr.parse(README.read_text(), "README.md")]
    must_run = {
        "owner serve --workspace ws-image": "online walkthrough",
        "--train-if-missing": "online walkthrough",
        "--model byom/image.pt": "TorchScript import",
        "--factory byom_nets:audio_net": "safetensors import",
        "--retention": "records-only owner",
        "jacfusion-fed submit": "submit",
        "jacfusion-fed forget": "forget",
        "owner rekey": "rekey",
        "--method robust": "robust predict",
        "/metrics": "metrics",
        "127.0.0.1:50060,127.0.0.2:50060": "replicas",
        "--owner audio=127.0.0.1:50062,127.0.0.1:50063": "several sites",
        "bench serve": "bench serve",
        "bench sweep --ks 10 --owners 2,3": "bench sweep",
        "bench fusion": "bench fusion",
    }
    for needle, what in must_run.items():
        found = [b for b in blocks if needle in b.code]
        assert found, f"no README block for {what} ({needle!r})"
        assert all(b.skip is None for b in found), f"{what} is marked skipped"
    for block in _blocks():
        assert block.skip is None or len(block.skip) > 20, block.where  # a reason, not a word


def test_directive_figures_are_the_results_files() -> None:
    """The figures the runner checks are those the prose quotes from the results files."""
    blocks = rr.parse(README.read_text(), "README.md")
    walk = json.loads((ROOT / "docs/results/walkthrough.json").read_text())["accuracy"]
    (fig,) = [b.figures for b in blocks if b.figures and "--labels" in b.code]
    assert fig is not None
    want = [walk[k] for k in ("image", "audio", "fused_jacobian", "fused_statistical")]
    assert list(fig.quoted) == [round(100 * v) for v in want]
    sim = json.loads((ROOT / "docs/results/simulate-quick.json").read_text())
    rows = sim["evaluation"]["table"]["rows"]
    (demo,) = [b.figures for b in blocks if b.figures and "simulate --quick" in b.code]
    assert demo is not None
    assert list(demo.quoted) == [round(100 * r["acc"]["clean"][0], 1) for r in rows]


def test_the_conventions_page_runs_nothing_and_names_every_directive() -> None:
    page = (ROOT / "docs" / "readme-runner.md").read_text()
    assert rr.parse(page, "readme-runner.md") == []
    for key in rr._KEYS:
        assert re.search(rf"`[^`]*\b{key}\b", page), key
    assert rr.SKIP_PREFIX in page


# --- a documented option that disappears fails the run -----------------------------------------


def _runner(doc: Path, select: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "tests" / "readme_runner.py"), str(doc), "--select", select],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


@pytest.mark.e2e
def test_a_renamed_option_in_a_copy_of_the_readme_fails_the_run(tmp_path: Path) -> None:
    """The README's own certificate step on a copy of the README, as written and with one
    option renamed: the first passes, the second fails naming the block and the option."""
    text = README.read_text()
    command = "jacfusion-fed certs --out certs --owner radiology=image --owner audiology=audio"
    assert command in text
    select = r"^\. \.venv/bin/activate|jacfusion-fed certs --out certs "
    good = _doc(tmp_path, text, "README-copy.md")
    run = _runner(good, select)
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"^2 block\(s\) ran, 0 skipped", run.stdout, re.M), run.stdout
    broken = _doc(tmp_path, text.replace(command, command.replace("--owner", "--owners")), "B.md")
    run = _runner(broken, select)
    assert run.returncode == 1, run.stdout + run.stderr
    assert re.search(r"FAILED +B\.md:\d+", run.stdout), run.stdout
    assert "No such option '--owners'" in run.stderr, run.stderr


def test_deploy_and_simulate_are_equal_as_the_readme_says() -> None:
    """The multi-host walkthrough's claim (same table, same model versions as `simulate
    --quick`) is the measured results file's."""
    data = json.loads((ROOT / "docs/results/deploy-vs-simulate.json").read_text())
    assert data["same_model_versions"] and data["same_table"] and not data["differing_cells"]
    runs = data["runs"]
    assert runs["simulate"]["model_versions"] == runs["deploy_local"]["model_versions"]
    sim = json.loads((ROOT / "docs/results/simulate-quick.json").read_text())
    assert {m: h["version"] for m, h in sim["heads"].items()} == runs["simulate"]["model_versions"]
    text = README.read_text()
    assert "docs/results/deploy-vs-simulate.json" in text and "cell for cell" in text
    walk = json.loads((ROOT / "docs/results/walkthrough.json").read_text())
    # "the owners train the very models simulate --quick trains": the walkthrough's versions
    assert walk["model_versions"]["fused_jacobian"] == runs["simulate"]["model_versions"]
