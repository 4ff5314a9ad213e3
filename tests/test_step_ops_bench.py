"""bench/step_ops.py counts what a step dispatches: exact on a known sequence of operations."""

import torch

from bench.step_ops import OpCounter, count_step


def test_counter_counts_operations_and_host_syncs_exactly():
    a, b = torch.ones(3), torch.full((3,), 2.0)
    counter = OpCounter()
    with counter:
        c = a + b  # one add
        d = c * 2  # one mul
        value = float(d.sum())  # one sum, one read of the value on the host
    assert value == 18.0
    assert counter.ops["aten.add"] == 1 and counter.ops["aten.mul"] == 1 and counter.ops["aten.sum"] == 1
    assert counter.ops["aten._local_scalar_dense"] == 1
    assert counter.total() == 4


def test_count_step_splits_forward_backward_and_optimizer():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(4))

        def forward(self, batch):
            class Out:
                loss = (self.w * batch).sum()

            return Out()

    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    phases = count_step(model, torch.arange(4.0), opt)
    assert phases["forward"]["ops"] == 2 and phases["forward"]["syncs"] == 0  # mul, sum
    assert phases["backward"]["ops"] > 0 and phases["optimizer"]["ops"] > 0
    assert torch.equal(model.w.detach(), 1 - 0.1 * torch.arange(4.0))  # the step ran
