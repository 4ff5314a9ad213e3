"""Model configuration as dataclasses (OmegaConf structured configs).

Every switch of the method and of its ablations lives here; ``ModelConfig.validate()`` rejects
impossible combinations before anything is built, naming the offending key.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional

EXPERT_NAMES = ("text", "mask", "reference", "base")


@dataclass
class FluxArch:
    """Arguments of diffusers' FluxTransformer2DModel, used when building from a config (random init)."""

    patch_size: int = 1
    in_channels: int = 64  # VAE latent channels x 2 x 2 (FLUX packs 2x2 latent patches)
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: list[int] = field(default_factory=lambda: [16, 56, 56])


@dataclass
class BackboneConfig:
    kind: str = "flux"  # the adapter to use (moe.backbone.BACKBONES)
    path: Optional[str] = None  # local diffusers folder (from_pretrained); None = random init from `arch`
    subfolder: Optional[str] = "transformer"  # subfolder inside `path` (diffusers pipeline layout)
    arch: FluxArch = field(default_factory=FluxArch)
    gradient_checkpointing: bool = False
    attention_backend: Optional[str] = None  # e.g. "flash" / "efficient" / "math": pins torch SDPA's backend
    # what the transformer's output means, as the base was pretrained: "velocity" (FLUX) or "sample"
    # (the clean latent x0, turned into the velocity (x_t - x0) / max(t, t_min); pixel-space miniatures)
    prediction: str = "velocity"
    t_min: float = 0.05


@dataclass
class LoraConfig:
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    # peft target module names (suffix match: "ff.net.2" matches "...blocks.3.ff.net.2", not
    # "...ff_context.net.2"). Self-attention projections + projection / MLP layers. The image-stream FFN
    # of a block with an expert layer keeps no LoRA even when matched here: the expert layer strips it
    # (moe.expert_layer.strip_lora), so no shared adapter beside the experts absorbs what they would learn.
    targets: list[str] = field(
        default_factory=lambda: [
            "to_q",
            "to_k",
            "to_v",
            "to_out.0",
            "proj_mlp",
            "proj_out",
            "ff.net.0.proj",
            "ff.net.2",
        ]
    )
    # sibling projections that read one tensor (q, k, v and the MLP input of a block) compute their
    # down projections as one product: the same function and parameters, fewer passes over the
    # tokens (moe/lora_siblings.py). false: peft's per-projection products.
    shared_down: bool = True


@dataclass
class VAEConfig:
    # autoencoder_kl: diffusers AutoencoderKL (FLUX's VAE). pixel_unshuffle: a lossless space-to-depth
    # codec with no weights (latent_channels = 3 * pixel_factor^2) for tiny CPU models, whose random
    # VAE would decode to noise and hide what the editor learned.
    kind: str = "autoencoder_kl"
    pixel_factor: int = 4
    path: Optional[str] = None  # local AutoencoderKL folder; None = random init from the fields below
    subfolder: Optional[str] = "vae"
    latent_channels: int = 16
    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 512, 512])
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159


@dataclass
class TextConfig:
    """Frozen text encoders: a sequence encoder (T5 in FLUX) and a pooled one (CLIP in FLUX)."""

    t5_path: Optional[str] = None  # local T5EncoderModel folder (with its tokenizer)
    clip_path: Optional[str] = None  # local CLIPTextModel folder (with its tokenizer)
    t5_subfolder: Optional[str] = "text_encoder_2"
    t5_tokenizer_subfolder: Optional[str] = "tokenizer_2"
    clip_subfolder: Optional[str] = "text_encoder"
    clip_tokenizer_subfolder: Optional[str] = "tokenizer"
    max_length: int = 128
    # Random-init tiny encoders (tests, embedded default) use a byte-level tokenizer; sizes below.
    t5_d_model: int = 4096
    t5_layers: int = 2
    t5_heads: int = 8
    t5_ff: int = 256
    clip_hidden: int = 768
    clip_layers: int = 2
    clip_heads: int = 4


