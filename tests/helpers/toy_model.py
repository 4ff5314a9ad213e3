"""A small stand-in for ``moe.model.CareEditModel`` with the same interface, for training-loop tests.

Why it exists: the trainer must be testable on 2 CPU cores in seconds, independently of the real
model's size. It holds a frozen "backbone" (so ``exclude_frozen_parameters`` matters), a trainable
adapter, and a real ``deepspeed.moe.layer.MoE`` (so expert parallelism, per-expert checkpoint files
and MoE optimizer groups are exercised). Its loss uses ``torch.randn`` noise like flow matching, so
exact resume also depends on restoring the RNG state.

It also provides a deterministic in-memory loader with the ``data.loader.EditLoader`` interface.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from torch import Tensor, nn

from data.batch import EditBatch

EXPERTS = ("text", "mask", "reference", "base")
PATCH = 8


@dataclass
class ToyOutput:
    loss: Tensor
    terms: dict[str, Tensor]
    stats: dict[str, float]
    num_tokens: int


@dataclass
class ToyEditResult:
    images: Tensor
    refined_mask: Tensor
    routing_map: Tensor


class ToyEditModel(nn.Module):
    """Patch tokens -> frozen projection -> trainable adapter -> MoE (4 experts) -> patch prediction."""

    def __init__(self, hidden: int = 32, ep_size: int = 1, image_channels: int = 3, top_k: int = 1) -> None:
        super().__init__()
        token_dim = image_channels * PATCH * PATCH
        self.backbone_in = nn.Linear(token_dim * 2, hidden)  # frozen, like the DiT
        self.backbone_out = nn.Linear(hidden, token_dim)
        for p in list(self.backbone_in.parameters()) + list(self.backbone_out.parameters()):
            p.requires_grad_(False)
        self.adapter = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.adapter.weight)
        nn.init.zeros_(self.adapter.bias)
        self.moe = MoE(
            hidden,
            nn.Linear(hidden, hidden),
            num_experts=len(EXPERTS),
            ep_size=ep_size,
            k=top_k,
            capacity_factor=4.0,
            min_capacity=4,
            use_rts=False,
        )
        self.head = nn.Linear(hidden, token_dim)
        self.hidden = hidden

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def flops_per_token(self) -> float:
        return float(2 * sum(p.numel() for n, p in self.named_parameters() if "deepspeed_experts" not in n))

    def compile_regions(self, **compile_kwargs) -> str:
        """Nothing is compiled: the stand-in runs eagerly under ``train.compile`` too ("": no log line)."""
        return ""

    def routing_warnings(self, stats: dict[str, float]) -> list[str]:
        return []

    def _tokens(self, image: Tensor) -> Tensor:
        b, c, h, w = image.shape
        x = image.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH)  # b c h' w' p p
        return x.permute(0, 2, 3, 1, 4, 5).reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)

    def _untokens(self, tokens: Tensor, shape: torch.Size) -> Tensor:
        b, c, h, w = shape
        x = tokens.reshape(b, h // PATCH, w // PATCH, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, h, w)

    def _velocity(self, noisy: Tensor, source: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = self.backbone_in(torch.cat([noisy, source], dim=-1))
        h = h + self.adapter(h)
        moe_out, l_aux, counts = self.moe(h)
        h = h + moe_out
        return self.head(h) + self.backbone_out(h), l_aux, counts

    def forward(self, batch: EditBatch) -> ToyOutput:
        src, tgt = self._tokens(batch.source), self._tokens(batch.target)
        noise = torch.randn_like(tgt)
        t = torch.rand(tgt.shape[0], 1, 1, device=tgt.device, dtype=tgt.dtype)
        noisy = (1 - t) * tgt + t * noise
        v, l_aux, counts = self._velocity(noisy, src)
        diffusion = F.mse_loss(v, noise - tgt)
        counts = counts.float()
        util = (counts / counts.sum().clamp(min=1)).tolist()
        stats = {f"util/block0/{name}": u for name, u in zip(EXPERTS, util)}
        loss = diffusion + 0.01 * l_aux
        return ToyOutput(
            loss=loss,
            terms={"diffusion": diffusion, "load_balance": l_aux},
            stats=stats,
            num_tokens=src.shape[0] * src.shape[1],
        )

    @torch.no_grad()
    def edit(
        self,
        batch: EditBatch,
        num_steps: int = 4,
        text_guidance: float = 1.0,
        image_guidance: float = 1.0,
        generator: Optional[torch.Generator] = None,
    ) -> ToyEditResult:
        src = self._tokens(batch.source)
        x = torch.randn(src.shape, generator=generator, device=src.device, dtype=src.dtype)
        for _ in range(num_steps):
            v, _, _ = self._velocity(x, src)
            x = x - v / num_steps
        images = self._untokens(x, batch.source.shape).clamp(-1, 1)
        b, _, h, w = batch.source.shape
        routing = torch.zeros(b, 3, h, w, device=src.device)
        return ToyEditResult(images=images, refined_mask=batch.coarse_mask.float(), routing_map=routing)


def make_experts_heterogeneous(model: ToyEditModel, widths: tuple[int, ...] = (8, 32, 56, 80)) -> ToyEditModel:
    """Give global expert ``g`` a hidden width ``widths[g]`` (like the real model's condition-specific
    experts, whose sizes differ), seeded by ``g`` so any ep_size builds the same experts. Expert-parallel
    ranks then hold experts of different sizes."""
    import torch.distributed as dist

    layer = model.moe
    experts = layer.deepspeed_moe.experts.deepspeed_experts
    # DeepSpeed's expert-parallel groups are consecutive ranks (built later, in deepspeed.initialize)
    ep_rank = dist.get_rank() % layer.ep_size if dist.is_initialized() else 0
    for local in range(len(experts)):
        g = ep_rank * len(experts) + local
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1000 + g)
            expert = nn.Sequential(nn.Linear(model.hidden, widths[g]), nn.ReLU(), nn.Linear(widths[g], model.hidden))
        for p in expert.parameters():
            p.allreduce, p.group_name = False, layer.expert_group_name
        experts[local] = expert
    return model


def build_toy_model(model_cfg) -> ToyEditModel:
    """Factory with ``moe.model.build_model``'s signature (reads ``experts.ep_size`` only)."""
    return ToyEditModel(ep_size=int(model_cfg.experts.ep_size))


