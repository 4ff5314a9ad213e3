"""Expert layer speed, side by side in one process: ours vs a dense layer of the same FLOPs vs stock
DeepSpeed MoE. Forward + backward, bf16, 4 experts, top-3, hidden 3072 (FLUX width).

    python bench/bench_expert_layer.py [--tokens 4096 16384] [--ranks 16 64] [--iters 10] [--compile] [--graphs]
        [--autotune] [--profile] [--only REGEX] [--check]

Prints one JSON line per case and a short table last. Ratios are measured in the same run, the cases
timed in interleaved rounds (``bench.common.time_interleaved``). ``--graphs`` adds the cases that trace
whole as CUDA graphs, compared with the graphed dense layer: without launch gaps, and replaying in
their own memory pool, they gave the steadiest ratios (docs/history/perf-log.md, 17:01 entry).
``--profile`` adds each case's kernel statistics: the device-busy time (no host launch gaps) and
the kernel count, which tell a GPU-bound gap from a host-bound one. ``--check`` compares the outputs and
gradients of our grouped FFN cases (the fused path and its reference, eager and as timed, compiled and
graphed) with the per-expert loop in float32 on the same weights and inputs (``check`` lines).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from bench.common import emit, environment, gap_stats, kernel_stats, profiled, time_interleaved  # noqa: E402
from moe.dispatch import AllToAllDispatcher, DenseDispatcher, GroupedDispatcher  # noqa: E402
from moe.expert_layer import CareMoE  # noqa: E402
from moe.experts import FfnExpert, LoraExpert, packed_width, stacked_for_grouped_mm  # noqa: E402
from moe.permute import slots_by_expert  # noqa: E402
from moe.router import topk_routing  # noqa: E402

D, FFN, E, K, CTX = 3072, 12288, 4, 3, 64
NAMES = ["text", "mask", "reference", "base"]


class Mlp(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.proj_in, self.proj_out = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return self.proj_out(F.gelu(self.proj_in(x), approximate="tanh"))


def _init_dist() -> None:
    import deepspeed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def stock_moe(expert: nn.Module):
    from deepspeed.moe.layer import MoE

    layer = MoE(hidden_size=D, expert=expert, num_experts=E, ep_size=1, k=K, drop_tokens=False, use_rts=False)
    layer.set_deepspeed_parallelism()
    return layer


def fwd_bwd(fn, x):
    def run():
        out = fn(x)
        out = out[0] if isinstance(out, tuple) else out
        out.float().sum().backward()

    return run


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--kinds", nargs="+", default=["ffn", "lora"], choices=["ffn", "lora"])
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile our layers and the dense / plain-LoRA references alike (stock DeepSpeed stays eager)",
    )
    p.add_argument(
        "--profile", action="store_true", help="also print each case's kernel statistics (one profiled call)"
    )
    p.add_argument("--top", type=int, default=8, help="kernels listed per profiled case")
    p.add_argument(
        "--graphs",
        action="store_true",
        help="also run the cases that trace whole under CUDA graphs (compile mode reduce-overhead), "
        "the dense reference among them; their names end in @graphs",
    )
    p.add_argument(
        "--autotune",
        action="store_true",
        help="also compile the dense reference and the floors with max-autotune (inductor may pick "
        "its Triton grouped-GEMM template): @autotune, and with --graphs @autotune_graphs",
    )
    p.add_argument("--only", default="", help="regex: run only the cases it matches (and their references)")
    p.add_argument(
        "--check",
        action="store_true",
        help="also compare the grouped FFN paths' outputs and gradients with the float32 per-expert loop",
    )
    args = p.parse_args()
    mc = (lambda f: torch.compile(f)) if args.compile else (lambda f: f)  # noqa: E731
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)  # as the model sets it
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    _init_dist()
    env = environment()
    emit({"env": env, "compile": args.compile})
    rows = []
    for s in args.tokens:
        torch.manual_seed(0)
        x = torch.randn(s, D, device=dev, dtype=dtype, requires_grad=True)
        packed = torch.randn(s, packed_width(D, CTX), device=dev, dtype=dtype, requires_grad=True)
        r = topk_routing(torch.randn(s, E, device=dev), torch.ones(s, E, dtype=torch.bool, device=dev), K)

        def ours(experts, dispatcher, how=None):
            """Our layer, compiled as the model compiles it: whole (fullgraph) where the dispatch needs
            no host value; without fullgraph, dynamo would break the graph at data-dependent shapes."""
            layer = CareMoE(experts, E, 1, 0, dispatcher).to(dev, dtype)
            run = _own_code(lambda inp: layer(inp, r.index, r.weight))  # noqa: B023 (called within the iteration)
            if not args.compile:
                return run
            return torch.compile(run, fullgraph=dispatcher.host_sync_free(experts), **(how or {}))

        if "ffn" in args.kinds:
            rows += ffn_cases(args, s, x, packed, ours, mc, dev, dtype, r)
        if "lora" not in args.kinds:
            continue
        # LoRA-sized experts
        for rank in args.ranks:
            lora_experts = [LoraExpert(n, D, CTX, rank) for n in NAMES]
            for ex in lora_experts:
                nn.init.normal_(ex.up.weight, std=0.01)
            cases = {
                "plain_lora_same_total_rank": fwd_bwd(mc(LoraMlp(D, E * rank).to(dev, dtype)), x),
                "ours_lora_dense": fwd_bwd(ours(lora_experts, DenseDispatcher()), packed),
                "ours_lora_alltoall": fwd_bwd(ours([_copy(e) for e in lora_experts], AllToAllDispatcher(1, 0)), packed),
                "deepspeed_stock_lora": fwd_bwd(stock_moe(LoraMlp(D, rank)).to(dev, dtype), x[None]),
            }
            cases = _selected(args, cases)
            res, breaks = _timed(args, cases)
            _profile(args, cases, tokens=s, experts=f"lora{rank}")
            for name, t in res.items():
                rec = {
                    "case": name,
                    "experts": f"lora{rank}",
                    "tokens": s,
                    "compiled": args.compile and "stock" not in name,
                    **t,
                    "graph_breaks": breaks[name],
                    "ratio_vs_plain_lora": t["median_ms"] / res["plain_lora_same_total_rank"]["median_ms"],
                }
                emit(rec)
                rows.append(rec)
    print("\n| experts | tokens | case | median ms | ratio |")
    print("|---|---|---|---|---|")
    for rec in rows:
        ratio = rec.get("ratio_vs_dense", rec.get("ratio_vs_plain_lora"))
        print(f"| {rec['experts']} | {rec['tokens']} | {rec['case']} | {rec['median_ms']:.3f} | {ratio:.2f} |")


def ffn_cases(args, s: int, x, packed, ours, mc, dev, dtype, routing) -> list[dict]:
    """FFN-sized experts: ours (loop, grouped GEMM and the fused grouped dispatcher), the dense layer of
    the same FLOPs, stock DeepSpeed, and the floors: the same expert GEMMs without routing, gathers,
    conditions, biases or the combine (per-expert loop on equal slices; grouped, with the weights stored
    stacked or stacked per call as our layer must)."""
    index = routing.index
    frozen = Mlp(D, FFN)
    ffn_experts = [FfnExpert(n, D, CTX, frozen.proj_in, frozen.proj_out) for n in NAMES]
    floor_mlps = [Mlp(D, FFN).to(dev, dtype) for _ in NAMES]
    slots = torch.randn(s * K, D, device=dev, dtype=dtype, requires_grad=True)

    def floor(rows):
        return torch.cat([m(c) for m, c in zip(floor_mlps, rows.chunk(E))])  # noqa: F821 (deleted after use)

    # the grouped GEMMs' floor, with the weights kept stacked (no copy per call) and equal groups; no
    # biases (the loop floor's Linear layers have them)
    stacked_in = nn.Parameter(torch.stack([m.proj_in.weight.detach() for m in floor_mlps]))  # [E, F, D]
    stacked_out = nn.Parameter(torch.stack([m.proj_out.weight.detach() for m in floor_mlps]))  # [E, D, F]
    offs = (torch.arange(1, E + 1, device=dev) * (s * K) // E).to(torch.int32)  # E near-equal groups of all rows
    # the group sizes our layer gets from the routing: they end in partial tiles, where equal groups of
    # S*K/E rows (3,072 or 12,288) are whole tiles
    routed_offs = slots_by_expert(index, E)[3][:E].cumsum(0).to(torch.int32)  # as the dispatcher counts them

    def floor_grouped(rows, offs=offs):
        h = F.gelu(torch._grouped_mm(rows, stacked_in.transpose(1, 2), offs=offs), approximate="tanh")
        return torch._grouped_mm(h, stacked_out.transpose(1, 2), offs=offs)

    def floor_grouped_routed(rows):
        return floor_grouped(rows, routed_offs)

    def floor_grouped_stacked_per_call(rows):
        """The grouped GEMMs with routed sizes and each expert's weights stacked per call, as our layer
        must (the experts keep their own parameters): what no fusion around the GEMMs removes."""
        w_in = stacked_for_grouped_mm([m.proj_in.weight for m in floor_mlps])  # noqa: F821 (deleted after use)
        h = F.gelu(torch._grouped_mm(rows, w_in, offs=routed_offs), approximate="tanh")
        w_out = stacked_for_grouped_mm([m.proj_out.weight for m in floor_mlps])  # noqa: F821
        return torch._grouped_mm(h, w_out, offs=routed_offs)

    checked = {}  # our grouped cases (for --check): name -> (their experts, the function timed)
    for name, dispatcher in [
        ("ours_ffn_grouped_gemm", AllToAllDispatcher(1, 0, True)),
        ("ours_ffn_fused", GroupedDispatcher()),
    ]:
        experts = [_copy(e) for e in ffn_experts]
        checked[name] = (experts, ours(experts, dispatcher))

    cases = {
        "dense_same_flops": fwd_bwd(mc(Mlp(D, K * FFN).to(dev, dtype)), x),
        "ours_ffn_alltoall": fwd_bwd(ours(ffn_experts, AllToAllDispatcher(1, 0)), packed),
        "ours_ffn_grouped_gemm": fwd_bwd(checked["ours_ffn_grouped_gemm"][1], packed),
        "ours_ffn_fused": fwd_bwd(checked["ours_ffn_fused"][1], packed),
        "floor_expert_gemms_only": fwd_bwd(mc(floor), slots),
        "deepspeed_stock_ffn": fwd_bwd(stock_moe(Mlp(D, FFN)).to(dev, dtype), x[None]),
    }
    if dtype == torch.bfloat16:  # grouped GEMMs take bf16 only
        cases["floor_grouped_gemms_stacked_weights"] = fwd_bwd(mc(floor_grouped), slots)
        cases["floor_grouped_gemms_routed_sizes"] = fwd_bwd(mc(floor_grouped_routed), slots)
        cases["floor_grouped_gemms_stacked_per_call"] = fwd_bwd(mc(floor_grouped_stacked_per_call), slots)
    if dev.type == "cuda":
        # do the per-expert GEMMs leave the GPU partly idle (each GEMM's last wave)? The loop floor
        # eager, on one stream and with the experts alternating between two streams
        streams = [torch.cuda.Stream() for _ in range(2)]

        def floor_two_streams(rows):
            here, outs = torch.cuda.current_stream(), []
            for i, (m, c) in enumerate(zip(floor_mlps, rows.chunk(E))):  # noqa: F821 (deleted after use)
                streams[i % 2].wait_stream(here)
                with torch.cuda.stream(streams[i % 2]):
                    outs.append(m(c))
            for st in streams:
                here.wait_stream(st)
            return torch.cat(outs)

        cases["floor_expert_gemms_eager"] = fwd_bwd(floor, slots)
        cases["floor_expert_gemms_two_streams_eager"] = fwd_bwd(floor_two_streams, slots)
    for suffix, how in _extra_modes(args).items():
        compiled = lambda f, how=how: torch.compile(f, **how)  # noqa: E731
        # under CUDA graphs, gradients live in graph memory: each call drops them (fwd_bwd_graphs)
        wrap = fwd_bwd_graphs if "graphs" in suffix else (lambda fn, inp, params: fwd_bwd(fn, inp))
        dense = Mlp(D, K * FFN).to(dev, dtype)
        floor_params = [q for m in floor_mlps for q in m.parameters()]
        cases[f"dense_same_flops@{suffix}"] = wrap(compiled(dense), x, dense.parameters())
        cases[f"floor_expert_gemms_only@{suffix}"] = wrap(compiled(_own_code(floor)), slots, floor_params)
        if dtype == torch.bfloat16:
            cases[f"floor_grouped_gemms_stacked_weights@{suffix}"] = wrap(
                compiled(_own_code(floor_grouped)), slots, [stacked_in, stacked_out]
            )
            cases[f"floor_grouped_gemms_routed_sizes@{suffix}"] = wrap(
                compiled(_own_code(floor_grouped_routed)), slots, [stacked_in, stacked_out]
            )
            cases[f"floor_grouped_gemms_stacked_per_call@{suffix}"] = wrap(
                compiled(_own_code(floor_grouped_stacked_per_call)), slots, floor_params
            )
            if "autotune" in suffix:
                # torch 2.11 fails to compile it: autotuning picked a Triton kernel for a row-major
                # weight stack, code generation froze the stack K-major, and Triton rejected the kernel
                # ("Tensor descriptor last dim must be 1"; docs/history/perf-log.md, 20:09 entry)
                continue
            for name, dispatcher in [
                ("ours_ffn_grouped_gemm", AllToAllDispatcher(1, 0, True)),
                ("ours_ffn_fused", GroupedDispatcher()),
            ]:
                experts = [_copy(e) for e in ffn_experts]
                checked[f"{name}@{suffix}"] = (experts, ours(experts, dispatcher, how))
                cases[f"{name}@{suffix}"] = wrap(
                    checked[f"{name}@{suffix}"][1], packed, [q for e in experts for q in e.parameters()]
                )
    cases = _selected(args, cases)
    res, breaks = _timed(args, cases)
    if args.check:
        check_paths({n: checked[n] for n in cases if n in checked}, packed, routing, ffn_experts, s)
    _profile(args, cases, tokens=s, experts="ffn")
    rows = []
    for name, t in res.items():
        compiled = args.compile and "stock" not in name and "eager" not in name
        rec = {
            "case": name,
            "experts": "ffn",
            "tokens": s,
            "compiled": compiled,
            **t,
            "graph_breaks": breaks[name],
            "ratio_vs_dense": t["median_ms"] / res[_reference("dense_same_flops", name)]["median_ms"],
        }
        emit(rec)
        rows.append(rec)
    del ffn_experts, floor_mlps, cases
    torch.cuda.empty_cache() if dev.type == "cuda" else None
    return rows


CHECK_TOL = 2e-2  # relative L2 error of a bf16 path against float32 (as tests/test_grouped_experts.py)


def check_paths(checked: dict, packed, routing, experts, tokens: int) -> None:
    """Each timed grouped case (as timed: compiled, graphed) and the same dispatcher run eagerly on its
    experts, against the per-expert loop in float32 on the same weights: output, packed-row gradient
    and every parameter gradient of ``sum(out * g)`` for a fixed random g. One ``check`` line each."""
    index, weight = routing.index, routing.weight
    ref_experts = [_copy(e).float() for e in experts]
    grad_out = torch.randn(
        packed.shape[0], D, device=packed.device, generator=torch.Generator(packed.device).manual_seed(1)
    )
    ref = _outputs_and_grads(
        lambda p: AllToAllDispatcher(1, 0)(p, index, weight, ref_experts),
        packed.detach().float().requires_grad_(),
        ref_experts,
        grad_out,
    )
    for name, (case_experts, timed) in checked.items():
        dispatcher = GroupedDispatcher() if "fused" in name else AllToAllDispatcher(1, 0, True)
        runs = {"eager": lambda p, d=dispatcher, ex=case_experts: d(p, index, weight, ex), "as_timed": timed}
        for how, fn in runs.items():
            got = _outputs_and_grads(fn, packed, case_experts, grad_out, graphs="graphs" in name and how == "as_timed")
            errs = {k: _rel(got[k], ref[k]) for k in ref}
            worst = max((k for k in errs if k.startswith("param:")), key=errs.get)
            emit(
                {
                    "check": name,
                    "run": how,
                    "tokens": tokens,
                    "rel_out": errs["out"],
                    "rel_packed_grad": errs["packed_grad"],
                    "rel_param_grad_max": errs[worst],
                    "worst_param": worst,
                    "tolerance": CHECK_TOL,
                    "ok": all(v < CHECK_TOL for v in errs.values()),
                }
            )


def _outputs_and_grads(fn, inp, experts, grad_out, graphs: bool = False) -> dict:
    params = {f"param:{e.name}.{n}": q for e in experts for n, q in e.named_parameters()}
    tensors = [inp, *params.values()]
    if graphs:
        torch.compiler.cudagraph_mark_step_begin()
    for t in tensors:
        t.grad = None
    out = fn(inp)
    out = out[0] if isinstance(out, tuple) else out
    (out.float() * grad_out).sum().backward()
    got = {"out": out.detach().float().clone(), "packed_grad": inp.grad.float().clone()}
    got |= {k: q.grad.float().clone() for k, q in params.items()}
    for t in tensors:
        t.grad = None
    return got


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _reference(reference: str, case: str) -> str:
    """The reference a case is compared with: the one compiled in the same mode (``name@mode``)."""
    return reference + case[case.index("@") :] if "@" in case else reference


def _extra_modes(args) -> dict[str, dict]:
    """Case-name suffix -> torch.compile arguments of the cases run in more modes than the default one
    (the autotune modes: max-autotune's options with prologue fusion off, as measured in docs/history/perf-log.md,
    20:09 entry)."""
    if not args.compile:
        return {}
    modes = {"graphs": {"mode": "reduce-overhead"}} if args.graphs else {}
    if args.autotune:
        from torch._inductor import list_mode_options

        for suffix, mode in [("autotune", "max-autotune-no-cudagraphs")] + (
            [("autotune_graphs", "max-autotune")] if args.graphs else []
        ):
            modes[suffix] = {"options": {**list_mode_options(mode), "prologue_fusion": False}}
    return modes


def _selected(args, cases: dict) -> dict:
    """The cases whose names match ``--only`` (all without it), each with its mode's reference."""
    if not args.only:
        return cases
    keep = {n for n in cases if re.search(args.only, n)}
    keep |= {_reference(r, n) for n in keep for r in ("dense_same_flops", "plain_lora_same_total_rank")}
    return {n: fn for n, fn in cases.items() if n in keep}


