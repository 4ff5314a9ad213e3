"""Pretraining the miniature base: a FLUX-shaped text-to-image DiT on the synthetic world, written in diffusers' layout.

CARE-Edit fine-tunes a *pretrained* frozen DiT. No pretrained weights can be downloaded here, and a
random frozen DiT cannot be taught to edit by LoRA, so the miniature pipeline makes its own base the
way FLUX was made: a text-to-image flow-matching model trained with all its weights (transformer
and the small text encoders) on captioned images (:mod:`data.captions`), then loaded by the editor
through the paths real FLUX weights take.

Its own home, beside ``train/`` rather than in it: it shares none of the editor's training machinery
(no DeepSpeed engine, loop, checkpointer or config tree; one process, plain AdamW), and what it makes
is an input of the editor's training, as the shards of ``data/`` are.

* ``recipe.py``: ``BaseRecipe``, everything that decides the base's bytes (``configs/base_*.yaml``);
* ``trainer.py``: the training loop (``pretrain``) and its held-out loss;
* ``text_to_image.py``: tokenizer, text encoders, transformer and codec as one model, and its sampler;
* ``save.py``: the diffusers folder, its digests and sample sheet.

``python -m launch.pretrain_base`` runs it. Everything outside this folder imports from here.
"""

from pretrain.recipe import BaseRecipe, TextArch, recipe_from_dict
from pretrain.save import colour_presence, file_digests, save_base, save_samples
from pretrain.text_to_image import TextToImage, build_tokenizer, encode_text, sample
from pretrain.trainer import heldout_loss, pretrain

__all__ = [
    "BaseRecipe",
    "TextArch",
    "TextToImage",
    "build_tokenizer",
    "colour_presence",
    "encode_text",
    "file_digests",
    "heldout_loss",
    "pretrain",
    "recipe_from_dict",
    "sample",
    "save_base",
    "save_samples",
]
