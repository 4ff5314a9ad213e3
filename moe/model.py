"""CARE-Edit: a frozen DiT with LoRA, condition-aware expert layers, Mask Repaint and Latent Mixture.

One training forward, top to bottom (:meth:`CareEditModel.forward`):

1. encode conditions with frozen encoders (or take cached latents / text embeddings from the batch),
   and drop each condition of each sample with its configured probability (``model.condition_dropout``);
2. sample a flow-matching time t and noise, build the noisy target latent and its velocity target;
3. assemble the image stream  [ target | base | reference (if any sample has one) | coarse-mask ]
   tokens, each condition with its own RoPE offset, and run the frozen backbone; expert layers in
   the configured blocks see the target tokens and report routing and refined masks;
4. compute every loss term separately, and their weighted sum (``moe/losses.py::combine_losses``).

Each concern has its own module: what the model is conditioned on and trained against
(``conditions.py``), the losses (``losses.py``), sampling an edit (``sampling.py``). Nothing is kept
between forwards: each builds its own context and returns what it produced.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import NamedTuple, Optional

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn
from torch.profiler import record_function

from data.batch import EditBatch

from .backbone import build_backbone, grid_position_ids, pack_latents, unpack_latents, velocity_from_sample
from .conditions import (
    Conditions,
    TrainingTargets,
    coarse_cells,
    drop_conditions,
    encode_conditions,
    fit_length,
    training_targets,
)
from .config import ModelConfig
from .encoders import FrozenTextEncoders, FrozenVAE, MaskEncoder, mask_to_grid
from .expert_layer import ExpertContext, ExpertFeedForward, LayerRecord, LayerSlot
from .intervention import RoutingIntervention
from .losses import ForwardRecord, combine_losses, routing_statistics
from .regions import token_regions
from .sampling import EditResult, Guidance, edit_result, euler_sample

__all__ = ["CareEditModel", "Conditions", "EditResult", "ModelOutput", "TrainingTargets", "build_model"]

# RoPE first-axis offsets of the conditions in the image stream
OFFSET_TARGET, OFFSET_BASE, OFFSET_REFERENCE, OFFSET_MASK = 0, 1, 2, 3


@dataclass
class ModelOutput:
    loss: Tensor  # weighted total
    terms: dict[str, Tensor]  # unweighted loss terms (only those with a non-zero weight)
    stats: dict[str, Tensor]  # detached scalars for logging (expert utilisation, gates, ...)
    num_tokens: int  # sequence tokens processed (text + image stream, all samples)
    prediction: Optional[Tensor] = None  # [B, C, h, w] predicted velocity


class ImageStream(NamedTuple):
    """The image stream of one forward: [ target | base | reference (optional) | coarse mask ] tokens."""

    tokens: Tensor  # [B, N_img, D]
    ids: Tensor  # [N_img, 3] RoPE ids (offset, row, col)
    ref_span: Optional[tuple[int, int]]  # the reference tokens, when some sample has a reference
    mask_span: tuple[int, int]  # the coarse-mask tokens, last in the stream


def expert_block_ids(cfg: ModelConfig, num_blocks: int) -> list[int]:
    """The dual-stream blocks that get an expert layer. Checked here too: a backbone loaded from a
    path has a block count the config's validation could not see."""
    if cfg.experts.blocks is not None:
        bad = [b for b in cfg.experts.blocks if not 0 <= b < num_blocks]
        if bad:
            raise ValueError(f"model.experts.blocks: {bad} out of range for the backbone's {num_blocks} dual blocks")
        return sorted(set(cfg.experts.blocks))
    if not 0 <= cfg.experts.num_blocks <= num_blocks:
        raise ValueError(
            f"model.experts.num_blocks: {cfg.experts.num_blocks} exceeds the backbone's {num_blocks} dual blocks"
        )
    return list(range(num_blocks - cfg.experts.num_blocks, num_blocks))


def default_ep_rank(ep_size: int) -> int:
    """DeepSpeed's default group layout puts consecutive ranks in one expert-parallel group."""
    if ep_size == 1:
        return 0
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        raise RuntimeError(f"experts.ep_size={ep_size} needs torch.distributed initialised before the model is built")
    return torch_dist.get_rank() % ep_size


