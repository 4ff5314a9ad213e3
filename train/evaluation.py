"""Evaluation metrics as plain functions on tensors, and the held-out evaluation pass.

Why plain functions: every number in docs/RESULTS.md must be checkable by hand on a few pixels
(``tests/test_edit_export_eval.py`` does that). Conventions: images are ``[B, 3, H, W]`` in
``[0, 1]`` (convert model outputs with :func:`to_unit`), masks ``[B, 1, H, W]`` in ``[0, 1]``;
every metric is computed per sample, and reduced by the caller (mean over samples).

* L1 / L2: mean absolute / squared difference to the target over pixels and channels.
* L1 inside / outside the fine mask: the edit strength vs preservation split; a sample whose
  region (or complement) is empty gives NaN there and is left out of that mean.
* IoU of the refined mask (thresholded at 0.5, ``>=``) against the fine mask; both empty = 1.
* held-out flow-matching loss (``flow_mse``): the training objective on unseen samples at fixed
  times (0.25, 0.5, 0.75) and seeded noise, split inside / outside the fine mask at latent
  resolution. It measures the denoiser itself, which pixel metrics of a few-step sample through a
  (possibly random, in tests and the tiny benchmark) VAE decoder may not.
* L1 of the *source* to the target (``l1_source``): the do-nothing edit, a baseline for L1.
* CLIP-I / DINO: cosine of image embeddings of edit and target; CLIP-T: cosine of the edit's CLIP
  image embedding and the instruction's CLIP text embedding. Encoders load from local folders only.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from typing import Any, Callable, Optional

import torch
from torch import Tensor


# ------------------------------------------------------------------------------------------ metrics
def to_unit(images: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1], clamped (the model and the loader use [-1, 1])."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def l1_per_sample(pred: Tensor, target: Tensor) -> Tensor:
    """[B]: mean |pred - target| over channels and pixels."""
    return (pred.float() - target.float()).abs().flatten(1).mean(dim=1)


def l2_per_sample(pred: Tensor, target: Tensor) -> Tensor:
    """[B]: mean (pred - target)^2 over channels and pixels (MSE)."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def masked_l1_per_sample(pred: Tensor, target: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """([B] inside, [B] outside): mean |pred - target| over the pixels where mask is 1 / 0.

    Soft masks weight the pixels. NaN where the region (or its complement) is empty.
    """
    diff = (pred.float() - target.float()).abs().mean(dim=1, keepdim=True)  # [B, 1, H, W] channel mean
    m = mask.float()
    inside_w, outside_w = m.flatten(1).sum(1), (1 - m).flatten(1).sum(1)
    inside = (diff * m).flatten(1).sum(1) / inside_w
    outside = (diff * (1 - m)).flatten(1).sum(1) / outside_w
    nan = torch.tensor(float("nan"))
    return torch.where(inside_w > 0, inside, nan), torch.where(outside_w > 0, outside, nan)


def mask_iou_per_sample(pred_mask: Tensor, gt_mask: Tensor, threshold: float = 0.5) -> Tensor:
    """[B]: |pred >= threshold AND gt >= 0.5| / |union|; 1.0 where both masks are empty."""
    if pred_mask.shape[-2:] != gt_mask.shape[-2:]:
        pred_mask = torch.nn.functional.interpolate(pred_mask.float(), size=gt_mask.shape[-2:], mode="nearest")
    p = (pred_mask.float() >= threshold).flatten(1)
    g = (gt_mask.float() >= 0.5).flatten(1)
    inter = (p & g).sum(1).float()
    union = (p | g).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def cosine_per_sample(a: Tensor, b: Tensor) -> Tensor:
    """[B]: cosine similarity of two [B, D] embedding batches."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


