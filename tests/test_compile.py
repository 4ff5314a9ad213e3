"""Compiled execution (``CareEditModel.compile_regions``) computes the same model as eager.

On CPU the graphs run through AOTAutograd with eager kernels (backend ``aot_eager``): that checks what
can go wrong in tracing (graph breaks, stale Python state captured in a graph, recompilation every
step, expert layers that do not share a graph) without spending minutes in the C++ compiler. The GPU
runs the same graphs through inductor (bench/bench_step.py --compile, docs/PERF.md).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.backends.debugging import aot_eager

from moe.model import build_model
from tests.helpers.model_configs import data_dependent_nodes, make_batch, tiny_model_config
from train.logging import edit_grid


class CountingBackend:
    """aot_eager that remembers the forward graphs it was handed (to count compilations)."""

    def __init__(self) -> None:
        self.graphs: list[str] = []
        self.data_dependent: list[str] = []  # nodes whose output size is read from the data (a host sync on CUDA)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs.append(gm.code)
        self.data_dependent += data_dependent_nodes(gm)
        return aot_eager(gm, example_inputs)


# ffn_grouped: FFN experts as grouped GEMMs in bf16, which need no host value, so their blocks compile
# whole like the LoRA experts' (the same aten ops either way: bf16 results agree to rounding)
@pytest.mark.parametrize("kind", ["lora", "ffn", "ffn_grouped"])
def test_compiled_model_equals_eager(kind):
    torch._dynamo.reset()
    torch.manual_seed(0)
    grouped = kind == "ffn_grouped"
    kind = "ffn" if grouped else kind
    cfg = tiny_model_config(
        **{
            "backbone.gradient_checkpointing": True,
            "experts.num_blocks": 3,
            "experts.kind": kind,
            "experts.grouped_gemm": grouped,
        }
    )
    eager = build_model(cfg)
    if grouped:
        eager.to(torch.bfloat16)
    rtol, atol = (2e-2, 1e-3) if grouped else (1e-5, 1e-7)
    with torch.no_grad():  # move off the zero-initialised start so every path carries signal
        for p in eager.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    compiled = copy.deepcopy(eager)
    backend = CountingBackend()
    compiled.compile_regions(backend=backend)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints keep their names
    # blocks compile whole, checkpoint inside, unless an expert layer needs host values (all-to-all)
    whole = compiled.backbone._whole_blocks
    tr = compiled.backbone.transformer
    blocks = list(tr.transformer_blocks) + list(tr.single_transformer_blocks)
    for b in blocks:
        layers = [m for m in b.modules() if type(m).__name__ == "ExpertFeedForward"]
        assert (id(b) in whole) == all(layer.traceable for layer in layers)
    assert any(layer.traceable for layer in compiled.expert_layers) == (kind == "lora" or grouped)
    eager.train()
    compiled.train()
    graphs_after = []
    # the third batch repeats the second's structure: by then nothing may compile any more
    for step, has_ref in enumerate([[True, True], [True, False], [False, True]]):
        batch = make_batch(seed=step, has_ref=has_ref)
        outs = []
        for model in (eager, compiled):
            torch.manual_seed(100 + step)
            out = model(batch)
            out.loss.backward()
            outs.append(out)
        assert torch.allclose(outs[0].loss, outs[1].loss, rtol=rtol / 10, atol=atol)
        assert outs[0].terms.keys() == outs[1].terms.keys()
        for name in outs[0].stats:
            a, b = outs[0].stats[name], outs[1].stats[name]
            assert torch.allclose(a, b, rtol=rtol, atol=atol) if grouped else torch.equal(a, b), name
        grads = {n: p.grad for n, p in compiled.named_parameters() if p.grad is not None}
        for n, p in eager.named_parameters():
            if p.grad is not None:
                assert torch.allclose(grads[n], p.grad, rtol=rtol, atol=atol), n
        eager.zero_grad(set_to_none=True)
        compiled.zero_grad(set_to_none=True)
        graphs_after.append(len(backend.graphs))
    assert graphs_after[2] == graphs_after[1], "a batch of a seen structure recompiled"
    # the recomputation of whole blocks is part of their compiled graph (a checkpoint region in it)
    assert any("checkpoint" in g for g in backend.graphs)
    routing_graphs = [g for g in backend.graphs if "to_logits" in g]
    if kind == "lora" or grouped:  # traced inside each expert block's graph: no graph break at the layer
        assert all("checkpoint" in g for g in routing_graphs) and routing_graphs
        assert not backend.data_dependent, backend.data_dependent  # and no size read back from the device
        # the three expert blocks share a graph per batch structure, but for the first layer (its prior
        # is the coarse box, without gradient): 2 structures x 2, where one graph per block would be 6
        assert len(routing_graphs) == 4, len(routing_graphs)
    else:  # compiled apart, one graph shared by the three layers (variants: with/without a reference
        # span, prior with/without gradient)
        assert 1 <= len(routing_graphs) <= 4, len(routing_graphs)


def test_context_tensors_are_not_static_inputs():
    """The per-forward context reaches the compiled expert blocks as ordinary graph inputs: the block's
    ``ff_args`` (the context and the layer's slot). Read through a module attribute, torch.compile marks
    such tensors static (fixed addresses, like parameters), and CUDA graphs then re-record every expert
    block at every step, since each forward's context is new (measured: 10 s steps on the H100,
    docs/history/perf-log.md)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    seen: dict[str, object] = {}
    static_params: list[str] = []  # the probe itself must see parameters as static

    def backend(gm: torch.fx.GraphModule, example_inputs):
        for node in gm.graph.nodes:
            arg = node.meta.get("grapharg") if node.op == "placeholder" else None
            if arg is None or arg.source is None:
                continue
            static = node.meta.get("tensor_dict", {}).get("_dynamo_static_input_type")
            if "ff_args" in arg.source.name:
                seen[arg.source.name] = static
            elif "_parameters" in arg.source.name and static is not None:
                static_params.append(arg.source.name)
        return aot_eager(gm, example_inputs)

    cfg = tiny_model_config(
        **{"backbone.gradient_checkpointing": True, "experts.num_blocks": 3, "experts.kind": "lora"}
    )
    model = build_model(cfg)
    model.compile_regions(backend=backend)
    model.train()
    model(make_batch(seed=0, has_ref=[True, True])).loss.backward()
    names = {name.rsplit(".", 1)[-1] for name in seen}
    assert {"text", "coarse", "prior"} <= names, names  # the context was traced into the expert blocks
    assert static_params  # so a missing flag below means "not static", not "not found"
    assert not {n: s for n, s in seen.items() if s is not None}, seen


