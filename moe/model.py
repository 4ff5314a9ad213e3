"""CARE-Edit: a frozen DiT with LoRA, condition-aware expert layers, Mask Repaint and Latent Mixture.

One training forward, top to bottom (:meth:`CareEditModel.forward`):

1. encode conditions with frozen encoders (or take cached latents / text embeddings from the batch),
   and drop each condition of each sample with its configured probability (``model.condition_dropout``);
2. sample a flow-matching time t and noise, build the noisy target latent and its velocity target;
3. assemble the image stream  [ target | base | reference (if any sample has one) | coarse-mask ]
   tokens, each condition with its own RoPE offset, and run the frozen backbone; expert layers in
   the configured blocks see the target tokens and report routing and refined masks;
4. compute every loss term separately, and their weighted sum.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn
from torch.profiler import record_function

from data.batch import EditBatch

from .backbone import build_backbone, grid_position_ids, pack_latents, unpack_latents, velocity_from_sample
from .config import ModelConfig
from .encoders import FrozenTextEncoders, FrozenVAE, MaskEncoder, mask_to_grid
from .expert_layer import ExpertContext, ExpertFeedForward, LayerSlot
from .losses import (
    flow_matching_loss,
    load_balance_loss,
    mask_boundary_loss,
    mixture_smoothness_loss,
    region_weight,
    router_z_loss,
    routing_entropy,
    routing_spread,
    tag_alignment_loss,
)
from .repaint import cells_of_grid, subgrid_logits
from .router import dense_weights

# RoPE first-axis offsets of the conditions in the image stream
OFFSET_TARGET, OFFSET_BASE, OFFSET_REFERENCE, OFFSET_MASK = 0, 1, 2, 3
# routing-map colours of the experts (text, mask, reference, base)
EXPERT_COLOURS = {
    "text": (1.0, 0.2, 0.2),
    "mask": (0.2, 0.9, 0.2),
    "reference": (0.2, 0.4, 1.0),
    "base": (0.6, 0.6, 0.6),
}


@dataclass
class Conditions:
    """Everything the denoiser is conditioned on, already encoded."""

    base: Tensor  # [B, C, h, w] normalised latents of the source image
    reference: Optional[Tensor]  # [B, C, h, w] or None when no sample has a reference
    has_ref: Tensor  # [B] bool
    text: Tensor  # [B, L, D_t5]
    text_mask: Tensor  # [B, L] bool
    pooled: Tensor  # [B, D_clip]
    coarse: Tensor  # [B, 1, H, W] coarse box in pixels
    fine: Optional[Tensor]  # [B, 1, H, W] fine mask (training and evaluation only)
    has_mask: Optional[Tensor] = None  # [B] bool; None = every sample has its box (False: dropped in training)


@dataclass
class ModelOutput:
    loss: Tensor  # weighted total
    terms: dict[str, Tensor]  # unweighted loss terms (only those with a non-zero weight)
    stats: dict[str, Tensor]  # detached scalars for logging (expert utilisation, gates, ...)
    num_tokens: int  # sequence tokens processed (text + image stream, all samples)
    prediction: Optional[Tensor] = None  # [B, C, h, w] predicted velocity


@dataclass
class EditResult:
    images: Tensor  # [B, 3, H, W] in [-1, 1]
    refined_mask: Tensor  # [B, 1, H, W] in [0, 1] (last expert layer; the coarse box without repaint)
    routing_map: Tensor  # [B, 3, H, W] colour of the dominant expert per token (last expert layer)
    utilisation: dict[str, float] = field(default_factory=dict)
    guidance: dict[str, float] = field(default_factory=dict)  # the text and image guidance scales used


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
        self.expert_names = list(cfg.experts.enabled)
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
        self._last_seq_len = 0
        self._loss_terms_fn = self.loss_terms  # eager unless compile_regions()
        # one mode for the whole tree, as after any later ``train()``: freezing left the backbone's
        # blocks in eval mode, so the first ``train()`` (after the first image step) flipped them, and
        # the compiled blocks, whose graphs guard on it, recompiled (and re-recorded their CUDA graphs)
        self.train()

    def compile_regions(self, **compile_kwargs) -> str:
        """Compile the backbone block by block and each expert layer's tensor math (``torch.compile``
        keyword arguments, e.g. ``backend``). Numerically the same model; the training step on a GPU
        is otherwise bound by launching thousands of small kernels from Python (docs/PERF.md).

        The block graphs specialise on a few legitimate variants (first block without input gradients,
        batches with and without an attention mask, reference tokens present or not, resolution
        buckets), more than dynamo's default of 8 per code object: the limit is raised so they stay
        compiled instead of falling back to eager.

        Blocks whose expert layers can be traced (no host synchronisation: dense dispatch, or grouped-GEMM
        FFN experts at ep_size 1 in bf16) compile whole, gradient checkpoint included; a block whose
        expert layer needs host values (the all-to-all's split sizes, the per-expert loop's row counts)
        breaks the graph at the layer, whose routing stage compiles apart. Call it after the parameters
        have their final dtype and device (traceability is decided from them, here). ``mode`` (e.g. ``"reduce-overhead"``: CUDA
        graphs) applies to the blocks compiled whole, and without gradient checkpointing to every block
        that can be traced (``FluxBackbone.compile_blocks``). The expert
        layers receive their per-forward context as arguments of the block call, so its tensors are
        ordinary graph inputs and the graphs are recorded once.
        Returns a one-line summary for the log."""
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
        # A traceable expert layer writes its routing record into the per-forward context: compiled
        # under a checkpoint, that write happens in the forward only (compile_blocks sets dynamo's
        # flag), which is what the model needs: the losses read the records of the forward.

        def whole(block: nn.Module) -> bool:
            return all(layer.traceable for layer in block.modules() if isinstance(layer, ExpertFeedForward))

        n_whole = self.backbone.compile_blocks(whole=whole, **compile_kwargs)
        plain = {k: v for k, v in compile_kwargs.items() if k != "mode"}
        for layer in self.expert_layers:
            if not layer.traceable:
                layer.enable_compile(**plain)
        self._loss_terms_fn = torch.compile(self.loss_terms, **plain)
        tr = self.backbone.transformer
        apart = sum(1 for layer in self.expert_layers if layer.compiled_apart)
        return (
            f"{n_whole} of {len(tr.transformer_blocks) + len(tr.single_transformer_blocks)} "
            f"blocks whole with their checkpoint, {apart} of {len(self.expert_layers)} expert layers apart"
        )

    # -- parameters ---------------------------------------------------------------------------
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
        device = batch.has_reference.device
        if batch.source_latent is not None:
            base = self.vae.normalise(batch.source_latent.to(self.dtype))
        else:
            base = self.vae.encode(batch.source.to(self.dtype))
        has_ref = batch.has_reference.bool() & self.cfg.use_reference
        reference = None
        if bool(has_ref.any()):
            if batch.reference_latent is not None:
                reference = self.vae.normalise(batch.reference_latent.to(self.dtype))
            else:
                reference = self.vae.encode(batch.reference.to(self.dtype))
            reference = reference * has_ref[:, None, None, None].to(reference.dtype)
        if batch.text_embeds is not None and not drop_text:
            text, text_mask, pooled = batch.text_embeds, batch.text_mask, batch.pooled_text
        else:
            prompts = [""] * batch.batch_size if drop_text else list(batch.instruction)
            text, text_mask, pooled = self.text_encoders.encode(prompts, device)
        if drop_image:
            base = torch.zeros_like(base)
        return Conditions(
            base=base,
            reference=reference,
            has_ref=has_ref,
            text=text.to(self.dtype),
            text_mask=text_mask.bool(),
            pooled=pooled.to(self.dtype),
            coarse=batch.coarse_mask.to(self.dtype),
            fine=batch.fine_mask,
        )

    # -- the denoiser ---------------------------------------------------------------------------
    def predict_velocity(self, noisy: Tensor, t: Tensor, cond: Conditions) -> tuple[Tensor, ExpertContext]:
        """noisy [B, C, h, w] at flow time t [B] -> predicted velocity [B, C, h, w], and the layers' reports."""
        with self.backbone.attention_context():
            return self._predict_velocity(noisy, t, cond)

    def _predict_velocity(self, noisy: Tensor, t: Tensor, cond: Conditions) -> tuple[Tensor, ExpertContext]:
        bb = self.backbone
        b, _, h, w = noisy.shape
        gh, gw = h // 2, w // 2
        n = gh * gw
        dev = noisy.device
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
        img = torch.cat(parts, dim=1)
        img_ids = torch.cat(ids, dim=0)
        txt = bb.embed_text(cond.text)
        txt_ids = torch.zeros(txt.shape[1], 3, device=dev)

        attention_mask = None
        if ref_span is not None and not bool(cond.has_ref.all()):
            # samples without a reference must not see the (zero) reference tokens of the batch
            keep = torch.ones(b, txt.shape[1] + img.shape[1], dtype=torch.bool, device=dev)
            keep[:, txt.shape[1] + ref_span[0] : txt.shape[1] + ref_span[1]] = cond.has_ref[:, None]
            attention_mask = keep[:, None, None, :]

        temb = bb.embed_time(t, cond.pooled)
        coarse = mask_to_grid(cond.coarse, (gh, gw)).reshape(b, n).to(noisy.dtype)
        gt = mask_to_grid(cond.fine, (gh, gw)).reshape(b, n).to(noisy.dtype) if cond.fine is not None else None
        has_text = cond.text_mask.any(dim=1)
        has_mask = cond.has_mask if cond.has_mask is not None else torch.ones_like(has_text)
        presence = torch.stack([has_text, cond.has_ref, has_mask], dim=1).float()
        # every expert may be selected; an absent reference is a context the Reference expert reads
        available = torch.ones(b, len(self.expert_names), dtype=torch.bool, device=dev)
        if self.cfg.router.mask_absent and "reference" in self.expert_names:  # the ablation
            available[:, self.expert_names.index("reference")] = cond.has_ref & (ref_span is not None)
        ctx = ExpertContext(
            num_target=n,
            grid=(gh, gw),
            mask_span=(mask_start, mask_start + n),
            ref_span=ref_span,
            base_span=(n, 2 * n),
            has_ref=cond.has_ref,
            text=txt,
            text_mask=cond.text_mask,
            temb=temb,
            presence=presence,
            available=available,
            coarse=coarse,
            coarse_cells=self._coarse_cells(cond.coarse, (gh, gw)),
            gt_mask=gt,
            slots=[LayerSlot() for _ in self.expert_layers],
        )

        def expert_args(block_index: int) -> tuple:
            """(ctx, slot) for the expert layer in this block, its prior set now (the layer before it has run)."""
            position = self._position_of_block.get(block_index)
            return () if position is None else (ctx, ctx.enter(position))

        hidden = bb.run_blocks(img, txt, temb, img_ids, txt_ids, attention_mask, feed_forward_args=expert_args)
        self._last_seq_len = txt.shape[1] + img.shape[1]
        pred = unpack_latents(bb.project_out(hidden[:, :n], temb), h, w)
        if self.cfg.backbone.prediction == "sample":  # the base predicts x0
            pred = velocity_from_sample(noisy, pred, t, self.cfg.backbone.t_min)
        return pred, ctx

    # -- training ---------------------------------------------------------------------------------
    def sample_time(self, batch_size: int, device: torch.device) -> Tensor:
        lc = self.cfg.loss
        if lc.timestep_sampling == "uniform":
            return torch.rand(batch_size, device=device)
        return torch.sigmoid(lc.logit_mean + lc.logit_std * torch.randn(batch_size, device=device))

    def drop_conditions(self, cond: Conditions) -> Conditions:
        """Condition dropout for training: each sample loses each condition with its probability
        (``model.condition_dropout``), drawn from the torch RNG (seeded runs repeat). Dropped means what
        ``edit()``'s guidance passes and an absent input look like: the empty prompt's encoding, zero base
        latents, no reference, and a box over the whole image (its presence flag off)."""
        p = self.cfg.condition_dropout
        rates = [p.text, p.base, p.reference, p.mask]
        if max(rates) <= 0:
            return cond
        b, dev = cond.base.shape[0], cond.base.device
        drop = torch.rand(b, 4, device=dev) < torch.tensor(rates, device=dev)  # [B, 4]
        text, text_mask, pooled = cond.text, cond.text_mask, cond.pooled
        if p.text > 0:
            e_text, e_mask, e_pooled = self._empty_prompt(text.shape[1], dev, text.dtype)
            d = drop[:, 0]
            text = torch.where(d[:, None, None], e_text, text)
            text_mask = torch.where(d[:, None], e_mask, text_mask)
            pooled = torch.where(d[:, None], e_pooled, pooled)
        base = cond.base * (~drop[:, 1]).to(cond.base.dtype)[:, None, None, None]
        has_ref, reference = cond.has_ref & ~drop[:, 2], cond.reference
        if reference is not None:
            reference = reference * has_ref.to(reference.dtype)[:, None, None, None]
        keep_mask = ~drop[:, 3] & (cond.has_mask if cond.has_mask is not None else True)
        coarse = torch.where(keep_mask[:, None, None, None], cond.coarse, torch.ones_like(cond.coarse))
        return Conditions(
            base=base,
            reference=reference,
            has_ref=has_ref,
            text=text,
            text_mask=text_mask,
            pooled=pooled,
            coarse=coarse,
            fine=cond.fine,
            has_mask=keep_mask,
        )

    @torch.no_grad()
    def _empty_prompt(self, length: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """The empty prompt's encoding ([1, length, D], [1, length], [1, D_pooled]), as ``edit()``'s
        unconditional passes encode it; computed once per device and dtype and kept."""
        key = (length, str(device), dtype)
        cached = getattr(self, "_empty_cache", None)
        if cached is None or cached[0] != key:
            text, mask, pooled = self.text_encoders.encode([""], device)
            text, mask = text[:, :length], mask[:, :length].bool()
            if text.shape[1] < length:  # cached embeddings longer than the encoder's max_length
                pad = length - text.shape[1]
                text = torch.nn.functional.pad(text, (0, 0, 0, pad))
                mask = torch.nn.functional.pad(mask, (0, pad))
            self._empty_cache = (key, (text.to(dtype), mask, pooled.to(dtype)))
            cached = self._empty_cache
        return cached[1]

    def forward(self, batch: EditBatch) -> ModelOutput:
        with record_function("care/encode"):
            x0 = self.encode_target(batch)
            cond = self.encode_conditions(batch)
        b = x0.shape[0]
        t = self.sample_time(b, x0.device)
        noise = torch.randn_like(x0)
        tt = t.to(x0.dtype)[:, None, None, None]
        noisy = (1 - tt) * x0 + tt * noise
        velocity = noise - x0
        if self.training:
            cond = self.drop_conditions(cond)
        pred, ctx = self.predict_velocity(noisy, t, cond)
        with record_function("care/losses"):
            return self._losses(batch, pred, velocity, ctx)

    def _losses(self, batch: EditBatch, pred: Tensor, velocity: Tensor, ctx: ExpertContext) -> ModelOutput:
        records = [ctx.records[p] for p in sorted(ctx.records)]
        terms, layer_stats = self._loss_terms_fn(
            pred,
            velocity,
            ctx.gt_mask,
            ctx.grid,
            [r.routing.probs for r in records],
            [r.routing.index for r in records],
            [r.routing.weight for r in records],
            [r.refined_logits for r in records if r.refined_logits is not None],
            [r.gate for r in records if r.gate is not None],
            batch.tag_ids.to(pred.device),
            [r.routing.logits for r in records if r.routing.logits is not None],
            [r.refined_detail for r in records if r.refined_detail is not None],
            self._subgrid_target(batch, ctx.grid, pred.device),
        )
        lc = self.cfg.loss
        weights = {
            "diffusion": lc.diffusion,
            "load_balance": lc.load_balance,
            "router_z": lc.router_z,
            "mask_boundary": lc.mask_boundary,
            "mixture_smoothness": lc.mixture_smoothness,
            "tag_alignment": lc.tag_alignment,
        }
        loss = sum(weights[k] * v for k, v in terms.items())
        return ModelOutput(
            loss=loss,
            terms=terms,
            stats=self._routing_stats(sorted(ctx.records), layer_stats),
            num_tokens=pred.shape[0] * self._last_seq_len,
            prediction=pred,
        )

    def _coarse_cells(self, coarse: Tensor, grid: tuple[int, int]) -> Optional[Tensor]:
        """The coarse box's area fraction per cell of Mask Repaint's fine grid, per token [B, N, s*s], where
        the refined mask is confined to it on that grid (``repaint.within_coarse`` with ``subgrid`` s > 1)."""
        s = self.cfg.repaint.subgrid
        if not (self.cfg.repaint.enabled and self.cfg.repaint.within_coarse) or s <= 1:
            return None
        return cells_of_grid(mask_to_grid(coarse, (grid[0] * s, grid[1] * s)), s).to(coarse.dtype)

    def _subgrid_target(self, batch: EditBatch, grid: tuple[int, int], device: torch.device) -> Optional[Tensor]:
        """The fine mask's share of each cell of Mask Repaint's fine grid [B, gh*s, gw*s] (``repaint.subgrid``
        s > 1; else None): the target of the mask loss there."""
        s = self.cfg.repaint.subgrid
        if not self.cfg.repaint.enabled or s <= 1 or batch.fine_mask is None:
            return None
        return mask_to_grid(batch.fine_mask.to(device), (grid[0] * s, grid[1] * s))

    def loss_terms(
        self,
        pred: Tensor,
        velocity: Tensor,
        gt_mask: Optional[Tensor],
        grid: tuple[int, int],
        probs: list[Tensor],
        index: list[Tensor],
        weight: list[Tensor],
        refined: list[Tensor],
        gates: list[Tensor],
        tag_ids: Tensor,
        logits: Optional[list[Tensor]] = None,
        details: Optional[list[Tensor]] = None,
        fine_target: Optional[Tensor] = None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Every loss term (unweighted; only those with a non-zero weight), and the detached routing
        statistics per expert layer: ``util`` [L, E] (share of tokens selecting each expert), ``spread``
        [L] and ``entropy`` [L] (:func:`moe.losses.routing_spread`, :func:`moe.losses.routing_entropy`:
        the signs of a collapsed router), and ``gate`` [L] (mean mixture gate) and ``gate_spread`` [L] (its
        standard deviation over tokens). A pure function of tensors (compiled by :meth:`compile_regions`);
        nothing in it waits for the GPU. probs/logits [S, E], index/weight [S, K], refined and gates [B, N]
        per expert layer; with ``repaint.subgrid`` s > 1, details [B, N, s*s] per layer and fine_target
        [B, gh*s, gw*s], and the mask loss is taken on that grid."""
        lc = self.cfg.loss
        b = pred.shape[0]
        terms: dict[str, Tensor] = {}
        gh, gw = grid
        e = len(self.expert_names)
        learned = self.cfg.router.kind == "learned"
        region = region_weight(gt_mask, lc.region_alpha) if lc.region_alpha > 0 else None
        terms["diffusion"] = flow_matching_loss(pack_latents(pred), pack_latents(velocity), region)
        if lc.load_balance > 0 and learned and probs:
            terms["load_balance"] = torch.stack([load_balance_loss(p, i, e) for p, i in zip(probs, index)]).mean()
        if lc.router_z > 0 and learned and logits:
            terms["router_z"] = torch.stack([router_z_loss(lg) for lg in logits]).mean()
        if lc.mask_boundary > 0 and refined and details and fine_target is not None:
            # repaint.subgrid > 1: the mask loss on the fine grid, through the token logits and their patches
            terms["mask_boundary"] = torch.stack(
                [
                    mask_boundary_loss(subgrid_logits(lg, d, grid), fine_target, lc.boundary_band, lc.boundary_weight)
                    for lg, d in zip(refined, details)
                ]
            ).mean()
        elif lc.mask_boundary > 0 and refined:
            fine = gt_mask.reshape(b, gh, gw)
            terms["mask_boundary"] = torch.stack(
                [
                    mask_boundary_loss(lg.reshape(b, gh, gw), fine, lc.boundary_band, lc.boundary_weight)
                    for lg in refined
                ]
            ).mean()
        if lc.mixture_smoothness > 0 and learned and index:
            terms["mixture_smoothness"] = torch.stack(
                [mixture_smoothness_loss(dense_weights(i, w, e).reshape(b, gh, gw, e)) for i, w in zip(index, weight)]
            ).mean()
        if lc.tag_alignment > 0 and probs:
            signature = torch.stack([p.reshape(b, -1, e).mean(dim=1) for p in probs]).mean(dim=0)
            valid = (tag_ids >= 0).unsqueeze(-1)
            task = (self.tag_embed(tag_ids.clamp(min=0)) * valid).sum(dim=1)
            terms["tag_alignment"] = tag_alignment_loss(self.tag_predictor(signature.to(self.dtype)), task)
        layer_stats: dict[str, Tensor] = {}
        with torch.no_grad():
            if index:
                layer_stats["util"] = torch.stack([dense_weights(i, (i >= 0).float(), e).mean(dim=0) for i in index])
                layer_stats["spread"] = torch.stack(
                    [routing_spread(dense_weights(i, w, e).reshape(b, -1, e)) for i, w in zip(index, weight)]
                )
                layer_stats["entropy"] = torch.stack([routing_entropy(p) for p in probs])
            if gates:
                layer_stats["gate"] = torch.stack([g.float().mean() for g in gates])
                layer_stats["gate_spread"] = torch.stack([g.float().reshape(b, -1).std(dim=1).mean() for g in gates])
        return terms, layer_stats

    def _routing_stats(self, positions: list[int], layer_stats: dict[str, Tensor]) -> dict[str, Tensor]:
        """Views into the statistics tensors, named for the logs (no kernels, no waiting):
        ``util/block<i>/<expert>``, ``routing_spread/block<i>``, ``routing_entropy/block<i>``,
        ``gate/block<i>``, ``gate_spread/block<i>``."""
        stats: dict[str, Tensor] = {}
        names = {"spread": "routing_spread", "entropy": "routing_entropy", "gate": "gate", "gate_spread": "gate_spread"}
        for row, position in enumerate(positions):
            block = self.expert_blocks[position]
            if "util" in layer_stats:
                for col, name in enumerate(self.expert_names):
                    stats[f"util/block{block}/{name}"] = layer_stats["util"][row, col]
            for key, label in names.items():
                if key in layer_stats and row < layer_stats[key].shape[0]:
                    stats[f"{label}/block{block}"] = layer_stats[key][row]
        return stats

    def routing_warnings(self, stats: dict, min_spread: float = 0.01, min_entropy: float = 0.05) -> list[str]:
        """Warnings for the log where a learned router has collapsed (:func:`routing_collapse_warnings`);
        none for the uniform and static ablations, which route alike on purpose."""
        if self.cfg.router.kind != "learned":
            return []
        return routing_collapse_warnings(stats, min_spread, min_entropy)

    # -- FLOPs ------------------------------------------------------------------------------------
    def flops_per_token(self) -> float:
        """Forward model FLOPs per sequence token: 2 per weight of every linear layer of the backbone
        (LoRA and experts included, K experts active per target token), plus attention (4 * S * D per
        layer). Recompute from gradient checkpointing is not counted (model FLOPs, not hardware FLOPs)."""
        tr = self.backbone.transformer
        linear = sum(
            m.weight.numel() for name, m in tr.named_modules() if isinstance(m, nn.Linear) and ".moe." not in name
        )
        d = self.backbone.hidden_size
        layers = len(tr.transformer_blocks) + len(tr.single_transformer_blocks)
        attention = 4 * max(self._last_seq_len, 1) * d * layers
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
        keep_outside_box: bool = False,
    ) -> EditResult:
        """Flow-matching Euler sampler (diffusers' scheduler) with InstructPix2Pix-style guidance:
        v = v(none) + s_img * (v(image) - v(none)) + s_txt * (v(image, text) - v(image)).
        A guidance scale left as None is the recipe's (``model.sampling``).

        ``keep_outside_box``: after every step, the latents outside the user's box are replaced by the
        source's latents noised to the next time (with the sampler's own starting noise), as
        inpainting samplers do: the box is the user's statement of where the edit may happen, and
        outside it the result is the source (exactly, with a lossless codec). Off by default: it is an
        inference-time constraint, and evaluations report with and without it."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        if text_guidance is None:
            text_guidance = self.cfg.sampling.text_guidance
        if image_guidance is None:
            image_guidance = self.cfg.sampling.image_guidance
        was_training = self.training
        self.eval()
        cond = self.encode_conditions(batch)
        guided = text_guidance != 1.0 or image_guidance != 1.0
        if guided:
            cond_img = self.encode_conditions(batch, drop_text=True)
            cond_none = self.encode_conditions(batch, drop_text=True, drop_image=True)
        b, c, h, w = cond.base.shape
        # noise drawn on the generator's device, then moved: one seed, one edit, on CPU or GPU
        gen_device = generator.device if generator is not None else torch.device("cpu")
        x = torch.randn((b, c, h, w), generator=generator, device=gen_device, dtype=torch.float32)
        x = x.to(cond.base.device)
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        scheduler.set_timesteps(num_steps, device=cond.base.device)
        keep = None
        if keep_outside_box:  # 1 where a latent pixel lies wholly outside the box
            keep = 1 - nn.functional.adaptive_max_pool2d(cond.coarse.float(), (h, w))
            start_noise, source = x.clone(), cond.base.float()
        ctx = None
        for i, t in enumerate(scheduler.timesteps):
            tb = (t / 1000.0).expand(b).to(cond.base.device)
            v, ctx = self.predict_velocity(x.to(self.dtype), tb, cond)
            if guided:
                v_img, _ = self.predict_velocity(x.to(self.dtype), tb, cond_img)
                v_none, _ = self.predict_velocity(x.to(self.dtype), tb, cond_none)
                v = v_none + image_guidance * (v_img - v_none) + text_guidance * (v - v_img)
            x = scheduler.step(v.float(), t, x).prev_sample
            if keep is not None:
                t_next = float(scheduler.sigmas[i + 1])
                x = keep * ((1 - t_next) * source + t_next * start_noise) + (1 - keep) * x
        images = self.vae.decode(x.to(self.dtype)).float()
        self.train(was_training)
        result = self._edit_result(images, ctx, cond)
        result.guidance = {"text": float(text_guidance), "image": float(image_guidance)}
        return result

    def _edit_result(self, images: Tensor, ctx: Optional[ExpertContext], cond: Conditions) -> EditResult:
        b, _, hh, ww = images.shape
        size = (hh, ww)
        up = lambda grid: nn.functional.interpolate(grid, size=size, mode="nearest")  # noqa: E731
        if ctx is None or not ctx.records:
            return EditResult(images, cond.coarse.float(), torch.zeros_like(images))
        gh, gw = ctx.grid
        last = max(ctx.refined) if ctx.refined else None
        detail = ctx.records[last].refined_detail if last is not None and last in ctx.records else None
        if detail is not None:  # repaint.subgrid > 1: the mask on the fine grid
            refined = torch.sigmoid(subgrid_logits(ctx.records[last].refined_logits.float(), detail.float(), (gh, gw)))
            refined = up(refined[:, None])
        else:
            refined = ctx.refined[last] if last is not None else ctx.coarse
            refined = up(refined.float().reshape(b, 1, gh, gw))
        record = ctx.records[max(ctx.records)]
        e = len(self.expert_names)
        dense = dense_weights(record.routing.index, record.routing.weight, e).reshape(b, gh, gw, e)
        dominant = dense.argmax(dim=-1)
        palette = torch.tensor([EXPERT_COLOURS[nm] for nm in self.expert_names], device=images.device)
        colours = palette[dominant].permute(0, 3, 1, 2)  # [B, 3, gh, gw] in [0, 1]
        util = dense.gt(0).float().mean(dim=(0, 1, 2))
        return EditResult(
            images=images,
            refined_mask=refined,
            routing_map=up(colours) * 2 - 1,
            utilisation={nm: float(u) for nm, u in zip(self.expert_names, util)},
        )


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
