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
* edit success (``success``): yes/no per sample from ``train.eval.edit_success``, for samples whose
  shard JSON says what the target must contain; reported per task, as the mean over samples and
  as the mean over tasks (``success_mean_over_tasks``).
* L1 outside the user's box (``l1_outside_box``): preservation where the user asked for nothing.
* ``fail_<criterion>``: the share of samples failing each criterion of ``train.eval.edit_success``, which
  says why edits fail.
* baseline rows on the same samples, scored by the same code: the editors that need no model
  (``train.eval.baselines``: do-nothing, paint bucket, copy-the-reference, noise) and the oracle (the target).
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

from data.config import DataConfig
from data.loader import EditLoader
from data.shards import expand_shards
from train.eval.baselines import BASELINES, baseline_edits
from train.eval.edit_success import CRITERIA, edit_criteria


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
def flow_mse_per_sample(
    model: Any, batch: Any, times: tuple[float, ...] = (0.25, 0.5, 0.75), seed: int = 0
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
        return _as_tensor(
            self.clip.get_text_features(
                input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device)
            )
        )

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
    text_guidance: Optional[float] = None  # None: the model's own (model.sampling)
    image_guidance: Optional[float] = None
    flow_loss: bool = True  # also the held-out flow-matching loss (3 more forwards per batch)
    keep_outside_box: Optional[bool] = None  # the sampler keeps the source outside the box; None: the recipe's
    group_by_task: bool = True  # one edit call per task in a batch: exact per-task utilisation, more calls


class ShardChecks:
    """The ``check`` dict of each held-out sample (``data.synthetic`` writes one into its JSON), by key.

    Why a second read of the shards: the batch is the data layer's contract with the model and
    carries nothing the model does not use. The JSON members are read lazily in file order, the
    order the evaluation loader yields, so only the part of the shards that was evaluated is read.
    A sample without the field (or a shard that cannot be read) gives None: success unavailable.
    """

    def __init__(self, urls: list[str]):
        self._scan = self._read(urls)
        self._ahead: dict[str, Optional[dict]] = {}

    @staticmethod
    def _read(urls: list[str]):
        import json

        import webdataset as wds

        for url in urls:
            for sample in wds.tarfile_to_samples(handler=wds.ignore_and_continue)(iter([dict(url=url)])):
                try:
                    check = json.loads(sample["json"]).get("check") if "json" in sample else None
                except (ValueError, AttributeError):
                    check = None
                yield sample["__key__"], check if isinstance(check, dict) else None

    def get(self, key: str) -> Optional[dict]:
        if key in self._ahead:
            return self._ahead.pop(key)
        for k, check in self._scan:
            if k == key:
                return check
            self._ahead[k] = check
        return None


def iterate_heldout(data_cfg: DataConfig, shards: str, batch_size: int, limit: int):
    """Batches of the held-out shards in file order (evaluation view, each sample once), ``limit`` samples.

    Each batch carries ``extras["checks"]``: ``{sample key: check dict or None}`` (see :class:`ShardChecks`).
    """

    cfg = data_cfg if isinstance(data_cfg, DataConfig) else DataConfig(**data_cfg)
    cfg = dataclasses.replace(cfg, buckets=[], num_workers=0, cached=False)
    urls = expand_shards(shards)
    checks = ShardChecks(urls)
    seen = 0
    for batch in EditLoader(cfg, urls, batch_size, 0, 1, exact=True):
        if seen >= limit:
            return
        take = min(batch.batch_size, limit - seen)
        if take < batch.batch_size:
            batch = batch.select(list(range(take)))
        seen += take
        batch.extras["checks"] = {k: checks.get(k) for k in batch.keys}
        yield batch


# What each baseline's mask IoU compares with the fine mask (none has a refined mask of its own).
BASELINE_IOU_MASK = {b: "coarse box" for b in BASELINES} | {"oracle": "fine mask"}
NO_CHECKS = (
    "no evaluated sample has a success check: a 'check' field in its shard JSON (data.synthetic "
    "writes one) for a task train.eval.edit_success knows"
)


def l1_outside_box(edit: Tensor, target: Tensor, box: Tensor) -> Tensor:
    """[B]: mean |edit - target| outside the user's box (NaN where the box is the whole image)."""
    return masked_l1_per_sample(edit, target, box.float() >= 0.5)[1]


