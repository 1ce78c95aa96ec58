"""Throughput of Jacobian fusion against a per-sample scipy Sylvester loop, in one process.

Every figure is measured in the same run and reported as samples/s and as a ratio against the
scipy baseline, never as a pass/fail timing. Accuracy columns are max |p - p_ref| over the
samples both methods computed.

Workload (stated in the output): two modalities, modality 0 regularized with gamma = 0.5, one
step of Algorithm 1, uniform prior; a full-rank Gram matrix (H = K + 16, so scipy can invert it)
of a random head; logits of a confident classifier, z = N(0, 1) + 7 * onehot(label) per
modality.
"""

from __future__ import annotations

import math
import platform
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import numpy as np
import scipy.linalg
import scipy.special
import torch

from jacfusion_fed.fusion import factor_gram, jacobian_fusion
from jacfusion_fed.fusion.jacobian import Solver

GAMMA = 0.5
LOGIT_NOISE = 1.0
LOGIT_BOOST = 7.0


@dataclass
class MethodResult:
    samples: int
    seconds: float
    samples_per_s: float
    max_abs_diff_vs_reference: float | None = None
    reference: str | None = None
    user_cpu_s: float | None = None
    """CPU seconds in user mode (all threads) of the timed run; None for the scipy loop."""
    system_cpu_s: float | None = None
    """CPU seconds in the kernel (page faults, mostly) of the timed run."""
    kernel_time_share: float | None = None
    """system / (user + system) of the timed run."""
    peak_rss_delta_mib: float | None = None
    """Peak RSS during the timed run minus RSS before it (MiB): the solver's scratch plus the
    batch's own (N, K) float64 arrays (Linux; None where VmHWM cannot be reset)."""


@dataclass
class FusionBenchRow:
    num_classes: int
    device: str
    dtype: str
    methods: dict[str, MethodResult] = field(default_factory=dict)

    def speedup(self, method: str, baseline: str = "scipy_loop") -> float | None:
        if method not in self.methods or baseline not in self.methods:
            return None
        return self.methods[method].samples_per_s / self.methods[baseline].samples_per_s


