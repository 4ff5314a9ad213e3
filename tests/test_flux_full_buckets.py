"""configs/flux_full.yaml starts under ZeRO 2 at ep_size 4: its gradient bucket holds every rank's gradients.

The four experts differ in size (Mask and Base read one more condition column than Text and Reference),
so the expert-parallel ranks hold different trainable sizes and the trainer refuses a bucket smaller than
a rank's gradients (train/engine.py::check_bucket_layout; docs/FAULTS.md). The full model cannot be built
here, so it is built on the meta device (shapes, no data) once per expert-parallel rank; the few
data-dependent steps of its initialisation (a seed drawn with ``.item()``, the experts' perturbation
scaled by a weight's std) get placeholder values, which do not change any shape.
"""

from __future__ import annotations

import contextlib
import os

import torch
from omegaconf import OmegaConf

from tests.helpers.train_harness import ROOT
from train.config import load_config

NO_WEIGHTS = [
    f"{k}=null" for k in ("model.backbone.path", "model.vae.path", "model.text.t5_path", "model.text.clip_path")
]


@contextlib.contextmanager
def _meta_build():
    """Build modules on the meta device, with placeholders where the initialisation reads values."""
    import moe.experts

    item, to_float, randint = torch.Tensor.item, torch.Tensor.__float__, torch.randint
    perturbation = moe.experts.zero_mean_perturbation
    torch.Tensor.item = lambda self: 1 if self.is_meta else item(self)
    torch.Tensor.__float__ = lambda self: 1.0 if self.is_meta else to_float(self)
    torch.randint = lambda *a, **k: randint(*a, **{**k, "device": "cpu"})
    moe.experts.zero_mean_perturbation = lambda shape, *a, **k: torch.zeros(shape, device="meta")
    try:
        with torch.device("meta"):
            yield
    finally:
        torch.Tensor.item, torch.Tensor.__float__, torch.randint = item, to_float, randint
        moe.experts.zero_mean_perturbation = perturbation


def test_flux_full_bucket_holds_every_ranks_gradients(monkeypatch):
    from moe.model import build_model

    monkeypatch.setenv("WORLD_SIZE", "8")
    cfg = load_config(os.path.join(ROOT, "configs", "flux_full.yaml"), NO_WEIGHTS)
    model_cfg = OmegaConf.to_object(cfg.model)
    ep = model_cfg.experts.ep_size
    assert (cfg.train.zero_stage, ep, model_cfg.experts.kind) == (2, 4, "ffn")
    per_rank = []
    for ep_rank in range(ep):
        with _meta_build():
            model = build_model(model_cfg, ep_rank=ep_rank)
        per_rank.append([p.numel() for p in model.parameters() if p.requires_grad])
        del model
    totals = [sum(sizes) for sizes in per_rank]
    assert len(set(totals)) > 1, totals  # the ranks differ: check_bucket_layout applies
    assert totals == [954_558_288, 954_589_008] * 2, f"{totals}: update the comment in flux_full.yaml"
    assert cfg.train.reduce_bucket_size >= max(totals)
