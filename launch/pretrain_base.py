"""Pretrain the miniature base (text-to-image on the synthetic scenes) and write it as a diffusers folder.

    python -m launch.pretrain_base --config configs/base_tiny.yaml --out DIR [--device cuda] [key=value ...]
                                   [--expect DIGESTS.json] [--snapshot-every N]

Writes DIR/ in diffusers' pipeline layout (pretrain/save.py says what is where), DIR/digests.json
(sha256 of every weights file) and DIR/samples.png (the base's samples for held-out captions, each above
its caption's scene). With ``--expect``, exits 1 unless the new weights equal those digests bit for bit.
``--snapshot-every N`` also writes the base as it stands every N steps to DIR/snapshots/stepN/ (the same
layout, with its samples and held-out loss): a long run can be judged, or used, before it ends.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

if not __package__:  # run as a file (deepspeed launch/train.py): launch/by_path.py says why
    import by_path  # noqa: F401

# The project's modules are imported inside the functions, after the arguments are parsed: `--help` and a
# bad argument answer at once, before torch, DeepSpeed and the model load.


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="pretraining recipe (YAML, fields of BaseRecipe)")
    p.add_argument("--out", required=True, help="output folder (diffusers pipeline layout)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--expect", default=None, help="digests.json of a previous build: fail unless equal")
    p.add_argument("--snapshot-every", type=int, default=0, help="write DIR/snapshots/stepN every N steps")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the recipe")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    from omegaconf import OmegaConf

    from pretrain import file_digests, heldout_loss, pretrain, recipe_from_dict, save_base, save_samples

    if not os.path.isfile(args.config):
        print(f"error: --config {args.config}: no such file", file=sys.stderr)
        return 2
    try:
        recipe = recipe_from_dict(OmegaConf.merge(OmegaConf.load(args.config), OmegaConf.from_dotlist(args.overrides)))
        recipe.validate()
    except Exception as e:  # omegaconf's and validate()'s messages name the key
        print(f"error: {args.config}: {e}", file=sys.stderr)
        return 2

    def snapshot(step: int, ema, tok) -> None:
        folder = os.path.join(args.out, "snapshots", f"step{step}")
        info = dict(step=step, heldout_flow_mse=round(heldout_loss(ema, tok, recipe, args.device), 5))
        save_base(ema, tok, recipe, folder, info)
        info["colour_presence"] = save_samples(ema, tok, recipe, os.path.join(folder, "samples.png"), args.device)
        print(f"snapshot {folder}: {json.dumps(info)}", flush=True)

    model, tokenizer, summary = pretrain(
        recipe,
        args.device,
        log=lambda line: print(line, flush=True),
        snapshot=snapshot if args.snapshot_every > 0 else None,
        snapshot_every=args.snapshot_every,
    )
    summary["heldout_flow_mse"] = round(heldout_loss(model, tokenizer, recipe, args.device), 5)
    save_base(model, tokenizer, recipe, args.out, summary)
    summary["colour_presence"] = save_samples(
        model, tokenizer, recipe, os.path.join(args.out, "samples.png"), args.device
    )
    digests = file_digests(args.out)
    with open(os.path.join(args.out, "digests.json"), "w") as f:
        json.dump(digests, f, indent=1)
    print(json.dumps(dict(summary, digests=digests), indent=1))
    if args.expect:
        with open(args.expect) as f:
            expected = json.load(f)
        if expected != digests:
            print(f"error: the weights differ from {args.expect}", file=sys.stderr)
            return 1
        print(f"bit for bit equal to {args.expect}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