def make_workload(
    num_classes: int, num_samples: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z_a, z_b, gram) for the stated workload, float64."""
    rng = np.random.default_rng(seed)
    head = rng.normal(size=(num_classes, num_classes + 16)) * 0.3
    labels = rng.integers(0, num_classes, num_samples)
    logits = []
    for _ in range(2):
        z = rng.normal(size=(num_samples, num_classes)) * LOGIT_NOISE
        z[np.arange(num_samples), labels] += LOGIT_BOOST
        logits.append(z)
    return logits[0], logits[1], head @ head.T


def scipy_loop(z_a: np.ndarray, z_b: np.ndarray, gram: np.ndarray, gamma: float) -> np.ndarray:
    """The baseline: per sample, (S3) as A W + W B = B with scipy.linalg.solve_sylvester."""
    kappa = 1.0 / gamma - 1.0
    b = np.linalg.inv(gram)
    out = np.empty_like(z_a)
    for n in range(z_a.shape[0]):
        p = scipy.special.softmax(z_a[n] + z_b[n])
        jac = np.outer(p, p) - np.diag(p)
        w_a = scipy.linalg.solve_sylvester(kappa * jac @ jac, b, b)
        out[n] = scipy.special.softmax(w_a @ z_a[n] + z_b[n])
    return out


@dataclass
class CallUsage:
    """CPU seconds (user, system: all threads of this process), minor page faults, and peak
    RSS minus RSS before the call (MiB; None where VmHWM cannot be reset)."""

    user: float
    system: float
    minor_faults: int
    peak_rss_delta_mib: float | None


def _rss_mib(field_name: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def measure_call(fn: Callable[[int], Any], n: int) -> tuple[float, Any, CallUsage]:
    """fn(n) with its wall seconds, CPU time (user, system) and peak RSS delta."""
    before = _rss_mib("VmRSS")
    try:  # reset VmHWM to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        hwm_reset = True
    except OSError:
        hwm_reset = False
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    result = fn(n)
    seconds = time.perf_counter() - start
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    peak = _rss_mib("VmHWM") if hwm_reset else None
    return (
        seconds,
        result,
        CallUsage(
            usage1.ru_utime - usage0.ru_utime,
            usage1.ru_stime - usage0.ru_stime,
            usage1.ru_minflt - usage0.ru_minflt,
            peak - before if peak is not None and before is not None else None,
        ),
    )


def _with_usage(result: MethodResult, usage: CallUsage) -> MethodResult:
    result.user_cpu_s = usage.user
    result.system_cpu_s = usage.system
    total = usage.user + usage.system
    result.kernel_time_share = usage.system / total if total > 0 else None
    result.peak_rss_delta_mib = usage.peak_rss_delta_mib
    return result


def _timed(
    fn: Callable[[int], Any], n_max: int, budget_s: float, min_n: int = 1
) -> tuple[int, float, Any]:
    """Run fn(n) on a growing prefix until it takes >= budget_s or n reaches n_max."""
    n, seconds, result, _usage = _timed_usage(fn, n_max, budget_s, min_n)
    return n, seconds, result


def _timed_usage(
    fn: Callable[[int], Any], n_max: int, budget_s: float, min_n: int = 1
) -> tuple[int, float, Any, CallUsage]:
    """:func:`_timed`, with the CPU time and peak RSS delta of the last run."""
    n = max(1, min(min_n, n_max))
    while True:
        seconds, result, usage = measure_call(fn, n)
        if seconds >= budget_s or n >= n_max:
            return n, seconds, result, usage
        grow = budget_s / max(seconds, 1e-6) * 1.2
        n = min(n_max, max(n * 2, int(n * grow)))


def bench_fusion(
    ks: Sequence[int] = (10, 100, 309, 1000),
    num_samples: int = 10_000,
    *,
    solvers: Sequence[str] = ("exact", "fast"),
    device: str = "cpu",
    dtype: torch.dtype = torch.float64,
    tol: float = 1e-4,
    budget_s: float = 2.0,
    scipy_budget_s: float = 3.0,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[FusionBenchRow]:
    """Measure samples/s of ``jacobian_fusion`` per solver and of the scipy loop, per K."""
    rows = []
    for k in ks:
        if progress:
            progress(f"K={k}")
        rows.append(
            _bench_one_k(
                k,
                num_samples,
                solvers,
                torch.device(device),
                dtype,
                tol,
                budget_s,
                scipy_budget_s,
                seed,
            )
        )
    return rows


def _bench_one_k(
    k: int,
    num_samples: int,
    solvers: Sequence[str],
    dev: torch.device,
    dtype: torch.dtype,
    tol: float,
    budget_s: float,
    scipy_budget_s: float,
    seed: int,
) -> FusionBenchRow:
    z_a, z_b, gram = make_workload(k, num_samples, seed)
    row = FusionBenchRow(k, str(dev), str(dtype).replace("torch.", ""))
    n_sc, t_sc, p_sc = _timed(
        lambda n: scipy_loop(z_a[:n], z_b[:n], gram, GAMMA), num_samples, scipy_budget_s
    )
    row.methods["scipy_loop"] = MethodResult(n_sc, t_sc, n_sc / t_sc)
    za_t = torch.tensor(z_a, dtype=dtype, device=dev)
    zb_t = torch.tensor(z_b, dtype=dtype, device=dev)
    factor = factor_gram(torch.tensor(gram, device=dev))
    exact_probs: torch.Tensor | None = None
    for solver in solvers:

        def run(n: int, solver: str = solver) -> torch.Tensor:
            how = cast(Solver, solver)  # checked by jacobian_fusion (FusionInputError)
            out = jacobian_fusion(
                [za_t[:n], zb_t[:n]], [factor, None], gamma=GAMMA, solver=how, tol=tol
            )
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            return out

        run(min(64, num_samples))  # warm-up (allocator, kernels)
        n, t, probs, usage = _timed_usage(run, num_samples, budget_s, min_n=256)
        if n < num_samples and t < budget_s * 4:  # repeat once at full speed, keep the best
            t_again, probs, usage_again = measure_call(run, n)
            if t_again < t:
                t, usage = t_again, usage_again
        result = _with_usage(MethodResult(n, t, n / t), usage)
        overlap = min(n, n_sc)
        result.max_abs_diff_vs_reference = float(
            np.abs(probs[:overlap].double().cpu().numpy() - p_sc[:overlap]).max()
        )
        result.reference = "scipy_loop"
        if solver == "exact":
            exact_probs = probs
        elif exact_probs is not None:
            overlap = min(n, exact_probs.shape[0])
            result.max_abs_diff_vs_reference = float(
                (probs[:overlap].double() - exact_probs[:overlap].double()).abs().max()
            )
            result.reference = "exact"
        row.methods[solver] = result
    return row


def bench_forward_vs_fusion(
    num_samples: int = 4096, *, device: str = "cpu", budget_s: float = 1.0
) -> dict[str, float]:
    """Fusion cost next to the two AV-Digits unimodal forward passes on the same batch.

    The nets are the built-in AV-Digits architectures (image_cnn on 1x8x8, spectrogram_cnn on
    1x32x32); their cost does not depend on the weights, so they are freshly initialised.
    """
    from jacfusion_fed.models import build_model, default_arch

    dev = torch.device(device)
    torch.manual_seed(0)
    image = build_model(default_arch("avdigits", "image"), (1, 8, 8), 10).to(dev).eval()
    audio = build_model(default_arch("avdigits", "audio"), (1, 32, 32), 10).to(dev).eval()
    x_img = torch.rand(num_samples, 1, 8, 8, device=dev)
    x_aud = torch.rand(num_samples, 1, 32, 32, device=dev)

    def forward(_: int) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            out = image(x_img), audio(x_aud)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return out

    z_img, z_aud = forward(0)
    gram = image.head.weight.detach().double() @ image.head.weight.detach().double().T
    factor = factor_gram(gram)

    def fuse(_: int) -> torch.Tensor:
        out = jacobian_fusion([z_img, z_aud], [factor, None], gamma=GAMMA)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return out

    fuse(0)
    times = {}
    for name, fn in (("forward", forward), ("fusion", fuse)):
        best = math.inf
        deadline = time.perf_counter() + budget_s
        while time.perf_counter() < deadline or best == math.inf:
            start = time.perf_counter()
            fn(0)
            best = min(best, time.perf_counter() - start)
        times[name] = best
    return {
        "samples": float(num_samples),
        "forward_s": times["forward"],
        "fusion_s": times["fusion"],
        "fusion_over_forward": times["fusion"] / times["forward"],
    }


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "workload": {
            "modalities": 2,
            "regularized": [0],
            "gamma": GAMMA,
            "iterations": 1,
            "logits": f"N(0, {LOGIT_NOISE}^2) + {LOGIT_BOOST} * onehot(label)",
            "gram": "W W^T, W ~ N(0, 0.3^2) of shape (K, K + 16)",
        },
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def rows_to_json(rows: list[FusionBenchRow]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        entry = asdict(row)
        entry["speedup_vs_scipy_loop"] = {m: row.speedup(m) for m in row.methods}
        out.append(entry)
    return out