class CareEditModel(nn.Module):
    def __init__(self, cfg: ModelConfig, ep_rank: Optional[int] = None):
        """``cfg`` is validated (``build_model`` says by whom)."""
        super().__init__()
        self.cfg = cfg
        ep_rank = default_ep_rank(cfg.experts.ep_size) if ep_rank is None else ep_rank
        self.vae = FrozenVAE(cfg.vae, cfg.init_seed)
        self.text_encoders = FrozenTextEncoders(cfg.text, cfg.init_seed)
        self.backbone = build_backbone(cfg.backbone, cfg.lora, cfg.init_seed)
        dim = self.backbone.hidden_size
        self.token_stride = self.vae.downsample * 2  # pixels per token side (2x2 latent packing)
        self.mask_encoder = MaskEncoder(self.token_stride, cfg.repaint.hidden, dim)
        self.condition_embed = nn.Parameter(torch.zeros(2, dim))  # learned type embedding: base, reference
        self.expert_names = cfg.experts.names()
        # router.intervention: a change of every forward's routing (moe/intervention.py); None: as routed
        iv = cfg.router.intervention
        self.intervention = RoutingIntervention(iv) if iv is not None else None
        self.expert_blocks = expert_block_ids(cfg, self.backbone.num_expert_capable_blocks)
        # run_blocks' block index -> expert layer position (dual blocks come first in that index)
        self._position_of_block = {block_id: p for p, block_id in enumerate(self.expert_blocks)}
        seed_base = int(torch.randint(0, 2**30, (1,)).item())  # same on all ranks under a common seed
        self.expert_layers = []
        for position, block_id in enumerate(self.expert_blocks):
            layer = ExpertFeedForward(
                cfg, self.backbone.feed_forward(block_id), dim, position, ep_rank, seed_base + position
            )
            self.backbone.set_feed_forward(block_id, layer)
            self.expert_layers.append(layer)
        if cfg.loss.tag_alignment > 0:
            d = cfg.loss.tag_embed_dim
            self.tag_embed = nn.Embedding(cfg.num_tags, d)
            self.tag_predictor = nn.Sequential(nn.Linear(len(self.expert_names), d), nn.GELU(), nn.Linear(d, d))
        self._losses_fn, self._stats_fn = combine_losses, routing_statistics  # eager unless compile_regions()
        # one mode for the whole tree, as after any later ``train()``: freezing left the backbone's
        # blocks in eval mode, so the first ``train()`` (after the first image step) flipped them, and
        # the compiled blocks, whose graphs guard on it, recompiled (and re-recorded their CUDA graphs)
        self.train()

    def compile_regions(self, **compile_kwargs) -> str:
        """Compile the backbone block by block, each expert layer's tensor math and the losses
        (``torch.compile`` keyword arguments, e.g. ``backend``; ``mode`` applies to the blocks compiled
        whole). Numerically the same model; the GPU step is otherwise bound by launching thousands of
        small kernels from Python. A block whose expert layers are traceable (no host value: dense
        dispatch, or grouped-GEMM FFN experts at ep_size 1) compiles whole with its checkpoint; another
        breaks its graph at the layer, whose routing stage compiles apart. Call it after the parameters
        have their final dtype and device (traceability is decided from them). How and why:
        docs/DESIGN.md sections 10-11. Returns a one-line summary for the log."""
        # the blocks legitimately specialise on a few batch structures, more than dynamo's default of 8
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))

        def whole(block: nn.Module) -> bool:
            return all(layer.traceable for layer in block.modules() if isinstance(layer, ExpertFeedForward))

        n_whole = self.backbone.compile_blocks(whole=whole, **compile_kwargs)
        plain = {k: v for k, v in compile_kwargs.items() if k != "mode"}
        for layer in self.expert_layers:
            if not layer.traceable:
                layer.enable_compile(**plain)
        self._losses_fn = torch.compile(combine_losses, **plain)
        self._stats_fn = torch.compile(routing_statistics, **plain)
        tr = self.backbone.transformer
        apart = sum(1 for layer in self.expert_layers if layer.compiled_apart)
        return (
            f"{n_whole} of {len(tr.transformer_blocks) + len(tr.single_transformer_blocks)} "
            f"blocks whole with their checkpoint, {apart} of {len(self.expert_layers)} expert layers apart"
        )

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    @property
    def dtype(self) -> torch.dtype:
        return self.condition_embed.dtype

    # -- conditions ---------------------------------------------------------------------------
    @torch.no_grad()
    def encode_target(self, batch: EditBatch) -> Tensor:
        if batch.target_latent is not None:
            return self.vae.normalise(batch.target_latent.to(self.dtype))
        return self.vae.encode(batch.target.to(self.dtype))

    @torch.no_grad()
    def encode_conditions(self, batch: EditBatch, drop_text: bool = False, drop_image: bool = False) -> Conditions:
        """The batch's conditions through the frozen encoders (``moe/conditions.py::encode_conditions``)."""
        return encode_conditions(
            batch, self.vae, self.text_encoders, self.dtype, self.cfg.use_reference, drop_text, drop_image
        )

    def drop_conditions(self, cond: Conditions) -> Conditions:
        """Training's condition dropout (``moe/conditions.py::drop_conditions``) at this model's rates."""
        return drop_conditions(cond, self.cfg.condition_dropout, self._empty_prompt)

    @torch.no_grad()
    def _empty_prompt(self, length: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """The empty prompt's encoding ([1, length, D], [1, length], [1, D_pooled]), as ``edit()``'s
        unconditional passes encode it. A constant of the frozen encoders: computed once per length,
        device and dtype and kept."""
        key = (length, str(device), dtype)
        cached = getattr(self, "_empty_cache", None)
        if cached is None or cached[0] != key:
            text, mask, pooled = self.text_encoders.encode([""], device)
            text, mask = fit_length(text, mask, length)
            self._empty_cache = (key, (text.to(dtype), mask, pooled.to(dtype)))
            cached = self._empty_cache
        return cached[1]

    # -- the denoiser ---------------------------------------------------------------------------
    def predict_velocity(
        self,
        noisy: Tensor,
        t: Tensor,
        cond: Conditions,
        fine: Optional[Tensor] = None,
        intervention: Optional[RoutingIntervention] = None,
    ) -> tuple[Tensor, ExpertContext]:
        """noisy [B, C, h, w] at flow time t [B] -> predicted velocity [B, C, h, w], and the layers' reports.
        ``fine`` [B, N]: the fine mask on the token grid, which AdaptEdit's editing path reads in training.
        ``intervention``: every expert layer's routing changed so (``moe/intervention.py``; None: the config's
        ``router.intervention``, itself None for the routing as the router gives it)."""
        with self.backbone.attention_context():
            return self._predict_velocity(noisy, t, cond, fine, intervention)

    def _predict_velocity(
        self,
        noisy: Tensor,
        t: Tensor,
        cond: Conditions,
        fine: Optional[Tensor],
        intervention: Optional[RoutingIntervention] = None,
    ) -> tuple[Tensor, ExpertContext]:
        bb = self.backbone
        _, _, h, w = noisy.shape
        grid = (h // 2, w // 2)
        stream = self._image_stream(noisy, cond, grid)
        txt = bb.embed_text(cond.text)
        txt_ids = torch.zeros(txt.shape[1], 3, device=noisy.device)
        attention_mask = reference_attention_mask(cond.has_ref, stream.ref_span, txt.shape[1], stream.tokens.shape[1])
        temb = bb.embed_time(t, cond.pooled)
        iv = intervention if intervention is not None else self.intervention
        ctx = expert_context(
            cond, stream, grid, txt, temb, fine, noisy.dtype, iv, self.expert_names, self.cfg, len(self.expert_layers)
        )

        def expert_args(block_index: int) -> tuple:
            """(ctx, slot) for the expert layer in this block, its prior set now (the layer before it has run)."""
            position = self._position_of_block.get(block_index)
            return () if position is None else (ctx, ctx.enter(position))

        hidden = bb.run_blocks(
            stream.tokens, txt, temb, stream.ids, txt_ids, attention_mask, feed_forward_args=expert_args
        )
        pred = unpack_latents(bb.project_out(hidden[:, : ctx.num_target], temb), h, w)
        if self.cfg.backbone.prediction == "sample":  # the base predicts x0
            pred = velocity_from_sample(noisy, pred, t, self.cfg.backbone.t_min)
        return pred, ctx

    def _image_stream(self, noisy: Tensor, cond: Conditions, grid: tuple[int, int]) -> ImageStream:
        """The conditions in context: each part embedded, with its RoPE offset (docs/DESIGN.md section 5)."""
        bb, dev, (gh, gw) = self.backbone, noisy.device, grid
        n = gh * gw
        parts = [bb.embed_image(pack_latents(noisy)), bb.embed_image(pack_latents(cond.base)) + self.condition_embed[0]]
        ids = [grid_position_ids(gh, gw, OFFSET_TARGET, dev), grid_position_ids(gh, gw, OFFSET_BASE, dev)]
        ref_span = None
        if cond.reference is not None:
            parts.append(bb.embed_image(pack_latents(cond.reference)) + self.condition_embed[1])
            ids.append(grid_position_ids(gh, gw, OFFSET_REFERENCE, dev))
            ref_span = (2 * n, 3 * n)
        mask_start = n * len(parts)
        parts.append(self.mask_encoder(cond.coarse))
        ids.append(grid_position_ids(gh, gw, OFFSET_MASK, dev))
        return ImageStream(torch.cat(parts, dim=1), torch.cat(ids, dim=0), ref_span, (mask_start, mask_start + n))

    # -- training ---------------------------------------------------------------------------------
    def sample_time(self, batch_size: int, device: torch.device) -> Tensor:
        lc = self.cfg.loss
        if lc.timestep_sampling == "uniform":
            return torch.rand(batch_size, device=device)
        return torch.sigmoid(lc.logit_mean + lc.logit_std * torch.randn(batch_size, device=device))

    def forward(self, batch: EditBatch) -> ModelOutput:
        with record_function("care/encode"):
            x0 = self.encode_target(batch)
            cond = self.encode_conditions(batch)
        b, _, h, w = x0.shape
        t = self.sample_time(b, x0.device)
        noise = torch.randn_like(x0)
        tt = t.to(x0.dtype)[:, None, None, None]
        noisy = (1 - tt) * x0 + tt * noise
        velocity = noise - x0
        if self.training:
            cond = self.drop_conditions(cond)
        targets = training_targets(batch.fine_mask, (h // 2, w // 2), self.cfg.repaint, noisy.dtype, x0.device)
        pred, ctx = self.predict_velocity(noisy, t, cond, targets.fine)
        with record_function("care/losses"):
            return self._losses(pred, velocity, ctx, targets, batch.tag_ids.to(pred.device))

    def _losses(
        self, pred: Tensor, velocity: Tensor, ctx: ExpertContext, targets: TrainingTargets, tag_ids: Tensor
    ) -> ModelOutput:
        positions = sorted(ctx.records)
        record = forward_record(pred, velocity, ctx.grid, [ctx.records[p] for p in positions], targets, tag_ids)
        e, learned = len(self.expert_names), self.cfg.router.kind == "learned"
        head = self._task_embeddings if self.cfg.loss.tag_alignment > 0 else None
        loss, terms = self._losses_fn(record, self.cfg.loss, e, learned, head)
        stats = named_routing_stats(
            self._stats_fn(record, e), [self.expert_blocks[p] for p in positions], self.expert_names
        )
        return ModelOutput(loss, terms, stats, pred.shape[0] * sequence_length(ctx), pred)

    def _task_embeddings(self, signature: Tensor, tag_ids: Tensor) -> tuple[Tensor, Tensor]:
        """TAG-MoE's head (``losses.TaskHead``): the task embedding predicted from the routing signature
        [B, E], and the task's own, the sum of its tags' learned embeddings [B, d]."""
        valid = (tag_ids >= 0).unsqueeze(-1)
        task = (self.tag_embed(tag_ids.clamp(min=0)) * valid).sum(dim=1)
        return self.tag_predictor(signature.to(self.dtype)), task

    def routing_warnings(self, stats: dict, min_spread: float = 0.01, min_entropy: float = 0.05) -> list[str]:
        """Warnings for the log where a learned router has collapsed (:func:`routing_collapse_warnings`);
        none for the uniform and static ablations, which route alike on purpose."""
        if self.cfg.router.kind != "learned":
            return []
        return routing_collapse_warnings(stats, min_spread, min_entropy)

    def flops_per_token(self, seq_len: int = 0) -> float:
        """Forward model FLOPs per sequence token: 2 per weight of every linear layer of the backbone
        (LoRA and experts included, K experts active per target token), plus attention over a sequence
        of ``seq_len`` tokens (4 * S * D per layer; the loop asks before any batch, and counts none).
        Recompute from gradient checkpointing is not counted (model FLOPs, not hardware FLOPs)."""
        tr = self.backbone.transformer
        linear = sum(
            m.weight.numel() for name, m in tr.named_modules() if isinstance(m, nn.Linear) and ".moe." not in name
        )
        d = self.backbone.hidden_size
        layers = len(tr.transformer_blocks) + len(tr.single_transformer_blocks)
        attention = 4 * max(seq_len, 1) * d * layers
        k = self.cfg.router.top_k + (1 if self.cfg.mixture.enabled else 0)
        experts = 0
        for layer in self.expert_layers:
            per_expert = sum(p.numel() for p in layer.moe.parameters()) / max(layer.moe.num_local_experts, 1)
            experts += k * per_expert  # only target tokens see experts: an upper bound per token
        return float(2 * (linear + experts) + attention)

    # -- inference ----------------------------------------------------------------------------------
    @torch.no_grad()
    def edit(
        self,
        batch: EditBatch,
        num_steps: int = 20,
        text_guidance: Optional[float] = None,
        image_guidance: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
        keep_outside_box: Optional[bool] = None,
        intervention: Optional[RoutingIntervention] = None,
    ) -> EditResult:
        """Edit ``batch`` with the Euler sampler and guidance of ``moe/sampling.py``; a setting left as None
        is the recipe's (``model.sampling``). ``keep_outside_box``: the source is kept outside the user's
        box, as inpainting samplers do (an inference-time constraint). ``intervention``: every forward of
        the sampler routes so (``moe/intervention.py``; None: the config's ``router.intervention``)."""
        s = self.cfg.sampling
        keep = s.keep_outside_box if keep_outside_box is None else keep_outside_box
        g = Guidance(
            text=s.text_guidance if text_guidance is None else text_guidance,
            image=s.image_guidance if image_guidance is None else image_guidance,
        )
        was_training = self.training
        self.eval()
        cond = self.encode_conditions(batch)
        if g.text != 1.0 or g.image != 1.0:
            g.image_only = self.encode_conditions(batch, drop_text=True)
            g.neither = self.encode_conditions(batch, drop_text=True, drop_image=True)
        predict = (
            self.predict_velocity if intervention is None else partial(self.predict_velocity, intervention=intervention)
        )
        x, ctx = euler_sample(predict, cond, g, num_steps, generator, keep, self.dtype)
        images = self.vae.decode(x.to(self.dtype)).float()
        self.train(was_training)
        result = edit_result(images, ctx, cond.coarse, self.expert_names)
        result.guidance = {"text": float(g.text), "image": float(g.image), "keep_outside_box": bool(keep)}
        return result


def expert_context(
    cond: Conditions,
    stream: ImageStream,
    grid: tuple[int, int],
    txt: Tensor,
    temb: Tensor,
    fine: Optional[Tensor],
    dtype: torch.dtype,
    intervention: Optional[RoutingIntervention],
    expert_names: list[str],
    cfg: ModelConfig,
    num_layers: int,
) -> ExpertContext:
    """One forward's context for the expert layers (``num_layers`` of them), with an empty slot per layer:
    the conditions' spans and presence, the masks on the token grid, the region labels, the intervention."""
    b, n, dev = cond.base.shape[0], grid[0] * grid[1], temb.device
    has_text = cond.text_mask.any(dim=1)
    has_mask = cond.has_mask if cond.has_mask is not None else torch.ones_like(has_text)
    # every expert may be selected; an absent reference is a context the Reference expert reads
    available = torch.ones(b, len(expert_names), dtype=torch.bool, device=dev)
    if cfg.router.mask_absent and "reference" in expert_names:  # the ablation
        available[:, expert_names.index("reference")] = cond.has_ref & (stream.ref_span is not None)
    return ExpertContext(
        num_target=n,
        grid=grid,
        mask_span=stream.mask_span,
        ref_span=stream.ref_span,
        base_span=(n, 2 * n),
        has_ref=cond.has_ref,
        text=txt,
        text_mask=cond.text_mask,
        temb=temb,
        presence=torch.stack([has_text, cond.has_ref, has_mask], dim=1).float(),
        available=available,
        coarse=mask_to_grid(cond.coarse, grid).reshape(b, n).to(dtype),
        coarse_cells=coarse_cells(cond.coarse, grid, cfg.repaint),
        gt_mask=fine,
        regions=token_regions(cond.region_labels, grid) if cond.region_labels is not None else None,
        intervention=intervention,
        slots=[LayerSlot() for _ in range(num_layers)],
    )


def reference_attention_mask(
    has_ref: Tensor, ref_span: Optional[tuple[int, int]], text_len: int, image_len: int
) -> Optional[Tensor]:
    """[B, 1, 1, S] True where a token may be attended to, or None when no sample needs one: samples without
    a reference must not see the (zero) reference tokens of the batch."""
    if ref_span is None or bool(has_ref.all()):
        return None
    keep = torch.ones(has_ref.shape[0], text_len + image_len, dtype=torch.bool, device=has_ref.device)
    keep[:, text_len + ref_span[0] : text_len + ref_span[1]] = has_ref[:, None]
    return keep[:, None, None, :]


def sequence_length(ctx: ExpertContext) -> int:
    """Tokens of one sample's sequence in the forward of ``ctx``: the text, then the image stream, which
    the coarse-mask tokens close."""
    return ctx.text.shape[1] + ctx.mask_span[1]


def forward_record(
    pred: Tensor,
    velocity: Tensor,
    grid: tuple[int, int],
    layers: list[LayerRecord],
    targets: TrainingTargets,
    tag_ids: Tensor,
) -> ForwardRecord:
    """The losses' view of a training forward: the expert layers' reports (in layer order) as lists."""
    return ForwardRecord(
        pred=pred,
        velocity=velocity,
        grid=grid,
        probs=[r.routing.probs for r in layers],
        index=[r.routing.index for r in layers],
        weight=[r.routing.weight for r in layers],
        logits=[r.routing.logits for r in layers if r.routing.logits is not None],
        refined=[r.refined_logits for r in layers if r.refined_logits is not None],
        details=[r.refined_detail for r in layers if r.refined_detail is not None],
        gates=[r.gate for r in layers if r.gate is not None],
        fine=targets.fine,
        fine_subgrid=targets.fine_subgrid,
        tag_ids=tag_ids,
    )


def named_routing_stats(
    layer_stats: dict[str, Tensor], blocks: list[int], expert_names: list[str]
) -> dict[str, Tensor]:
    """Views into the statistics tensors (``losses.routing_statistics``), named for the logs (no kernels,
    no waiting): ``util/block<i>/<expert>``, ``routing_spread/block<i>``, ``routing_entropy/block<i>``,
    ``gate/block<i>``, ``gate_spread/block<i>``; ``blocks`` are the expert layers' block ids, in row order."""
    stats: dict[str, Tensor] = {}
    names = {"spread": "routing_spread", "entropy": "routing_entropy", "gate": "gate", "gate_spread": "gate_spread"}
    for row, block in enumerate(blocks):
        if "util" in layer_stats:
            for col, name in enumerate(expert_names):
                stats[f"util/block{block}/{name}"] = layer_stats["util"][row, col]
        for key, label in names.items():
            if key in layer_stats and row < layer_stats[key].shape[0]:
                stats[f"{label}/block{block}"] = layer_stats[key][row]
    return stats


def routing_collapse_warnings(stats: dict, min_spread: float = 0.01, min_entropy: float = 0.05) -> list[str]:
    """One line per expert layer whose routing looks collapsed, from :attr:`ModelOutput.stats` (tensors
    or floats): the routing weights barely vary over a sample's tokens (``routing_spread`` below
    ``min_spread``: every token of a sample goes the same way) or the router is all but certain
    everywhere (``routing_entropy`` below ``min_entropy``). A healthy tiny run keeps spread ~0.1."""
    out = []
    for key, value in stats.items():
        kind, _, block = key.partition("/")
        v = float(value)
        if kind == "routing_spread" and v < min_spread:
            out.append(f"routing collapsed in {block}: token spread of routing weights {v:.2e} < {min_spread}")
        elif kind == "routing_entropy" and v < min_entropy:
            out.append(f"routing collapsed in {block}: routing entropy {v:.3f} < {min_entropy} (one expert)")
    return out


def build_model(cfg: ModelConfig, ep_rank: Optional[int] = None) -> CareEditModel:
    """The model (frozen encoders and backbone, trainable CARE parts) of a validated ``cfg``.

    Validation runs once, where a config is made: ``train.config.load_config`` validates the whole
    tree (the model section included); a ``ModelConfig`` made otherwise is checked with its ``validate()``.
    """
    return CareEditModel(cfg, ep_rank=ep_rank)
