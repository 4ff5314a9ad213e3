"""A real DeepSpeed checkpoint written at experts.ep_size=2 (or 4) by as many gloo ranks, for the export tests.

Each rank builds the tiny CARE-Edit model the way ``train.loop`` does (seeded, ep_size 2), wraps it
in the training engine (``train.engine.build_engine``: MoE groups, EMA), moves every trainable
weight off its initialisation (the same change for the same *global* expert on any layout), updates
the EMA twice so EMA and weights differ, saves through ``train.checkpoint.Checkpointer``, and then
edits a fixed batch with the ep_size 2 model. Rank r writes what it knows to ``expected_rank<r>``:
its trainable weights and EMA under global expert names, and (rank 0) the ep_size 2 edit.
"""

from __future__ import annotations

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EDIT_STEPS = 2
EDIT_SEED = 5


def overrides(run_dir: str, ep_size: int = 2) -> list[str]:
    return [
        f"run.dir={run_dir}",
        "run.name=ep2",
        "run.seed=3",
        f"model.experts.ep_size={ep_size}",
        "ema.enabled=true",
        "ema.decay=0.5",
        "data.image_size=32",
        "model.router.noise_std=0.0",
    ]


def test_batch():
    from tests.helpers.model_configs import make_batch

    return make_batch(batch_size=2, size=32, has_ref=[True, False], seed=11)


class _NoLoader:
    """The loader position the checkpoint stores (train.contracts.Resumable): this worker reads no data."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _perturb(model, ep_rank: int, num_local: int) -> None:
    """Deterministic change per parameter, keyed by its global name (so ep1 and ep2 layouts agree)."""
    from train.checkpoint import global_expert_name

    for name, p in model.trainable_named_parameters():
        gname = global_expert_name(name, ep_rank, num_local)
        g = torch.Generator().manual_seed(sum(ord(c) * (i + 1) for i, c in enumerate(gname)) % 2**31)
        p.data.add_(0.05 * torch.randn(p.shape, generator=g))


def worker(rank: int, world: int, port: int, run_dir: str, ep_size: int = 2) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        DS_ACCELERATOR="cpu",
    )
    sys.path.insert(0, ROOT)
    torch.set_num_threads(1)
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from moe.model import build_model
    from train.checkpoint import Checkpointer, global_expert_name
    from train.config import load_config
    from train.distributed import init_distributed
    from train.engine import build_engine
    from train.rng import seed_everything

    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), overrides(run_dir, ep_size))
    dist = init_distributed()
    seed_everything(cfg.run.seed)
    model = build_model(OmegaConf.to_object(cfg.model))
    eng = build_engine(cfg, model, dist)
    module = eng.deepspeed.module
    ep_rank, num_local = rank % ep_size, 4 // ep_size
    _perturb(module, ep_rank, num_local)
    eng.ema.update(module)
    _perturb(module, ep_rank, num_local)
    eng.ema.update(module)
    Checkpointer.for_run(cfg, dist).save(eng.deepspeed, 1, _NoLoader(), eng.ema)

    g = torch.Generator().manual_seed(EDIT_SEED)
    res = module.edit(test_batch(), num_steps=EDIT_STEPS, generator=g)
    mine = {
        global_expert_name(n, ep_rank, num_local): p.detach().clone() for n, p in module.trainable_named_parameters()
    }
    ema = {f"ema/{global_expert_name(n, ep_rank, num_local)}": t.clone() for n, t in eng.ema.shadow.items()}
    out = {**mine, **ema}
    if rank == 0:
        out.update({"edit/images": res.images, "edit/refined_mask": res.refined_mask})
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(run_dir, f"expected_rank{rank}.safetensors"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
