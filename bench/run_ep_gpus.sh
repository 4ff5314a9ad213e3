#!/usr/bin/env bash
# Expert parallelism on one multi-GPU host, everything one device call needs:
#   1. bench/bench_ep.py: per-GPU throughput of full-width FFN expert layers at ep 1 (1 GPU), and at
#      ep 1 / ep 2 / ... on all GPUs (weak scaling: fixed tokens per GPU), all-to-all and all-reduce time;
#   2. a real training run (configs/gpu_smoke.yaml, FFN experts, bf16, ZeRO 2) at ep_size = number of GPUs,
#      checkpointed halfway, converted with launch.reshape_checkpoint and resumed at ep_size 1 on one
#      GPU with the same global batch (grad_accum x GPUs): the loss must continue where it stopped.
# Usage (after the wheel install line): bash bench/run_ep_gpus.sh NUM_GPUS OUT_DIR
set -euo pipefail
n=${1:-2}
out=${2:-/tmp/ep_out}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # keep NVLink multicast off
run() { python3 -m torch.distributed.run --standalone --nproc_per_node "$1" bench/bench_ep.py "${@:2}"; }
for tokens in 4096 16384; do
  run 1 --ep 1 --tokens $tokens | grep '^{' | tee -a "$out/bench_ep.jsonl"
  ep=1
  while [ $ep -le "$n" ]; do
    run "$n" --ep $ep --tokens $tokens | grep '^{' | tee -a "$out/bench_ep.jsonl"
    ep=$((ep * 2))
  done
done

python3 -m data.synthetic --out artifacts/synthetic --if-absent > "$out/data.log" 2>&1
steps=40
# constant lr (no warm-up, min_lr = lr): the 20-step first leg and the 40-step runs share one schedule
common=(--config configs/gpu_smoke.yaml train.steps=$steps schedule.warmup_steps=0 schedule.min_lr=3.0e-4 checkpoint.every=20 logging.every=5 logging.images_every=0 run.dir=/tmp/runs run.name=reshape)
python3 -m deepspeed.launcher.runner --num_gpus "$n" launch/train.py "${common[@]}" model.experts.ep_size=$n \
  train.steps=20 > "$out/train_ep$n.log" 2>&1
cp /tmp/runs/reshape/losses.jsonl "$out/losses_ep${n}_first20.jsonl"
python3 -m launch.reshape_checkpoint --src /tmp/runs/reshape/checkpoints > "$out/reshape.log" 2>&1
CUDA_VISIBLE_DEVICES=0 python3 -m deepspeed.launcher.runner --num_gpus 1 launch/train.py "${common[@]}" \
  model.experts.ep_size=1 train.grad_accum=$n --resume auto > "$out/train_ep1_resumed.log" 2>&1
cp /tmp/runs/reshape/losses.jsonl "$out/losses_all.jsonl"
# the uninterrupted reference at the original shape, to step 40
python3 -m deepspeed.launcher.runner --num_gpus "$n" launch/train.py "${common[@]}" model.experts.ep_size=$n \
  run.name=uninterrupted > "$out/train_uninterrupted.log" 2>&1
cp /tmp/runs/uninterrupted/losses.jsonl "$out/losses_uninterrupted.jsonl"
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
def load(p):
    rows = {}
    for line in open(p):
        r = json.loads(line)
        rows[r["step"]] = r
    return rows
a, b = load(f"{out}/losses_all.jsonl"), load(f"{out}/losses_uninterrupted.jsonl")
print("| step | loss (ep n, resumed at ep 1 on 1 GPU after step 20) | loss (ep n, uninterrupted) |")
for s in sorted(set(a) & set(b)):
    print(f"| {s} | {a[s].get('loss', a[s])} | {b[s].get('loss', b[s])} |")
PY
