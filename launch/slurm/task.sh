#!/usr/bin/env bash
# One training process of an srun step (launch/slurm/lib.sh starts one task per GPU with this).
#
# Exports the standard torch.distributed variables from SLURM's own, then execs the command, so the
# process srun signals is the Python process itself. train/distributed.py would map SLURM_PROCID /
# SLURM_NTASKS / SLURM_LOCALID on its own, but only inside init_distributed; launch/train.py validates
# the config first and that check (ep_size divides WORLD_SIZE) reads WORLD_SIZE, so it must be set here.
# MASTER_ADDR / MASTER_PORT come from the batch shell (lib.sh: first node of the allocation, a port
# derived from the job id).
set -u
export RANK=${SLURM_PROCID:?not an srun task}
export WORLD_SIZE=${SLURM_NTASKS:?}
export LOCAL_RANK=${SLURM_LOCALID:-0}
export LOCAL_WORLD_SIZE=${SLURM_NTASKS_PER_NODE:-1}
export LOCAL_WORLD_SIZE=${LOCAL_WORLD_SIZE%%(*}
# A cluster that binds one GPU per task (--gpus-per-task, --gpu-bind=single:1, cgroup device
# constraints) shows each task a single device, renumbered to 0.
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [[ "$CUDA_VISIBLE_DEVICES" != *,* ]]; then
  export LOCAL_RANK=0
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
exec "$@"
