"""One down projection product for LoRA'd sibling projections that read the same tokens.

A DiT block computes several projections from one tensor: FLUX's single blocks compute q, k, v and
the MLP input from the normed tokens, its dual blocks q, k and v. peft gives each projection its own
down projection ``h_i = x A_i^T``, so the tokens ``x`` are read once per sibling in the forward,
again in the checkpoint recompute, and twice per sibling in the backward (``dA_i = dh_i^T x``,
``dx += dh_i A_i``). These products are tiny (rank r) and bound by reading ``x``. Stacking the
``A_i`` makes each of them one product: ``[h_1 | ... | h_n] = x [A_1; ...; A_n]^T``. It is the same
function with the same parameters (peft's modules and names are untouched: checkpoints, exports
and merging work as before); only the order of the sums inside a product can differ.

How: each sibling becomes a :class:`SiblingLoraLinear` (peft's ``Linear`` with one more forward
path) pointing at one shared :class:`SharedDown`. The sharing is on only inside
:meth:`SharedDown.sharing`, which the backbone enters around each block call: there the first
sibling called with a tensor computes the stacked product for all, each sibling takes its column
block, and after the last one (or when the scope closes) the product is dropped. So a product never
outlives the block call that made it, and never meets changed weights or another grad mode. Anything
else (a call outside the scope, another input, a merged or disabled adapter, dropout, several
adapters, input casting turned off) takes peft's own forward.

The product reads the siblings' weights directly, which holds with DeepSpeed ZeRO 0-2 (ZeRO 3
gathers weights module by module; train.zero_stage excludes it). Measured in
``bench/bench_lora_siblings.py`` (docs/PERF.md).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import Tensor, nn


class SharedDown:
    """The stacked down projection of a group of sibling LoRA linears (a plain object, no state
    outside :meth:`sharing`)."""

    def __init__(self, members: list[nn.Module]):
        self.members = members
        self.active = False  # inside sharing(): the only place a product is computed and kept
        self._input: Optional[Tensor] = None  # the tensor the pending product was computed from
        self._h: Optional[Tensor] = None  # [..., sum of ranks]
        self._left = 0  # siblings that have not taken their block of the pending product

    @contextlib.contextmanager
    def sharing(self) -> Iterator[None]:
        """Turn the sharing on for one call of the block holding the group."""
        self.active, self._input, self._h, self._left = True, None, None, 0
        try:
            yield
        finally:
            self.active, self._input, self._h, self._left = False, None, None, 0

    def adapter(self) -> Optional[str]:
        """The one adapter every member runs plainly (vanilla LoRA, no dropout, unmerged, input
        casting on), or None."""
        names = None
        for m in self.members:
            active = list(m.active_adapters)
            if m.disable_adapters or m.merged or len(active) != 1 or (names is not None and active != names):
                return None
            a = active[0]
            if a not in m.lora_A or a in getattr(m, "lora_variant", {}) or m.lora_A[a].bias is not None:
                return None
            if not isinstance(m.lora_dropout[a], nn.Identity) or not getattr(m, "cast_input_dtype_enabled", True):
                return None
            names = active
        return names[0] if names else None

    def down(self, member: nn.Module, x: Tensor) -> Optional[Tensor]:
        """``member``'s down projection of ``x`` [..., D] -> [..., r] from the shared product, or None
        when peft's path must run."""
        if not self.active:
            return None
        if self._input is not x:
            a = self.adapter()
            if a is None:
                return None
            weights = [m.lora_A[a].weight for m in self.members]  # [r_i, D] each
            self._input, self._h, self._left = (
                x,
                F.linear(x.to(weights[0].dtype), torch.cat(weights)),
                len(self.members),
            )
        a = member.active_adapters[0]
        lo = sum(m.lora_A[a].weight.shape[0] for m in self.members[: member.shared_down_index])
        h = self._h[..., lo : lo + member.lora_A[a].weight.shape[0]]
        self._left -= 1
        if self._left == 0:  # every sibling has its block: drop it now, so that in a compiled block the
            # final state is empty and no tensor leaves the graph as a side effect
            self._input = self._h = None
        return h


class SiblingLoraLinear(PeftLoraLinear):
    """peft's LoRA ``Linear`` that takes its down projection from its :class:`SharedDown` when it can."""

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        h = self.shared_down.down(self, x) if not (args or kwargs) else None
        if h is None:
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x)
        a = self.active_adapters[0]
        return (result + self.lora_B[a](h) * self.scaling[a]).to(result.dtype)  # peft's vanilla LoRA, given h


def share_down(modules: list[nn.Module]) -> Optional[SharedDown]:
    """Group the LoRA linears among ``modules`` (siblings reading one input, in any call order).

    Only peft's plain LoRA ``Linear`` joins (not its subclasses, whose forward may differ); fewer
    than two make no group (returns None)."""
    members = [m for m in modules if type(m) is PeftLoraLinear]
    if len(members) < 2:
        return None
    group = SharedDown(members)
    for i, m in enumerate(members):
        m.__class__ = SiblingLoraLinear  # same parameters and state; one more forward path
        m.shared_down, m.shared_down_index = group, i
    return group
