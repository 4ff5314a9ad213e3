"""Sibling LoRA projections share one down projection product (moe/lora_siblings.py): the same
function, parameters and gradients as peft's per-projection products, with fewer products, eager
and compiled."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn
from torch._dynamo.backends.debugging import aot_eager
from torch.profiler import ProfilerActivity, profile

from moe.backbone import FluxBackbone
from moe.config import LoraConfig
from moe.lora_siblings import SharedDown, SiblingLoraLinear, share_down
from tests.helpers.model_configs import tiny_model_config


def _pair(checkpointing: bool = True, rank: int = 4):
    """A backbone with shared down projections and a copy of it with peft's plain products."""
    cfg = tiny_model_config().backbone
    cfg.gradient_checkpointing = checkpointing
    torch.manual_seed(0)
    plain = FluxBackbone(cfg, LoraConfig(rank=rank, shared_down=False))
    torch.manual_seed(0)
    shared = FluxBackbone(cfg, LoraConfig(rank=rank, shared_down=True))
    with torch.no_grad():  # same non-trivial weights in both (lora_B starts at zero)
        for (n, p), (n2, q) in zip(plain.named_parameters(), shared.named_parameters()):
            assert n == n2
            if "lora_" in n:
                p.normal_(0, 0.3)
            q.copy_(p)
    return plain, shared


def _inputs(model, seed=1, n_img=8, n_txt=3):
    g = torch.Generator().manual_seed(seed)
    d = model.hidden_size
    img = torch.randn(2, n_img, d, generator=g, requires_grad=True)
    txt, temb = torch.randn(2, n_txt, d, generator=g), torch.randn(2, d, generator=g)
    ids = torch.zeros(n_img, 3)
    ids[:, 1] = torch.arange(n_img)
    return img, txt, temb, ids, torch.zeros(n_txt, 3)


def _run(model, args):
    img = args[0].detach().clone().requires_grad_(True)
    out = model.run_blocks(img, *args[1:])
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), img.grad, grads


def _matmuls(model, args) -> int:
    """Matrix products in one forward + backward (after a warm-up call: no tracing counted)."""
    _run(model, args)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _run(model, args)
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))


def _fewer_per_forward(model) -> int:
    tr = model.transformer  # single blocks: 4 siblings (q, k, v, MLP in); dual blocks: q, k, v
    return 3 * len(tr.single_transformer_blocks) + 2 * len(tr.transformer_blocks)


def _rel(a, b) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def _assert_same(a, b, tol=1e-5):
    """Outputs, input gradient and every parameter gradient, within float32 rounding (relative to the
    tensor's norm: only the order of the sums inside a product differs)."""
    assert _rel(a[0], b[0]) < tol and _rel(a[1], b[1]) < tol
    assert a[2].keys() == b[2].keys() and any("lora_A" in n for n in a[2])
    for n in a[2]:
        assert _rel(a[2][n], b[2][n]) < tol, n


def test_groups_are_the_projections_that_read_one_tensor():
    _, shared = _pair()
    tr = shared.transformer
    single, dual = tr.single_transformer_blocks[0], tr.transformer_blocks[0]
    g = single.proj_mlp.shared_down
    assert isinstance(g, SharedDown)
    assert g.members == [single.proj_mlp, single.attn.to_q, single.attn.to_k, single.attn.to_v]
    assert dual.attn.to_q.shared_down.members == [dual.attn.to_q, dual.attn.to_k, dual.attn.to_v]
    assert not hasattr(dual.attn.to_out[0], "shared_down")  # reads another tensor
    assert not hasattr(dual.attn.add_q_proj, "lora_A")  # not a LoRA target: no group on the text stream
    # names and parameters are peft's: a checkpoint of one loads into the other
    plain, _ = _pair()
    assert list(plain.state_dict()) == list(shared.state_dict())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_same_outputs_and_gradients_as_peft_with_fewer_products(checkpointing):
    plain, shared = _pair(checkpointing)
    args = _inputs(plain)
    _assert_same(_run(shared, args), _run(plain, args))
    # per group, (siblings - 1) fewer products in the forward, the recompute, and for dA and dx
    passes = 4 if checkpointing else 3
    assert _matmuls(plain, args) - _matmuls(shared, args) == passes * _fewer_per_forward(shared)
    # nothing is held between calls: each group dropped its product after its last sibling
    assert all(m.shared_down._h is None for m in shared.modules() if hasattr(m, "shared_down"))


def test_compiled_whole_blocks_share_the_product_and_match_eager():
    torch._dynamo.reset()
    plain, shared = _pair(checkpointing=True)
    compiled = copy.deepcopy(shared)
    # the copy's groups point at the copy's modules, not the original's
    q = compiled.transformer.single_transformer_blocks[0].attn.to_q
    assert (
        q.shared_down.members[1] is q
        and q.shared_down is not shared.transformer.single_transformer_blocks[0].attn.to_q.shared_down
    )
    assert compiled.compile_blocks(backend=aot_eager) == len(list(compiled.transformer.transformer_blocks)) + len(
        list(compiled.transformer.single_transformer_blocks)
    )
    args = _inputs(plain)
    for _ in range(2):  # the second call runs the cached graphs
        _assert_same(_run(compiled, args), _run(plain, args))
    plain.compile_blocks(backend=aot_eager)  # like for like: the partitioner may move products around
    assert _matmuls(plain, args) - _matmuls(compiled, args) == 4 * _fewer_per_forward(compiled)


