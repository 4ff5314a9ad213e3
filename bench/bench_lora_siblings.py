"""LoRA on sibling projections that read the same input (a FLUX single block: to_q, to_k, to_v and
proj_mlp all read the normed tokens), side by side in one process.

    python bench/bench_lora_siblings.py [--tokens 4608] [--rank 64] [--iters 20]

Cases, each compiled with its gradient checkpoint inside (as ``moe.backbone.CheckpointedBlock``),
forward + backward with the input gradient, bf16:
* ``frozen``: the four frozen projections alone (the reference, 1.00);
* ``lora_separate``: peft's math, ``base(x) + up(down(x)) * s`` per projection;
* ``lora_shared_down``: the four down projections as one product over the shared input;
* ``*_keep_down``: the same, with the down products' outputs kept for the backward instead of
  recomputed (selective checkpointing: [T, r] per projection).
Prints one JSON line per case and a table.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts  # noqa: E402

from bench.common import emit, environment, kernel_stats, time_ms  # noqa: E402

D = 3072
OUTS = [D, D, D, 4 * D]  # to_q, to_k, to_v, proj_mlp


def consume(outs):
    # what the block does next is pointwise work on each output; keep it cheap and fusable
    return sum(F.gelu(o, approximate="tanh").float().mean() for o in outs)


def frozen(x, w):
    return consume([F.linear(x, wi) for wi in w["base"]])


def lora_separate(x, w):
    return consume(
        [F.linear(x, wb) + F.linear(F.linear(x, a), b) * w["s"] for wb, a, b in zip(w["base"], w["down"], w["up"])]
    )


def lora_shared_down(x, w):
    r = w["down"][0].shape[0]
    h = F.linear(x, torch.cat(w["down"]))  # [T, 4r]: one read of x for all four
    return consume(
        [
            F.linear(x, wb) + F.linear(h[:, i * r : (i + 1) * r], b) * w["s"]
            for i, (wb, b) in enumerate(zip(w["base"], w["up"]))
        ]
    )


def keep_down_policy(rank: int):
    def policy(ctx, func, *args, **kwargs):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            out_cols = args[-1].shape[-1]
            if out_cols % rank == 0 and out_cols <= 4 * rank:
                return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def checkpointed(fn, policy=None, backend="inductor"):
    def run(x, w):
        if policy is None:
            return checkpoint(fn, x, w, use_reentrant=False)
        ctx = functools.partial(create_selective_checkpoint_contexts, policy)
        return checkpoint(fn, x, w, use_reentrant=False, context_fn=ctx)

    return torch.compile(run, fullgraph=True, backend=backend)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4608)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--backend", default="inductor", help="aot_eager for a quick CPU check")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    dev, dt = torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
    emit({"env": environment(), "tokens": args.tokens, "rank": args.rank})
    torch.manual_seed(0)
    w = {
        "base": [torch.randn(o, D, device=dev, dtype=dt) * D**-0.5 for o in OUTS],
        "down": [(torch.randn(args.rank, D, device=dev, dtype=dt) * D**-0.5).requires_grad_() for _ in OUTS],
        "up": [(torch.randn(o, args.rank, device=dev, dtype=dt) * 0.01).requires_grad_() for o in OUTS],
        "s": 1.0,
    }
    x0 = torch.randn(args.tokens, D, device=dev, dtype=dt)
    pol = keep_down_policy(args.rank)
    cases = {
        "frozen": checkpointed(frozen, backend=args.backend),
        "lora_separate": checkpointed(lora_separate, backend=args.backend),
        "lora_shared_down": checkpointed(lora_shared_down, backend=args.backend),
        "lora_separate_keep_down": checkpointed(lora_separate, pol, args.backend),
        "lora_shared_down_keep_down": checkpointed(lora_shared_down, pol, args.backend),
    }

    # same function: the shared-down layout must give the separate layout's loss and gradients
    grads = {}
    for name in ("lora_separate", "lora_shared_down", "lora_shared_down_keep_down"):
        x = x0.clone().requires_grad_(True)
        loss = cases[name](x, w)
        g = torch.autograd.grad(loss, [x, *w["down"], *w["up"]])
        grads[name] = (loss.detach(), g)
    ref_loss, ref_g = grads["lora_separate"]
    for name in ("lora_shared_down", "lora_shared_down_keep_down"):
        loss, g = grads[name]
        rel = max(float((a.float() - b.float()).norm() / b.float().norm()) for a, b in zip(g, ref_g))
        emit({"check": name, "loss_diff": float((loss - ref_loss).abs()), "max_grad_rel_diff": rel})

    def step(fn):
        def run():
            x = x0.clone().requires_grad_(True)
            fn(x, w).backward()

        return run

    res = {n: time_ms(step(fn), iters=args.iters) for n, fn in cases.items()}
    res2 = {n: time_ms(step(fn), iters=args.iters) for n, fn in cases.items()}  # repeat: the spread
    base = res["frozen"]["median_ms"]
    for n in cases:
        emit(
            {
                "case": n,
                **res[n],
                "repeat_median_ms": res2[n]["median_ms"],
                "x_frozen": res[n]["median_ms"] / base,
                "lora_overhead_ms": res[n]["median_ms"] - base,
            }
        )
        if args.profile and cuda:
            emit({"profile": n, **kernel_stats(step(cases[n]), top=6)})
    print("\n| case | ms | repeat ms | x frozen | LoRA ms |")
    print("|---|---|---|---|---|")
    for n in cases:
        print(
            f"| {n} | {res[n]['median_ms']:.3f} | {res2[n]['median_ms']:.3f} | {res[n]['median_ms'] / base:.3f} "
            f"| {res[n]['median_ms'] - base:.3f} |"
        )


if __name__ == "__main__":
    main()
