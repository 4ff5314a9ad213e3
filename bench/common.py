"""Timing helpers shared by the GPU benchmarks: median of event-timed repeats after warm-up."""

from __future__ import annotations

import json
import platform
import statistics
import time
from typing import Callable

import torch


def environment() -> dict:
    import deepspeed
    import diffusers

    env = {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "diffusers": diffusers.__version__,
           "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()})"
    return env


def time_ms(fn: Callable[[], object], warmup: int = 3, iters: int = 10) -> dict:
    """Median / min / max milliseconds of ``fn`` (device events on GPU, wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    cuda = torch.cuda.is_available()
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "iters": iters}


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def measure_matmul_peak(n: int = 8192) -> float:
    """bf16 matmul TFLOP/s on random data: the ceiling achieved-FLOP figures are compared with."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = time_ms(lambda: a @ b, warmup=3, iters=20)["median_ms"]
    return 2 * n**3 / (t * 1e-3) / 1e12


def profiled(fn: Callable[[], object]):
    """One call of ``fn`` under the torch profiler (CPU and CUDA activity); returns the profile."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return prof


def kernel_stats(fn: Callable[[], object], top: int = 12, skip_prefix: str = "care/", prof=None) -> dict:
    """One profiled call of ``fn`` (or the given profile): device kernel count, busy time, the most
    expensive kernels, and the host ops that took the most self time. GPU spans of
    ``record_function`` ranges are not kernels."""
    prof = prof if prof is not None else profiled(fn)
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"
               and not getattr(e, "is_user_annotation", False) and not e.name.startswith(skip_prefix)]
    by_name: dict[str, list[float]] = {}
    for k in kernels:
        by_name.setdefault(k.name[:80], []).append(k.device_time / 1e3)
    ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
    cpu = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    return {
        "host_top": [{"op": e.key[:60], "count": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2)}
                     for e in cpu],
        "kernels": len(kernels),
        "kernel_busy_ms": sum(k.device_time for k in kernels) / 1e3,
        "top": [{"kernel": n, "count": len(v), "ms": round(sum(v), 3)} for n, v in ranked],
    }
