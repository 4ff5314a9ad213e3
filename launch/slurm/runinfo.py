"""Where a run lives and how far it got, as shell assignments for the SLURM batch scripts.

    eval "$(WORLD_SIZE=N python -m launch.slurm.runinfo --config C.yaml [key=value ...])"

sets RUN_DIR, CKPT_DIR, TB_DIR, TARGET_STEPS (train.steps) and LATEST_STEP (the step of the checkpoint
``<CKPT_DIR>/latest`` names; 0 when there is none). The config is merged and validated exactly as
``launch/train.py`` does (same schema, same WORLD_SIZE rule for ep_size), so a bad override fails here,
in the batch shell, before any srun step starts. The batch scripts use LATEST_STEP >= TARGET_STEPS as
"this run is finished": such a job is never requeued and, if it is started again, does not train.

No torch import: this runs in the batch shell, in about half a second.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from typing import Optional

from train.config import ConfigError, checkpoint_dir, load_config, run_dir, tensorboard_dir

STEP_TAG = re.compile(r"^step(\d+)$")


def latest_step(ckpt_dir: str) -> int:
    """Step of the checkpoint ``<ckpt_dir>/latest`` names (the atomic pointer train/checkpoint/ writes); 0 if none."""
    try:
        with open(os.path.join(ckpt_dir, "latest")) as f:
            tag = f.read().strip()
    except FileNotFoundError:
        return 0
    m = STEP_TAG.match(tag)
    if not m or not os.path.isdir(os.path.join(ckpt_dir, tag)):
        return 0
    return int(m.group(1))


def info(config: str, overrides: list[str]) -> dict[str, str]:
    cfg = load_config(config, overrides)
    ckpt = checkpoint_dir(cfg)
    return {
        "RUN_DIR": os.path.abspath(run_dir(cfg)),
        "CKPT_DIR": os.path.abspath(ckpt),
        "TB_DIR": os.path.abspath(tensorboard_dir(cfg)),
        "TARGET_STEPS": str(int(cfg.train.steps)),
        "LATEST_STEP": str(latest_step(ckpt)),
    }


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    try:
        values = info(a.config, a.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    for k, v in values.items():
        print(f"{k}={shlex.quote(v)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
