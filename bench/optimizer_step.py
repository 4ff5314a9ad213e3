"""The trainer's fused AdamW against torch's foreach AdamW on a real training step, side by side.

    python bench/optimizer_step.py [--config configs/mid.yaml] [--micro-batch 64] [--iters 30] [key=value ...]

A small model's step on a GPU is bound by the host's cost of issuing operations (bench/step_ops.py
counts them: the fused optimizer dispatches about 450 fewer a step than the foreach one for
configs/tiny.yaml's model). This times what that buys: the model's forward, backward and optimizer
step on a real held-out batch, once with each optimizer over the same parameter groups
(``train.engine.optimizer_param_groups``; the fused one is ``train.engine.build_optimizer``, what the
trainer steps), timed interleaved (``bench.common.time_interleaved``: every case samples the same
stretch of the machine's clocks). The optimizer step alone is timed too, on the gradients the last
backward left. DeepSpeed's engine and the trainer's logging are not part of it.

Prints one JSON line per case and one with the ratios (foreach / fused).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import emit, environment, heldout_batch, recipe_model, time_interleaved  # noqa: E402
from train.engine import build_optimizer, optimizer_param_groups  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/mid.yaml")
    p.add_argument("--data", default="artifacts/synthetic/val-{000000..000000}.tar", help="held-out shards")
    p.add_argument("--micro-batch", type=int, default=None, help="default: the config's train.micro_batch")
    p.add_argument("--iters", type=int, default=30, help="timed calls of each case")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg, model = recipe_model(args.config, args.overrides, device)
    mb = args.micro_batch or cfg.train.micro_batch
    batch = heldout_batch(cfg, args.data, mb, device)

    def groups() -> list[dict]:
        return optimizer_param_groups(model, cfg.optim.weight_decay)

    fused = build_optimizer(groups(), cfg.optim)
    o = cfg.optim
    foreach = torch.optim.AdamW(groups(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, foreach=True)
    assert fused.defaults["fused"] and not foreach.defaults["fused"]

    def step(opt: torch.optim.Optimizer):
        def run() -> None:
            opt.zero_grad(set_to_none=True)
            model(batch).loss.backward()
            opt.step()

        return run

    cases = {"step_foreach": step(foreach), "step_fused": step(fused)}
    for run in cases.values():  # warm-up: caches, optimizer state, allocator
        for _ in range(3):
            run()
    cases |= {"optimizer_foreach": foreach.step, "optimizer_fused": fused.step}
    for opt in (foreach, fused):
        opt.step()
    times = time_interleaved(cases, iters=args.iters)
    env = environment()
    tensors = sum(len(g["params"]) for g in fused.param_groups)
    for name, t in times.items():
        emit({"case": name, "config": args.config, "micro_batch": mb, "trainable_tensors": tensors, **t, **env})
    emit(
        {
            "ratio_step_foreach_over_fused": times["step_foreach"]["median_ms"] / times["step_fused"]["median_ms"],
            "ratio_optimizer_foreach_over_fused": times["optimizer_foreach"]["median_ms"]
            / times["optimizer_fused"]["median_ms"],
            "device": env["device"],
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
