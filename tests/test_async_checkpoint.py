"""Checkpoints written beside the training (``checkpoint.async_save``): the same files, the same guarantees.

Two gloo ranks, expert parallelism 2, ZeRO 2, EMA on (stand-in model, CPU fp32): a run that writes its
checkpoints from a background thread is compared file by file with one that writes them while the step
loop waits; a kill while the thread writes, SIGTERM while it writes, and a write that fails for lack of
space are each shown to keep ``latest`` on a complete checkpoint, and resumed runs to continue bit for bit.
"""

import glob
import io
import json
import os
import re
import signal

import pytest
import torch

from tests.helpers.faults import Faults
from tests.helpers.train_harness import read_losses, read_records, run_ranks, start_ranks, wait_for_step
from train.checkpoint import verify_complete
from train.checkpoint.snapshot import snapshot, storage_bytes

pytestmark = pytest.mark.multiprocess
RUN = [
    "model.experts.ep_size=2",
    "train.zero_stage=2",
    "ema.enabled=true",
    "logging.images_every=0",
    "train.steps=6",
    "checkpoint.every=2",
    "checkpoint.keep=5",
]
TAGS = ("step00000002", "step00000004", "step00000006")


class _LossScaler:  # an object of the kind ZeRO's optimizer state holds, with a tensor inside
    def __init__(self) -> None:
        self.cur_scale = torch.tensor(2.0**16)
        self.steps = 3


def _saved(state) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def test_a_snapshot_is_what_torch_save_writes_of_the_state_at_that_moment():
    flat = torch.randn(70)  # ZeRO keeps fp32 partitions as views of one flat buffer
    state = {
        "partitions": [flat[:40], flat[40:64]],
        "flat": flat,
        "param": torch.nn.Parameter(torch.randn(3, 4)),
        "transposed": torch.arange(12.0).view(3, 4).t(),
        "ids": torch.arange(5),
        "scaler": _LossScaler(),
        "step": 7,
        "name": "adamw",
    }
    before = _saved(state)
    snap = snapshot(state)
    assert snap.ready is None  # nothing came from a GPU
    with torch.no_grad():  # the training goes on and changes the state in place
        flat.mul_(2)
        state["param"].add_(1)
        state["scaler"].cur_scale.add_(1)
    state["scaler"].steps = 4
    assert _saved(snap.state) == before  # byte for byte: values, storage sharing, objects
    assert snap.nbytes == storage_bytes(state) == 4 * (70 + 12 + 12 + 1) + 8 * 5


def _ckpts(run):
    return os.path.join(run, "toy", "checkpoints")


def _latest(run):
    with open(os.path.join(_ckpts(run), "latest")) as f:
        return f.read().strip()


@pytest.fixture(scope="module")
def asynchronous(tmp_path_factory):
    """The uninterrupted run, checkpoints written beside the training (the default). Each file takes 0.5 s
    more to write (3 s a checkpoint) and each step 2 s, so the files are written while the next steps change
    the state, and the next save does not have to wait for them."""
    run = str(tmp_path_factory.mktemp("async"))
    ranks = run_ranks(2, run, RUN, faults=Faults(slow_write_s=0.5, step_sleep_s=2.0))
    return run, ranks.output(0)


def test_async_checkpoints_are_the_files_a_blocking_save_writes(asynchronous, tmp_path):
    run, _ = asynchronous
    blocking = str(tmp_path / "blocking")
    run_ranks(2, blocking, RUN + ["checkpoint.async_save=false"])
    assert read_losses(blocking) == read_losses(run)
    for tag in TAGS:
        a, b = os.path.join(_ckpts(run), tag), os.path.join(_ckpts(blocking), tag)
        assert verify_complete(a) is None and verify_complete(b) is None
        assert sorted(os.listdir(a)) == sorted(os.listdir(b))
        pts = [n for n in os.listdir(a) if n.endswith(".pt")]
        assert any(n.startswith("zero_pp_rank_1") for n in pts) and "train_state_rank1.pt" in pts
        for name in pts:  # byte for byte: same tensors, same storage sharing, same pickled objects
            with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
                assert fa.read() == fb.read(), (tag, name)
        with open(os.path.join(a, "complete.json")) as fa, open(os.path.join(b, "complete.json")) as fb:
            listed_a, listed_b = json.load(fa)["files"], json.load(fb)["files"]
        del listed_a["config.yaml"], listed_b["config.yaml"]  # the runs differ in run.dir and async_save
        assert listed_a == listed_b
    # and the files hold the state of their step, not a later one: the EMA moved between checkpoints
    emas = [torch.load(os.path.join(_ckpts(run), t, "train_state_rank0.pt"), weights_only=True)["ema"] for t in TAGS]
    assert not torch.equal(emas[0]["shadow"]["adapter.weight"], emas[1]["shadow"]["adapter.weight"])