def fwd_bwd_graphs(fn, x, params):
    """``fwd_bwd`` for a function compiled with CUDA graphs: each call starts a new graph step, and the
    gradients of ``x`` and ``params`` are dropped before and after it: they live in graph memory that
    a later replay overwrites, so accumulating into them (here or in a case sharing the tensors) would
    read overwritten memory."""
    inner = fwd_bwd(fn, x)
    tensors = [x, *params]

    def run():
        torch.compiler.cudagraph_mark_step_begin()
        for t in tensors:
            t.grad = None
        inner()
        for t in tensors:
            t.grad = None

    return run


def _timed(args, cases: dict) -> tuple[dict, dict]:
    """Each case's times (interleaved, after a warm-up of each), and the graph breaks torch.compile
    met while warming it up (0: traced whole)."""
    breaks = {}
    for name, fn in cases.items():
        before = sum(torch._dynamo.utils.counters["graph_break"].values())
        for _ in range(3):
            fn()
        breaks[name] = sum(torch._dynamo.utils.counters["graph_break"].values()) - before
    return time_interleaved(cases, iters=args.iters), breaks


def _profile(args, cases: dict, tokens: int, experts: str) -> None:
    if args.profile and torch.cuda.is_available():
        for name, fn in cases.items():
            prof = profiled(fn)
            gaps = gap_stats(prof, top=4)
            emit(
                {
                    "profile": name,
                    "experts": experts,
                    "tokens": tokens,
                    "gpu_idle_ms": gaps["gap_ms"],
                    "gpu_idle_largest": gaps["largest"],
                    **kernel_stats(fn, top=args.top, prof=prof, gemm_launches=True),
                }
            )


class LoraMlp(nn.Module):
    """A plain low-rank MLP residual: the same math as one LoRA expert without its condition input."""

    def __init__(self, d: int, rank: int):
        super().__init__()
        self.down, self.up = nn.Linear(d, rank), nn.Linear(rank, d)

    def forward(self, x):
        return self.up(F.gelu(self.down(x)))


def _own_code(fn):
    """``fn`` with a code object of its own. Dynamo keeps its compiled graphs per code object: the
    cases built from one lambda share it, and once a case that breaks the graph (the per-expert loop)
    was compiled through it, a later case compiled through it with fullgraph ran eagerly, silently."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _copy(m):
    import copy

    return copy.deepcopy(m)


if __name__ == "__main__":
    main()
