"""Scratch memory and kernel time of the solvers: reused workspace against fresh allocations.

For each (K, N) and solver, two child processes run one solve each on the workload of
:mod:`jacfusion_fed.bench.fusion` (p = statistical fusion of the two modalities, modality 0's
logits, gamma = 0.5, i.e. the solve one step of Algorithm 1 does): one with
``JACFUSION_SOLVER_SCRATCH=fresh`` (the allocating code path of before the workspace, the
baseline) and one with the default (reuse). A child process per measurement keeps peak RSS
its own. Per run it reports samples/s, user and system CPU seconds (``getrusage``), the kernel's
share of CPU time, minor page faults, and the peak RSS delta of the solve (VmHWM, reset
through /proc/self/clear_refs, minus VmRSS before it); ``peak_scratch_mib`` is that delta minus
the (N, K) float64 output. The exact solver is ``structured_apply``; the fast one
``fast_apply`` (its exact fallback and chunk sizing follow the same switch).

Throughput is noisy on a shared machine: the load average is recorded before and after, and
the CPU-time shares and peak memory are the robust figures.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

MODES = ("fresh", "reuse")
SOLVERS = ("exact", "fast")
KERNEL_SHARE_TARGET = 0.10
PEAK_SCRATCH_TARGET_MIB = 64.0
DEFAULT_PLAN = ((10, 100_000), (100, 100_000), (1000, 5_000))
"""(K, N) pairs measured by default: large N, so chunking has reached its steady state."""


def _trim_heap() -> None:
    """glibc's malloc_trim(0) where there is one (the measuring child only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure_once(num_classes: int, num_samples: int, solver: str, seed: int = 0) -> dict[str, Any]:
    """One solve in this process, measured (what a child runs)."""
    import torch

    from jacfusion_fed.bench.fusion import GAMMA, make_workload, measure_call
    from jacfusion_fed.fusion import factor_gram
    from jacfusion_fed.fusion.fast import fast_apply
    from jacfusion_fed.fusion.scratch import release_idle, reuse_enabled
    from jacfusion_fed.fusion.solver import structured_apply

    z_a, z_b, gram = make_workload(num_classes, num_samples, seed)
    z = torch.tensor(z_a)
    p = torch.softmax(z + torch.tensor(z_b), dim=-1)
    factor = factor_gram(torch.tensor(gram))
    kappa = 1.0 / GAMMA - 1.0

    def solve(rows: int) -> torch.Tensor:
        if solver == "exact":
            return structured_apply(p[:rows], z[:rows], factor, kappa)
        return fast_apply(p[:rows], [z[:rows]], [factor], [kappa], tol=1e-4)[0][0]

    solve(2)  # warm-up (libraries, kernels) on two rows
    release_idle()  # the workspace the solve needs is counted in its peak
    _trim_heap()  # freed heap memory goes back to the OS: RSS before = what is live
    seconds, out, usage = measure_call(solve, num_samples)
    user, system, peak = usage.user, usage.system, usage.peak_rss_delta_mib
    output_mib = out.numel() * out.element_size() / 2**20
    return {
        "mode": "reuse" if reuse_enabled() else "fresh",
        "samples": num_samples,
        "seconds": seconds,
        "samples_per_s": num_samples / seconds,
        "user_cpu_s": user,
        "system_cpu_s": system,
        "kernel_time_share": system / (user + system) if user + system > 0 else None,
        "minor_faults": usage.minor_faults,
        "peak_rss_delta_mib": peak,
        "output_mib": output_mib,
        "peak_scratch_mib": peak - output_mib if peak is not None else None,
        "threads": torch.get_num_threads(),
    }


def _child(num_classes: int, num_samples: int, solver: str, mode: str, threads: int) -> Any:
    env = dict(os.environ)
    env["JACFUSION_SOLVER_SCRATCH"] = mode
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", __name__, str(num_classes), str(num_samples), solver]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measurement child failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_solver_scratch(
    plan: Sequence[tuple[int, int]] = DEFAULT_PLAN,
    solvers: Sequence[str] = ("exact",),
    threads: int = 1,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Fresh vs reuse, per (K, N) and solver, each in its own child process; a JSON-ready dict."""
    import torch

    load_before = os.getloadavg()
    rows = []
    for k, n in plan:
        for solver in solvers:
            runs = {}
            for mode in MODES:
                if progress:
                    progress(f"K={k} N={n} {solver} {mode}")
                runs[mode] = _child(k, n, solver, mode, threads)
            fresh, reuse = runs["fresh"], runs["reuse"]
            cpu = {m: r["user_cpu_s"] + r["system_cpu_s"] for m, r in runs.items()}
            rows.append(
                {
                    "num_classes": k,
                    "samples": n,
                    "solver": solver,
                    "fresh": fresh,
                    "reuse": reuse,
                    "reuse_over_fresh": {
                        "samples_per_s": reuse["samples_per_s"] / fresh["samples_per_s"],
                        "cpu_s": cpu["reuse"] / cpu["fresh"] if cpu["fresh"] > 0 else None,
                    },
                }
            )
    exact_big = [r for r in rows if r["solver"] == "exact" and r["num_classes"] >= 100]
    return {
        "environment": {
            "torch": torch.__version__,
            "threads": threads,
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "load_average_before": list(load_before),
            "load_average_after": list(os.getloadavg()),
            "workload": "bench fusion's (jacfusion_fed.bench.fusion): W_a z_a for p = "
            "softmax(z_a + z_b), gamma = 0.5",
        },
        "targets": {
            "kernel_time_share_below": KERNEL_SHARE_TARGET,
            "peak_scratch_mib_at_most": PEAK_SCRATCH_TARGET_MIB,
            "kernel_time_share_met": bool(exact_big)
            and all(
                r["reuse"]["kernel_time_share"] is not None
                and r["reuse"]["kernel_time_share"] < KERNEL_SHARE_TARGET
                for r in exact_big
            ),
            "peak_scratch_met": all(
                r["reuse"]["peak_scratch_mib"] is not None
                and r["reuse"]["peak_scratch_mib"] <= PEAK_SCRATCH_TARGET_MIB
                for r in rows
                if r["solver"] == "exact"
            ),
        },
        "rows": rows,
    }


if __name__ == "__main__":
    k_arg, n_arg, solver_arg = sys.argv[1:4]
    print(json.dumps(measure_once(int(k_arg), int(n_arg), solver_arg)))
