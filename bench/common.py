"""Timing helpers shared by the GPU benchmarks: median of event-timed repeats after warm-up."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Optional

import torch


def environment() -> dict:
    import deepspeed
    import diffusers

    env = {
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()})"
    return env


def recipe_model(config: str, overrides: list[str], device: Optional[torch.device] = None) -> tuple:
    """A recipe (``config`` + ``overrides``) -> (its ``TrainConfig``, its model in training mode), built
    after seeding with ``run.seed`` as the trainer does, on ``device`` (default: where it was built)."""
    # the model's and the trainer's code load only where a bench builds a model: bench/ablations.py uses this
    # module to drive its runs as subprocesses
    from moe.model import build_model
    from train.config import as_train_config, load_config

    cfg = as_train_config(load_config(config, overrides))
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model).train()
    return cfg, model.to(device) if device is not None else model


def heldout_batch(cfg, data: str, size: int, device: Optional[torch.device] = None):
    """The first ``size`` held-out samples of ``data`` (shards) as one batch, loaded as ``cfg.data`` says."""
    from train.eval import iterate_heldout  # loaded where used (see recipe_model)

    batch = next(iter(iterate_heldout(cfg.data, data, size, size)))
    return batch.to(device) if device is not None else batch


def run_logged(cmd: list[str], log: str, cwd: str, env: Optional[dict] = None) -> None:
    """Run ``cmd`` in ``cwd`` with its output in ``log``; raise RuntimeError with the log's tail if it fails."""
    os.makedirs(os.path.dirname(log) or ".", exist_ok=True)
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} failed ({rc}); log {log}:\n{tail}")


def time_ms(fn: Callable[[], object], warmup: int = 3, iters: int = 10) -> dict:
    """Median / min / max milliseconds of ``fn`` (device events on GPU, wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    return _stats([_time_once(fn) for _ in range(iters)])


def time_interleaved(cases: dict[str, Callable[[], object]], iters: int = 10) -> dict[str, dict]:
    """``time_ms`` of several warmed-up cases, one call of each per round, the starting case rotating.

    Timed one after another, cases meet different clock speeds: an H100 running large GEMMs
    changes its clock within seconds (in one run, the same GEMM kernels of a dense layer took
    34.5 ms in one profiled call and 27.1 ms in another). Interleaved, every case samples the same stretch of time, so their ratios hold.
    """
    names = list(cases)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(iters):
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            times[name].append(_time_once(cases[name]))
    return {n: _stats(t) for n, t in times.items()}


def _time_once(fn: Callable[[], object]) -> float:
    if torch.cuda.is_available():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _stats(times: list[float]) -> dict:
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "iters": len(times)}


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


def kernel_stats(
    fn: Callable[[], object], top: int = 12, skip_prefix: str = "care/", prof=None, gemm_launches: bool = False
) -> dict:
    """One profiled call of ``fn`` (or the given profile): device kernel count, busy time, the most
    expensive kernels, and the host ops that took the most self time. GPU spans of
    ``record_function`` ranges are not kernels."""
    prof = prof if prof is not None else profiled(fn)
    kernels = [
        e
        for e in prof.events()
        if e.device_type.name == "CUDA"
        and not getattr(e, "is_user_annotation", False)
        and not e.name.startswith(skip_prefix)
    ]
    by_name: dict[str, list[float]] = {}
    for k in kernels:
        by_name.setdefault(k.name[:80], []).append(k.device_time / 1e3)
    ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
    cpu = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    stats = {
        "host_top": [
            {"op": e.key[:60], "count": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2)} for e in cpu
        ],
        "kernels": len(kernels),
        "kernel_busy_ms": sum(k.device_time for k in kernels) / 1e3,
        # copies to the host inside the call: each pageable one is a synchronisation that drains the GPU
        "device_to_host_copies": sum(e.name.startswith("Memcpy DtoH") for e in prof.events()),
        "top": [{"kernel": n, "count": len(v), "ms": round(sum(v), 3)} for n, v in ranked],
    }
    if gemm_launches:  # matrix products one by one, in launch order (library kernel names are too long to tell apart)
        stats["gemm_launches_ms"] = [
            round(k.device_time / 1e3, 3) for k in sorted(kernels, key=lambda k: k.time_range.start) if _is_gemm(k.name)
        ]
    return stats


def _is_gemm(kernel_name: str) -> bool:
    return any(s in kernel_name for s in ("gemm", "nvjet", "cutlass", "Kernel2", "sm90_xmma"))


def gap_stats(prof, phases: tuple[str, ...] = (), top: int = 8, min_us: float = 20.0) -> dict:
    """Where the GPU sat idle in one profiled call: the gaps between kernels (a host that issues too
    slowly, or a synchronisation), summed per phase (the GPU span of each named ``record_function``
    range) and the largest ones with the kernels on either side. ``min_us``: gaps counted apart."""
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    kernels = sorted(
        (e for e in events if not getattr(e, "is_user_annotation", False) and not e.name.startswith("care/")),
        key=lambda e: e.time_range.start,
    )
    spans = [(e.name, e.time_range.start, e.time_range.end) for e in events if e.name in phases]
    gaps = []
    end, prev = None, None
    for k in kernels:
        if end is not None and k.time_range.start > end:
            gaps.append((k.time_range.start - end, end, prev, k.name))
        if end is None or k.time_range.end > end:
            end, prev = k.time_range.end, k.name
    per_phase: dict[str, float] = {}
    for g, at, _, _ in gaps:
        phase = next((n for n, a, b in spans if a <= at + g / 2 <= b), "other")
        per_phase[phase] = per_phase.get(phase, 0.0) + g / 1e3
    big = [g for g in gaps if g[0] >= min_us]
    return {
        "gap_ms": round(sum(g[0] for g in gaps) / 1e3, 3),
        "gaps": len(gaps),
        f"gaps_over_{min_us:g}us": len(big),
        f"gap_ms_over_{min_us:g}us": round(sum(g[0] for g in big) / 1e3, 3),
        "gap_ms_by_phase": {k: round(v, 3) for k, v in per_phase.items()},
        "largest": [
            {"us": round(g, 1), "after": a[:50], "before": b[:50]}
            for g, _, a, b in sorted(gaps, key=lambda x: -x[0])[:top]
        ],
    }