def test_each_save_reports_blocked_and_write_time_and_size(asynchronous):
    run, out = asynchronous
    lines = [line for line in out.splitlines() if line.startswith("checkpoint step")]
    assert [line.split(":")[0] for line in lines] == [f"checkpoint {t}" for t in TAGS], out[-3000:]
    pattern = r"training blocked ([\d.]+) s; written in ([\d.]+) s beside the training \(([\d.]+) MB, ([\d.]+) GB/s\)"
    for line, tag in zip(lines, TAGS):
        m = re.search(pattern, line)
        assert m, line
        blocked, written = float(m.group(1)), float(m.group(2))
        assert written >= 2.5 and (tag == TAGS[-1] or blocked < written / 2), line  # the last one: the run's end
        with open(os.path.join(_ckpts(run), tag, "complete.json")) as f:
            size = sum(json.load(f)["files"].values())
        assert float(m.group(3)) == pytest.approx(size / 1e6, abs=1e-3)  # every rank's files
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(run, "toy", "tb")).Reload()
    for name in ("checkpoint/blocked_s", "checkpoint/write_s", "checkpoint/gb", "checkpoint/gb_per_s"):
        assert [e.step for e in events.Scalars(name)] == [2, 4, 6], name
    # the size the run announced before its first save is within 15% of what it wrote
    m = re.search(r"checkpoint space: about ([\d.]+) MB per checkpoint \(estimated", out)
    assert m, out[:3000]
    with open(os.path.join(_ckpts(run), "step00000002", "complete.json")) as f:
        written = sum(json.load(f)["files"].values()) / 1e6
    assert 0.85 <= float(m.group(1)) / written <= 1.05, (m.group(1), written)


def test_kill_while_the_thread_writes_keeps_latest_then_resume_is_exact(asynchronous, tmp_path):
    run, _ = asynchronous
    cut = str(tmp_path / "cut")
    ranks = start_ranks(2, cut, RUN, faults=Faults(slow_write_s=0.5))  # each file of each save takes 0.5 s more
    wait_for_step(cut, 5, ranks)  # step 5 trained while checkpoint 4 was still being written
    assert _latest(cut) == "step00000002"
    ranks.kill()  # SIGKILL every rank in the middle of writing checkpoint 4
    names = os.listdir(_ckpts(cut))
    assert ".tmp-step00000004" in names and "step00000004" not in names, names
    resumed = run_ranks(2, cut, RUN, resume="auto", tag="resume")
    assert "resumed from step00000002 at step 2" in resumed.output()
    full, again = read_losses(run), read_losses(cut)
    assert [again[s] for s in range(3, 7)] == [full[s] for s in range(3, 7)]  # bit for bit
    assert full[6] != full[4]
    assert _latest(cut) == "step00000006" and not any(n.startswith(".tmp-") for n in os.listdir(_ckpts(cut)))


def test_sigterm_while_a_checkpoint_is_written_waits_for_it(tmp_path):
    run = str(tmp_path)
    overrides = RUN[:-3] + ["train.steps=200", "checkpoint.every=4", "checkpoint.keep=5"]
    ranks = start_ranks(2, run, overrides, faults=Faults(step_sleep_s=0.2, slow_write_s=0.5))
    wait_for_step(run, 5, ranks)
    assert not os.path.exists(os.path.join(_ckpts(run), "latest"))  # checkpoint 4 is not committed yet
    os.kill(ranks.procs[1].pid, signal.SIGTERM)  # one rank; checkpoint 4 is being written
    codes = ranks.wait(180)
    assert codes == [0, 0], ranks.report(codes)
    last = max(read_losses(run))
    assert 5 <= last < 200
    out = ranks.output(0)
    assert out.index("checkpoint step00000004:") < out.index(f"preempted: step {last}"), out[-2000:]
    assert verify_complete(os.path.join(_ckpts(run), "step00000004")) is None
    assert _latest(run) == f"step{last:08d}"  # and the final checkpoint, written after it, committed too
    assert verify_complete(os.path.join(_ckpts(run), f"step{last:08d}")) is None