@torch.no_grad()
def flow_mse_per_sample(model: Any, batch: Any, times: tuple[float, ...] = (0.25, 0.5, 0.75), seed: int = 0
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """([B] all, [B] inside, [B] outside): MSE of the predicted velocity against noise - x0, averaged
    over ``times``; noise drawn from a generator seeded with ``seed`` (same samples -> same numbers)."""
    was_training = model.training
    model.eval()
    x0 = model.encode_target(batch).float()
    cond = model.encode_conditions(batch)
    fine = torch.nn.functional.interpolate(batch.fine_mask.float(), size=x0.shape[-2:], mode="area")
    fine = (fine >= 0.5).float().to(x0.device)
    g = torch.Generator(device=x0.device).manual_seed(seed)
    total = inside = outside = 0
    for t in times:
        noise = torch.randn(x0.shape, generator=g, device=x0.device)
        noisy = (1 - t) * x0 + t * noise
        tb = torch.full((x0.shape[0],), t, device=x0.device)
        pred, _ = model.predict_velocity(noisy.to(model.dtype), tb, cond)
        err = (pred.float() - (noise - x0)).pow(2).mean(dim=1, keepdim=True)  # [B, 1, h, w]
        total = total + err.flatten(1).mean(1)
        i, o = masked_mean(err, fine), masked_mean(err, 1 - fine)
        inside, outside = inside + i, outside + o
    model.train(was_training)
    n = len(times)
    return (total / n).cpu(), (inside / n).cpu(), (outside / n).cpu()


def masked_mean(x: Tensor, w: Tensor) -> Tensor:
    """[B]: sum(x * w) / sum(w) per sample over [B, 1, h, w]; NaN where the weights sum to 0."""
    den = w.flatten(1).sum(1)
    return torch.where(den > 0, (x * w).flatten(1).sum(1) / den.clamp(min=1e-12), torch.full_like(den, float("nan")))


def nanmean(values: list[float]) -> float:
    """Mean of the finite values (NaN when there are none)."""
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


# ------------------------------------------------------------------------------------------ encoders
class EmbeddingEncoders:
    """CLIP (image + text) and DINOv2 (image) from local folders; either may be absent (skipped).

    ``local_files_only=True``: evaluation never downloads. Images go in as [B, 3, H, W] in [0, 1].
    """

    def __init__(self, clip_path: Optional[str] = None, dino_path: Optional[str] = None, device: str = "cpu"):
        from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor

        self.device = device
        self.clip = self.clip_processor = self.dino = self.dino_processor = None
        if clip_path:
            self.clip = CLIPModel.from_pretrained(clip_path, local_files_only=True).to(device).eval()
            self.clip_processor = CLIPProcessor.from_pretrained(clip_path, local_files_only=True)
        if dino_path:
            self.dino = AutoModel.from_pretrained(dino_path, local_files_only=True).to(device).eval()
            self.dino_processor = AutoImageProcessor.from_pretrained(dino_path, local_files_only=True)

    def skipped(self) -> dict[str, str]:
        out = {}
        if self.clip is None:
            out.update({"clip_i": "no --clip path given", "clip_t": "no --clip path given"})
        if self.dino is None:
            out["dino"] = "no --dino path given"
        return out

    @staticmethod
    def _pil(images: Tensor) -> list:
        from PIL import Image

        arr = (images.float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in arr]

    @torch.no_grad()
    def clip_image(self, images: Tensor) -> Tensor:
        px = self.clip_processor(images=self._pil(images), return_tensors="pt")["pixel_values"].to(self.device)
        return _as_tensor(self.clip.get_image_features(pixel_values=px))

    @torch.no_grad()
    def clip_text(self, texts: list[str]) -> Tensor:
        tok = self.clip_processor(text=texts, return_tensors="pt", padding=True, truncation=True)
        return _as_tensor(self.clip.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                                      attention_mask=tok["attention_mask"].to(self.device)))

    @torch.no_grad()
    def dino_image(self, images: Tensor) -> Tensor:
        px = self.dino_processor(images=self._pil(images), return_tensors="pt")["pixel_values"].to(self.device)
        return self.dino(pixel_values=px).last_hidden_state[:, 0]  # CLS token