def test_image_sampling_beside_compiled_training_compiles_nothing():
    """The training loop's image grid samples eagerly: through the compiled blocks it compiled their
    no-gradient variants at the first image step, and under CUDA graphs ran its block calls as graphs,
    likely recorded again at every image step (docs/history/perf-log.md, 20:09 entry). So sampling after a
    compiled training step compiles no graph and samples what the eager model samples, and the next
    training step compiles nothing either: the model as built is in the training mode that sampling
    restores (the frozen blocks were not, and recompiled after the first image step on the H100)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = tiny_model_config(
        **{"backbone.gradient_checkpointing": False, "experts.num_blocks": 2, "experts.kind": "lora"}
    )
    eager = build_model(cfg)
    compiled = copy.deepcopy(eager)
    backend = CountingBackend()
    compiled.compile_regions(backend=backend)
    compiled(make_batch(seed=0, has_ref=[True, True])).loss.backward()  # as built: the loop sets no mode
    trained = len(backend.graphs)
    assert trained > 0  # the probe sees the training graphs
    batch = make_batch(seed=1, has_ref=[True, False])
    grids = [edit_grid(m, batch, num_steps=2, seed=3) for m in (eager, compiled)]
    assert len(backend.graphs) == trained, "sampling compiled graphs of its own"
    assert torch.equal(grids[0], grids[1])
    assert compiled.training
    # and training goes on with the graphs it has (on the H100 it recompiled after sampling)
    compiled(make_batch(seed=2, has_ref=[True, True])).loss.backward()
    assert len(backend.graphs) == trained, "training recompiled after sampling"