@pytest.mark.parametrize(
    "asynchronous_save, error",
    [(True, "enospc"), pytest.param(False, "zip", marks=pytest.mark.slow)],  # the second: the slow suite's
    ids=["async, ENOSPC", "blocking, zip writer's short write"],
)
def test_a_full_disk_on_one_rank_stops_every_rank_naming_it(tmp_path, asynchronous_save, error):
    run = str(tmp_path)
    overrides = RUN + [f"checkpoint.async_save={str(asynchronous_save).lower()}"]
    ranks = run_ranks(2, run, overrides, expect_ok=False, faults=Faults(disk_full_at_step=4, disk_full_error=error))
    codes = [p.returncode for p in ranks.procs]
    assert codes == [7, 7], ranks.report(codes)
    for rank in (0, 1):
        out = ranks.output(rank)
        line = next((x for x in out.splitlines() if x.startswith("checkpoint not written: ")), None)
        assert line is not None, out[-3000:]
        assert "checkpoint step00000004 could not be written: the disk is full" in line
        assert f"in {os.path.abspath(_ckpts(run))}:" in line and "rank 1 failed to write" in line
        assert re.search(r"[\d.]+ [MG]B free when rank 1 failed", line) and "after removing the partial" in line
        assert re.search(r"this checkpoint holds [\d.]+ MB of tensors \(step00000002 takes [\d.]+ MB\)", line)
        assert "'latest' still names step00000002" in line, line
    assert _latest(run) == "step00000002"
    assert not glob.glob(os.path.join(_ckpts(run), ".tmp-*"))  # the partial checkpoint's space given back
    # found at once by a blocking save, at the first step boundary after the thread's failure by an async one
    assert 4 <= max(read_losses(run)) <= 5 if asynchronous_save else max(read_losses(run)) == 4
    assert not any(r["skipped"] for r in read_records(run))
    resumed = run_ranks(2, run, overrides, resume="auto", tag="resume")  # space freed: it goes on
    assert "resumed from step00000002 at step 2" in resumed.output()
    assert _latest(run) == "step00000006"


def _can_mount_tmpfs() -> bool:
    """A private mount namespace with a tmpfs (``unshare -rm``: as root, or where user namespaces are allowed)."""
    import shutil
    import subprocess

    if shutil.which("unshare") is None:
        return False
    probe = "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && umount $d && rmdir $d"
    return subprocess.run(["unshare", "-rm", "sh", "-c", probe], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="cannot mount a tmpfs in a private mount namespace here")
def test_a_real_full_tmpfs_warns_at_start_then_stops_with_the_clear_error(tmp_path):
    """A 480 kB tmpfs as run.dir: it holds one checkpoint of the stand-in (0.3 MB) but not two. The run warns at
    start, writes checkpoint 1, and stops at checkpoint 2 with torch's own failure of a full disk named."""
    mount, logs = str(tmp_path / "run"), str(tmp_path / "logs")
    os.makedirs(mount)
    script = 'mount -t tmpfs -o size=480k tmpfs "$0" && { "$@"; rc=$?; cp -a "$0"/. "$0.after"; exit $rc; }'
    overrides = ["train.steps=3", "checkpoint.every=1", "checkpoint.keep=1", "logging.images_every=0"]
    ranks = start_ranks(1, logs, overrides + [f"run.dir={mount}"], prefix=["unshare", "-rm", "sh", "-c", script, mount])
    codes = ranks.wait(180)
    out = ranks.output(0)
    assert codes == [7], ranks.report(codes)
    assert re.search(r"warning: \S+ has [\d.]+ MB free, fewer than two checkpoints of about [\d.]+ MB", out), out
    line = next(x for x in out.splitlines() if x.startswith("checkpoint not written: "))
    assert "checkpoint step00000002 could not be written: the disk is full" in line, line
    assert "'latest' still names step00000001" in line
    after = mount + ".after"
    assert _latest(after) == "step00000001" and verify_complete(os.path.join(_ckpts(after), "step00000001")) is None
    resumed = run_ranks(1, after, overrides, resume="auto", tag="resume")  # on a disk with room it goes on
    assert "resumed from step00000001 at step 1" in resumed.output()
