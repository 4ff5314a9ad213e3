"""Backbone adapters: the frozen DiT behind a small interface the expert code relies on.

The interface (what ``moe.model`` calls) is:

* ``hidden_size``, ``num_expert_capable_blocks``, ``patch_channels``
* ``embed_image(packed) / embed_text(embeds) / embed_time(t, pooled, guidance)``
* ``feed_forward(block_id)`` / ``set_feed_forward(block_id, module)``: the image-stream FFN of a block,
  where an expert layer is installed (it receives the normed image-stream tokens, returns the FFN output)
* ``run_blocks(img, txt, temb, img_ids, txt_ids, attention_mask, feed_forward_args)`` -> image-stream hidden
  states; ``feed_forward_args(i)`` gives the extra arguments of block ``i``'s image-stream FFN
* ``project_out(hidden, temb)`` -> per-token prediction in packed-latent channels

An SD3 or Qwen-Image DiT adapter implements the same methods; nothing in the expert code names FLUX.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import BackboneConfig, FluxArch, LoraConfig
from .encoders import freeze, read_local, seeded
from .lora_siblings import share_down

_SDPA_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
    "cudnn": "CUDNN_ATTENTION",
}


def pack_latents(latents: Tensor) -> Tensor:
    """[B, C, h, w] -> [B, (h/2)*(w/2), C*4]: FLUX's 2x2 patch packing, row-major over the token grid."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, h: int, w: int) -> Tensor:
    """Inverse of :func:`pack_latents`; h, w are the latent (not token) height and width."""
    b, _, c4 = tokens.shape
    x = tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def velocity_from_sample(noisy: Tensor, sample: Tensor, t: Tensor, t_min: float) -> Tensor:
    """A sample-predicting base's output as a velocity: x_t = (1 - t) x0 + t noise, so the velocity
    noise - x0 = (x_t - x0) / t; t [B] clamped at t_min (no blow-up as t -> 0)."""
    return (noisy - sample) / t.clamp_min(t_min).to(noisy.dtype)[:, None, None, None]


def grid_position_ids(gh: int, gw: int, offset: int, device: torch.device) -> Tensor:
    """[gh*gw, 3] RoPE ids (condition offset, row, col): each condition gets its own first-axis index."""
    ids = torch.zeros(gh, gw, 3, device=device)
    ids[..., 0] = offset
    ids[..., 1] = torch.arange(gh, device=device)[:, None]
    ids[..., 2] = torch.arange(gw, device=device)[None, :]
    return ids.reshape(gh * gw, 3)


def flux_arch_kwargs(a: FluxArch) -> dict:
    kwargs = {k: getattr(a, k) for k in FluxArch.__dataclass_fields__}
    kwargs["axes_dims_rope"] = tuple(a.axes_dims_rope)
    return kwargs


