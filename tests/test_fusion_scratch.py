"""The exact solver's reused scratch: same answers, bounded memory, no sharing between threads.

Peak scratch is measured, not assumed: the torch allocator's own event stream (profiler memory
events) gives the live bytes at every allocation and free during a solve, and a child process's
peak RSS gives what the operating system saw.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from jacfusion_fed.fusion import factor_gram, jacobian_fusion, solve_jacobian_weights
from jacfusion_fed.fusion import scratch as scratch_mod
from jacfusion_fed.fusion.fast import fast_apply
from jacfusion_fed.fusion.gram import GramFactor
from jacfusion_fed.fusion.implicit import implicit_apply
from jacfusion_fed.fusion.scratch import (
    SCRATCH_ENV,
    Workspace,
    borrow,
    plan_chunk,
    pooled_bytes,
    release_idle,
    scratch_budget,
)
from jacfusion_fed.fusion.solver import structured_apply, structured_weights

MIB = 1 << 20
TARGET = 64 * MIB
CPU = torch.device("cpu")


def _problem(k: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, GramFactor]:
    g = torch.Generator().manual_seed(seed)
    head = torch.randn(k, k // 2 + 3, generator=g, dtype=torch.float64) * 0.5
    z = torch.randn(n, k, generator=g, dtype=torch.float64) * 3.0
    p = torch.softmax(z + torch.randn(n, k, generator=g, dtype=torch.float64), -1)
    return p, z, factor_gram(head @ head.T)


@contextmanager
def _fresh() -> Iterator[None]:
    """The solver runs its allocating (pre-workspace) path inside this block."""
    saved = os.environ.get(SCRATCH_ENV)
    os.environ[SCRATCH_ENV] = "fresh"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(SCRATCH_ENV, None)
        else:
            os.environ[SCRATCH_ENV] = saved


# --- same answers -----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 10, 37, 100])
def test_reuse_is_bit_for_bit_the_allocating_path_within_a_chunk(k: int) -> None:
    p, z, factor = _problem(k, 40)
    with _fresh():
        before = structured_apply(p, z, factor, 1.0)
    assert torch.equal(structured_apply(p, z, factor, 1.0), before)


@pytest.mark.parametrize(("k", "n"), [(10, 9000), (100, 700), (309, 30)])
def test_reuse_matches_the_allocating_path_over_many_chunks(k: int, n: int) -> None:
    p, z, factor = _problem(k, n)
    with _fresh():
        before = structured_apply(p, z, factor, 1.0)
        w_before = structured_weights(p[:50], factor, 1.0)
    torch.testing.assert_close(structured_apply(p, z, factor, 1.0), before, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        structured_weights(p[:50], factor, 1.0), w_before, rtol=0, atol=1e-13
    )


def test_blocks_of_eigenvectors_give_the_same_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A budget below one sample's (K, K) pair forces blocks of kb < K eigenvectors."""
    k = 120
    p, z, factor = _problem(k, 7)
    whole = structured_apply(p, z, factor, 1.0)
    w_whole = structured_weights(p, factor, 1.0)
    budget = 8 * (2 * k * 25 + 40 * k)
    monkeypatch.setitem(scratch_mod.SCRATCH_BYTES, "cpu", budget)
    assert plan_chunk(k, 32 * k + 8, 2, budget)[1] < k
    release_idle()
    torch.testing.assert_close(structured_apply(p, z, factor, 1.0), whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(structured_weights(p, factor, 1.0), w_whole, rtol=0, atol=1e-13)
    assert pooled_bytes() <= budget
    release_idle()


def test_weights_agree_with_the_dense_form() -> None:
    p, _z, factor = _problem(30, 200)
    gram = factor.eigenvectors @ torch.diag(factor.eigenvalues) @ factor.eigenvectors.T
    exact = solve_jacobian_weights(p, gram, 0.3, solver="exact")
    dense = solve_jacobian_weights(p, gram, 0.3, solver="dense")
    torch.testing.assert_close(exact, dense, rtol=0, atol=1e-10)


# --- gradients still flow ---------------------------------------------------------------------


def test_autograd_through_the_solver_uses_the_allocating_path() -> None:
    """With a graph to record, out=/in-place ops would raise; the allocating path is used."""
    p, z, factor = _problem(6, 4)
    p = p.clone().requires_grad_(True)
    z = z.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda q, y: structured_apply(q, y, factor, 0.7), (p, z))
    assert torch.autograd.gradcheck(lambda q: structured_weights(q, factor, 0.7), (p,))