@dataclass
class RouterConfig:
    kind: str = "learned"  # learned | uniform (random top-K, equal weights) | static (all experts, equal weights)
    top_k: int = 3
    ctx_dim: int = 64  # width of each per-token condition context (text / reference / mask) carried to experts
    attn_dim: int = 64  # query/key width of the router's latent attention
    num_latents: int = 4  # learned latent queries summarising the task context
    noise_std: float = 0.0  # std of Gaussian noise on router logits during training (0 = off)
    # the selected experts' combine weights: renormalized (the K probabilities rescaled to sum to 1) or
    # probability (the softmax probabilities as they are, as the Switch Transformer does). At K = 1 a
    # renormalised weight is always exactly 1, so the diffusion loss never reaches the router; auto takes
    # probability at K = 1 and renormalized above it.
    weights: str = "auto"
    # false (default): top-K over every expert for every sample; a missing reference is a learned
    # "absent" context that the Reference expert reads. true: experts whose condition is absent are
    # removed before the top-K (an ablation: a sample without a reference then has K of 3 to choose)
    mask_absent: bool = False


@dataclass
class ExpertsConfig:
    enabled: list[str] = field(default_factory=lambda: list(EXPERT_NAMES))
    kind: str = "lora"  # lora (low-rank residual experts) | ffn (copies of the block's feed-forward)
    rank: int = 64  # rank of `lora` experts
    # experts start different, so the diffusion loss ranks them from the first step (a router over
    # identical experts learns only from its regularisers): `lora` up projections ~ N(0, init_std^2),
    # `ffn` copies with their output projection perturbed by init_std x its weights' std (zero mean
    # over the experts). The layer's output then moves by O(init_std) at initialisation. 0 = identical.
    init_std: float = 1.0e-3
    ep_size: int = 1  # expert-parallel ranks (must divide the number of enabled experts)
    # auto | dense (every expert on every token, sparse weights) | alltoall | grouped (ffn experts at ep_size 1:
    # grouped GEMMs with the permutation fused into them; alltoall with grouped_gemm is its reference).
    # auto: dense for lora and grouped for ffn (where grouped_gemm resolves on) at ep_size 1, else alltoall
    dispatch: str = "auto"
    # ffn experts as torch._grouped_mm products (no per-expert loop; at ep_size 1 no host sync, so their
    # blocks trace whole and CUDA graphs take them). null = auto: on at ep_size 1. Used where supported
    # (bf16, sm90+ GPU or CPU); elsewhere the per-expert loop. On one H100 a run of configs/gpu_smoke.yaml
    # trained 13.2 samples/s with it against 11.8 for the loop (train.compile), 17.2 against 9.8 with
    # reduce-overhead (docs/PERF.md).
    # Memory: the grouped GEMMs keep a stacked copy of the expert weights for the backward (FLUX width:
    # ~0.6 GB per expert layer), held across the whole forward unless gradient checkpointing is on
    grouped_gemm: Optional[bool] = None

    def use_grouped_gemm(self) -> bool:
        """The ``grouped_gemm`` setting resolved: auto takes grouped GEMMs at ep_size 1 only. With several
        ranks the all-to-all needs host split sizes anyway, and one local expert gains nothing from grouping."""
        return self.ep_size == 1 if self.grouped_gemm is None else self.grouped_gemm

    blocks: Optional[list[int]] = None  # dual-stream block indices; None = the last `num_blocks`
    num_blocks: int = 4


@dataclass
class RepaintConfig:
    enabled: bool = True
    mode: str = "coupled"  # coupled | decoupled (stop-gradient into the editing path; AdaptEdit)
    hidden: int = 64
    # During training the editing path reads the ground-truth fine mask, the prediction at inference
    # (AdaptEdit's teacher forcing). Decoupled, the mask head learns from its own loss on detached
    # features; coupled, that loss also trains the shared features it reads (the diffusion loss then
    # reaches the head only through the router's prior, the previous layer's refined mask).
    use_gt_mask_in_training: bool = False
    # > 1: the head also predicts a subgrid x subgrid patch of the mask per token, so the refined mask (the
    # output, its loss and its IoU) is finer than the token grid; the editing path still reads one value per token
    subgrid: int = 1
    # The refined mask is zero on every token (and subgrid cell) the coarse mask does not reach: refinement
    # only takes away. The loader draws the coarse box from the fine mask's bounding box (data/augment.py),
    # so the fine mask never reaches outside it and the head's capacity goes to the boundary inside.
    within_coarse: bool = False


