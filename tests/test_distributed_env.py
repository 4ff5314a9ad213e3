"""How ranks and the rendezvous are read from SLURM's variables (srun, one task per GPU)."""

from __future__ import annotations

import os

import pytest

from train.distributed import fill_env_defaults, first_host


@pytest.mark.parametrize(
    "nodelist, host",
    [("node1", "node1"), ("gpu[003-010,012]", "gpu003"), ("a01,a02", "a01"), ("rack2-n[7,9]", "rack2-n7"),
     ("x[01-02],y[1-3]", "x01")],
)
def test_first_host_of_a_nodelist(nodelist, host):
    assert first_host(nodelist) == host


def test_srun_variables_fill_rank_and_rendezvous(monkeypatch):
    # fill_env_defaults writes os.environ: restore all of it afterwards, or later tests' child
    # processes inherit a rendezvous on a host that does not exist
    monkeypatch.setattr(os, "environ", dict(os.environ))
    for key in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"]:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[17-18]")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    fill_env_defaults()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("5", "16", "1")
    assert os.environ["MASTER_ADDR"] == "gpu17"
    assert os.environ["MASTER_PORT"] == str(10000 + 123456 % 20000)
