"""The CARE-Edit expert layer, installed in place of a block's image-stream feed-forward.

``CareMoE`` is a ``deepspeed.moe.layer.MoE`` (so the DeepSpeed engine creates its expert-parallel
groups, splits its parameters into MoE optimizer groups and checkpoints it per expert), keeping
DeepSpeed's parameter naming ``deepspeed_moe.experts.deepspeed_experts.<local id>``, but with
heterogeneous experts and its own dispatch (``moe.dispatch``), because DeepSpeed's gate cannot see
the per-sample task context and its capacity-based dispatch drops tokens.

``ExpertFeedForward`` wraps the frozen FFN of a block. The block passes it the per-forward
:class:`ExpertContext` and its :class:`LayerSlot` as arguments (``moe.backbone.FluxDualBlock``). For
the target tokens it runs, in order: condition read-outs -> Mask Repaint -> router -> Latent Mixture
weights -> dispatch to experts.
Condition tokens (base, reference, mask) pass through the frozen FFN unchanged. The frozen FFN it
wraps carries no LoRA (:func:`strip_lora`): a shared adapter there would run beside the experts on
every target token and could absorb what they are meant to learn.
Nothing here is named "expert" outside ``CareMoE`` (DeepSpeed's checkpointing treats any state key
of an MoE module containing "expert" as an expert weight).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch
import torch.distributed as torch_dist
from deepspeed.moe.layer import MoE
from torch import Tensor, nn
from torch.profiler import record_function

from .config import ModelConfig
from .dispatch import build_dispatcher
from .encoders import seeded
from .experts import build_expert, one_lora_rank, packed_width
from .intervention import RoutingIntervention
from .repaint import LatentMixture, MaskRepaint, confine_to_coarse
from .router import ConditionRouter, Routing, routing_confidence


def strip_lora(module: nn.Module) -> nn.Module:
    """``module`` with every peft LoRA layer inside it replaced by the frozen layer it wraps (in place)."""
    for name, child in list(module.named_children()):
        base = getattr(child, "base_layer", None)
        if base is not None and hasattr(child, "lora_A"):
            setattr(module, name, base)
        else:
            strip_lora(child)
    return module


class _ExpertStack(nn.Module):
    """Same attribute layout as ``deepspeed.moe.experts.Experts``: ``deepspeed_experts`` ModuleList."""

    def __init__(self, experts: list[nn.Module], group_name: str):
        super().__init__()
        self.deepspeed_experts = nn.ModuleList(experts)
        self.num_local_experts = len(experts)
        for expert in self.deepspeed_experts:
            for p in expert.parameters():
                p.allreduce = False  # reduced only inside the expert-data-parallel group
                p.group_name = group_name


class _DispatchLayer(nn.Module):
    """Stands where DeepSpeed's ``MOELayer`` stands (``MoE.deepspeed_moe``)."""

    def __init__(self, experts: _ExpertStack, dispatcher, ep_size: int):
        super().__init__()
        self.experts = experts
        self.dispatcher = dispatcher
        self.ep_size = ep_size
        self.ep_group = None

    def _set_ep_group(self, group) -> None:
        self.ep_group = group
        if self.ep_size > 1:
            rank = torch_dist.get_rank(group)
            if rank != self.dispatcher.ep_rank:
                raise RuntimeError(
                    f"expert-parallel rank {rank} differs from the rank ({self.dispatcher.ep_rank}) the experts "
                    "were built for: build the model after torch.distributed is initialised"
                )

    def forward(self, packed: Tensor, index: Tensor, weight: Tensor) -> Tensor:
        if self.ep_size > 1 and self.ep_group is None:
            raise RuntimeError("expert parallelism needs its process group: call set_deepspeed_parallelism()")
        return self.dispatcher(packed, index, weight, self.experts.deepspeed_experts, self.ep_group)


class CareMoE(MoE):
    def __init__(self, local_experts: list[nn.Module], num_experts: int, ep_size: int, ep_rank: int, dispatcher):
        nn.Module.__init__(self)  # MoE.__init__ would build a stock gate and homogeneous experts
        self.use_residual = False
        self.enable_expert_tensor_parallelism = False
        self.ep_size = ep_size
        self.ep_rank = ep_rank
        self.expert_group_name = f"ep_size_{ep_size}"
        self.num_experts = num_experts
        self.num_local_experts = num_experts // ep_size
        self.deepspeed_moe = _DispatchLayer(_ExpertStack(local_experts, self.expert_group_name), dispatcher, ep_size)

    def forward(self, packed: Tensor, index: Tensor, weight: Tensor) -> Tensor:  # type: ignore[override]
        """packed [S, W], index/weight [S, K] (global expert ids, -1 = none) -> [S, D]."""
        return self.deepspeed_moe(packed, index, weight)


