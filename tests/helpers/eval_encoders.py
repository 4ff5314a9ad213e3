"""Tiny random CLIP and DINOv2 folders (saved with save_pretrained) for offline evaluation tests.

Real encoders are never downloaded in tests; these exercise the same local-folder loading path
(``local_files_only=True``) with a character-level CLIP tokenizer (no merges).
"""

from __future__ import annotations

import json
import os

import torch


def make_tiny_encoders(root: str) -> tuple[str, str]:
    """Write ``root/clip`` (CLIPModel + CLIPProcessor) and ``root/dino`` (Dinov2Model + processor)."""
    from transformers import (
        BitImageProcessor,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
        Dinov2Config,
        Dinov2Model,
    )

    clip, dino = os.path.join(root, "clip"), os.path.join(root, "dino")
    os.makedirs(clip, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in map(chr, range(97, 123)):
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    with open(os.path.join(clip, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(clip, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tok = CLIPTokenizer(os.path.join(clip, "vocab.json"), os.path.join(clip, "merges.txt"), model_max_length=77)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), max_position_embeddings=77, eos_token_id=1, bos_token_id=0, pad_token_id=1, **small
        ),
        vision_config=dict(image_size=32, patch_size=8, **small),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(clip)
    square = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=CLIPImageProcessor(**square), tokenizer=tok).save_pretrained(clip)
    Dinov2Model(Dinov2Config(image_size=32, patch_size=8, **small)).save_pretrained(dino)
    BitImageProcessor(**square).save_pretrained(dino)
    return clip, dino