def _edit_row(edit: Tensor, sub: Any, iou_mask: Tensor, checks: list[Optional[dict]]) -> dict[str, Tensor]:
    """Per-sample metrics every row of the report has: L1 inside / outside the fine mask and outside the
    box, mask IoU, success, and ``fail_<criterion>`` (1 where the sample failed that criterion of
    ``train.eval.edit_success``, NaN where it has no check)."""
    target, source, fine = to_unit(sub.target).cpu(), to_unit(sub.source).cpu(), sub.fine_mask.float().cpu()
    box = sub.coarse_mask.float().cpu()
    inside, outside = masked_l1_per_sample(edit, target, fine)
    judged = edit_criteria(edit, source, target, fine, list(sub.task), checks, box)
    return {
        "l1": l1_per_sample(edit, target),
        "l1_inside": inside,
        "l1_outside": outside,
        "l1_outside_box": l1_outside_box(edit, target, box),
        "mask_iou": mask_iou_per_sample(iou_mask.float().cpu(), fine),
        "success": judged["success"],
        **{f"fail_{c}": 1.0 - judged[c] for c in CRITERIA},
    }


def _baseline_rows(sub: Any, checks: list[Optional[dict]], seed: int) -> dict[str, dict[str, Tensor]]:
    """The rows of ``train.eval.baselines`` on this sub-batch, scored like the model's."""
    edits = baseline_edits(
        to_unit(sub.source).cpu(),
        to_unit(sub.target).cpu(),
        to_unit(sub.reference if sub.reference is not None else sub.source * 0 + 1).cpu(),
        sub.has_reference.cpu(),
        sub.coarse_mask.float().cpu(),
        sub.bbox.cpu(),
        list(sub.task),
        checks,
        seed=seed,
    )
    return {
        name: _edit_row(img, sub, sub.fine_mask if name == "oracle" else sub.coarse_mask, checks)
        for name, img in edits.items()
    }


def success_ci95(per_task: dict[str, dict[str, list[float]]]) -> float:
    """Half-width of a 95% interval of the success averaged over tasks: the tasks are strata, each a
    binomial share of its checked samples, ``1.96 * sqrt(sum_t p_t (1 - p_t) / n_t) / T`` (a task whose
    share is 0 or 1 adds nothing, so on few samples it is a lower bound of the uncertainty)."""
    var, tasks = 0.0, 0
    for d in per_task.values():
        values = [v for v in d.get("success", []) if not math.isnan(v)]
        if values:
            p = sum(values) / len(values)
            var, tasks = var + p * (1 - p) / len(values), tasks + 1
    return 1.96 * math.sqrt(var) / tasks if tasks else math.nan


def _reduce(per_sample: dict[str, list[float]], per_task: dict[str, dict[str, list[float]]]) -> dict:
    """Means over samples, per task, and success averaged over tasks (each task weighs the same)."""
    tasks = {
        t: {k: nanmean(v) for k, v in d.items()} | {"count": len(next(iter(d.values())))} for t, d in per_task.items()
    }
    metrics = {k: nanmean(v) for k, v in per_sample.items()}
    if "success" in metrics:
        metrics["success_mean_over_tasks"] = nanmean([d["success"] for d in tasks.values()])
        metrics["success_mean_over_tasks_ci95"] = success_ci95(per_task)
    return {"metrics": metrics, "per_task": tasks}