@dataclass
class LayerRecord:
    """What one expert layer reports for the losses and the logs (target tokens, flattened B*N)."""

    routing: Routing
    gate: Optional[Tensor]  # [B, N] Latent Mixture gate per target token
    refined_logits: Optional[Tensor]  # [B, N]
    refined_detail: Optional[Tensor] = None  # [B, N, s*s] Mask Repaint's patch offsets (repaint.subgrid > 1)


@dataclass
class LayerSlot:
    """What one expert layer reads and writes in one forward: the mask it starts from, what it refines
    it to, and what it reports. The layer receives its slot as an argument of its call, and does not
    look it up by its position: a position read in the trace would be a constant, and each expert
    block would compile its own graph instead of sharing one."""

    prior: Optional[Tensor] = None  # [B, N] set just before the layer's block runs (ExpertContext.enter)
    refined: Optional[Tensor] = None  # [B, N] refined mask in [0, 1] (Mask Repaint on)
    record: Optional[LayerRecord] = None


@dataclass
class ExpertContext:
    """Per-forward inputs shared by all expert layers, and what they report back (one slot per layer).

    The model builds one for each forward and hands it, with the layer's slot, to each expert layer
    as an argument of its block's call (``FluxBackbone.run_blocks``' ``feed_forward_args``): nothing
    outlives the forward or is shared between forwards, so forwards of several models may be in
    flight at once, nested, or in several threads."""

    num_target: int
    grid: tuple[int, int]
    mask_span: tuple[int, int]
    ref_span: Optional[tuple[int, int]]
    base_span: tuple[int, int]  # the base-image tokens, in the target tokens' grid order
    has_ref: Tensor  # [B] bool
    text: Tensor  # [B, L, D] embedded text tokens
    text_mask: Optional[Tensor]  # [B, L] bool
    temb: Tensor  # [B, D]
    presence: Tensor  # [B, 3] float: text, reference, mask present
    available: Tensor  # [B, E] bool: experts that may be selected
    coarse: Tensor  # [B, N] coarse box on the token grid (area fraction)
    coarse_cells: Optional[Tensor] = None  # [B, N, s*s] its area fraction per subgrid cell (repaint.within_coarse)
    gt_mask: Optional[Tensor] = None  # [B, N] fine mask on the token grid (teacher-forced repaint, training)
    regions: Optional[Tensor] = None  # [B, N] long token region labels (moe.regions), compositional samples
    intervention: Optional[RoutingIntervention] = None  # a change of routing at inference (moe.intervention)
    slots: list[LayerSlot] = field(default_factory=list)  # by layer position

    def enter(self, position: int) -> LayerSlot:
        """The slot of the layer at ``position``, its prior set: the refined mask of the layer before
        it, or the coarse box for the first (or when Mask Repaint is off)."""
        slot = self.slots[position]
        before = self.slots[position - 1].refined if position > 0 else None
        slot.prior = before if before is not None else self.coarse
        return slot

    @property
    def records(self) -> dict[int, LayerRecord]:
        """position -> what the layer reported (layers that ran)."""
        return {p: s.record for p, s in enumerate(self.slots) if s.record is not None}

    @property
    def refined(self) -> dict[int, Tensor]:
        """position -> refined mask [B, N] in [0, 1] (Mask Repaint on)."""
        return {p: s.refined for p, s in enumerate(self.slots) if s.refined is not None}


@dataclass
class RouteInput:
    """What :meth:`ExpertFeedForward.route` reads: one layer's tokens, the shared per-forward context,
    and the layer's own mask prior and (AdaptEdit, in training) the fine mask its editing path reads."""

    hidden: Tensor  # [B, N_img, D] normed image-stream tokens, target first
    ctx: ExpertContext
    prior: Tensor  # [B, N] refined mask of the layer before (the coarse box for the first)
    gt_mask: Optional[Tensor] = None  # [B, N] fine mask in place of the refined one (repaint.use_gt_mask_in_training)


class RouteOutput(NamedTuple):
    """What :meth:`ExpertFeedForward.route` computes for the S = B * N target tokens."""

    packed: Tensor  # [S, W] tokens with their condition columns (moe.experts.packed_width)
    index: Tensor  # [S, K+1] expert ids to dispatch: top-K plus Base's mixture share ([S, K], mixture off)
    weight: Tensor  # [S, K+1] their weights
    routing: Routing  # the router's own probabilities, top-K and logits
    gate: Optional[Tensor]  # [B, N] Latent Mixture gate (mixture off: None)
    refined_logits: Optional[Tensor]  # [B, N] Mask Repaint's logits (repaint off: None)
    refined: Optional[Tensor]  # [B, N] the refined mask in [0, 1] (repaint off: None)
    refined_detail: Optional[Tensor]  # [B, N, s*s] its patch offsets (repaint.subgrid > 1; else None)


