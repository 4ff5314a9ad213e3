"""Cost of the replica-consistency check's local part: fingerprinting one rank's trainable parameters.

    python bench/bench_replica_check.py [--params 7.5e8] [--tensor-numel 1.2e7] [--dtype bf16] [--iters 5]

The check (train/faults/replica_check.py) fingerprints every trainable parameter, moves one [N, 2] int64
tensor to the host and gathers the fingerprints (a few kB per rank). The fingerprinting dominates;
this times it on random tensors of the given total size (default: about one rank's share of the
flagship recipe's ~3B trainable expert parameters at ep_size 4) on the GPU if there is one.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from train.faults import fingerprint  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=float, default=7.5e8)
    p.add_argument("--tensor-numel", type=float, default=1.2e7)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--iters", type=int, default=5)
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n, per = int(a.params), int(a.tensor_numel)
    tensors = [torch.randn(min(per, n - i), device=device, dtype=DTYPES[a.dtype]) for i in range(0, n, per)]

    def run() -> None:
        torch.stack([fingerprint(t) for t in tensors]).cpu()

    run()  # warm-up
    times = []
    for _ in range(a.iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(
        json.dumps(
            {
                "bench": "replica_check_fingerprint",
                "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "torch": torch.__version__,
                "params": n,
                "tensors": len(tensors),
                "dtype": a.dtype,
                "median_s": round(med, 4),
                "gb_per_s": round(n * tensors[0].element_size() / med / 1e9, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
