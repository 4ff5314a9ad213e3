"""Tiny model configurations shared by the model tests (random init, CPU, a second per forward)."""

from __future__ import annotations

from omegaconf import OmegaConf

from moe.config import ModelConfig


def tiny_model_config(**overrides) -> ModelConfig:
    cfg = OmegaConf.structured(ModelConfig)
    tiny = {
        "backbone": {"arch": {"num_layers": 3, "num_single_layers": 2, "num_attention_heads": 2,
                              "attention_head_dim": 16, "axes_dims_rope": [4, 6, 6], "in_channels": 16,
                              "joint_attention_dim": 32, "pooled_projection_dim": 32}},
        "vae": {"latent_channels": 4, "block_out_channels": [16, 16, 32], "layers_per_block": 1, "norm_num_groups": 8},
        "text": {"t5_d_model": 32, "t5_ff": 64, "t5_layers": 1, "t5_heads": 2, "clip_hidden": 32,
                 "clip_layers": 1, "clip_heads": 2, "max_length": 16},
        "lora": {"rank": 4},
        "experts": {"rank": 4, "num_blocks": 2},
        "router": {"ctx_dim": 8, "attn_dim": 8, "num_latents": 2},
        "repaint": {"hidden": 16},
    }
    cfg = OmegaConf.merge(cfg, tiny, OmegaConf.from_dotlist([f"{k}={v}" for k, v in overrides.items()]))
    return OmegaConf.to_object(cfg)
