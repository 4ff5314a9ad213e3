"""Data loader throughput: samples/s per worker, raw PNG shards vs cached latent shards, at 512x512.

    .venv/bin/python bench/bench_data.py [--samples 96] [--batches 10] [--workers 1 2]

Generates its own synthetic shards (512x512) and a cached copy (stand-in encoders: 8x average
pooling to 16 channels, text 128 x 1024 + pooled 768, float32) in a temp dir, then times the
loader (fixed 512 size, random crop 0.8, after 2 warm-up batches). Prints one JSON line per
measurement, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import webdataset  # noqa: E402

from data.cache import cache_shards  # noqa: E402
from data.config import DataConfig  # noqa: E402
from data.loader import build_train_loader  # noqa: E402
from data.synthetic import write_synthetic  # noqa: E402


def encode_images(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 8).repeat(1, 6, 1, 1)[:, :16]


def encode_text(texts: list[str]):
    n = len(texts)
    return torch.randn(n, 128, 1024), torch.ones(n, 128, dtype=torch.bool), torch.randn(n, 768)


def measure(cfg: DataConfig, workers: int, batch: int, batches: int) -> tuple[float, float]:
    """(samples per wall second, samples per CPU second of the loading process).

    The second is only meaningful with workers=0 (all loading in this process, one torch thread):
    it is what one worker delivers on an otherwise idle core, and it does not depend on what else
    the machine is running, unlike wall-clock throughput.
    """
    cfg.num_workers = workers
    it = iter(build_train_loader(cfg, batch, 0, 1))
    for _ in range(2):
        next(it)
    t, c = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(it)
    n = batches * batch
    return n / (time.perf_counter() - t), n / (time.process_time() - c)


def main() -> None:
    torch.set_num_threads(1)  # as in a DataLoader worker
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="0 = in-process (CPU-time figure)")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        pats = write_synthetic(
            tmp, train=a.samples, val=0, test=0, size=512, samples_per_shard=a.samples // 4, progress=False
        )
        gen_s = time.perf_counter() - t
        t = time.perf_counter()
        rep = cache_shards(
            pats["train"], os.path.join(tmp, "cached"), encode_images, encode_text, 512, batch_size=8, progress=False
        )
        cache_s = time.perf_counter() - t
        sizes = {
            k: sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".tar")) / a.samples
            for k, d in (("raw", tmp), ("cached", os.path.join(tmp, "cached")))
        }
        print(
            json.dumps(
                dict(
                    event="setup",
                    generate_s=round(gen_s, 1),
                    cache_s=round(cache_s, 1),
                    bytes_per_sample={k: int(v) for k, v in sizes.items()},
                )
            )
        )
        for kind, pattern in (("raw", pats["train"]), ("cached", rep.pattern)):
            for w in a.workers:
                cfg = DataConfig(
                    train_shards=pattern,
                    image_size=512,
                    cached=kind == "cached",
                    shuffle_buffer=100,
                    random_crop_scale=1.0 if kind == "cached" else 0.8,
                )
                sps, cpu = measure(cfg, w, a.batch, a.batches)
                row = dict(
                    kind=kind,
                    workers=w,
                    batch=a.batch,
                    image=512,
                    samples_per_s=round(sps, 1),
                    samples_per_s_per_worker=round(sps / max(w, 1), 1),
                    samples_per_cpu_s=round(cpu, 1) if w == 0 else None,
                    loadavg_1m=round(os.getloadavg()[0], 1),
                )
                print(json.dumps(row), flush=True)
                rows.append(row)
    print(
        json.dumps(
            dict(
                event="env",
                python=platform.python_version(),
                torch=torch.__version__,
                webdataset=webdataset.__version__ if hasattr(webdataset, "__version__") else "?",
                cpus=os.cpu_count(),
                machine=platform.machine(),
            )
        )
    )
    print("\n| shards | workers | samples/s (wall) | per worker (wall) | samples per CPU-s (in-process) | load avg |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cpu = r["samples_per_cpu_s"] if r["samples_per_cpu_s"] is not None else "-"
        print(
            f"| {r['kind']} | {r['workers']} | {r['samples_per_s']} | {r['samples_per_s_per_worker']} | {cpu} "
            f"| {r['loadavg_1m']} |"
        )


if __name__ == "__main__":
    main()
