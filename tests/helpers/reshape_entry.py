"""Training entry for the reshape tests: the toy model and loader, made independent of the world size.

Why: a step must compute the same thing at 2 ranks x 1 micro-batch and at 1 rank x 2 micro-batches
for a resumed run at another shape to be comparable with the uninterrupted one. So

* the loader numbers micro-batches globally (micro-batch ``position * world + rank``), and a
  reshaped resume continues at the number of micro-batches all old ranks consumed together;
* the model draws its noise from a generator seeded by the batch, not from the rank's RNG stream.

Then step ``s`` covers the same samples with the same noise at any (world size, grad_accum) with
the same global batch, and losses differ only by the order of fp32 sums.
"""

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from launch.train import main  # noqa: E402
from tests.helpers.toy_model import ToyEditModel, ToyLoader, build_toy_val_batch, make_batch  # noqa: E402


class GlobalToyModel(ToyEditModel):
    def forward(self, batch):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(batch.keys[0].split("-")[0]) + 7)
            return super().forward(batch)


class GlobalToyLoader(ToyLoader):
    world_size: int = 1

    def __iter__(self):
        while True:
            index = self.position * self.world_size + self.rank
            self.position += 1
            yield make_batch(self.seed * 1_000_003 + index, self.batch_size, self.image_size)

    def load_state_dict(self, state: dict) -> None:
        if "per_rank" not in state:
            return super().load_state_dict(state)
        consumed = sum(int(s["position"]) for s in state["per_rank"])  # micro-batches, all old ranks together
        if consumed % self.world_size:
            raise ValueError(f"{consumed} micro-batches consumed do not split over {self.world_size} ranks")
        self.position = consumed // self.world_size


def build_loader(data_cfg, batch_size, rank, world_size, start_step=0, exact=False):
    loader = GlobalToyLoader(
        batch_size=batch_size, rank=rank, seed=int(data_cfg.seed), image_size=int(data_cfg.image_size)
    )
    loader.world_size = world_size
    return loader


def build_model(model_cfg):
    return GlobalToyModel(ep_size=int(model_cfg.experts.ep_size))


if __name__ == "__main__":
    sys.exit(main(model_factory=build_model, loader_factory=build_loader, val_batch_factory=build_toy_val_batch))