def _as_tensor(x: Any) -> Tensor:
    """transformers may return a tensor or an output object with ``pooler_output`` (version dependent)."""
    return x if isinstance(x, Tensor) else x.pooler_output


# ------------------------------------------------------------------------------------------ the pass
@dataclasses.dataclass
class EvalSettings:
    steps: int = 8
    limit: int = 64
    batch_size: int = 8
    seed: int = 0
    text_guidance: float = 1.0
    image_guidance: float = 1.0
    flow_loss: bool = True  # also the held-out flow-matching loss (3 more forwards per batch)
    group_by_task: bool = True  # one edit call per task in a batch: exact per-task utilisation, more calls


def iterate_heldout(data_cfg: Any, shards: str, batch_size: int, limit: int):
    """Batches of the held-out shards in file order (evaluation view, each sample once), ``limit`` samples."""
    from data.config import DataConfig
    from data.loader import EditLoader, expand_shards

    cfg = data_cfg if isinstance(data_cfg, DataConfig) else DataConfig(**data_cfg)
    cfg = dataclasses.replace(cfg, buckets=[], num_workers=0, cached=False)
    seen = 0
    for batch in EditLoader(cfg, expand_shards(shards), batch_size, 0, 1, exact=True):
        if seen >= limit:
            return
        take = min(batch.batch_size, limit - seen)
        if take < batch.batch_size:
            batch = batch.select(list(range(take)))
        seen += take
        yield batch


@torch.no_grad()
def evaluate(model: Any, batches, settings: EvalSettings, encoders: Optional[EmbeddingEncoders] = None,
             device: str = "cpu", on_batch: Optional[Callable[[int], None]] = None) -> dict:
    """Edit every held-out sample (per task group, for per-task utilisation) and reduce the metrics."""
    per_sample: dict[str, list[float]] = defaultdict(list)
    per_task: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    util: dict[str, dict[str, list[tuple[float, int]]]] = defaultdict(lambda: defaultdict(list))
    g = torch.Generator(device=device).manual_seed(settings.seed)
    n = 0
    for batch in batches:
        groups = sorted(set(batch.task)) if settings.group_by_task else ["all"]
        for task in groups:
            idx = [i for i, t in enumerate(batch.task) if t == task or task == "all"]
            sub = batch.select(idx).to(device)
            res = model.edit(sub, num_steps=settings.steps, text_guidance=settings.text_guidance,
                             image_guidance=settings.image_guidance, generator=g)
            edit, target = to_unit(res.images).cpu(), to_unit(sub.target).cpu()
            fine = sub.fine_mask.float().cpu()
            inside, outside = masked_l1_per_sample(edit, target, fine)
            values = {"l1": l1_per_sample(edit, target), "l2": l2_per_sample(edit, target),
                      "l1_inside": inside, "l1_outside": outside,
                      "mask_iou": mask_iou_per_sample(res.refined_mask.cpu(), fine),
                      "l1_source": l1_per_sample(to_unit(sub.source).cpu(), target)}
            if settings.flow_loss:
                values["flow_mse"], values["flow_mse_inside"], values["flow_mse_outside"] = flow_mse_per_sample(
                    model, sub, seed=settings.seed)
            if encoders is not None and encoders.clip is not None:
                e_edit, e_tgt = encoders.clip_image(edit), encoders.clip_image(target)
                values["clip_i"] = cosine_per_sample(e_edit, e_tgt).cpu()
                values["clip_t"] = cosine_per_sample(e_edit, encoders.clip_text(list(sub.instruction))).cpu()
            if encoders is not None and encoders.dino is not None:
                values["dino"] = cosine_per_sample(encoders.dino_image(edit), encoders.dino_image(target)).cpu()
            for k, v in values.items():
                per_sample[k].extend(v.tolist())
                per_task[task][k].extend(v.tolist())
            for name, u in res.utilisation.items():
                util[task][name].append((u, len(idx)))
            n += len(idx)
        if on_batch is not None:
            on_batch(n)
    utilisation = {task: {name: sum(u * c for u, c in vals) / sum(c for _, c in vals) for name, vals in d.items()}
                   for task, d in util.items()}
    return {
        "num_samples": n,
        "metrics": {k: nanmean(v) for k, v in per_sample.items()},
        "per_task": {t: {k: nanmean(v) for k, v in d.items()} | {"count": len(next(iter(d.values())))}
                     for t, d in per_task.items()},
        "utilisation_per_task": utilisation,
        "skipped_metrics": encoders.skipped() if encoders is not None else
        {"clip_i": "no --clip path given", "clip_t": "no --clip path given", "dino": "no --dino path given"},
        "settings": dataclasses.asdict(settings),
    }


