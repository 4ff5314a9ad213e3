"""The CARE-Edit training step at full FLUX scale against the bare frozen backbone, side by side.

    python bench/bench_step.py [--config configs/flux_full.yaml] [--size 512] [--iters 5] [--compile]
                               [--block-mode reduce-overhead] [--device cuda] [key=value ...]
    python bench/bench_step.py --device cpu --config bench/step_tiny.yaml --size 32 --text-len 8 --iters 1
                               (a smoke run on CPU: the same step, timed by wall clock, no profile)

Random weights built directly on the GPU (no paths), cached-mode inputs (random latents and text
embeddings of the real shapes: a 512x512 edit gives 1024 target + 1024 base + 1024 reference + 1024
mask tokens, and 512 text tokens). Default experts: LoRA rank 64 in the configured blocks (FFN
experts at ep_size 1 do not fit one GPU with Adam state: docs/DESIGN.md section 8).

Prints one JSON line per case, host issue time against device time, kernel statistics of both sides,
a step breakdown (torch profiler, device time by range), and a table. Both sides run the same block
loop (``FluxBackbone.run_blocks``) in the same execution mode.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch.profiler import record_function  # noqa: E402

from bench.common import emit, environment, gap_stats, kernel_stats, measure_matmul_peak, profiled, time_ms  # noqa: E402
from data.batch import EditBatch  # noqa: E402
from moe.backbone import FluxBackbone  # noqa: E402
from moe.config import LoraConfig  # noqa: E402
from moe.model import build_model  # noqa: E402
from train.config import load_config  # noqa: E402

DEFAULT_OVERRIDES = [
    "model.backbone.path=null",
    "model.vae.path=null",
    "model.text.t5_path=null",
    "model.text.clip_path=null",
    "model.text.t5_layers=1",
    "model.text.clip_layers=1",
    "model.experts.kind=lora",
    "model.experts.rank=64",
    "model.experts.ep_size=1",
    "model.experts.dispatch=auto",
]


def cached_batch(size: int, text_len: int, cfg, device, f: int = 8) -> EditBatch:
    """f: the VAE's downsampling (8 for FLUX's)."""
    c = cfg.vae.latent_channels
    lat = lambda: torch.randn(1, c, size // f, size // f, device=device)  # noqa: E731
    mask = torch.zeros(1, 1, size, size, device=device)
    mask[..., size // 4 : 3 * size // 4, size // 5 : 3 * size // 5] = 1
    return EditBatch(
        source=None,
        target=None,
        reference=None,
        has_reference=torch.tensor([True], device=device),
        fine_mask=mask,
        coarse_mask=mask,
        bbox=torch.tensor([[size // 5, size // 4, 3 * size // 5, 3 * size // 4]]),
        instruction=["replace the object with the reference"],
        task=["replace"],
        tag_ids=torch.tensor([[1, 2, -1]], device=device),
        keys=["bench"],
        source_latent=lat(),
        target_latent=lat(),
        reference_latent=lat(),
        text_embeds=torch.randn(1, text_len, cfg.text.t5_d_model, device=device),
        text_mask=torch.ones(1, text_len, dtype=torch.bool, device=device),
        pooled_text=torch.randn(1, cfg.text.clip_hidden, device=device),
    )


def _device_ms(e) -> float:
    return getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)) / 1e3


def breakdown(step, names: list[str], top: int = 12) -> tuple[dict, dict]:
    """Device ms per named range, kernel statistics and the GPU's idle gaps, from one profiled step."""
    prof = profiled(step)
    out = {e.key: _device_ms(e) for e in prof.key_averages() if e.key in names}
    stats = kernel_stats(step, top, prof=prof)
    stats["idle"] = gap_stats(prof, phases=("care/forward", "care/backward", "care/optimizer"))
    return out, stats