def test_implicit_gradients_match_autograd_through_the_allocating_path() -> None:
    p, z, factor = _problem(12, 30)
    g_out = torch.randn(30, 12, dtype=torch.float64)
    grads = []
    for fn in (implicit_apply, structured_apply):
        q = p.clone().requires_grad_(True)
        y = z.clone().requires_grad_(True)
        (fn(q, y, factor, 1.5) * g_out).sum().backward()
        grads.append((q.grad, y.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=1e-10)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=0, atol=1e-10)


def test_jacobian_fusion_is_differentiable_end_to_end() -> None:
    _p, z, factor = _problem(8, 16)
    za = z.clone().requires_grad_(True)
    probs = jacobian_fusion([za, z.flip(0)], [factor, None], gamma=0.4, solver="exact")
    probs[:, 0].sum().backward()
    assert za.grad is not None and bool(torch.isfinite(za.grad).all())


# --- bounded memory ---------------------------------------------------------------------------


def _peak_live_bytes(fn: Callable[[], object]) -> tuple[int, int]:
    """(peak live bytes above the start, largest single allocation) of the torch CPU
    allocator while fn runs, from the profiler's memory events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    assert events, "the profiler recorded no allocation"
    live = peak = biggest = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
        biggest = max(biggest, event.nbytes())
    return peak, biggest


@pytest.mark.parametrize(("k", "n"), [(10, 20_000), (100, 3_000), (1000, 12)])
def test_peak_scratch_is_bounded_whatever_n(k: int, n: int) -> None:
    p, z, factor = _problem(k, n)
    output = n * k * 8
    release_idle()  # a cold pool: the workspace's own allocation is counted
    peak, _ = _peak_live_bytes(lambda: structured_apply(p, z, factor, 1.0))
    # The workspace and the O(n K) temporaries outside it share one budget (+ alignment).
    assert peak - output <= scratch_budget(CPU) + MIB < TARGET, peak / MIB
    warm_peak, biggest = _peak_live_bytes(lambda: structured_apply(p, z, factor, 1.0))
    assert biggest <= max(output, scratch_budget(CPU) // 8), biggest / MIB  # nothing (n, K, K)
    assert warm_peak - output < scratch_budget(CPU) // 2, warm_peak / MIB
    # The probe sees the allocating path's per-chunk temporaries (it can fail).
    with _fresh():
        old_peak, _ = _peak_live_bytes(lambda: structured_apply(p, z, factor, 1.0))
    assert old_peak - output > scratch_budget(CPU), old_peak / MIB


def test_fast_solver_scratch_is_bounded_whatever_n() -> None:
    """Blocks of y (a quarter of the budget), chunks of the series form (the budget) and the
    exact fallback's workspace (the budget): at most 2.25 budgets whatever N is."""
    n = 12_000  # more than one block of rows at K = 100
    p, z, factor = _problem(100, n)
    bound = scratch_budget(CPU) * 9 // 4 + MIB
    release_idle()
    peak, _ = _peak_live_bytes(lambda: fast_apply(p, [z], [factor], [1.0], tol=1e-4))
    assert peak - n * 100 * 8 <= bound < TARGET, peak / MIB
    with _fresh():  # the probe sees the allocating path's temporaries
        old_peak, _ = _peak_live_bytes(lambda: fast_apply(p, [z], [factor], [1.0], tol=1e-4))
    assert old_peak - n * 100 * 8 > bound, old_peak / MIB


@pytest.mark.parametrize("k", [10, 100, 1000, 1500])
def test_workspace_never_holds_more_than_the_budget(k: int) -> None:
    """Up to K = 1500, where one sample's (K, K) pair alone exceeds the budget."""
    p, z, factor = _problem(k, 2 if k >= 1000 else 500)
    release_idle()
    structured_apply(p, z, factor, 1.0)
    if k <= 100:  # W_a itself is O(K^3) per sample
        structured_weights(p[:2], factor, 1.0)
    assert 0 < pooled_bytes() <= scratch_budget(CPU)
    release_idle()
    assert pooled_bytes() == 0


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc")
def test_peak_rss_of_a_large_batch_stays_under_64_mib() -> None:
    """What the OS sees: a child solves N = 5,000 at K = 100 (56 chunks) in one call."""
    root = Path(__file__).resolve().parents[1]
    code = (
        "import json; from jacfusion_fed.bench.solver_scratch import measure_once; "
        "print(json.dumps(measure_once(100, 5000, 'exact')))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(SCRATCH_ENV, None)
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads(done.stdout.splitlines()[-1])
    assert row["mode"] == "reuse"
    assert row["peak_scratch_mib"] <= 64.0, row


# --- threads ----------------------------------------------------------------------------------


def test_concurrent_solves_never_share_a_workspace() -> None:
    problems = [_problem(40, 900, seed) for seed in range(6)]
    serial = [structured_apply(p, z, f, 1.0) for p, z, f in problems]
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(problems))

    def work(i: int) -> None:
        try:
            start.wait()
            p, z, f = problems[i]
            for _ in range(3):
                results[i] = structured_apply(p, z, f, 1.0)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(problems))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, expected in enumerate(serial):
        assert torch.equal(results[i], expected)


