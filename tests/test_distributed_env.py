"""How ranks and the rendezvous are read from SLURM's variables (srun, one task per GPU)."""

from __future__ import annotations

import os

import pytest

from train.distributed import fill_env_defaults, first_host


@pytest.mark.parametrize(
    "nodelist, host",
    [
        ("node1", "node1"),
        ("gpu[003-010,012]", "gpu003"),
        ("a01,a02", "a01"),
        ("rack2-n[7,9]", "rack2-n7"),
        ("x[01-02],y[1-3]", "x01"),
        ("rack[1-2]n[3-4]", "rack1n3"),
        (" c[5-6]", "c5"),
    ],
)
def test_first_host_of_a_nodelist(nodelist, host):
    assert first_host(nodelist) == host


@pytest.mark.parametrize("nodelist", ["", "a[1-2", ",a"])
def test_first_host_rejects_what_is_not_a_nodelist(nodelist):
    with pytest.raises(ValueError, match="cannot parse SLURM nodelist"):
        first_host(nodelist)


def _clean_env(monkeypatch):
    # fill_env_defaults writes os.environ: restore all of it afterwards, or later tests' child
    # processes inherit a rendezvous on a host that does not exist
    monkeypatch.setattr(os, "environ", dict(os.environ))
    for key in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"]:
        monkeypatch.delenv(key, raising=False)
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)


def test_srun_variables_fill_rank_and_rendezvous(monkeypatch):
    _clean_env(monkeypatch)
    monkeypatch.setenv("SLURM_STEP_ID", "0")  # srun sets it for every task of a step
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[17-18]")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    fill_env_defaults()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("5", "16", "1")
    assert os.environ["MASTER_ADDR"] == "gpu17"
    assert os.environ["MASTER_PORT"] == str(10000 + 123456 % 20000)


def test_srun_rendezvous_is_the_first_node_of_the_step(monkeypatch):
    """A step on part of the job's nodes (``srun -N1 -r1``): rank 0 runs on the step's first node."""
    _clean_env(monkeypatch)
    monkeypatch.setenv("SLURM_STEP_ID", "3")
    for key, value in [
        ("SLURM_PROCID", "0"),
        ("SLURM_NTASKS", "2"),
        ("SLURM_LOCALID", "0"),
        ("SLURM_JOB_NODELIST", "gpu[17-18]"),
        ("SLURM_STEP_NODELIST", "gpu18"),
        ("SLURM_JOB_ID", "40001"),
    ]:
        monkeypatch.setenv(key, value)
    fill_env_defaults()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("0", "2")
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("gpu18", "10001")


def test_batch_shell_without_srun_is_one_process(monkeypatch, capsys):
    """The batch script's own shell has SLURM_PROCID=0 and SLURM_NTASKS=N but no SLURM_STEP_ID (seen with
    slurm-wlm 22.05): a python started there without srun must not wait for N - 1 ranks that never come."""
    _clean_env(monkeypatch)
    for key, value in [
        ("SLURM_PROCID", "0"),
        ("SLURM_NTASKS", "2"),
        ("SLURM_LOCALID", "0"),
        ("SLURM_JOB_NODELIST", "gpu[17-18]"),
        ("SLURM_JOB_ID", "123456"),
    ]:
        monkeypatch.setenv(key, value)
    fill_env_defaults()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("0", "1", "0")
    assert os.environ["MASTER_ADDR"] == "127.0.0.1"
    assert "SLURM_NTASKS=2 but this process was not started by srun" in capsys.readouterr().err


@pytest.mark.parametrize("visible, local_rank", [("", "3"), ("0,1,2,3", "3"), ("3", "0"), ("GPU-5f2a", "0")])
def test_srun_task_bound_to_one_gpu_uses_device_0(monkeypatch, visible, local_rank):
    """--gpus-per-task=1 shows each task only its own GPU, numbered 0 inside the task (as task.sh does)."""
    _clean_env(monkeypatch)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    if visible:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    for key, value in [
        ("SLURM_STEP_ID", "0"),
        ("SLURM_PROCID", "3"),
        ("SLURM_NTASKS", "4"),
        ("SLURM_LOCALID", "3"),
        ("SLURM_JOB_NODELIST", "n1"),
        ("SLURM_JOB_ID", "7"),
    ]:
        monkeypatch.setenv(key, value)
    fill_env_defaults()
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"]) == ("3", local_rank)