@dataclass
class MixtureConfig:
    enabled: bool = True  # off = plain router-weighted sum of the selected experts


@dataclass
class ConditionDropoutConfig:
    """Training-time probability, per sample, of dropping each condition (0 = never): the text becomes
    the empty prompt, the base image zero latents, the reference absent, the coarse box the whole image.
    Drawn from the torch RNG. They put ``edit()``'s guidance passes (empty text, zero base) in distribution."""

    text: float = 0.05
    base: float = 0.05
    reference: float = 0.05
    mask: float = 0.05


@dataclass
class SamplingConfig:
    """The guidance the recipe edits with when a caller names none: ``CareEditModel.edit``, hence
    ``launch/edit.py``, ``launch/eval.py``, the in-run held-out edits and the image grids. InstructPix2Pix
    guidance: ``v = v(none) + image * (v(image) - v(none)) + text * (v(image, text) - v(image))``; 1 and 1
    is the plain conditional prediction (one forward per step), anything else costs three. The passes
    without text or image are in distribution because of ``condition_dropout``."""

    text_guidance: float = 1.0
    image_guidance: float = 1.0
    # the sampler keeps the source outside the user's box (after every step the latents there are the
    # source's, noised to the step's time), as inpainting samplers do: outside the box the edit is the
    # source, exactly with a lossless codec. An inference-time constraint, not a property of the weights.
    keep_outside_box: bool = False


@dataclass
class LossConfig:
    diffusion: float = 1.0
    region_alpha: float = 0.0  # diffusion weight 1 + alpha * fine mask (AdaptEdit uses 2)
    load_balance: float = 0.01
    router_z: float = 1.0e-3  # ST-MoE router z-loss, mean logsumexp(logits)^2: keeps the logits small
    mask_boundary: float = 0.1
    boundary_band: int = 1  # tokens on each side of the fine-mask boundary that are up-weighted
    boundary_weight: float = 4.0
    # Kept small: early on the router's gradient from this term outweighs the diffusion loss's (the
    # experts barely differ yet), and Adam follows it to one expert per sample, constant over the image.
    # Tiny recipe, CPU: token spread of routing weights 2e-5-4e-3 after 150 steps at 0.01, 0.09-0.15 at
    # 1e-3 and 1e-4 (150 and 300 steps, two seeds)
    mixture_smoothness: float = 1.0e-3
    tag_alignment: float = 0.0  # TAG-MoE predictive alignment (0 = off)
    tag_embed_dim: int = 64
    timestep_sampling: str = "logit_normal"  # logit_normal | uniform
    logit_mean: float = 0.0
    logit_std: float = 1.0


