"""Train a CARE-Edit model: ``deepspeed launch/train.py --config configs/<recipe>.yaml [key=value ...]``.

Also runs as a plain process (``python -m launch.train ...``, what ``make train`` does), by path
(``python launch/train.py``), under ``torchrun`` and under ``srun``. The config is merged and validated *before* any process group or
model is built, so a typo stops in a second with the key named.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Optional

if not __package__:  # run as a file (deepspeed launch/train.py): launch/by_path.py says why
    import by_path  # noqa: F401

from train.config import ConfigError, load_config  # noqa: E402


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML recipe (may list `defaults:` to include)")
    p.add_argument(
        "--resume",
        default=None,
        help="'auto' (latest in the run's checkpoint dir, if any) or a path "
        "(a checkpoint of this shape, or a portable one from `python -m launch.reshape_checkpoint`)",
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. train.steps=100 optim.lr=3e-4")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None, **factories: Callable[..., Any]) -> int:
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    # the heavy imports (torch, deepspeed, the model) only after the config is valid: a typo stops in a second
    from train.checkpoint import CheckpointWriteError, IncompleteCheckpoint, ReshapeError
    from train.distributed import shutdown_distributed
    from train.engine import BucketLayoutError
    from train.faults import ReplicaMismatch, RunLocked, TooManySkippedSteps
    from train.loop import train

    # Each refusal is one line naming what to do, and its own exit code (docs/FAULTS.md)
    try:
        train(cfg, resume=args.resume, **factories)
    except TooManySkippedSteps as e:
        print(f"training stopped: {e}", file=sys.stderr, flush=True)
        return 3
    except (ReshapeError, IncompleteCheckpoint) as e:  # another shape, a broken or incomplete checkpoint
        print(f"resume error: {e}", file=sys.stderr, flush=True)
        return 4
    except RunLocked as e:  # another live copy of this run writes here
        print(f"run locked: {e}", file=sys.stderr, flush=True)
        return 5
    except ReplicaMismatch as e:  # replicas diverged: latest was not moved
        print(f"replicas diverged: {e}", file=sys.stderr, flush=True)
        return 6
    except CheckpointWriteError as e:  # a save failed (a full disk: folder, free space, size); latest not moved
        print(f"checkpoint not written: {e}", file=sys.stderr, flush=True)
        return 7 if e.disk_full else 8
    except BucketLayoutError as e:  # ZeRO buckets would flush at different points on the ranks
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    # Every rank finished: tear the process group down now, not at interpreter exit. A refusal above
    # returns without it (a barrier could wait for a rank that stopped elsewhere).
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