def test_borrowed_workspaces_are_distinct_while_held() -> None:
    with borrow(CPU) as first, borrow(CPU) as second:
        assert first is not second
    with borrow(CPU) as again:
        assert again in (first, second)  # returned to the pool, reused


def test_workspace_views_do_not_overlap() -> None:
    ws = Workspace(CPU)
    a, b, c = ws.views((3, 5), (7,), (2, 2, 2))
    for t, value in ((a, 1.0), (b, 2.0), (c, 3.0)):
        t.fill_(value)
    assert bool((a == 1).all() and (b == 2).all() and (c == 3).all())
    assert ws.nbytes >= 8 * (15 + 7 + 8)


def test_plan_chunk_counts_every_temporary() -> None:
    budget = 16 * MIB
    for k in (2, 10, 100, 1000, 5000):
        rows, cols = plan_chunk(k, 32 * k + 8, 2, budget)
        assert 8 * rows * (32 * k + 8 + 2 * k * cols) <= budget or (rows, cols) == (1, 1)
        assert rows >= 1 and 1 <= cols <= k


def test_inference_mode_and_normal_calls_alternate() -> None:
    """The server fuses under torch.inference_mode, evaluation outside it: a pooled workspace
    made in one mode must serve the other."""
    p, z, factor = _problem(10, 50)
    expected = structured_apply(p, z, factor, 1.0)
    release_idle()
    with torch.inference_mode():
        inside = structured_apply(p, z, factor, 1.0)
    outside = structured_apply(p, z, factor, 1.0)
    with torch.inference_mode():
        again = structured_apply(p.clone(), z.clone(), factor, 1.0)
    for got in (inside, outside, again):
        assert torch.equal(got, expected)


def test_other_dtypes_get_their_own_workspace() -> None:
    p, z, factor = _problem(10, 50)
    f32 = GramFactor(factor.eigenvalues.float(), factor.eigenvectors.float())
    got = structured_apply(p.float(), z.float(), f32, 1.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), structured_apply(p, z, factor, 1.0), atol=1e-4, rtol=0)


# --- the benchmarks -----------------------------------------------------------------------------


def test_bench_fusion_reports_cpu_time_and_peak_rss() -> None:
    from jacfusion_fed.bench.fusion import bench_fusion, rows_to_json

    entry = rows_to_json(bench_fusion([10], 3000, budget_s=0.05, scipy_budget_s=0.01))[0]
    for solver in ("exact", "fast"):
        m = entry["methods"][solver]
        assert m["user_cpu_s"] > 0 and m["system_cpu_s"] >= 0
        assert 0 <= m["kernel_time_share"] < 1
        if os.access("/proc/self/clear_refs", os.W_OK):
            assert m["peak_rss_delta_mib"] is not None
    assert entry["methods"]["scipy_loop"]["kernel_time_share"] is None


