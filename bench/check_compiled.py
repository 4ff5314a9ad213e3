"""Compiled = eager on the GPU: the check to run before timing a compile mode there.

    python bench/check_compiled.py [--mode reduce-overhead] [--kind lora] [--steps 3]

The CPU tests (tests/test_compile.py) run the compiled graphs through ``aot_eager``; inductor's
kernels and CUDA graphs exist only on the GPU. This builds the tiny model in float32 (TF32 off),
trains an eager copy and a compiled copy on the same batches, and compares the loss and every
gradient. Prints one JSON line per step; exits 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import emit, environment  # noqa: E402
from moe.model import build_model  # noqa: E402
from tests.helpers.model_configs import make_batch, tiny_model_config  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", default=None, help="torch.compile mode for the blocks compiled whole")
    p.add_argument("--kind", default="lora", choices=["lora", "ffn"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--tol", type=float, default=1e-4, help="largest relative difference (norm) allowed")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    emit({"env": environment(), "mode": args.mode, "kind": args.kind})
    torch.manual_seed(0)
    cfg = tiny_model_config(
        **{"backbone.gradient_checkpointing": True, "experts.num_blocks": 2, "experts.kind": args.kind}
    )
    eager = build_model(cfg).to(dev)
    with torch.no_grad():  # off the zero-initialised start, so every path carries signal
        for q in eager.parameters():
            if q.requires_grad:
                q.add_(0.02 * torch.randn_like(q))
    compiled = copy.deepcopy(eager)
    emit({"compiled": compiled.compile_regions(**({"mode": args.mode} if args.mode else {}))})
    ok = True
    for step in range(args.steps):
        batch = make_batch(seed=step, has_ref=[True, step % 2 == 0]).to(dev)
        results = []
        for model in (eager, compiled):
            if model is compiled and args.mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()
            torch.manual_seed(100 + step)
            out = model(batch)
            out.loss.backward()
            grads = {n: q.grad.detach().clone() for n, q in model.named_parameters() if q.grad is not None}
            results.append((out.loss.detach().clone(), grads))
            model.zero_grad(set_to_none=True)
        (loss_e, g_e), (loss_c, g_c) = results
        rel = {n: float((g_c[n] - g).norm() / g.norm().clamp_min(1e-30)) for n, g in g_e.items()}
        worst = max(rel, key=rel.get)
        rec = {
            "step": step,
            "loss_eager": float(loss_e),
            "loss_compiled": float(loss_c),
            "loss_rel_diff": float((loss_c - loss_e).abs() / loss_e.abs()),
            "grads": len(g_e),
            "same_grad_names": g_e.keys() == g_c.keys(),
            "worst_grad": worst,
            "worst_grad_rel_diff": rel[worst],
        }
        emit(rec)
        ok &= rec["same_grad_names"] and rec["loss_rel_diff"] < args.tol and rec["worst_grad_rel_diff"] < args.tol
    print("compiled == eager" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