def test_merged_disabled_or_dropout_adapters_take_peft_path():
    plain, shared = _pair(checkpointing=False)
    args = _inputs(plain)
    with torch.no_grad():
        expected = plain.run_blocks(*args)
        for m in shared.modules():
            if hasattr(m, "shared_down"):
                m.merge()
        assert all(m.shared_down.adapter() is None for m in shared.modules() if hasattr(m, "shared_down"))
        assert _rel(shared.run_blocks(*args), expected) < 1e-5
        for m in shared.modules():
            if hasattr(m, "shared_down"):
                m.unmerge()
        assert _rel(shared.run_blocks(*args), expected) < 1e-5
        for model in (plain, shared):  # adapters off: both are the frozen backbone
            for m in model.modules():
                if isinstance(m, PeftLoraLinear):
                    m.enable_adapters(False)
        assert all(m.shared_down.adapter() is None for m in shared.modules() if hasattr(m, "shared_down"))
        assert _rel(shared.run_blocks(*args), plain.run_blocks(*args)) < 1e-6
        assert _rel(shared.run_blocks(*args), expected) > 1e-3  # the adapters were doing something
    cfg = tiny_model_config().backbone
    models = []
    for flag in (False, True):
        torch.manual_seed(0)
        models.append(FluxBackbone(cfg, LoraConfig(rank=4, dropout=0.5, shared_down=flag)).eval())
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        with torch.no_grad():
            q.copy_(p.normal_(0, 0.3) if p.requires_grad else p)
    group = models[1].transformer.single_transformer_blocks[0].proj_mlp.shared_down
    assert group.adapter() is None  # dropout draws a mask per projection: not one product
    with torch.no_grad():
        assert _rel(models[1].run_blocks(*args), models[0].run_blocks(*args)) < 1e-6


def test_bf16_backbone_with_float32_adapters_keeps_pefts_dtypes():
    """peft keeps adapters in float32 on a bf16 model: the sum is cast back to the layer's dtype."""
    plain, shared = _pair(checkpointing=False)
    for model in (plain, shared):
        for n, p in model.named_parameters():
            if "lora_" not in n:
                p.data = p.data.to(torch.bfloat16)
    args = tuple(
        a.to(torch.bfloat16) if a.is_floating_point() and a.dim() > 1 and i < 3 else a
        for i, a in enumerate(_inputs(plain))
    )
    with torch.no_grad():
        out_plain, out_shared = plain.run_blocks(*args), shared.run_blocks(*args)
    assert out_shared.dtype == out_plain.dtype == torch.bfloat16
    assert _rel(out_shared.float(), out_plain.float()) < 2e-2


class Siblings(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 5), nn.Linear(6, 7), nn.Linear(6, 3)


def test_uneven_ranks_outside_the_scope_and_partial_use():
    """Direct use of a group: sharing only inside its scope; ranks of any size; a product that was not
    taken by every sibling is dropped when the scope closes."""
    from peft import LoraConfig as PeftConfig
    from peft import inject_adapter_in_model

    torch.manual_seed(0)
    plain = Siblings()
    inject_adapter_in_model(PeftConfig(r=2, target_modules=["a", "b", "c"], rank_pattern={"b": 3, "c": 1}), plain)
    for n, p in plain.named_parameters():
        if "lora_B" in n:
            p.data.normal_()
    shared = copy.deepcopy(plain)
    group = share_down([shared.a, shared.b, shared.c])
    assert [m.lora_A["default"].weight.shape[0] for m in group.members] == [2, 3, 1]
    x = torch.randn(4, 6)
    with group.sharing():
        got = [shared.a(x), shared.b(x), shared.c(x)]
        assert group._h is None  # all three took their block
    for name, y in zip("abc", got):
        assert _rel(y, getattr(plain, name)(x)) < 1e-6
    assert _matmul_count(lambda: [shared.a(x), shared.b(x), shared.c(x)]) == 9  # outside: the base and peft's 2 each
    with group.sharing():
        assert _matmul_count(lambda: [shared.a(x), shared.b(x), shared.c(x)]) == 7  # the bases, one down, three up
        shared.b(x)  # a partial use
        assert group._h is not None
    assert group._h is None and group._input is None and not group.active
    # a deepcopy and a pickle of a grouped module keep working
    again = pickle.loads(pickle.dumps(shared))
    assert type(again.a) is SiblingLoraLinear and again.a.shared_down is again.b.shared_down
    with again.a.shared_down.sharing():
        assert _rel(again.c(x), plain.c(x)) < 1e-6


def _matmul_count(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm"))