class CudaGraphLog(logging.Handler):
    """Counts what CUDA graph trees do (recordings, re-recordings and why, warm-up and eager runs)."""

    KINDS = ("Re-recording", "Recording function", "Running warmup", "Running eager", "skipping cudagraph")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.counts = {k: 0 for k in self.KINDS}
        self.statuses: dict[str, int] = {}  # why a recorded graph did not match (a match may follow)
        self.examples: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        for k in self.KINDS:
            if k in msg:
                self.counts[k] += 1
        if "Re-recording" in msg or "skipping cudagraph" in msg:
            status = msg.split("reason=")[-1].split(".")[0][:80]
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if "StaticInputIdxMismatch" not in status and len(self.examples) < 4:
                self.examples.append(msg[:700])

    def snapshot(self) -> dict:
        return {"counts": dict(self.counts), "statuses": dict(self.statuses), "examples": list(self.examples)}

    @classmethod
    def install(cls) -> "CudaGraphLog":
        import torch._inductor.cudagraph_trees as trees

        original = trees.log_data_ptr_mismatch

        def tolerant(placeholders, inputs, recorded, target_idxs, mismatch) -> str:
            try:  # torch's own message asserts one placeholder per input, which graph partitions break
                return original(placeholders, inputs, recorded, target_idxs, mismatch)
            except AssertionError:
                moved = [i for i in target_idxs if torch.is_tensor(inputs[i]) and inputs[i].data_ptr() != recorded[i]]
                shapes = [tuple(inputs[i].shape) for i in moved[:4]]
                return f"{mismatch}. {len(moved)} of {len(target_idxs)} inputs moved: {moved[:4]} {shapes}"

        trees.log_data_ptr_mismatch = tolerant
        handler = cls()
        for name in ("torch._inductor.cudagraph_trees", "torch._inductor.cudagraph_utils"):
            logger = logging.getLogger(name)
            logger.setLevel(logging.DEBUG)
            logger.addHandler(handler)
        return handler


