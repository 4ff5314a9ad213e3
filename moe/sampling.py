"""Sampling an edit: the flow-matching Euler sampler with InstructPix2Pix-style guidance, and what an edit returns.

The sampler knows the model only as a velocity function ``predict(noisy, t, cond) -> (velocity, ctx)``
(``CareEditModel.predict_velocity``), so it is the same loop for every configuration of the model.
Guidance (``model.sampling``, or the scales a caller names) mixes three predictions per step:

    v = v(none) + s_img * (v(image) - v(none)) + s_txt * (v(image, text) - v(image))

where "image" keeps the source and drops the text, and "none" drops both, the inputs condition
dropout trains the model on. Scales of 1 and 1 are no guidance: one prediction per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .conditions import Conditions
from .expert_layer import ExpertContext
from .repaint import subgrid_logits
from .router import dense_weights

# routing-map colours of the experts (text, mask, reference, base)
EXPERT_COLOURS = {
    "text": (1.0, 0.2, 0.2),
    "mask": (0.2, 0.9, 0.2),
    "reference": (0.2, 0.4, 1.0),
    "base": (0.6, 0.6, 0.6),
    "all": (0.9, 0.6, 0.1),  # the one adapter of experts.kind=one_lora
}

Predict = Callable[[Tensor, Tensor, Conditions], tuple[Tensor, ExpertContext]]


@dataclass
class EditResult:
    images: Tensor  # [B, 3, H, W] in [-1, 1]
    refined_mask: Tensor  # [B, 1, H, W] in [0, 1] (last expert layer; the coarse box without repaint)
    routing_map: Tensor  # [B, 3, H, W] colour of the dominant expert per token (last expert layer)
    utilisation: dict[str, float] = field(default_factory=dict)
    guidance: dict[str, float] = field(default_factory=dict)  # the text and image guidance scales used


@dataclass
class Guidance:
    """The scales of one edit, and the conditions of its two extra predictions (None: no guidance)."""

    text: float
    image: float
    image_only: Optional[Conditions] = None  # the source kept, the text dropped
    neither: Optional[Conditions] = None  # both dropped


def guided_velocity(
    predict: Predict, x: Tensor, t: Tensor, cond: Conditions, g: Guidance
) -> tuple[Tensor, ExpertContext]:
    """The guided velocity at ``x`` and time ``t``, and the fully conditioned prediction's context."""
    v, ctx = predict(x, t, cond)
    if g.image_only is not None:
        v_img, _ = predict(x, t, g.image_only)
        v_none, _ = predict(x, t, g.neither)
        v = v_none + g.image * (v_img - v_none) + g.text * (v - v_img)
    return v, ctx


def euler_sample(
    predict: Predict,
    cond: Conditions,
    guidance: Guidance,
    num_steps: int,
    generator: Optional[torch.Generator],
    keep_outside_box: bool,
    dtype: torch.dtype,
) -> tuple[Tensor, Optional[ExpertContext]]:
    """Latents of the edits ([B, C, h, w], float32) after ``num_steps`` Euler steps of diffusers' scheduler
    from seeded noise, and the last step's context (routing and refined masks).

    ``keep_outside_box``: after every step, the latents outside the user's box are replaced by the
    source's latents noised to the next time (with the sampler's own starting noise), as inpainting
    samplers do: outside the box the result is the source (exactly, with a lossless codec)."""
    from diffusers import FlowMatchEulerDiscreteScheduler  # diffusers loads lazily, as in moe/backbone.py

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
        v, ctx = guided_velocity(predict, x.to(dtype), tb, cond, guidance)
        x = scheduler.step(v.float(), t, x).prev_sample
        if keep is not None:
            t_next = float(scheduler.sigmas[i + 1])
            x = keep * ((1 - t_next) * source + t_next * start_noise) + (1 - keep) * x
    return x, ctx


def edit_result(images: Tensor, ctx: Optional[ExpertContext], coarse: Tensor, expert_names: list[str]) -> EditResult:
    """The decoded edits with the last expert layer's refined mask (on Mask Repaint's finer grid with
    ``repaint.subgrid`` > 1; the coarse box without repaint), a map of each token's dominant expert and
    the experts' utilisation, all at the images' size."""
    b, _, hh, ww = images.shape
    size = (hh, ww)
    up = lambda grid: nn.functional.interpolate(grid, size=size, mode="nearest")  # noqa: E731
    if ctx is None or not ctx.records:
        return EditResult(images, coarse.float(), torch.zeros_like(images))
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
    e = len(expert_names)
    dense = dense_weights(record.routing.index, record.routing.weight, e).reshape(b, gh, gw, e)
    dominant = dense.argmax(dim=-1)
    palette = torch.tensor([EXPERT_COLOURS[nm] for nm in expert_names], device=images.device)
    colours = palette[dominant].permute(0, 3, 1, 2)  # [B, 3, gh, gw] in [0, 1]
    util = dense.gt(0).float().mean(dim=(0, 1, 2))
    return EditResult(
        images=images,
        refined_mask=refined,
        routing_map=up(colours) * 2 - 1,
        utilisation={nm: float(u) for nm, u in zip(expert_names, util)},
    )