class FluxDualBlock(nn.Module):
    """diffusers' ``FluxTransformerBlock`` (dual-stream) with its forward owned here.

    diffusers' forward calls ``self.ff(norm_hidden_states)`` and nothing more, so an expert layer in
    place of ``ff`` could not be handed the per-forward context it needs. This block takes over the
    diffusers block's submodules, in their order and under their names (parameter names, and with
    them checkpoints, optimizer groups and peft's LoRA layers, stay as they are), and runs the same
    computation (diffusers 0.42's ``FluxTransformerBlock.forward``; tests/test_model_layers.py checks
    it against diffusers' own), except that ``ff_args`` are passed on to ``self.ff``. The arguments
    travel through the call, so gradient checkpointing and ``torch.compile`` see them as inputs of
    the block like the hidden states.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        from diffusers.models.transformers.transformer_flux import FluxTransformerBlock

        if not isinstance(block, FluxTransformerBlock):
            raise TypeError(f"FluxDualBlock takes over a diffusers FluxTransformerBlock, not {type(block).__name__}")
        for name, module in block.named_children():  # diffusers' order: the parameters keep their order
            self.add_module(name, module)

    def forward(
        self,
        hidden_states: Tensor,  # [B, N_img, D]
        encoder_hidden_states: Tensor,  # [B, L, D]
        temb: Tensor,  # [B, D]
        image_rotary_emb: Optional[tuple[Tensor, Tensor]] = None,
        joint_attention_kwargs: Optional[dict[str, Any]] = None,
        ff_args: tuple = (),
    ) -> tuple[Tensor, Tensor]:
        """(text stream, image stream), as diffusers returns them; ``ff_args`` go to the image-stream FFN."""
        norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
        norm_encoder_hidden_states, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(
            encoder_hidden_states, emb=temb
        )
        attention_outputs = self.attn(
            hidden_states=norm_hidden_states,
            encoder_hidden_states=norm_encoder_hidden_states,
            image_rotary_emb=image_rotary_emb,
            **(joint_attention_kwargs or {}),
        )
        attn_output, context_attn_output = attention_outputs[:2]  # a third output: IP-adapter attention

        # image stream
        hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_output
        norm_hidden_states = self.norm2(hidden_states)
        norm_hidden_states = norm_hidden_states * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        ff_output = self.ff(norm_hidden_states, *ff_args)
        hidden_states = hidden_states + gate_mlp.unsqueeze(1) * ff_output
        if len(attention_outputs) == 3:
            hidden_states = hidden_states + attention_outputs[2]

        # text stream
        encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * context_attn_output
        norm_encoder_hidden_states = self.norm2_context(encoder_hidden_states)
        norm_encoder_hidden_states = norm_encoder_hidden_states * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        context_ff_output = self.ff_context(norm_encoder_hidden_states)
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * context_ff_output
        if encoder_hidden_states.dtype == torch.float16:
            encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
        return encoder_hidden_states, hidden_states


def call_block(
    block: nn.Module, img: Tensor, txt: Tensor, temb: Tensor, rope, kwargs: Optional[dict], ff_args: tuple
) -> tuple[Tensor, Tensor]:
    """One transformer block on the two streams -> (txt, img). Only dual blocks take ``ff_args``
    (single blocks have no separate image-stream FFN), and only when there are any."""
    if ff_args:
        return block(img, txt, temb, rope, kwargs, ff_args)
    return block(
        hidden_states=img, encoder_hidden_states=txt, temb=temb, image_rotary_emb=rope, joint_attention_kwargs=kwargs
    )


class CheckpointedBlock(nn.Module):
    """One transformer block called under activation checkpointing, as one module to compile.

    Compiled, the checkpoint becomes part of the graph: the forward keeps only the block's inputs and
    the compiled backward recomputes what it needs. Held outside the model's module tree (the block
    keeps its own place and parameter names); every instance shares one compiled graph per block kind.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(
        self, img: Tensor, txt: Tensor, temb: Tensor, rope, kwargs: Optional[dict], ff_args: tuple = ()
    ) -> tuple[Tensor, Tensor]:
        return checkpoint(self._call, img, txt, temb, rope, kwargs, ff_args, use_reentrant=False)

    def _call(
        self, img: Tensor, txt: Tensor, temb: Tensor, rope, kwargs: Optional[dict], ff_args: tuple
    ) -> tuple[Tensor, Tensor]:
        return call_block(self.block, img, txt, temb, rope, kwargs, ff_args)