def host_issue_ms(step, iters: int = 3) -> dict:
    """Host time to issue one step vs device time of it: a ratio near 1 means the step is bound by the
    Python/launch side (the GPU waits for kernels), not by the GPU."""
    host, device = [], []
    for _ in range(iters):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        step()
        end.record()
        host.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        device.append(start.elapsed_time(end))
    return {"host_issue_ms": statistics.median(host), "device_ms": statistics.median(device)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/flux_full.yaml")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda (the benchmark) or cpu (a smoke run: wall-clock times; no matmul peak, profile or CUDA graph log)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the blocks of both models (regional)")
    p.add_argument(
        "--block-mode",
        default=None,
        help="torch.compile mode for the blocks compiled whole, in both models "
        "(reduce-overhead: CUDA graphs; what CUDA graph trees record is logged)",
    )
    args, overrides = p.parse_known_args()
    cfg = OmegaConf.to_object(load_config(args.config, DEFAULT_OVERRIDES + overrides).model)
    dev = torch.device(args.device)
    on_gpu = dev.type == "cuda"
    env = environment()
    env["matmul_bf16_tflops"] = measure_matmul_peak() if on_gpu else None
    emit(
        {
            "env": env,
            "compile": args.compile,
            "block_mode": args.block_mode,
            "model": OmegaConf.to_container(OmegaConf.structured(cfg).experts),
        }
    )

    torch.set_default_dtype(torch.bfloat16)
    with torch.device(dev):
        model = build_model(cfg)
        bare = FluxBackbone(cfg.backbone, LoraConfig(rank=0), cfg.init_seed)
    torch.set_default_dtype(torch.float32)
    model.to(torch.bfloat16)  # peft keeps adapters in fp32 unless cast, as DeepSpeed's bf16 mode does
    bare.gradient_checkpointing = cfg.backbone.gradient_checkpointing  # same block machinery as the model's
    if args.compile:  # both sides in the same execution mode: the ratio compares like with like
        mode = {"mode": args.block_mode} if args.block_mode else {}
        model.compile_regions(**mode)
        bare.compile_blocks(**mode)
    model.train()
    batch = cached_batch(args.size, args.text_len, cfg, dev, model.vae.downsample)
    trainable = [p for _, p in model.trainable_named_parameters()]
    opt = torch.optim.AdamW(trainable, lr=1e-6, fused=True)
    n_trainable = sum(p.numel() for p in trainable)

    grid = args.size // model.token_stride  # 32 at 512 px with FLUX's VAE
    tokens_img = 4 * grid**2
    hidden = torch.randn(1, tokens_img, cfg.backbone.arch.in_channels, device=dev, dtype=torch.bfloat16)
    enc = torch.randn(1, args.text_len, cfg.backbone.arch.joint_attention_dim, device=dev, dtype=torch.bfloat16)
    pooled = torch.randn(1, cfg.backbone.arch.pooled_projection_dim, device=dev, dtype=torch.bfloat16)
    img_ids = torch.zeros(tokens_img, 3, device=dev)
    img_ids[:, 1] = torch.arange(tokens_img, device=dev) // grid
    img_ids[:, 2] = torch.arange(tokens_img, device=dev) % grid
    txt_ids = torch.zeros(args.text_len, 3, device=dev)

    timestep = torch.full((1,), 0.5, device=dev)
    graphs = on_gpu and args.block_mode == "reduce-overhead"

    def bare_step():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        x = hidden.clone().requires_grad_(True)
        temb = bare.embed_time(timestep, pooled)
        img = bare.run_blocks(bare.embed_image(x), bare.embed_text(enc), temb, img_ids, txt_ids)
        bare.project_out(img, temb).float().square().mean().backward()

    def care_fwd_bwd():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with record_function("care/forward"):
            out = model(batch)
        with record_function("care/backward"):
            out.loss.backward()
        return out

    def care_step():
        care_fwd_bwd()
        with record_function("care/optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)

    def peak_gib(reset: bool = True) -> float:
        """Peak device memory since the last reset (GiB; NaN on CPU)."""
        if not on_gpu:
            return float("nan")
        peak = torch.cuda.max_memory_allocated() / 2**30
        if reset:
            torch.cuda.reset_peak_memory_stats()
        return peak

    graph_log = CudaGraphLog.install() if graphs else None
    peak_gib()
    res = {"bare_backbone_fwd_bwd": time_ms(bare_step, iters=args.iters)}
    bare_peak = peak_gib()
    if graph_log:
        emit({"cudagraphs_after": "bare", **graph_log.snapshot()})
    res["care_fwd_bwd"] = time_ms(lambda: (care_fwd_bwd(), opt.zero_grad(set_to_none=True)), iters=args.iters)
    if graph_log:
        emit({"cudagraphs_after": "care_fwd_bwd", **graph_log.snapshot()})
    res["care_step_with_optimizer"] = time_ms(care_step, iters=args.iters)
    if graph_log:
        emit({"cudagraphs_after": "care_step", **graph_log.snapshot()})
    care_peak = peak_gib(reset=False)

    seq = args.text_len + tokens_img
    fwd_flops = model.flops_per_token(seq_len=seq) * seq  # per sample
    # frozen weights get no weight gradient: model FLOPs of a step ~ forward + activation backward
    model_flops = 2 * fwd_flops + 2 * n_trainable * seq  # + weight gradients of the trainable parts (upper bound)
    hw_flops = model_flops + (fwd_flops if cfg.backbone.gradient_checkpointing else 0)
    base_ms = res["bare_backbone_fwd_bwd"]["median_ms"]
    for name, t in res.items():
        rec = {"case": name, **t, "ratio_vs_bare": t["median_ms"] / base_ms, "tokens": seq}
        if name.startswith("care"):
            rec["model_tflops"] = model_flops / (t["median_ms"] * 1e-3) / 1e12
            rec["hardware_tflops"] = hw_flops / (t["median_ms"] * 1e-3) / 1e12
            if env["matmul_bf16_tflops"]:
                rec["mfu_vs_measured_peak"] = rec["model_tflops"] / env["matmul_bf16_tflops"]
            rec["peak_mem_gib"] = care_peak
        else:
            rec["peak_mem_gib"] = bare_peak
        emit(rec)

    names = [
        "care/forward",
        "care/backward",
        "care/optimizer",
        "care/encode",
        "care/router_contexts",
        "care/repaint",
        "care/router",
        "care/mixture",
        "care/experts",
        "care/frozen_ffn",
        "care/losses",
    ]
    parts: dict = {}
    if on_gpu:  # host issue against device time, and the profiled breakdown, need CUDA events
        emit({"case": "host_vs_device", "bare": host_issue_ms(bare_step), "care": host_issue_ms(care_step)})
        parts, kstats = breakdown(care_step, names)
        inner = sum(parts.get(n, 0) for n in names[3:])
        parts["backbone_forward_other"] = parts.get("care/forward", 0) - inner
        _, bare_kstats = breakdown(bare_step, [])
        emit({"breakdown_device_ms": parts, "trainable_params": n_trainable})
        emit({"kernels_care": kstats, "kernels_bare": bare_kstats})
    print("\n| case | median ms | x bare | model TFLOP/s | peak GiB |")
    print("|---|---|---|---|---|")
    for name, t in res.items():
        tf = model_flops / (t["median_ms"] * 1e-3) / 1e12 if name.startswith("care") else float("nan")
        peak = care_peak if name.startswith("care") else bare_peak
        print(f"| {name} | {t['median_ms']:.1f} | {t['median_ms'] / base_ms:.3f} | {tf:.0f} | {peak:.1f} |")
    if parts:
        print("\nbreakdown (device ms, forward ranges nested in care/forward):")
        for k, v in parts.items():
            print(f"  {k:28s} {v:9.2f}")


if __name__ == "__main__":
    main()