@pytest.mark.e2e
def test_solver_scratch_benchmark_writes_fresh_and_reuse(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "s.json"
    cmd = [sys.executable, str(root / "benchmarks" / "bench_solver_scratch.py")]
    done = subprocess.run(
        [*cmd, "--plan", "10:2000", "--solvers", "exact,fast", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert len(result["environment"]["load_average_before"]) == 3
    assert [(r["num_classes"], r["solver"]) for r in result["rows"]] == [
        (10, "exact"),
        (10, "fast"),
    ]
    for row in result["rows"]:
        assert row["fresh"]["mode"] == "fresh" and row["reuse"]["mode"] == "reuse"
        for run in (row["fresh"], row["reuse"]):
            assert run["samples"] == 2000 and run["samples_per_s"] > 0
            assert run["user_cpu_s"] >= 0 and run["system_cpu_s"] >= 0
    bad = subprocess.run([*cmd, "--plan", "1:5", "--out", str(out)], capture_output=True, text=True)
    assert bad.returncode != 0 and "error: --plan" in bad.stderr


def test_strided_inputs() -> None:
    """Transposed or sliced p and z (no contiguous rows) give the same answer."""
    p, z, factor = _problem(20, 300)
    expected = structured_apply(p, z, factor, 1.0)
    p_t, z_t = p.T.contiguous().T, z.T.contiguous().T
    wide = torch.cat((z, z), dim=1)[:, ::2]  # stride 2 along K
    wide.copy_(z)
    assert not p_t.is_contiguous() and not wide.is_contiguous()
    for got in (structured_apply(p_t, z_t, factor, 1.0), structured_apply(p, wide, factor, 1.0)):
        assert got.is_contiguous()
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)  # GEMM order may differ


def test_fast_solver_matches_its_allocating_baseline_and_stays_differentiable() -> None:
    p, z, factor = _problem(60, 900)
    z2 = z.flip(0) * 0.5
    with _fresh():
        before, rep_before = fast_apply(p, [z, z2], [factor, factor], [1.0, 2.0], tol=1e-6)
    after, rep_after = fast_apply(p, [z, z2], [factor, factor], [1.0, 2.0], tol=1e-6)
    assert rep_after == rep_before and rep_after.fast_samples > 0
    for a, b in zip(after, before, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    zg = z[:20].clone().requires_grad_(True)
    outs, report = fast_apply(p[:20], [zg], [factor], [1.0], tol=1e-6)
    assert report.exact_samples == 20  # the exact solver's implicit path
    outs[0].sum().backward()
    assert zg.grad is not None and bool(torch.isfinite(zg.grad).all())


def test_committed_solver_scratch_results_are_consistent() -> None:
    """docs/results/bench-solver-scratch.json: both modes per (K, solver), the load recorded,
    and its `targets` flags recomputed from its own rows."""
    from jacfusion_fed.bench.solver_scratch import KERNEL_SHARE_TARGET, PEAK_SCRATCH_TARGET_MIB

    path = Path(__file__).resolve().parents[1] / "docs" / "results" / "bench-solver-scratch.json"
    result = json.loads(path.read_text())
    env = result["environment"]
    assert len(env["load_average_before"]) == 3 and len(env["load_average_after"]) == 3
    rows = result["rows"]
    assert {r["num_classes"] for r in rows if r["solver"] == "exact"} >= {10, 100, 1000}
    for row in rows:
        for mode in ("fresh", "reuse"):
            run = row[mode]
            assert run["mode"] == mode and run["samples"] == row["samples"]
            total = run["user_cpu_s"] + run["system_cpu_s"]
            assert abs(run["kernel_time_share"] - run["system_cpu_s"] / total) < 1e-9
    exact_big = [r["reuse"] for r in rows if r["solver"] == "exact" and r["num_classes"] >= 100]
    targets = result["targets"]
    assert targets["kernel_time_share_met"] == all(
        r["kernel_time_share"] < KERNEL_SHARE_TARGET for r in exact_big
    )
    assert targets["peak_scratch_met"] == all(
        r["reuse"]["peak_scratch_mib"] <= PEAK_SCRATCH_TARGET_MIB
        for r in rows
        if r["solver"] == "exact"
    )


def test_capacitance_solve_into_is_bit_for_bit_the_expression_form() -> None:
    from jacfusion_fed.fusion.solver import capacitance_solve, capacitance_solve_into

    g = torch.Generator().manual_seed(3)
    n, k = 17, 9
    a = torch.rand(k, generator=g, dtype=torch.float64) * 50
    s = torch.rand(n, 1, generator=g, dtype=torch.float64)
    m = tuple(torch.rand(n, k, generator=g, dtype=torch.float64) for _ in range(3))
    b = tuple(torch.randn(n, k, generator=g, dtype=torch.float64) for _ in range(2))
    expected = capacitance_solve(a, s, m, b)  # type: ignore[arg-type]
    got = capacitance_solve_into(a, s, m, b, torch.empty(n, 10, k, dtype=torch.float64))  # type: ignore[arg-type]
    assert all(torch.equal(x, y) for x, y in zip(got, expected, strict=True))