class ExpertFeedForward(nn.Module):
    """The expert layer in place of one block's image-stream FFN (see the module docstring).

    It is called by its block as ``ff(hidden, ctx, slot)``: ``ctx`` the per-forward
    :class:`ExpertContext`, ``slot`` this layer's :class:`LayerSlot` in it. Compiled
    (``CareEditModel.compile_regions``), a :attr:`traceable` layer (no host value needed) is traced
    into its block's graph, context reads and slot writes included; any other layer breaks the
    block's graph and compiles its routing stage apart (:meth:`enable_compile`).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        frozen_ff: nn.Module,
        dim: int,
        position: int,
        ep_rank: int = 0,
        expert_seed: int = 0,
    ):
        super().__init__()
        ex = cfg.experts
        self.position = position
        self.kind = ex.kind
        self.expert_names = ex.names()
        self.base_id = self.expert_names.index("base") if "base" in self.expert_names else -1
        self.frozen_ff = strip_lora(frozen_ff)
        self.decoupled = cfg.repaint.mode == "decoupled"
        self.use_gt_mask = cfg.repaint.use_gt_mask_in_training
        self.within_coarse = cfg.repaint.within_coarse
        c = cfg.router.ctx_dim
        self.router = ConditionRouter(cfg.router, dim, len(self.expert_names), dim, self.expert_names)
        self.repaint = MaskRepaint(dim, c, cfg.repaint.hidden, cfg.repaint.subgrid) if cfg.repaint.enabled else None
        self.mixture = LatentMixture(dim, cfg.mixture.fixed_gate) if cfg.mixture.enabled else None
        kind, rank = ex.kind, ex.rank
        if kind == "one_lora":  # one adapter with the parameters of the enabled lora experts
            kind, rank = "lora", one_lora_rank(dim, c, ex.rank, list(ex.enabled))

        n_local = len(self.expert_names) // ex.ep_size
        local = []
        for j in range(n_local):
            e = ep_rank * n_local + j
            # each expert is initialised from its own seed, so any ep_size builds identical experts
            with seeded(expert_seed * 1009 + e):
                local.append(
                    build_expert(
                        kind,
                        self.expert_names[e],
                        dim,
                        c,
                        rank,
                        self.frozen_ff,
                        ex.init_std,
                        e,
                        len(self.expert_names),
                        seed=expert_seed * 1009 + 7919,
                    )
                )
        dispatcher = build_dispatcher(ex.dispatch, kind, ex.ep_size, ep_rank, ex.use_grouped_gemm())
        self.moe = CareMoE(local, len(self.expert_names), ex.ep_size, ep_rank, dispatcher)
        self.packed_width = packed_width(dim, c)
        self._route_fn, self._mix_fn = self.route, self.mix  # compiled apart by enable_compile()
        self._eager_forward = None  # set by enable_compile(): a graph break around the bookkeeping

    # -- execution ----------------------------------------------------------------------------
    @property
    def traceable(self) -> bool:
        """Whether the whole layer, context bookkeeping included, can be traced into its block's graph:
        yes unless its dispatch needs host values (the all-to-all's split sizes, the per-expert loop's
        row counts). Decided by the parameters' dtype and device when it is asked (compile time)."""
        moe = self.moe.deepspeed_moe
        return moe.dispatcher.host_sync_free(moe.experts.deepspeed_experts)

    @property
    def compiled_apart(self) -> bool:
        """True after :meth:`enable_compile`: the layer breaks its block's graph."""
        return self._eager_forward is not None

    def enable_compile(self, **compile_kwargs) -> None:
        """For a layer that is not :attr:`traceable`: compile its pure routing stage apart.

        Such a layer breaks its block's graph: :meth:`forward` then runs eagerly (its dispatch
        synchronises with the host) and :meth:`route` (read-outs, repaint, router, mixture, packing) is
        compiled on its own, one graph shared by all layers (and :meth:`mix` too when it has no host
        synchronisation; only for direct callers). A traceable layer is normally compiled as part of its
        block instead (``CareEditModel.compile_regions``).
        """
        self._route_fn = torch.compile(self.route, **compile_kwargs)
        if self.traceable:
            self._mix_fn = torch.compile(self.mix, **compile_kwargs)
        self._eager_forward = torch.compiler.disable(self._forward)

    def forward(self, hidden: Tensor, ctx: Optional[ExpertContext] = None, slot: Optional[LayerSlot] = None) -> Tensor:
        """hidden [B, N_img, D]: the normed image-stream tokens (target first) -> FFN output, same shape.
        Records the layer's routing and refined mask in ``slot``."""
        if ctx is None or slot is None:
            raise RuntimeError(
                "expert layer called without its context: it runs inside CareEditModel, whose blocks pass it "
                "(hidden, ctx, slot); the backbone alone (FluxBackbone.run_blocks without feed_forward_args) "
                "cannot run it"
            )
        if self._eager_forward is not None:
            return self._eager_forward(hidden, ctx, slot)
        return self._forward(hidden, ctx, slot)

    def _forward(self, hidden: Tensor, ctx: ExpertContext, slot: LayerSlot) -> Tensor:
        gt = ctx.gt_mask if (self.use_gt_mask and self.training) else None
        out = self._route_fn(RouteInput(hidden=hidden, ctx=ctx, prior=slot.prior, gt_mask=gt))
        if out.refined is not None:
            slot.refined = out.refined
        slot.record = LayerRecord(
            routing=out.routing, gate=out.gate, refined_logits=out.refined_logits, refined_detail=out.refined_detail
        )
        return self._mix_fn(hidden, out.packed, out.index, out.weight)

    def route(self, inp: RouteInput) -> RouteOutput:
        """Condition read-outs -> Mask Repaint -> router -> Latent Mixture -> packed tokens.

        A pure function of its input (compilable; it writes nothing), over the S = B * N target tokens.
        The index/weight to dispatch are the router's top-K with Base's Latent Mixture share merged
        into its slot or in the extra one.
        """
        ctx, hidden, prior, gt_mask, coarse = inp.ctx, inp.hidden, inp.prior, inp.gt_mask, inp.ctx.coarse
        b, n, grid = hidden.shape[0], ctx.num_target, ctx.grid
        x = hidden[:, :n]
        ref = hidden[:, ctx.ref_span[0] : ctx.ref_span[1]] if ctx.ref_span is not None else None
        mask_tokens = hidden[:, ctx.mask_span[0] : ctx.mask_span[1]]
        base_tokens = hidden[:, ctx.base_span[0] : ctx.base_span[1]]  # [B, N, D], same grid order as x
        with record_function("care/router_contexts"):
            contexts = self.router.contexts(x, ctx.text, ctx.text_mask, ref, ctx.has_ref, mask_tokens, base_tokens)

        refined_logits = refined = refined_detail = None
        if self.repaint is not None:
            inputs = (x, contexts[1], contexts[3], prior)
            if self.decoupled:  # AdaptEdit: the mask head learns from its own loss only
                inputs = tuple(t.detach() for t in inputs)
            with record_function("care/repaint"):
                refined_logits, refined_detail = self.repaint(*inputs, coarse, grid)
                if self.within_coarse:
                    refined_logits, refined_detail = confine_to_coarse(
                        refined_logits, refined_detail, coarse, ctx.coarse_cells
                    )
            refined = torch.sigmoid(refined_logits)
            edit_mask = refined.detach() if self.decoupled else refined
            if gt_mask is not None:
                edit_mask = gt_mask
        else:
            edit_mask = coarse

        with record_function("care/router"):
            # decoupled: the previous layer's refined mask reaches the router as a value, not a path back
            router_prior = prior.detach() if self.decoupled else prior
            routing = self.router(x, contexts, router_prior, ctx.temb, ctx.presence, ctx.available, ctx.regions)
        iv = ctx.intervention
        if iv is not None:  # routing changed at inference; probabilities, gate and all else as they were
            routing = iv.routed(routing, ctx.regions, b, len(self.expert_names))
        index, weight, gate = routing.index, routing.weight, None
        if self.mixture is not None:
            with record_function("care/mixture"):
                gate = self.mixture(ctx.temb, routing_confidence(routing.probs).view(b, n, 2))  # [B, N]
                index, weight = LatentMixture.blend(index, weight, gate.reshape(-1), self.base_id)
        if iv is not None:
            index, weight = iv.dispatched(index, weight, self.expert_names)
        columns = [x, *contexts, edit_mask[..., None].to(x.dtype)]  # the layout of moe.experts.packed_width
        pad = self.packed_width - sum(t.shape[-1] for t in columns)  # aligned rows (experts.packed_width)
        columns.append(x.new_zeros(b, n, pad))
        packed = torch.cat(columns, dim=-1).reshape(b * n, -1)  # [S, W]
        return RouteOutput(packed, index, weight, routing, gate, refined_logits, refined, refined_detail)

    def mix(self, hidden: Tensor, packed: Tensor, index: Tensor, weight: Tensor) -> Tensor:
        """Experts on the target tokens (weighted by the routing), the frozen FFN on the rest."""
        b, n_img, d = hidden.shape
        n = packed.shape[0] // b
        with record_function("care/experts"):
            y = self.moe(packed, index, weight).view(b, n, d)
        with record_function("care/frozen_ffn"):
            if self.kind == "lora":  # a residual on the frozen FFN's output
                frozen = self.frozen_ff(hidden)
                return torch.cat([frozen[:, :n] + y, frozen[:, n:]], dim=1)
            return torch.cat([y, self.frozen_ff(hidden[:, n:])], dim=1)