def make_batch(seed: int, batch_size: int, image_size: int = 32) -> EditBatch:
    """A deterministic synthetic edit batch: target = source with a brightened box."""
    g = torch.Generator().manual_seed(seed)
    src = torch.rand(batch_size, 3, image_size, image_size, generator=g) * 2 - 1
    mask = torch.zeros(batch_size, 1, image_size, image_size)
    q = image_size // 4
    mask[:, :, q : 3 * q, q : 3 * q] = 1
    tgt = torch.where(mask.bool(), (src + 0.8).clamp(max=1), src)
    return EditBatch(
        source=src,
        target=tgt,
        reference=torch.zeros_like(src),
        has_reference=torch.zeros(batch_size, dtype=torch.bool),
        fine_mask=mask,
        coarse_mask=mask,
        bbox=torch.tensor([[q, q, 3 * q, 3 * q]] * batch_size),
        instruction=["brighten"] * batch_size,
        task=["recolor"] * batch_size,
        tag_ids=torch.full((batch_size, 1), -1),
        keys=[f"{seed}-{i}" for i in range(batch_size)],
    )


@dataclass
class ToyLoader:
    """Infinite deterministic loader: the batch at position p on rank r depends on (seed, r, p) only."""

    batch_size: int
    rank: int
    seed: int = 0
    image_size: int = 32
    position: int = 0
    skipped: dict = field(default_factory=lambda: {"bad_samples": 0})

    def __iter__(self) -> Iterator[EditBatch]:
        while True:
            seed = self.seed * 1_000_003 + self.rank * 10_007 + self.position
            self.position += 1
            yield make_batch(seed, self.batch_size, self.image_size)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])

    def skip_stats(self) -> dict[str, int]:
        return dict(self.skipped)


def build_toy_loader(
    data_cfg, batch_size: int, rank: int, world_size: int, start_step: int = 0, exact: bool = False
) -> ToyLoader:
    return ToyLoader(batch_size=batch_size, rank=rank, seed=int(data_cfg.seed), image_size=int(data_cfg.image_size))


def build_toy_val_batch(data_cfg, n: int) -> EditBatch:
    return make_batch(12345, n, int(data_cfg.image_size))