# ------------------------------------------------------------------------------------------ the plot
def plot_results(result: dict, path: str) -> None:
    """PNG with PIL primitives (matplotlib is not a dependency): per-task bars of L1 inside/outside and
    mask IoU, and per-task expert utilisation as stacked bars."""
    from PIL import Image, ImageDraw

    tasks = sorted(result["per_task"])
    experts = sorted({e for d in result["utilisation_per_task"].values() for e in d})
    colours = {"text": (230, 50, 50), "mask": (50, 200, 50), "reference": (50, 100, 255), "base": (150, 150, 150)}
    bar_colours = [(240, 140, 40), (60, 120, 200), (90, 170, 90)]
    w_task, h_plot, margin = 120, 200, 40
    width = margin * 2 + w_task * max(len(tasks), 1)
    img = Image.new("RGB", (width, 2 * h_plot + 4 * margin), "white")
    d = ImageDraw.Draw(img)
    d.text((margin, 5), "L1 inside (orange) / outside (blue) fine mask, mask IoU (green); y in [0, 1]", fill="black")
    d.text((margin, h_plot + 2 * margin + 5), "expert utilisation per task (fraction of tokens routed)", fill="black")
    for row in range(2):
        y0 = margin + row * (h_plot + 2 * margin)
        d.line([(margin, y0 + h_plot), (width - margin, y0 + h_plot)], fill="black")
        d.line([(margin, y0), (margin, y0 + h_plot)], fill="black")
    for i, task in enumerate(tasks):
        x = margin + i * w_task + 10
        m = result["per_task"][task]
        for j, key in enumerate(("l1_inside", "l1_outside", "mask_iou")):
            v = m.get(key, float("nan"))
            if not math.isnan(v):
                top = margin + h_plot - int(min(max(v, 0), 1) * h_plot)
                d.rectangle([x + 30 * j, top, x + 30 * j + 24, margin + h_plot], fill=bar_colours[j])
        d.text((x, margin + h_plot + 4), task, fill="black")
        y_base = 2 * margin + 2 * h_plot + margin
        u = result["utilisation_per_task"].get(task, {})
        for j, e in enumerate(experts):
            v = min(max(u.get(e, 0.0), 0.0), 1.0)
            top = y_base - int(v * h_plot)
            d.rectangle([x + 22 * j, top, x + 22 * j + 18, y_base], fill=colours.get(e, (0, 0, 0)))
        d.text((x, y_base + 4), task, fill="black")
    legend_x = width - margin - 4 * 60
    for j, e in enumerate(experts):
        d.rectangle([legend_x + 60 * j, h_plot + 2 * margin - 10, legend_x + 60 * j + 8, h_plot + 2 * margin - 2],
                    fill=colours.get(e, (0, 0, 0)))
        d.text((legend_x + 60 * j + 10, h_plot + 2 * margin - 12), e, fill="black")
    img.save(path)
