"""Tiny model configurations and batches shared by the model tests (random init, CPU)."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from data.batch import EditBatch
from moe.config import ModelConfig

TINY = {
    "backbone": {
        "arch": {
            "num_layers": 3,
            "num_single_layers": 2,
            "num_attention_heads": 2,
            "attention_head_dim": 16,
            "axes_dims_rope": [4, 6, 6],
            "in_channels": 16,
            "joint_attention_dim": 32,
            "pooled_projection_dim": 32,
        }
    },
    "vae": {"latent_channels": 4, "block_out_channels": [16, 16, 32], "layers_per_block": 1, "norm_num_groups": 8},
    "text": {
        "t5_d_model": 32,
        "t5_ff": 64,
        "t5_layers": 1,
        "t5_heads": 2,
        "clip_hidden": 32,
        "clip_layers": 1,
        "clip_heads": 2,
        "max_length": 16,
    },
    "lora": {"rank": 4},
    "experts": {"rank": 4, "num_blocks": 2},
    "router": {"ctx_dim": 8, "attn_dim": 8, "num_latents": 2},
    "repaint": {"hidden": 16},
}


def tiny_model_config(**overrides) -> ModelConfig:
    """The tiny config with dotted overrides, e.g. ``tiny_model_config(**{"experts.kind": "ffn"})``; validated
    (ValueError naming the key), as ``load_config`` validates a training config: ``build_model`` does not."""
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), TINY)
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{k}={v}" for k, v in overrides.items()]))
    model_cfg = OmegaConf.to_object(cfg)
    model_cfg.validate()
    return model_cfg


def make_batch(batch_size: int = 2, size: int = 32, has_ref=None, seed: int = 0) -> EditBatch:
    """Random images, a box mask per sample, reference present on the first sample only by default."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda: torch.rand(batch_size, 3, size, size, generator=g) * 2 - 1  # noqa: E731
    fine = torch.zeros(batch_size, 1, size, size)
    coarse = torch.zeros(batch_size, 1, size, size)
    boxes = []
    for i in range(batch_size):
        y0, x0 = 4 + 2 * i, 6 + i
        y1, x1 = y0 + size // 2, x0 + size // 2
        coarse[i, :, y0:y1, x0:x1] = 1
        fine[i, :, y0 + 2 : y1 - 2, x0 + 3 : x1 - 1] = 1
        boxes.append([x0, y0, x1, y1])
    if has_ref is None:
        has_ref = [i == 0 for i in range(batch_size)]
    has_ref_t = torch.tensor(has_ref)
    ref = rand() * has_ref_t[:, None, None, None]
    words = ["make the red circle blue", "remove the green square", "add a star", "make it sepia"]
    return EditBatch(
        source=rand(),
        target=rand(),
        reference=ref,
        has_reference=has_ref_t,
        fine_mask=fine,
        coarse_mask=coarse,
        bbox=torch.tensor(boxes),
        instruction=[words[i % 4] for i in range(batch_size)],
        task=["recolor"] * batch_size,
        tag_ids=torch.tensor([[1, 2, -1]] * batch_size),
        keys=[f"k{i}" for i in range(batch_size)],
    )


def data_dependent_nodes(gm: torch.fx.GraphModule) -> list[str]:
    """Nodes of a traced graph (nested ones too: checkpoint bodies) whose output size is read from the
    data. On CUDA each is a device-to-host synchronisation, and CUDA graphs split around it."""
    return [
        n.format_node()
        for m in gm.modules()
        if isinstance(m, torch.fx.GraphModule)
        for n in m.graph.nodes
        if n.meta.get("unbacked_bindings")
    ]
