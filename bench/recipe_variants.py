"""A recipe's training step under several sets of overrides, side by side in one process.

    python bench/recipe_variants.py [--config configs/tiny.yaml] [--iters 40] \
        --case off model.repaint.within_coarse=false --case on model.repaint.within_coarse=true

Whether a model option costs time: each case builds the recipe's model with its overrides (same seed),
and its forward and backward on the same real held-out batch (the recipe's micro-batch) is timed
interleaved with the others' (``bench.common.time_interleaved``: every case samples the same stretch
of the machine's clocks, which on a shared 2-core machine drift by a third between minutes). The
optimizer is left out: no option timed here changes it (bench/optimizer_step.py times that).

Prints one JSON line per case and one with each case's median over the first case's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import emit, environment, heldout_batch, recipe_model, time_interleaved  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--data", default="artifacts/synthetic/val-{000000..000000}.tar", help="held-out shards")
    p.add_argument("--iters", type=int, default=40, help="timed calls of each case")
    p.add_argument(
        "--case", nargs="+", action="append", required=True, metavar=("NAME", "KEY=VALUE"), help="repeatable"
    )
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases, batch, mb = {}, None, 0
    for name, *overrides in args.case:
        cfg, model = recipe_model(args.config, overrides, device)
        if batch is None:
            mb = cfg.train.micro_batch
            batch = heldout_batch(cfg, args.data, mb, device)

        def step(model=model, batch=batch) -> None:
            model.zero_grad(set_to_none=True)
            model(batch).loss.backward()

        for _ in range(3):  # warm-up: caches, allocator
            step()
        cases[name] = step
    times = time_interleaved(cases, iters=args.iters)
    env = environment()
    for (name, *overrides), t in zip(args.case, times.values()):
        emit({"case": name, "overrides": overrides, "config": args.config, "micro_batch": mb, **t, **env})
    first = next(iter(times.values()))["median_ms"]
    emit({f"ratio_{name}_over_{args.case[0][0]}": t["median_ms"] / first for name, t in times.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
