"""Condition encoders: frozen VAE, frozen text encoders, and the learned coarse-mask encoder.

Real weights come from local folders only (``local_files_only=True``), read on the CPU whatever the
default device (:func:`read_local`); without a path each frozen encoder is built from a small config
with random weights, on the default device (the trainer builds the model under its device, so a
random-init part is not drawn on the CPU and then moved), so tests and the embedded default never touch
a hub. Random-init text encoders use :class:`ByteTokenizer` (UTF-8 bytes), which needs no vocabulary file.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator, Optional, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import TextConfig, VAEConfig

T = TypeVar("T")
_READ_SECONDS = [0.0]  # time spent in read_local, for the trainer's start-up timing line


def read_local(load: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``load(*args, **kwargs)`` (a ``from_pretrained``) on the CPU, whatever the default device: a
    library's loading path is not built for a CUDA default device, and the engine moves the weights
    anyway. The seconds it takes add to :func:`weights_read_seconds`."""
    t0 = time.perf_counter()
    try:
        with torch.device("cpu"):
            return load(*args, **kwargs)
    finally:
        _READ_SECONDS[0] += time.perf_counter() - t0


def weights_read_seconds() -> float:
    """Seconds spent so far in this process reading weights from local folders (:func:`read_local`)."""
    return _READ_SECONDS[0]


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Build random-init frozen weights from their own seed, leaving the global RNG untouched."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    module.eval()
    return module


class _AlwaysEval(nn.Module):
    """A frozen part that stays in eval mode when the model around it is put in training mode:
    ``model.train()`` reaches every submodule, and T5's dropout (rate 0.1 in its configs) would then
    noise the text conditioning of every training step, unlike at inference."""

    def train(self, mode: bool = True) -> "_AlwaysEval":
        return super().train(False)


class PixelUnshuffleCodec(nn.Module):
    """Lossless space-to-depth "VAE" with no weights: decode(encode(x)) == x.

    It keeps its input's dtype: having no weights, it has no dtype of its own to impose (casting to
    a float32 buffer handed float32 latents to a bf16 model under DeepSpeed, which casts parameters
    only)."""

    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)  # carries device and dtype

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    def encode_raw(self, images: Tensor) -> Tensor:
        return F.pixel_unshuffle(images, self.factor)

    def decode_raw(self, latents: Tensor) -> Tensor:
        return F.pixel_shuffle(latents, self.factor)