@torch.no_grad()
def evaluate(
    model: Any,
    batches,
    settings: EvalSettings,
    encoders: Optional[EmbeddingEncoders] = None,
    device: str = "cpu",
    on_batch: Optional[Callable[[int], None]] = None,
) -> dict:
    """Edit every held-out sample (per task group, for per-task utilisation) and reduce the metrics.

    Beside the model's row, the editors that need no model (``train.eval.baselines``: do-nothing, paint
    bucket, copy-the-reference, noise, oracle) on the same samples, scored by the same code (the
    oracle's mask IoU is the fine mask's, the others' the coarse box's). ``samples`` lists, per sample,
    its key, task, success and the criteria it failed. ``success`` (``train.eval.edit_success``) needs the batch's ``extras["checks"]``
    (:func:`iterate_heldout` sets it); samples without a check are left out of its means, and when
    no sample has one, success is listed in ``skipped_metrics``.
    """
    per_sample: dict[str, list[float]] = defaultdict(list)
    per_task: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    base_sample = {b: defaultdict(list) for b in BASELINES}
    base_task = {b: defaultdict(lambda: defaultdict(list)) for b in BASELINES}
    util: dict[str, dict[str, list[tuple[float, int]]]] = defaultdict(lambda: defaultdict(list))
    g = torch.Generator(device=device).manual_seed(settings.seed)
    n = checked = 0
    samples: list[dict] = []  # per sample: key, task, success and the criteria it failed
    # the scales the edits used: the settings', or what the model resolved None to (CareEditModel.edit)
    guidance = {
        "text": settings.text_guidance,
        "image": settings.image_guidance,
        "keep_outside_box": settings.keep_outside_box,
    }
    for batch in batches:
        groups = sorted(set(batch.task)) if settings.group_by_task else ["all"]
        known = batch.extras.get("checks", {})
        for task in groups:
            idx = [i for i, t in enumerate(batch.task) if t == task or task == "all"]
            sub = batch.select(idx).to(device)
            checks = [known.get(k) for k in sub.keys]
            res = model.edit(
                sub,
                num_steps=settings.steps,
                text_guidance=settings.text_guidance,
                image_guidance=settings.image_guidance,
                generator=g,
                **({} if settings.keep_outside_box is None else {"keep_outside_box": settings.keep_outside_box}),
            )
            edit, target = to_unit(res.images).cpu(), to_unit(sub.target).cpu()
            values = _edit_row(edit, sub, res.refined_mask, checks)
            values.update(l2=l2_per_sample(edit, target), l1_source=l1_per_sample(to_unit(sub.source).cpu(), target))
            if settings.flow_loss:
                values["flow_mse"], values["flow_mse_inside"], values["flow_mse_outside"] = flow_mse_per_sample(
                    model, sub, seed=settings.seed
                )
            if encoders is not None and encoders.clip is not None:
                e_edit, e_tgt = encoders.clip_image(edit), encoders.clip_image(target)
                values["clip_i"] = cosine_per_sample(e_edit, e_tgt).cpu()
                values["clip_t"] = cosine_per_sample(e_edit, encoders.clip_text(list(sub.instruction))).cpu()
            if encoders is not None and encoders.dino is not None:
                values["dino"] = cosine_per_sample(encoders.dino_image(edit), encoders.dino_image(target)).cpu()
            baselines = _baseline_rows(sub, checks, seed=settings.seed + n)
            failed = [[c for c in CRITERIA if values[f"fail_{c}"][i].item() == 1.0] for i in range(len(idx))]
            samples += [
                {"key": k, "task": t, "success": values["success"][i].item(), "failed": failed[i]}
                for i, (k, t) in enumerate(zip(sub.keys, sub.task))
            ]
            for i, t in enumerate(sub.task):
                for k, v in values.items():
                    per_sample[k].append(v[i].item())
                    per_task[t][k].append(v[i].item())
                for b, row in baselines.items():
                    for k, v in row.items():
                        base_sample[b][k].append(v[i].item())
                        base_task[b][t][k].append(v[i].item())
            guidance = getattr(res, "guidance", None) or guidance  # a model without the field: the settings'
            for name, u in res.utilisation.items():
                util[task][name].append((u, len(idx)))
            n += len(idx)
            checked += int((~values["success"].isnan()).sum())
        if on_batch is not None:
            on_batch(n)
    utilisation = {
        task: {name: sum(u * c for u, c in vals) / sum(c for _, c in vals) for name, vals in d.items()}
        for task, d in util.items()
    }
    skipped = (
        encoders.skipped()
        if encoders is not None
        else {"clip_i": "no --clip path given", "clip_t": "no --clip path given", "dino": "no --dino path given"}
    )
    if checked == 0:
        skipped["success"] = NO_CHECKS
    return {
        "num_samples": n,
        "num_checked": checked,
        **_reduce(per_sample, per_task),
        "baselines": {
            b: _reduce(base_sample[b], base_task[b]) | {"mask_iou_of": BASELINE_IOU_MASK[b]} for b in BASELINES
        },
        "utilisation_per_task": utilisation,
        "samples": samples,
        "skipped_metrics": skipped,
        "settings": dataclasses.asdict(settings),
        "guidance": guidance,
    }
