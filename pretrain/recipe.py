"""The recipe of the miniature base: everything that decides its bytes (saved as OUT/recipe.yaml).

``configs/base_tiny.yaml`` and ``configs/base_mid.yaml`` are recipes; ``launch/pretrain_base.py`` reads
one with :func:`recipe_from_dict` and checks it with :meth:`BaseRecipe.validate` before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import OmegaConf

from moe.config import FluxArch


@dataclass
class TextArch:
    d_model: int = 64  # T5 width = the transformer's joint_attention_dim
    layers: int = 2
    heads: int = 4
    ff: int = 128
    clip_hidden: int = 64  # CLIP width = the transformer's pooled_projection_dim
    clip_layers: int = 2
    clip_heads: int = 4
    max_length: int = 32


@dataclass
class BaseRecipe:
    """Everything that decides the base's bytes (saved as OUT/recipe.yaml)."""

    seed: int = 0
    image_size: int = 64
    pixel_factor: int = 4  # pixel-unshuffle codec: latent channels 3 * f^2, packed 2x2 into tokens
    arch: FluxArch = field(default_factory=FluxArch)
    text: TextArch = field(default_factory=TextArch)
    num_scenes: int = 20000  # a fixed set of captioned scenes, cycled in seeded epochs
    val_scenes: int = 64  # held-out scenes (after the training ones) for the loss and the sample grid
    steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 5e-5
    warmup_steps: int = 200
    weight_decay: float = 0.01
    clip_grad_norm: float = 1.0
    caption_dropout: float = 0.1  # empty caption: the base also learns unconditional generation
    ema_decay: float = 0.999  # the saved weights are the EMA's (0 = the raw weights)
    save_dtype: str = "float16"  # transformer weights on disk: float16 halves the folder
    sample_steps: int = 20
    # What the transformer's output means. "velocity" (FLUX's choice) or "sample", the clean image x0,
    # turned into the velocity (x_t - x0) / t for the loss and the sampler. A token here is 8x8 raw
    # pixels (192 values, as wide as the model): noise that high-dimensional is hard for a narrow
    # network to predict, a clean image is not (Li & He, "Back to Basics: Let Denoising Generative
    # Models Denoise", 2025), so pixel-space miniatures predict the sample.
    prediction: str = "velocity"
    t_min: float = 0.05  # "sample": the velocity's division by t is clamped at t_min
    logit_mean: float = 0.0  # training times t = sigmoid(logit_mean + logit_std * N(0, 1)); t = 1 is noise
    logit_std: float = 1.0

    def validate(self) -> None:
        a, t = self.arch, self.text
        channels = 3 * self.pixel_factor**2 * 4
        checks = {
            "arch.in_channels": (a.in_channels == channels, f"must be 3 * pixel_factor^2 * 4 = {channels}"),
            "arch.joint_attention_dim": (a.joint_attention_dim == t.d_model, "must equal text.d_model"),
            "arch.pooled_projection_dim": (a.pooled_projection_dim == t.clip_hidden, "must equal text.clip_hidden"),
            "arch.axes_dims_rope": (sum(a.axes_dims_rope) == a.attention_head_dim, "must sum to attention_head_dim"),
            "image_size": (self.image_size % (2 * self.pixel_factor) == 0, "must be a multiple of 2 * pixel_factor"),
            "save_dtype": (self.save_dtype in ("float16", "float32", "bfloat16"), "float16, float32 or bfloat16"),
            "steps": (self.steps >= 1 and self.batch_size >= 1, "steps and batch_size must be >= 1"),
            "prediction": (self.prediction in ("velocity", "sample"), "velocity or sample"),
            "t_min": (0 < self.t_min < 1, "must lie in (0, 1)"),
        }
        for key, (ok, msg) in checks.items():
            if not ok:
                raise ValueError(f"recipe.{key}: {msg}")


def recipe_from_dict(d: dict) -> BaseRecipe:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(BaseRecipe), d))
