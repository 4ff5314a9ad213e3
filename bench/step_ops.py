"""Operations a training step dispatches, by phase: what bounds a small model's step on a GPU.

    python bench/step_ops.py [--config configs/tiny.yaml] [--micro-batch 16 64] [key=value ...]

A tiny model's kernels take microseconds, so on a GPU its step costs what the host spends issuing
them: roughly one kernel launch per dispatched operation (views launch none but still cost host
time), plus a wait at every read of a GPU value on the host (``aten._local_scalar_dense``: ``.item()``,
``float(t)``, ``bool(t)``; on the CPU the optimizer's reads of its step counters count too, which
stay on the host on a GPU). This counts both with a ``TorchDispatchMode`` on the CPU, for the model's
forward and backward and a fused AdamW step over its trainable tensors (the trainer's), on real held-out batches
of the config's data. The count does not depend on the device, and barely on the micro-batch: a
larger micro-batch buys samples at almost no host cost. The trainer adds its own per-step work
(DeepSpeed's engine, the gradient-norm guard, logging), not counted here.

Prints one JSON line per micro-batch (the second step's counts: the first also builds caches).
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from bench.common import emit, heldout_batch, recipe_model  # noqa: E402
from train.engine import build_optimizer, optimizer_param_groups  # noqa: E402

SYNC = "aten._local_scalar_dense"


class OpCounter(TorchDispatchMode):
    """Counts every operation that reaches the dispatcher's backend, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    def total(self) -> int:
        return sum(self.ops.values())


def count_step(model: torch.nn.Module, batch, optimizer: torch.optim.Optimizer) -> dict:
    """Ops and host syncs of forward, backward and the optimizer step."""
    phases = {}
    for name in ("forward", "backward", "optimizer"):
        counter = OpCounter()
        with counter:
            if name == "forward":
                loss = model(batch).loss
            elif name == "backward":
                loss.backward()
            else:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        phases[name] = {"ops": counter.total(), "syncs": counter.ops[SYNC]}
    return phases


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--data", default="artifacts/synthetic/val-{000000..000000}.tar", help="held-out shards")
    p.add_argument("--micro-batch", type=int, nargs="+", default=[16, 64])
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_args(argv)
    cfg, model = recipe_model(args.config, args.overrides)
    groups = optimizer_param_groups(model, cfg.optim.weight_decay)
    params = [p for g in groups for p in g["params"]]
    optimizer = build_optimizer(groups, cfg.optim)  # the trainer's optimizer
    for mb in args.micro_batch:
        batch = heldout_batch(cfg, args.data, mb)
        count_step(model, batch, optimizer)  # the first step builds caches (empty prompt, optimizer state)
        phases = count_step(model, batch, optimizer)
        emit(
            {
                "config": args.config,
                "micro_batch": batch.batch_size,
                "trainable_tensors": len(params),
                **{f"{k}_{m}": v[m] for k, v in phases.items() for m in ("ops", "syncs")},
                "total_ops": sum(v["ops"] for v in phases.values()),
                "total_syncs": sum(v["syncs"] for v in phases.values()),
            }
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