@dataclass
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    repaint: RepaintConfig = field(default_factory=RepaintConfig)
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    condition_dropout: ConditionDropoutConfig = field(default_factory=ConditionDropoutConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    use_reference: bool = True  # put reference-image tokens in the sequence when a sample has one
    # Seed of the frozen weights built at random when no path is given. Frozen weights are not saved
    # in checkpoints, so they must be a function of the config alone (resume, export, cache, eval).
    init_seed: int = 0
    num_tags: int = 64  # size of the tag vocabulary for TAG-MoE alignment (>= len(data.schema.TAG_VOCAB))

    def validate(self) -> None:
        """Raise ValueError naming the first impossible setting; called before any model is built."""
        validate_model_config(self)


def base_prediction(path: Optional[str]) -> Optional[str]:
    """What a pretrained base folder says its transformer predicts (``model_index.json``'s
    ``prediction``, written by ``launch.pretrain_base``), or None when the folder does not say (FLUX:
    velocity). A base used with the wrong parameterisation trains and samples garbage without an error."""
    if not path:
        return None
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        return None
    with open(index) as f:
        return json.load(f).get("prediction")


def _fail(key: str, msg: str) -> None:
    raise ValueError(f"model.{key}: {msg}")


def validate_model_config(cfg: ModelConfig) -> None:
    """Raise ValueError naming the first impossible setting (checked in this order)."""
    names = list(cfg.experts.enabled)
    _validate_experts(cfg.experts, cfg.router, names)
    _validate_mask_and_codec(cfg, names)
    _validate_backbone(cfg)
    _validate_weights(cfg)


def _validate_experts(ex: ExpertsConfig, ro: RouterConfig, names: list[str]) -> None:
    if not names:
        _fail("experts.enabled", "at least one expert must be enabled")
    unknown = [n for n in names if n not in EXPERT_NAMES]
    if unknown:
        _fail("experts.enabled", f"unknown expert(s) {unknown}; choose from {list(EXPERT_NAMES)}")
    if len(set(names)) != len(names):
        _fail("experts.enabled", f"duplicate experts in {names}")
    n = len(names)
    if ex.kind not in ("lora", "ffn"):
        _fail("experts.kind", f"'{ex.kind}' is not one of lora, ffn")
    if ex.rank < 1:
        _fail("experts.rank", "must be >= 1")
    if ex.init_std < 0:
        _fail("experts.init_std", "must be >= 0")
    if ex.ep_size < 1 or n % ex.ep_size != 0:
        _fail("experts.ep_size", f"{ex.ep_size} must be >= 1 and divide the number of enabled experts ({n})")
    if ex.dispatch not in ("auto", "dense", "alltoall", "grouped"):
        _fail("experts.dispatch", f"'{ex.dispatch}' is not one of auto, dense, alltoall, grouped")
    if ex.dispatch in ("dense", "grouped") and ex.ep_size > 1:
        _fail("experts.dispatch", f"{ex.dispatch} dispatch needs every expert on every rank (ep_size 1)")
    if ex.dispatch == "grouped" and ex.kind != "ffn":
        _fail("experts.dispatch", "grouped dispatch runs ffn experts (experts.kind=ffn); lora experts take dense")
    if ex.dispatch == "grouped" and ex.grouped_gemm is False:
        _fail("experts.dispatch", "grouped dispatch runs grouped GEMMs, but experts.grouped_gemm is false")
    if ro.kind not in ("learned", "uniform", "static"):
        _fail("router.kind", f"'{ro.kind}' is not one of learned, uniform, static")
    if ro.weights not in ("auto", "renormalized", "probability"):
        _fail("router.weights", f"'{ro.weights}' is not one of auto, renormalized, probability")
    if not 1 <= ro.top_k <= n:
        _fail("router.top_k", f"{ro.top_k} must be between 1 and the number of enabled experts ({n})")
    if ro.noise_std < 0:
        _fail("router.noise_std", "must be >= 0")
    if ro.ctx_dim < 1 or ro.attn_dim < 1 or ro.num_latents < 1:
        _fail("router", "ctx_dim, attn_dim and num_latents must be >= 1")


def _validate_mask_and_codec(cfg: ModelConfig, names: list[str]) -> None:
    """Mask Repaint, the Latent Mixture and the image codec."""
    if cfg.repaint.subgrid < 1:
        _fail("repaint.subgrid", f"must be >= 1, got {cfg.repaint.subgrid}")
    if cfg.repaint.mode not in ("coupled", "decoupled"):
        _fail("repaint.mode", f"'{cfg.repaint.mode}' is not one of coupled, decoupled")
    if cfg.mixture.enabled and "base" not in names:
        _fail("mixture.enabled", "the Latent Mixture blends with the Base expert: enable 'base' or turn it off")
    if cfg.vae.kind not in ("autoencoder_kl", "pixel_unshuffle"):
        _fail("vae.kind", f"'{cfg.vae.kind}' is not one of autoencoder_kl, pixel_unshuffle")
    if cfg.vae.kind == "pixel_unshuffle" and cfg.vae.latent_channels != 3 * cfg.vae.pixel_factor**2:
        _fail("vae.latent_channels", f"must be 3 * pixel_factor^2 = {3 * cfg.vae.pixel_factor**2} for pixel_unshuffle")


def _validate_backbone(cfg: ModelConfig) -> None:
    """The backbone's parameterisation (against what a pretrained base says it predicts) and, when it is
    built from ``backbone.arch`` (no path), the shapes the other parts must agree with."""
    ex, arch = cfg.experts, cfg.backbone.arch
    if cfg.backbone.prediction not in ("velocity", "sample"):
        _fail("backbone.prediction", f"'{cfg.backbone.prediction}' is not one of velocity, sample")
    if not 0 < cfg.backbone.t_min < 1:
        _fail("backbone.t_min", "must lie in (0, 1)")
    recorded = base_prediction(cfg.backbone.path)
    if recorded is not None and recorded != cfg.backbone.prediction:
        _fail(
            "backbone.prediction",
            f"'{cfg.backbone.prediction}', but the base at {cfg.backbone.path} was pretrained to predict '{recorded}'",
        )
    if cfg.backbone.kind != "flux":
        _fail("backbone.kind", f"'{cfg.backbone.kind}' is not a known backbone (flux)")
    if cfg.backbone.path is not None:
        return
    if sum(arch.axes_dims_rope) != arch.attention_head_dim:
        _fail("backbone.arch.axes_dims_rope", f"must sum to attention_head_dim ({arch.attention_head_dim})")
    if arch.in_channels != cfg.vae.latent_channels * 4 * arch.patch_size**2:
        _fail("backbone.arch.in_channels", "must equal vae.latent_channels * 4 (2x2 packing) * patch_size^2")
    if arch.joint_attention_dim != cfg.text.t5_d_model and cfg.text.t5_path is None:
        _fail("text.t5_d_model", f"must equal backbone.arch.joint_attention_dim ({arch.joint_attention_dim})")
    if arch.pooled_projection_dim != cfg.text.clip_hidden and cfg.text.clip_path is None:
        _fail("text.clip_hidden", f"must equal backbone.arch.pooled_projection_dim ({arch.pooled_projection_dim})")
    blocks = ex.blocks if ex.blocks is not None else []
    bad = [b for b in blocks if not 0 <= b < arch.num_layers]
    if bad:
        _fail("experts.blocks", f"{bad} out of range for {arch.num_layers} dual-stream blocks")
    if ex.blocks is None and not 0 <= ex.num_blocks <= arch.num_layers:
        _fail("experts.num_blocks", f"must be between 0 and backbone.arch.num_layers ({arch.num_layers})")


def _validate_weights(cfg: ModelConfig) -> None:
    """LoRA's rank, the dropout probabilities, the loss weights and the sampling guidance."""
    if cfg.lora.rank < 0:
        _fail("lora.rank", "must be >= 0 (0 disables LoRA)")
    for key in ("text", "base", "reference", "mask"):
        p = getattr(cfg.condition_dropout, key)
        if not 0.0 <= p <= 1.0:
            _fail(f"condition_dropout.{key}", f"{p} is not a probability in [0, 1]")
    for key in (
        "diffusion",
        "region_alpha",
        "load_balance",
        "router_z",
        "mask_boundary",
        "mixture_smoothness",
        "tag_alignment",
    ):
        if getattr(cfg.loss, key) < 0:
            _fail(f"loss.{key}", "loss weights must be >= 0")
    for key in ("text_guidance", "image_guidance"):
        g = getattr(cfg.sampling, key)
        if not (math.isfinite(g) and g >= 0):
            _fail(f"sampling.{key}", f"{g} must be a finite number >= 0 (1 = no guidance)")
    if cfg.loss.timestep_sampling not in ("logit_normal", "uniform"):
        _fail("loss.timestep_sampling", "must be logit_normal or uniform")
