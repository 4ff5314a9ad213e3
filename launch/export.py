"""Export the trained weights of a training checkpoint as one safetensors file.

``python -m launch.export --checkpoint RUN/checkpoints|TAG_DIR --out weights.safetensors [--ema] [--tag best]``

``--tag`` picks a checkpoint of the run: ``latest`` (the default), ``best`` (the checkpoint with the best
held-out metric, kept by a run with ``checkpoint.best_metric``) or a ``step<N>`` directory name.

Writes exactly the model's trainable parameters (LoRA, experts, router, repaint, mixture, mask
encoder, condition embeddings, tag predictor), or their EMA with ``--ema``, with expert-parallel
shards merged into an ep_size 1 model (global expert ids), and the resolved config (YAML, with
``model.experts.ep_size: 1``) in the safetensors metadata under ``config``. Frozen weights are not
included: they come from their own paths, or from the config's random init seeded with ``run.seed``.
``launch/edit.py`` and ``launch/eval.py`` take the file as ``--checkpoint``. See train/eval/export.py.
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


def _check_paths(checkpoint: str, out: str) -> Optional[str]:
    """One line saying what is wrong with the paths before anything is read, or None."""
    if os.path.isfile(checkpoint):
        return (
            f"--checkpoint {checkpoint}: is a file; export reads a training checkpoint directory "
            "(RUN/checkpoints or one of its tag dirs). An export is already usable as launch/edit.py --checkpoint"
        )
    if os.path.isdir(out):
        return f"--out {out}: is a directory; give the .safetensors file to write"
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"--out {out}: {parent} is a file, not a directory"
    return None


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run checkpoint dir (uses 'latest') or a tag dir")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (error if the run kept none)")
    p.add_argument(
        "--tag", default=None, help="with a run's checkpoint dir: latest (default), best, or step<N> (a directory)"
    )
    args = p.parse_args(argv)
    from train.checkpoint import resolve_tag
    from train.config import ConfigError
    from train.eval import WeightsError, export_checkpoint

    problem = _check_paths(args.checkpoint, args.out)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    source = args.checkpoint
    if args.tag:
        try:
            source = resolve_tag(args.checkpoint, args.tag)
        except FileNotFoundError as e:
            print(f"error: --tag {args.tag}: {e}", file=sys.stderr)
            return 2
    try:
        tensors = export_checkpoint(source, args.out, ema=args.ema)
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: --checkpoint {args.checkpoint}: its config does not validate: {first}", file=sys.stderr)
        return 2
    except OSError as e:  # writing --out (permission denied, disk full, ...) or reading a checkpoint file
        if e.filename is None or str(e.filename).startswith(args.out):
            print(f"error: --out {args.out}: cannot write ({e.strerror or e})", file=sys.stderr)
        else:
            print(f"error: {e.filename}: {e.strerror or e}", file=sys.stderr)
        return 2
    n = sum(t.numel() for t in tensors.values())
    print(
        f"wrote {args.out}: {len(tensors)} tensors, {n:,} parameters{' (EMA)' if args.ema else ''}"
        + (f" from {source}" if args.tag else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