class FrozenVAE(_AlwaysEval):
    """The frozen image codec; ``encode`` returns FLUX-normalised latents ((z - shift) * scale).

    diffusers AutoencoderKL (from a local folder, or random init), or :class:`PixelUnshuffleCodec`.
    """

    def __init__(self, cfg: VAEConfig, init_seed: int = 0):
        super().__init__()
        if cfg.kind == "pixel_unshuffle":
            self.vae = PixelUnshuffleCodec(cfg.pixel_factor)
            self.scaling_factor, self.shift_factor = 1.0, 0.0
            self.latent_channels, self.downsample = 3 * cfg.pixel_factor**2, cfg.pixel_factor
            return
        from diffusers import AutoencoderKL

        if cfg.path is not None:
            self.vae = read_local(
                AutoencoderKL.from_pretrained, cfg.path, subfolder=cfg.subfolder, local_files_only=True
            )
        else:
            with seeded(init_seed):
                self.vae = self._random(cfg)
        freeze(self.vae)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.shift_factor = float(self.vae.config.shift_factor or 0.0)
        self.latent_channels = int(self.vae.config.latent_channels)
        self.downsample = 2 ** (len(self.vae.config.block_out_channels) - 1)

    @staticmethod
    def _random(cfg: VAEConfig) -> nn.Module:
        from diffusers import AutoencoderKL

        n = len(cfg.block_out_channels)
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(cfg.block_out_channels),
            layers_per_block=cfg.layers_per_block,
            latent_channels=cfg.latent_channels,
            norm_num_groups=cfg.norm_num_groups,
            scaling_factor=cfg.scaling_factor,
            shift_factor=cfg.shift_factor,
        )

    def normalise(self, raw: Tensor) -> Tensor:
        return (raw - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def encode_raw(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] in [-1, 1] -> [B, C, H/f, W/f] posterior mean, unnormalised (what caches store)."""
        if isinstance(self.vae, PixelUnshuffleCodec):
            return self.vae.encode_raw(images)
        return self.vae.encode(images.to(self.vae.dtype)).latent_dist.mode()

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] in [-1, 1] -> normalised latents (deterministic: the posterior mean)."""
        return self.normalise(self.encode_raw(images))

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        raw = latents / self.scaling_factor + self.shift_factor
        if isinstance(self.vae, PixelUnshuffleCodec):
            return self.vae.decode_raw(raw).clamp(-1, 1)
        return self.vae.decode(raw.to(self.vae.dtype)).sample.clamp(-1, 1)


class ByteTokenizer:
    """UTF-8 byte tokenizer for random-init text encoders: ids = byte + 3; 0 pad, 1 eos, 2 bos."""

    pad_id, eos_id, bos_id, offset = 0, 1, 2, 3
    vocab_size = 256 + 3

    def __init__(self, max_length: int):
        self.max_length = max_length

    def __call__(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        ids = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        for i, text in enumerate(texts):
            body = [b + self.offset for b in text.encode("utf-8")][: self.max_length - 1] + [self.eos_id]
            ids[i, : len(body)] = torch.tensor(body)
        return ids, ids != self.pad_id


def _local_or_random(
    model_cls,
    path: Optional[str],
    subfolder: Optional[str],
    tokenizer_subfolder: Optional[str],
    random_config,
    seed: int,
):
    """A text encoder and its tokenizer from a local folder, or a random-init model (seeded) with no
    tokenizer (the byte tokenizer stands in). Never downloads."""
    if path is None:
        with seeded(seed):
            return model_cls(random_config()), None
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a tiny local folder: no "Loading weights" bars on every start
    try:
        model = read_local(model_cls.from_pretrained, path, subfolder=subfolder, local_files_only=True)
        return model, read_local(
            AutoTokenizer.from_pretrained, path, subfolder=tokenizer_subfolder, local_files_only=True
        )
    finally:
        if shown:
            hf_logging.enable_progress_bar()


class FrozenTextEncoders(_AlwaysEval):
    """T5 sequence embeddings (FLUX's ``encoder_hidden_states``) and CLIP pooled embeddings."""

    def __init__(self, cfg: TextConfig, init_seed: int = 0):
        super().__init__()
        from transformers import CLIPTextModel, T5EncoderModel

        self.max_length = cfg.max_length
        self.t5, self.t5_tokenizer = _local_or_random(
            T5EncoderModel,
            cfg.t5_path,
            cfg.t5_subfolder,
            cfg.t5_tokenizer_subfolder,
            lambda: _tiny_t5_config(cfg),
            init_seed + 1,
        )
        self.clip, self.clip_tokenizer = _local_or_random(
            CLIPTextModel,
            cfg.clip_path,
            cfg.clip_subfolder,
            cfg.clip_tokenizer_subfolder,
            lambda: _tiny_clip_config(cfg),
            init_seed + 2,
        )
        self.byte_tokenizer = ByteTokenizer(cfg.max_length)
        freeze(self.t5)
        freeze(self.clip)

    def _tokenize(self, tokenizer, texts: list[str], max_length: int) -> tuple[Tensor, Tensor]:
        if tokenizer is None:
            return self.byte_tokenizer(texts)
        enc = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        return enc.input_ids, enc.attention_mask.bool()

    @torch.no_grad()
    def encode(self, texts: list[str], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """-> (embeds [B, L, D_t5], mask [B, L] bool, pooled [B, D_clip])."""
        ids, mask = self._tokenize(self.t5_tokenizer, texts, self.max_length)
        ids, mask = ids.to(device), mask.to(device)
        embeds = self.t5(input_ids=ids, attention_mask=mask).last_hidden_state
        clip_len = min(self.max_length, int(self.clip.config.max_position_embeddings))
        cids, cmask = self._tokenize(self.clip_tokenizer, texts, clip_len)
        pooled = self.clip(input_ids=cids.to(device), attention_mask=cmask.to(device)).pooler_output
        return embeds, mask, pooled


def _tiny_t5_config(cfg: TextConfig):
    from transformers import T5Config

    return T5Config(
        vocab_size=ByteTokenizer.vocab_size,
        d_model=cfg.t5_d_model,
        d_kv=cfg.t5_d_model // cfg.t5_heads,
        d_ff=cfg.t5_ff,
        num_layers=cfg.t5_layers,
        num_heads=cfg.t5_heads,
        feed_forward_proj="gated-gelu",
        pad_token_id=ByteTokenizer.pad_id,
        eos_token_id=ByteTokenizer.eos_id,
    )


def _tiny_clip_config(cfg: TextConfig):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=ByteTokenizer.vocab_size,
        hidden_size=cfg.clip_hidden,
        intermediate_size=cfg.clip_hidden * 4,
        num_hidden_layers=cfg.clip_layers,
        num_attention_heads=cfg.clip_heads,
        max_position_embeddings=cfg.max_length,
        pad_token_id=ByteTokenizer.pad_id,
        bos_token_id=ByteTokenizer.bos_id,
        eos_token_id=ByteTokenizer.eos_id,
    )


class MaskEncoder(nn.Module):
    """Learned encoder of the coarse mask into one token per target token (same grid).

    A patchifying convolution with the token stride (VAE downsampling x 2x2 packing) sees exactly the
    pixels of its token, so box edges that cut through a token are encoded, not rounded away.
    """

    def __init__(self, stride: int, hidden: int, out_dim: int):
        super().__init__()
        self.stride = stride
        self.patchify = nn.Conv2d(1, hidden, kernel_size=stride, stride=stride)
        self.mix = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1)
        self.out = nn.Linear(hidden, out_dim)

    def forward(self, mask: Tensor) -> Tensor:
        """[B, 1, H, W] -> [B, (H/s)*(W/s), out_dim], row-major over the token grid."""
        h = F.gelu(self.patchify(mask * 2 - 1))
        h = F.gelu(self.mix(h)) + h
        return self.out(h.flatten(2).transpose(1, 2))


def mask_to_grid(mask: Tensor, grid: tuple[int, int]) -> Tensor:
    """Area fraction of the mask inside each token cell: [B, 1, H, W] -> [B, gh, gw] in [0, 1]."""
    return F.adaptive_avg_pool2d(mask.float(), grid)[:, 0]
