"""Expert layer speed, side by side in one process: ours vs a dense layer of the same FLOPs vs stock
DeepSpeed MoE. Forward + backward, bf16, 4 experts, top-3, hidden 3072 (FLUX width).

    python bench/bench_expert_layer.py [--tokens 4096 16384] [--ranks 16 64] [--iters 10] [--compile] [--profile]

Prints one JSON line per case and a short table last. Ratios are measured in the same run.
``--profile`` adds each case's kernel statistics: the device-busy time (no host launch gaps) and
the kernel count, which tell a GPU-bound gap from a host-bound one.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from bench.common import emit, environment, kernel_stats, time_ms  # noqa: E402
from moe.dispatch import AllToAllDispatcher, DenseDispatcher  # noqa: E402
from moe.expert_layer import CareMoE  # noqa: E402
from moe.experts import FfnExpert, LoraExpert, packed_width  # noqa: E402
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
    p.add_argument("--compile", action="store_true",
                   help="torch.compile our layers and the dense / plain-LoRA references alike (stock DeepSpeed stays eager)")
    p.add_argument("--profile", action="store_true", help="also print each case's kernel statistics (one profiled call)")
    args = p.parse_args()
    mc = (lambda f: torch.compile(f)) if args.compile else (lambda f: f)  # noqa: E731
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

        def ours(experts, dispatcher):
            layer = CareMoE(experts, E, 1, 0, dispatcher).to(dev, dtype)
            return mc(lambda inp: layer(inp, r.index, r.weight))

        if "ffn" in args.kinds:
            rows += ffn_cases(args, s, x, packed, ours, mc, dev, dtype)
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
            res, breaks = _timed(args, cases)
            _profile(args, cases, tokens=s, experts=f"lora{rank}")
            for name, t in res.items():
                rec = {"case": name, "experts": f"lora{rank}", "tokens": s, "compiled": args.compile and "stock" not in name,
                       **t, "graph_breaks": breaks[name],
                       "ratio_vs_plain_lora": t["median_ms"] / res["plain_lora_same_total_rank"]["median_ms"]}
                emit(rec)
                rows.append(rec)
    print("\n| experts | tokens | case | median ms | ratio |")
    print("|---|---|---|---|---|")
    for rec in rows:
        ratio = rec.get("ratio_vs_dense", rec.get("ratio_vs_plain_lora"))
        print(f"| {rec['experts']} | {rec['tokens']} | {rec['case']} | {rec['median_ms']:.3f} | {ratio:.2f} |")


def ffn_cases(args, s: int, x, packed, ours, mc, dev, dtype) -> list[dict]:
    """FFN-sized experts: ours (loop and grouped GEMM), the dense layer of the same FLOPs, stock
    DeepSpeed, and the floor of the per-expert loop: the same expert GEMMs on equal contiguous
    slices of S*K rows, without routing, gathers, conditions or the combine."""
    frozen = Mlp(D, FFN)
    ffn_experts = [FfnExpert(n, D, CTX, frozen.proj_in, frozen.proj_out) for n in NAMES]
    floor_mlps = [Mlp(D, FFN).to(dev, dtype) for _ in NAMES]
    slots = torch.randn(s * K, D, device=dev, dtype=dtype, requires_grad=True)

    def floor(rows):
        return torch.cat([m(c) for m, c in zip(floor_mlps, rows.chunk(E))])

    # the grouped GEMMs' floor, with the weights kept stacked (no copy per call) and equal groups; no
    # biases (the loop floor's Linear layers have them)
    stacked_in = nn.Parameter(torch.stack([m.proj_in.weight.detach() for m in floor_mlps]))  # [E, F, D]
    stacked_out = nn.Parameter(torch.stack([m.proj_out.weight.detach() for m in floor_mlps]))  # [E, D, F]
    offs = (torch.arange(1, E + 1, device=dev) * (s * K) // E).to(torch.int32)  # E near-equal groups of all rows

    def floor_grouped(rows):
        h = F.gelu(torch._grouped_mm(rows, stacked_in.transpose(1, 2), offs=offs), approximate="tanh")
        return torch._grouped_mm(h, stacked_out.transpose(1, 2), offs=offs)

    cases = {
        "dense_same_flops": fwd_bwd(mc(Mlp(D, K * FFN).to(dev, dtype)), x),
        "ours_ffn_alltoall": fwd_bwd(ours(ffn_experts, AllToAllDispatcher(1, 0)), packed),
        "ours_ffn_grouped_gemm": fwd_bwd(ours([_copy(e) for e in ffn_experts], AllToAllDispatcher(1, 0, True)), packed),
        "floor_expert_gemms_only": fwd_bwd(mc(floor), slots),
        "deepspeed_stock_ffn": fwd_bwd(stock_moe(Mlp(D, FFN)).to(dev, dtype), x[None]),
    }
    if dtype == torch.bfloat16:  # grouped GEMMs take bf16 only
        cases["floor_grouped_gemms_stacked_weights"] = fwd_bwd(mc(floor_grouped), slots)
    res, breaks = _timed(args, cases)
    _profile(args, cases, tokens=s, experts="ffn")
    rows = []
    for name, t in res.items():
        rec = {"case": name, "experts": "ffn", "tokens": s, "compiled": args.compile and "stock" not in name, **t,
               "graph_breaks": breaks[name], "ratio_vs_dense": t["median_ms"] / res["dense_same_flops"]["median_ms"]}
        emit(rec)
        rows.append(rec)
    del ffn_experts, floor_mlps, cases
    torch.cuda.empty_cache() if dev.type == "cuda" else None
    return rows


def _timed(args, cases: dict) -> tuple[dict, dict]:
    """Each case's times, and the graph breaks torch.compile met while warming it up (0: traced whole)."""
    res, breaks = {}, {}
    for name, fn in cases.items():
        before = sum(torch._dynamo.utils.counters["graph_break"].values())
        res[name] = time_ms(fn, iters=args.iters)
        breaks[name] = sum(torch._dynamo.utils.counters["graph_break"].values()) - before
    return res, breaks


def _profile(args, cases: dict, tokens: int, experts: str) -> None:
    if args.profile and torch.cuda.is_available():
        for name, fn in cases.items():
            emit({"profile": name, "experts": experts, "tokens": tokens, **kernel_stats(fn, top=8)})


class LoraMlp(nn.Module):
    """A plain low-rank MLP residual: the same math as one LoRA expert without its condition input."""

    def __init__(self, d: int, rank: int):
        super().__init__()
        self.down, self.up = nn.Linear(d, rank), nn.Linear(rank, d)

    def forward(self, x):
        return self.up(F.gelu(self.down(x)))


def _copy(m):
    import copy

    return copy.deepcopy(m)


if __name__ == "__main__":
    main()
