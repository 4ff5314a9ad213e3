"""Metrics: TensorBoard on rank 0, a compact console line with a tqdm bar, validation image grids.

Why rank 0 only: every rank sees the same reduced scalars for the dense part; expert utilisation and
losses are averaged over ranks before logging so the line describes the whole job.
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional

import torch
import torch.distributed as torch_dist

from train.config import LoggingConfig
from train.distributed import DistInfo

GRID_COLUMNS = ("source", "coarse mask", "refined mask", "routing map", "target", "edit")


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average a dict of floats over all ranks (same keys on every rank)."""
    if not values or not torch_dist.is_initialized() or torch_dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    torch_dist.all_reduce(t)
    t /= torch_dist.get_world_size()
    return dict(zip(keys, t.tolist()))


class MetricLogger:
    def __init__(
        self,
        cfg: LoggingConfig,
        dist: DistInfo,
        tb_dir: str,
        image_dir: str,
        total_steps: int,
        start_step: int,
        flops_per_token: float,
    ) -> None:
        self.dist = dist
        self.every = int(cfg.every)
        self.image_dir = image_dir
        self.flops_per_token = flops_per_token
        self.writer = None
        self.bar = None
        self._window: dict[str, float] = {}
        self._count = 0
        self._samples = 0
        self._tokens = 0
        self._t0 = time.perf_counter()
        if dist.is_main:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(image_dir, exist_ok=True)
            self.writer = SummaryWriter(tb_dir)
            if cfg.progress_bar:
                from tqdm import tqdm

                self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, leave=True)

    def set_total(self, total_steps: int) -> None:
        """The run's step count changed (a time budget decided it): the progress bar follows."""
        if self.bar is not None:
            self.bar.total = total_steps
            self.bar.refresh()

    def print(self, msg: str) -> None:
        if not self.dist.is_main:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def accumulate(self, scalars: dict[str, float], samples: int, tokens: int) -> None:
        for k, v in scalars.items():
            self._window[k] = self._window.get(k, 0.0) + float(v)
        self._count += 1 if scalars else 0  # skipped steps (agreed on all ranks) add no scalars
        self._samples += samples
        self._tokens += tokens
        if self.bar is not None:
            self.bar.update(1)

    def flush(self, step: int, extra: dict[str, float]) -> Optional[dict[str, float]]:
        """Collective (all ranks call it every ``logging.every`` steps): reduce, print, write TB."""
        if self._count == 0:
            return None
        dt = max(time.perf_counter() - self._t0, 1e-9)
        means = {k: v / self._count for k, v in self._window.items()}
        means = mean_over_ranks(means, self.dist.device)
        world = self.dist.world_size
        means["perf/samples_per_s"] = self._samples * world / dt
        means["perf/tokens_per_s"] = self._tokens * world / dt
        means["perf/tflops_per_s_per_rank"] = 3 * self.flops_per_token * self._tokens / dt / 1e12
        if self.dist.on_gpu:
            means["perf/mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        means.update(extra)
        self._window, self._count, self._samples, self._tokens = {}, 0, 0, 0
        self._t0 = time.perf_counter()
        if self.dist.is_main:
            for k, v in means.items():
                self.writer.add_scalar(k, v, step)
            self.print(console_line(step, means))
        return means

    def eval_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """The held-out evaluation's numbers (``val/...``) to TensorBoard and the console (rank 0)."""
        if not self.dist.is_main:
            return
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()
        self.print(val_console_line(step, metrics))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Scalars to TensorBoard as they are (rank 0; no console line)."""
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def checkpoint_saved(self, report: Any) -> None:
        """A committed checkpoint (``train.checkpoint.SaveReport``): its console line, and TensorBoard scalars at
        its step: ``checkpoint/blocked_s`` (the step loop's time in it), ``checkpoint/write_s``,
        ``checkpoint/gb`` and ``checkpoint/gb_per_s`` (rank 0)."""
        if not self.dist.is_main:
            return
        scalars = {
            "checkpoint/blocked_s": report.blocked_s,
            "checkpoint/write_s": report.write_s,
            "checkpoint/gb": report.bytes / 1e9,
            "checkpoint/gb_per_s": report.gb_per_s,
        }
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, report.step)
        self.print(checkpoint_console_line(report))

    def image_grid(self, step: int, grid: torch.Tensor) -> str:
        """Write a [3,H,W] grid in [0,1] to TensorBoard and ``images/step<N>.png`` (rank 0)."""
        path = os.path.join(self.image_dir, f"step{step:08d}.png")
        if self.dist.is_main:
            from PIL import Image

            self.writer.add_image("val/edit_grid", grid, step)
            pixels = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            Image.fromarray(pixels).save(path)
        return path

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def checkpoint_console_line(report: Any) -> str:
    """``checkpoint step00001000: training blocked 0.41 s; written in 12.3 s beside the training (3.61 GB,
    0.29 GB/s); latest at step 1003``."""
    how = "beside the training" if report.asynchronous else "while the training waited"
    where = f"; latest at step {report.committed_at}" if report.committed_at != report.step else ""
    return (
        f"checkpoint {report.tag}: training blocked {report.blocked_s:.2f} s; written in {report.write_s:.2f} s "
        f"{how} ({_size(report.bytes)}, {report.gb_per_s:.2f} GB/s){where}"
    )


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.3f} MB"


def val_console_line(step: int, m: dict[str, float]) -> str:
    """``step 250 | val flow 0.41 (inside 0.90, outside 0.30) | success 0.25 (recolor 0.50 ...) | ...``."""

    def f(key: str) -> str:
        return f"{m[key]:.4f}" if key in m else "-"

    parts = [
        f"step {step}",
        f"val flow {f('val/flow_loss')} (inside {f('val/flow_loss_inside')}, outside {f('val/flow_loss_outside')})",
    ]
    if "val/l1" in m:
        tasks = " ".join(f"{k[12:]} {v:.2f}" for k, v in sorted(m.items()) if k.startswith("val/success/"))
        ci = f" ± {m['val/success_ci95']:.2f}" if "val/success_ci95" in m else ""
        parts.append(f"success {f('val/success_mean')}{ci}" + (f" ({tasks})" if tasks else " (no checks)"))
        parts.append(f"L1 inside {f('val/l1_inside')} outside {f('val/l1_outside')} IoU {f('val/mask_iou')}")
    parts.append(f"{m.get('val/seconds', 0.0):.1f} s")
    return " | ".join(parts)


def console_line(step: int, m: dict[str, float]) -> str:
    """``step 120 | loss 0.41 diffusion 0.40 ... | lr 3e-4 gnorm 0.8 | 35 samp/s ...`` (compact)."""
    terms = " ".join(f"{k[5:]} {v:.4f}" for k, v in sorted(m.items()) if k.startswith("loss/"))
    util = {}
    for k, v in m.items():
        if k.startswith("util/"):
            _, block, expert = k.split("/", 2)
            util.setdefault(block, []).append(f"{expert[:3]}{v:.2f}")
    util_s = " ".join(f"{b}[{' '.join(u)}]" for b, u in sorted(util.items()))
    skips = " ".join(f"{k[5:]} {int(v)}" for k, v in sorted(m.items()) if k.startswith("data/") and v)
    parts = [
        f"step {step}",
        terms,
        f"lr {m.get('opt/lr', 0):.2e} gnorm {m.get('opt/grad_norm', float('nan')):.3f} "
        f"skipped {int(m.get('guard/skipped_steps', 0))}",
        f"{m['perf/samples_per_s']:.1f} samp/s {m['perf/tokens_per_s']:.0f} tok/s "
        f"{m['perf/tflops_per_s_per_rank']:.3f} TFLOP/s/rank",
    ]
    if "perf/mem_gb" in m:
        parts[-1] += f" mem {m['perf/mem_gb']:.1f} GB"
    if util_s:
        parts.append("util " + util_s)
    if skips:
        parts.append("data-skip " + skips)
    return " | ".join(p for p in parts if p)


@torch.no_grad()
def edit_grid(model: Any, batch: Any, num_steps: int, seed: int = 0) -> torch.Tensor:
    """Rows: samples; columns: source | coarse mask | refined mask | routing map | target | edit.

    Sampling runs eagerly even when training runs compiled (``torch.compiler.set_stance``). Through
    the training's compiled blocks it compiled their no-gradient variants, and under CUDA graphs
    without gradient checkpointing its block calls ran as graphs too. On the H100
    (``configs/gpu_smoke.yaml``, ``reduce-overhead``) the step after each image step took 22-79 s,
    the later ones too (likely graphs recorded for the sampler again); sampling eagerly, 2 s
    (docs/history/perf-log.md, 20:09 entry)."""
    was_training = model.training
    model.eval()
    try:
        g = torch.Generator(device=batch.source.device).manual_seed(seed)
        with torch.compiler.set_stance("force_eager"):
            res = model.edit(batch, num_steps=num_steps, generator=g)  # the recipe's guidance
    finally:
        model.train(was_training)

    def img(x: torch.Tensor) -> torch.Tensor:  # [-1,1] -> [0,1]
        return (x.float().clamp(-1, 1) + 1) / 2

    def mask(x: torch.Tensor) -> torch.Tensor:
        return x.float().clamp(0, 1).expand(-1, 3, -1, -1)

    size = batch.source.shape[-2:]

    def fit(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(x, size=size, mode="nearest") if x.shape[-2:] != size else x

    cols = [
        img(batch.source),
        mask(fit(batch.coarse_mask)),
        mask(fit(res.refined_mask)),
        img(fit(res.routing_map.float())),
        img(batch.target),
        img(res.images),
    ]
    rows = torch.stack([c.cpu() for c in cols], dim=1).flatten(0, 1)  # [B*6, 3, H, W]
    return tile(rows, ncols=len(cols))


def tile(images: torch.Tensor, ncols: int, pad: int = 2) -> torch.Tensor:
    """[N,3,H,W] -> one [3, rows*(H+pad)+pad, ncols*(W+pad)+pad] image on a white background."""
    n, c, h, w = images.shape
    nrows = (n + ncols - 1) // ncols
    out = torch.ones(c, nrows * (h + pad) + pad, ncols * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        out[:, y : y + h, x : x + w] = images[i]
    return out
