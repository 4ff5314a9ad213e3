"""Interventions on a trained model's routing at inference: change where tokens are routed and nothing else,
and see what the edit loses. A model that relies on its router loses success when its routing is moved;
one that ignores it does not.

An intervention acts on each expert layer's routing between the router and the experts
(``ExpertFeedForward.route``). The router's probabilities and logits, the Latent Mixture's gate (which
reads the router's own probabilities), the condition read-outs, Mask Repaint and every weight stay as
they are; only the weights the experts' outputs are combined with change:

* ``swap_regions``: in a compositional edit (``data.compose``), the tokens of the text region are routed as
  the reference region's tokens were on average (each expert's mean routed weight over that region), and
  the reference region's as the text region's; border and outside tokens keep their own routing. A sample
  without both regions is left as it is.
* ``region_mean``: each region's tokens routed as that region's tokens were on average: the control for
  ``swap_regions`` (what averaging alone costs).
* ``static``: every token's routed weights equal over all experts, as static fusion routes.
* ``off_<expert>``: the expert contributes nothing to any token (its routed weight and, for Base, its
  mixture share removed); each token's other weights are scaled up to the total they had, so the output
  keeps its size (a token left with no expert gets the frozen path alone).

The switch is the model config's ``router.intervention`` (validated with the rest of the config, so a
misspelt name fails at load), e.g. ``python -m launch.eval ... --intervention swap_regions`` on a trained
checkpoint; ``CareEditModel.predict_velocity`` and ``edit`` also take one as an argument, which wins over the
config's. Without one the forward is the model's own, bit for bit; an intervention that leaves the routing
as it was (``static`` on a static-fusion model) gives the same output bit for bit; every other difference
in the output comes through the dispatched routing weights alone (``tests/test_interventions.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import regions as region
from .config import ROUTING_INTERVENTIONS as KINDS  # and off_<expert> for each expert
from .router import Routing, dense_weights


@dataclass(frozen=True)
class RoutingIntervention:
    """One intervention by name: ``swap_regions``, ``region_mean``, ``static`` or ``off_<expert>``."""

    name: str

    def __post_init__(self) -> None:
        if self.name not in KINDS and not self.name.startswith("off_"):
            raise ValueError(f"unknown routing intervention {self.name!r} (known: {', '.join(KINDS)}, off_<expert>)")

    @property
    def expert_off(self) -> Optional[str]:
        return self.name[len("off_") :] if self.name.startswith("off_") else None

    @property
    def needs_regions(self) -> bool:
        return self.name in ("swap_regions", "region_mean")

    def routed(self, routing: Routing, regions: Optional[Tensor], batch: int, num_experts: int) -> Routing:
        """The router's top-K (before the Latent Mixture) under this intervention; the others pass it on."""
        if self.expert_off is not None:
            return routing
        dense = dense_weights(routing.index, routing.weight, num_experts).reshape(batch, -1, num_experts)
        if self.name == "static":
            dense = torch.full_like(dense, 1.0 / num_experts)
        else:
            if regions is None:
                raise ValueError(f"routing intervention {self.name}: the batch has no region labels (data.compose)")
            dense = region_means(dense, regions, swap=self.name == "swap_regions")
        index, weight = sparse(dense.reshape(-1, num_experts))
        return Routing(probs=routing.probs, index=index, weight=weight, logits=routing.logits)

    def dispatched(self, index: Tensor, weight: Tensor, expert_names: Sequence[str]) -> tuple[Tensor, Tensor]:
        """The weights to dispatch (top-K with Base's mixture share, [S, K']) under ``off_<expert>``."""
        name = self.expert_off
        if name is None:
            return index, weight
        if name not in expert_names:
            raise ValueError(f"routing intervention {self.name}: no expert {name!r} (experts: {list(expert_names)})")
        return expert_off(index, weight, list(expert_names).index(name))


def region_means(dense: Tensor, regions: Tensor, swap: bool) -> Tensor:
    """dense [B, N, E] routed weights, regions [B, N] token labels -> the text region's tokens given the
    reference region's mean weights and the reverse (``swap``), or each its own region's mean."""
    text = (regions == region.TEXT)[..., None]
    ref = (regions == region.REFERENCE)[..., None]
    n_text, n_ref = text.sum(1), ref.sum(1)  # [B, 1]
    mean_text = (dense * text).sum(1) / n_text.clamp(min=1)  # [B, E]
    mean_ref = (dense * ref).sum(1) / n_ref.clamp(min=1)
    both = ((n_text > 0) & (n_ref > 0))[:, :, None]  # [B, 1, 1]
    new_text, new_ref = (mean_ref, mean_text) if swap else (mean_text, mean_ref)
    dense = torch.where(text & both, new_text[:, None, :], dense)
    return torch.where(ref & both, new_ref[:, None, :], dense)


def sparse(dense: Tensor) -> tuple[Tensor, Tensor]:
    """Dense weights [S, E] -> index/weight [S, E]: every expert with a weight above 0, -1 elsewhere."""
    index = torch.arange(dense.shape[1], device=dense.device).expand_as(dense)
    used = dense > 0
    return torch.where(used, index, torch.full_like(index, -1)), torch.where(used, dense, torch.zeros_like(dense))


def expert_off(index: Tensor, weight: Tensor, expert: int) -> tuple[Tensor, Tensor]:
    """index/weight [S, K] without ``expert``, the other weights scaled to the token's former total."""
    hit = index == expert
    total = weight.sum(1, keepdim=True)
    weight = torch.where(hit, torch.zeros_like(weight), weight)
    left = weight.sum(1, keepdim=True)
    weight = weight * torch.where(left > 0, total / left.clamp(min=1e-20), torch.zeros_like(left))
    return torch.where(hit, torch.full_like(index, -1), index), weight
