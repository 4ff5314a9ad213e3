"""Make a checkpoint resumable at another GPU count, ep_size or ZeRO stage.

    python -m launch.reshape_checkpoint --src runs/flux/checkpoints            # follows 'latest'
    python -m launch.reshape_checkpoint --src runs/flux/checkpoints/step00040000 [--dst DIR]
        [--world-size 2 --ep-size 2]                                          # optional: check a target shape
    deepspeed --num_gpus 2 launch/train.py --config ... model.experts.ep_size=2 --resume auto
        # or --resume runs/flux/checkpoints/portable/step00040000

Runs on one CPU process (no GPU, no process group). It reads the DeepSpeed shards of every rank
and writes a portable checkpoint (``train/checkpoint/portable.py``): fp32 master weights, Adam moments and
step counts, the lr schedule, DeepSpeed's counters, EMA, loader and RNG states, with experts
under global ids. Every file it needs is checked before any tensor is read, so a missing shard
stops it at once, naming the file. The default destination ``<checkpoints>/portable/<tag>`` is
outside keep-last-K pruning, and ``--resume auto`` at another shape uses it when ``latest`` names
``<tag>`` (so a requeued SLURM job needs no new argument).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

if not __package__:  # run as a file (deepspeed launch/train.py): launch/by_path.py says why
    import by_path  # noqa: F401

# The project's modules are imported inside the functions, after the arguments are parsed: `--help` and a
# bad argument answer at once, before torch, DeepSpeed and the model load.


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="a checkpoint tag directory, or a checkpoint dir with 'latest'")
    p.add_argument("--dst", default=None, help="output directory (default: <checkpoints>/portable/<tag>)")
    p.add_argument("--world-size", type=int, default=None, help="check that this target shape is possible")
    p.add_argument("--ep-size", type=int, default=None, help="check that this target ep_size is possible")
    return p.parse_args(argv)


def resolve_src(src: str) -> str:
    """The tag directory: ``src`` itself, or what its ``latest`` names."""
    from train.checkpoint import read_latest

    src = os.path.abspath(src)
    named = read_latest(src)
    if named is not None:
        src = os.path.join(*named)
    if not os.path.isfile(os.path.join(src, "train_state_rank0.pt")):
        raise FileNotFoundError(f"{src}: not a training checkpoint (no train_state_rank0.pt)")
    return src


def check_target(num_experts: list[int], world_size: Optional[int], ep_size: Optional[int]) -> None:
    """Fail before converting when the requested target shape cannot hold these experts."""
    ep = ep_size or 1
    for layer, n in enumerate(num_experts):
        if n % ep:
            raise ValueError(f"--ep-size {ep} does not divide the {n} experts of expert layer {layer}")
    if world_size is not None and world_size % ep:
        raise ValueError(f"--ep-size {ep} does not divide --world-size {world_size}")


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # conversion needs no GPU
    from train.checkpoint import PORTABLE_DIR, ReshapeError, convert, read_layouts

    try:
        src = resolve_src(args.src)
        dst = args.dst or os.path.join(os.path.dirname(src), PORTABLE_DIR, os.path.basename(src))
        if args.world_size is not None or args.ep_size is not None:
            check_target(read_layouts(src)[0]["layout"]["num_experts"], args.world_size, args.ep_size)
        convert(src, dst)
    except (ReshapeError, FileNotFoundError, ValueError) as e:
        print(f"reshape_checkpoint: {e}", file=sys.stderr)
        return 2
    print(
        f"resume at any world size / ep_size / ZeRO stage with: --resume {dst}"
        + (" (or --resume auto while 'latest' names this checkpoint)" if args.dst is None else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
