"""The toy model of tests/helpers/toy_model.py with the interface the held-out evaluation reads (train/eval/heldout.py).

Why a subclass: ``train.eval.evaluation.flow_mse_per_sample`` and ``evaluate`` call the real model's
``encode_target`` / ``encode_conditions`` / ``predict_velocity`` / ``dtype`` and read ``utilisation``
from ``edit``; the toy's pixels stand in for latents and its source for the conditions. The forward the
training runs is the toy's own, untouched, so a toy run's losses are the same with or without this.
``tests/helpers/faults.py`` swaps a built toy to this class when ``Faults.toy_eval`` is set.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from data.batch import EditBatch
from tests.helpers.toy_model import EXPERTS, ToyEditModel, ToyEditResult


class EvalToyModel(ToyEditModel):
    @property
    def dtype(self) -> torch.dtype:
        return self.head.weight.dtype

    def encode_target(self, batch: EditBatch) -> Tensor:
        return batch.target.to(self.dtype)

    def encode_conditions(self, batch: EditBatch) -> Tensor:
        return batch.source.to(self.dtype)

    def predict_velocity(self, noisy: Tensor, t: Tensor, cond: Tensor) -> tuple[Tensor, None]:
        v, _, _ = self._velocity(self._tokens(noisy), self._tokens(cond))
        return self._untokens(v, noisy.shape), None

    @torch.no_grad()
    def edit(self, batch: EditBatch, generator: Optional[torch.Generator] = None, **kw) -> ToyEditResult:
        kw.pop("keep_outside_box", None)
        res = super().edit(batch, generator=generator, **kw)
        res.utilisation = {name: 1.0 / len(EXPERTS) for name in EXPERTS}
        return res


def with_eval_interface(model: ToyEditModel) -> EvalToyModel:
    """The same instance (same parameters and names), now an :class:`EvalToyModel`."""
    model.__class__ = EvalToyModel
    return model
