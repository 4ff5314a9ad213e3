"""The base as a text-to-image model: tokenizer, tiny T5 / CLIP text encoders, the FLUX-shaped
transformer, the lossless pixel-unshuffle codec, and Euler sampling from captions.

The text path embeds exactly as CARE-Edit's frozen encoders do (``moe.encoders.FrozenTextEncoders``),
so the editor reads the base's text encoders the way the base was trained to.
Attention runs on SDPA's math kernel: the sequences are short, it is deterministic, and cuDNN's
attention failed on a FLUX backward on the GPUs here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

from data.captions import VOCABULARY
from moe.backbone import flux_arch_kwargs, grid_position_ids, pack_latents, unpack_latents, velocity_from_sample
from pretrain.recipe import BaseRecipe, TextArch

PAD, EOS, UNK = "[PAD]", "[EOS]", "[UNK]"  # ids 0, 1, 2 (CLIP pools at EOS; its legacy path is eos id 2)


def build_tokenizer(max_length: int):
    """A word-level tokenizer over the generator's vocabulary (``transformers`` fast tokenizer, saved
    and loaded like any other): ids 0 pad, 1 eos (appended), 2 unknown word."""
    vocab = {w: i for i, w in enumerate([PAD, EOS, UNK] + VOCABULARY)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, vocab[EOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=max_length,
    )


def build_text_encoders(t: TextArch, vocab_size: int) -> tuple[nn.Module, nn.Module]:
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=t.d_model,
            d_kv=t.d_model // t.heads,
            d_ff=t.ff,
            num_layers=t.layers,
            num_heads=t.heads,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=t.clip_hidden,
            intermediate_size=t.clip_hidden * 4,
            num_hidden_layers=t.clip_layers,
            num_attention_heads=t.clip_heads,
            max_position_embeddings=t.max_length,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=1,
        )
    )
    return t5, clip


def encode_text(tokenizer, t5: nn.Module, clip: nn.Module, texts: list[str], max_length: int, device) -> tuple:
    """(sequence embeddings [B, L, D], pooled [B, D_clip]), as CARE-Edit's frozen encoders compute them
    (``moe.encoders.FrozenTextEncoders.encode``: padded to max_length, T5 with its mask, CLIP pooled)."""
    enc = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
    seq = t5(input_ids=ids, attention_mask=mask).last_hidden_state
    pooled = clip(input_ids=ids, attention_mask=mask).pooler_output
    return seq, pooled


def images_to_latents(images: Tensor, factor: int) -> Tensor:
    """uint8 [B, H, W, 3] -> the pixel-unshuffle codec's latents [B, 3 f^2, H/f, W/f] of [-1, 1] pixels."""
    x = images.permute(0, 3, 1, 2).float() / 127.5 - 1
    return F.pixel_unshuffle(x, factor)


def latents_to_images(latents: Tensor, factor: int) -> Tensor:
    return F.pixel_shuffle(latents.float(), factor).clamp(-1, 1)


class TextToImage(nn.Module):
    """The three trainable parts together (one module for the optimizer, EMA and ``to``)."""

    def __init__(self, recipe: BaseRecipe, vocab_size: int):
        super().__init__()
        self.recipe = recipe
        self.transformer = FluxTransformer2DModel(**flux_arch_kwargs(recipe.arch))
        self.t5, self.clip = build_text_encoders(recipe.text, vocab_size)

    def velocity(self, noisy: Tensor, t: Tensor, seq: Tensor, pooled: Tensor) -> Tensor:
        """noisy latents [B, C, h, w] at flow time t [B] in [0, 1] -> predicted velocity, same shape."""
        b, _, h, w = noisy.shape
        img_ids = grid_position_ids(h // 2, w // 2, 0, noisy.device)  # the target's ids in CARE-Edit
        txt_ids = torch.zeros(seq.shape[1], 3, device=noisy.device)
        with sdpa_kernel([SDPBackend.MATH]):
            out = self.transformer(
                hidden_states=pack_latents(noisy),
                encoder_hidden_states=seq,
                pooled_projections=pooled,
                timestep=t,
                img_ids=img_ids,
                txt_ids=txt_ids,
                return_dict=False,
            )[0]
        out = unpack_latents(out, h, w)
        if self.recipe.prediction == "sample":
            return velocity_from_sample(noisy, out, t, self.recipe.t_min)
        return out


@torch.no_grad()
def sample(model: TextToImage, tokenizer, texts: list[str], steps: int, seed: int = 0) -> Tensor:
    """Euler sampling from captions with diffusers' flow-matching scheduler (as ``CareEditModel.edit``):
    -> images [B, 3, H, W] in [-1, 1]."""
    r = model.recipe
    device = next(model.parameters()).device
    c, s = 3 * r.pixel_factor**2, r.image_size // r.pixel_factor
    gen = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn((len(texts), c, s, s), generator=gen).to(device)
    seq, pooled = encode_text(tokenizer, model.t5, model.clip, texts, r.text.max_length, device)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    scheduler.set_timesteps(steps, device=device)
    for t in scheduler.timesteps:
        v = model.velocity(x, (t / 1000.0).expand(len(texts)).to(device), seq, pooled)
        x = scheduler.step(v.float(), t, x).prev_sample
    return latents_to_images(x, r.pixel_factor)