class FluxBackbone(nn.Module):
    """diffusers ``FluxTransformer2DModel``, frozen, with peft LoRA on the configured projections."""

    def __init__(self, cfg: BackboneConfig, lora: LoraConfig, init_seed: int = 0):
        super().__init__()
        from diffusers import FluxTransformer2DModel

        if cfg.path is not None:
            self.transformer = read_local(
                FluxTransformer2DModel.from_pretrained, cfg.path, subfolder=cfg.subfolder, local_files_only=True
            )
        else:
            with seeded(init_seed):
                self.transformer = FluxTransformer2DModel(**flux_arch_kwargs(cfg.arch))
        blocks = self.transformer.transformer_blocks
        for i, block in enumerate(blocks):  # the dual blocks' forward is ours (FluxDualBlock)
            blocks[i] = FluxDualBlock(block)
        freeze(self.transformer)
        self.gradient_checkpointing = cfg.gradient_checkpointing
        # id(block) -> compiled CheckpointedBlock (compile_blocks); a plain dict: not part of the state
        self._whole_blocks: dict[int, nn.Module] = {}
        self.attention_backend = cfg.attention_backend
        self._shared_down: list[list] = []  # share_lora_down
        if lora.rank > 0:
            self._add_lora(lora)

    def _add_lora(self, lora: LoraConfig) -> None:
        from peft import LoraConfig as PeftLoraConfig
        from peft import inject_adapter_in_model

        peft_cfg = PeftLoraConfig(
            r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.targets)
        )
        inject_adapter_in_model(peft_cfg, self.transformer)  # lora_B starts at zero: output unchanged
        if lora.shared_down:
            self.share_lora_down()

    def share_lora_down(self) -> int:
        """Let the LoRA'd projections that read the same tokens share one down projection product
        (:mod:`moe.lora_siblings`): in a single block q, k, v and the MLP input read the normed tokens;
        in a dual block q, k, v read the image stream and the added projections the text stream.
        ``run_blocks`` turns each block's sharing on around its call. Returns how many groups formed."""
        tr = self.transformer
        self._shared_down = []  # per block, in run_blocks' order (dual blocks first); plain lists, no state
        for block in tr.transformer_blocks:
            a = block.attn
            siblings = [[a.to_q, a.to_k, a.to_v], [a.add_q_proj, a.add_k_proj, a.add_v_proj]]
            self._shared_down.append([g for g in map(share_down, siblings) if g is not None])
        for block in tr.single_transformer_blocks:
            group = share_down([block.proj_mlp, block.attn.to_q, block.attn.to_k, block.attn.to_v])
            self._shared_down.append([group] if group is not None else [])
        return sum(len(groups) for groups in self._shared_down)

    def _sharing(self, i: int) -> ContextManager:
        """The shared LoRA down products of block ``i`` on, for one call of it."""
        groups = self._shared_down[i] if i < len(self._shared_down) else ()
        if not groups:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for group in groups:
            stack.enter_context(group.sharing())
        return stack

    # -- shape facts -------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return int(self.transformer.inner_dim)

    @property
    def num_expert_capable_blocks(self) -> int:
        return len(self.transformer.transformer_blocks)

    @property
    def patch_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    @property
    def uses_guidance(self) -> bool:
        return bool(self.transformer.config.guidance_embeds)

    # -- embeddings --------------------------------------------------------------------------
    def embed_image(self, packed: Tensor) -> Tensor:
        return self.transformer.x_embedder(packed)

    def embed_text(self, embeds: Tensor) -> Tensor:
        return self.transformer.context_embedder(embeds)

    def embed_time(self, t: Tensor, pooled: Tensor, guidance: Optional[Tensor] = None) -> Tensor:
        """t in [0, 1] (flow-matching time = noise level), as the FLUX pipeline passes it (x1000 inside)."""
        dtype = pooled.dtype
        if self.uses_guidance:
            g = guidance if guidance is not None else torch.full_like(t, 3.5)
            return self.transformer.time_text_embed(t.to(dtype) * 1000, g.to(dtype) * 1000, pooled)
        return self.transformer.time_text_embed(t.to(dtype) * 1000, pooled)

    # -- expert-layer installation ------------------------------------------------------------
    def feed_forward(self, block_id: int) -> nn.Module:
        return self.transformer.transformer_blocks[block_id].ff

    def set_feed_forward(self, block_id: int, module: nn.Module) -> None:
        self.transformer.transformer_blocks[block_id].ff = module

    # -- the frozen path ---------------------------------------------------------------------
    def attention_context(self) -> ContextManager:
        """Pins torch SDPA's backends for everything attention-shaped in the model.

        ``attention_backend`` names one; unset, every backend but cuDNN is allowed (cuDNN's failed
        on a FLUX backward on the H100 here: docs/DESIGN.md section 5). It must be entered again around an
        eager recomputation (gradient checkpointing), or the recomputed attention may take another backend
        and no longer match what the forward saved.
        """
        from torch.nn.attention import SDPBackend, sdpa_kernel

        allowed = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        if self.attention_backend is None:
            return sdpa_kernel(allowed)
        # the named backend first; the others remain for what it cannot run (masked router attention)
        pinned = getattr(SDPBackend, _SDPA_BACKENDS[self.attention_backend])
        return sdpa_kernel([pinned] + [b for b in allowed if b != pinned], set_priority=True)

    def run_blocks(
        self,
        img: Tensor,  # [B, N_img, D] embedded image-stream tokens (target first)
        txt: Tensor,  # [B, L, D] embedded text tokens
        temb: Tensor,  # [B, D]
        img_ids: Tensor,  # [N_img, 3]
        txt_ids: Tensor,  # [L, 3]
        attention_mask: Optional[Tensor] = None,  # [B, 1, 1, L + N_img] bool, True = attend
        feed_forward_args: Optional[Callable[[int], tuple]] = None,
    ) -> Tensor:
        """Every block, dual blocks first, then single -> the image-stream hidden states [B, N_img, D].

        ``feed_forward_args(i)`` is asked just before dual block ``i`` runs and returns the extra
        arguments of its image-stream FFN (an empty tuple for the plain FFN; how expert layers get
        their per-forward context). They are arguments of the block call, so gradient checkpointing
        keeps them for its recomputation, and a compiled block takes their tensors as graph inputs.
        The attention context and the shared LoRA down products are entered inside the checkpointed
        call, so an eager recomputation during backward runs under them too; a block compiled whole
        (:meth:`compile_blocks`) recomputes inside its compiled backward, from what its graph saved."""
        tr = self.transformer
        rope = tr.pos_embed(torch.cat([txt_ids, img_ids], dim=0))
        kwargs = {"attention_mask": attention_mask} if attention_mask is not None else None
        n_dual = len(tr.transformer_blocks)

        def run(i: int, block: nn.Module, img: Tensor, txt: Tensor, ff_args: tuple) -> tuple[Tensor, Tensor]:
            with self.attention_context(), self._sharing(i):
                return call_block(block, img, txt, temb, rope, kwargs, ff_args)

        use_ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
        for i, block in enumerate(list(tr.transformer_blocks) + list(tr.single_transformer_blocks)):
            ff_args = feed_forward_args(i) if feed_forward_args is not None and i < n_dual else ()
            whole = self._whole_blocks.get(id(block)) if use_ckpt else None
            if whole is not None:  # compiled with its checkpoint inside (compile_blocks)
                with self.attention_context(), self._sharing(i):
                    txt, img = whole(img, txt, temb, rope, kwargs, ff_args)
            elif use_ckpt:
                txt, img = checkpoint(run, i, block, img, txt, ff_args, use_reentrant=False)
            else:
                txt, img = run(i, block, img, txt, ff_args)
        return img

    def compile_blocks(self, whole: Optional[Callable[[nn.Module], bool]] = None, **compile_kwargs) -> int:
        """``torch.compile`` each transformer block (regional compilation: blocks of one kind share a
        graph; parameter names stay as they are, for checkpoints).

        With gradient checkpointing, a block for which ``whole(block)`` holds (default: every block) is
        compiled together with its checkpoint (:class:`CheckpointedBlock`): the recomputation then
        runs inside the compiled backward instead of as a second compiled forward called from Python,
        and ``mode="reduce-overhead"`` (CUDA graphs) becomes possible for it. Blocks that break the
        graph (those holding an expert layer that is not traceable: ``whole`` excludes them) are compiled in place and
        checkpointed from outside, always with the default mode. Without gradient checkpointing every
        block compiles in place, with ``mode`` where ``whole`` holds. Returns how many blocks compiled
        whole with their checkpoint.

        A whole block is compiled with ``fullgraph=True``: a graph break inside it would leave its
        checkpoint to run eagerly (the recomputation outside the compiled backward, no CUDA graph), a
        silent slowdown, so an unexpected one must fail at once instead.
        """
        # Python state written inside a block (shared LoRA down products, expert layers' routing
        # records) is written in the forward; a whole block's recomputation replays its tensor ops
        # only, which is what both need. The flag is dynamo's, process-wide, and read when a graph is
        # traced (so it cannot be reset afterwards).
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
        tr = self.transformer
        self._whole_blocks.clear()
        mode_free = {k: v for k, v in compile_kwargs.items() if k != "mode"}
        for block in list(tr.transformer_blocks) + list(tr.single_transformer_blocks):
            ok = whole is None or whole(block)
            if self.gradient_checkpointing and ok:
                wrapper = CheckpointedBlock(block)
                wrapper.compile(fullgraph=True, **compile_kwargs)
                self._whole_blocks[id(block)] = wrapper
                block.compile(**mode_free)  # calls without gradient (no checkpoint then)
            else:
                block.compile(**(compile_kwargs if ok else mode_free))
        return len(self._whole_blocks)

    def project_out(self, hidden: Tensor, temb: Tensor) -> Tensor:
        tr = self.transformer
        return tr.proj_out(tr.norm_out(hidden, temb))


BACKBONES = {"flux": FluxBackbone}


def build_backbone(cfg: BackboneConfig, lora: LoraConfig, init_seed: int = 0) -> nn.Module:
    return BACKBONES[cfg.kind](cfg, lora, init_seed)
