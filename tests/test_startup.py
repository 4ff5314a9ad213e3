"""Start-up: the timing lines from launch to the first step, the model built under the training device with
weights from folders read on the CPU, and the compile cache kept in the run folder across processes."""

import os
import re
import subprocess
import sys

import pytest
import torch

from moe.backbone import FluxBackbone
from moe.config import LoraConfig
from moe.encoders import FrozenTextEncoders, FrozenVAE, weights_read_seconds
from moe.model import build_model
from tests.helpers.model_configs import tiny_model_config
from tests.helpers.train_harness import ROOT, TINY_CONFIG, TOY_CONFIG, run_ranks
from train.config import load_config
from train.rng import seed_everything
from train.timing.startup import CACHE_ENV, init_device, use_compile_cache

STEPS = ["train.steps=2", "checkpoint.every=2", "logging.images_every=0"]
PHASES = [
    "imports and config",
    "process group and run lock",
    "checkpoint lookup",
    "model build",
    "engine",
    "compile set-up",
    "loader",
    "logger",
    "first step",
]


def _phases(out: str) -> list[tuple[str, float, float]]:
    """(phase, seconds, seconds since launch) of every start-up line."""
    pattern = r"^start-up: (.+?): ([\d.]+) s.*\(([\d.]+) s since launch\)$"
    return [(m[1], float(m[2]), float(m[3])) for m in re.finditer(pattern, out, re.M)]


@pytest.mark.multiprocess
def test_startup_lines_account_for_the_time_from_launch_to_the_first_step(tmp_path):
    run = str(tmp_path)
    overrides = STEPS + ["train.compile=true", "train.compile_backend=aot_eager"]
    out = run_ranks(1, run, overrides).output()
    phases = _phases(out)
    assert [p[0].split(" (")[0] for p in phases] == PHASES, out[-3000:]
    first = dict((p[0], p) for p in phases)
    m = re.search(
        r"start-up: first step: [\d.]+ s \(data [\d.]+ s, forward \(compiles\) [\d.]+ s, .*"
        r"backward \(compiles\) [\d.]+ s, .*optimizer step [\d.]+ s",
        out,
    )
    assert m, out[-3000:]
    total = float(re.search(r"start-up: launch to the end of the first step: ([\d.]+) s", out)[1])
    # the phases cover the whole time: they add up to the time since launch at each line
    running = 0.0
    for name, seconds, since in phases:
        running += seconds
        assert running == pytest.approx(since, abs=0.05 * len(phases)), (name, running, since)
    assert first["first step"][2] == pytest.approx(total, abs=0.1)
    cache = os.path.join(run, "toy", "compile_cache")
    assert f"cache {cache})" in out and os.path.isdir(cache)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(run, "toy", "tb")).Reload()
    for tag in (
        "startup/model_build_s",
        "startup/first_step_s",
        "startup/first_step/forward_compiles_s",
        "startup/total_s",
    ):
        assert [e.step for e in events.Scalars(tag)] == [1], tag
    # a resumed run times its checkpoint load, and its first step is the one after the checkpoint
    resumed = run_ranks(1, run, ["train.steps=3", "checkpoint.every=2", "logging.images_every=0"], resume="auto")
    names = [p[0] for p in _phases(resumed.output())]
    assert "checkpoint load (step00000002)" in names and names[-1] == "first step"


def test_the_model_built_under_the_training_device_is_the_cpu_build_on_the_cpu():
    cfg = load_config(TOY_CONFIG, [])
    assert init_device(cfg, torch.device("cpu")) == torch.device("cpu")
    no = load_config(TOY_CONFIG, ["train.init_on_device=false"])
    assert init_device(no, torch.device("meta")) == torch.device("cpu")
    assert init_device(cfg, torch.device("meta")) == torch.device("meta")
    model_cfg = tiny_model_config()
    seed_everything(0)
    plain = build_model(model_cfg).state_dict()
    seed_everything(0)
    with torch.device(init_device(cfg, torch.device("cpu"))):  # what the trainer does
        built = build_model(model_cfg).state_dict()
    assert list(built) == list(plain)
    assert all(torch.equal(built[k], plain[k]) for k in plain)


def test_weights_from_folders_are_read_on_the_cpu_and_random_ones_drawn_on_the_default_device():
    """Under another default device (meta stands in for a GPU here), a part read from a local folder is read
    on the CPU exactly as without it, and the time is counted; a random-init part is built on that device."""
    tiny = load_config(TINY_CONFIG, []).model
    backbone_cfg, text_cfg = tiny.backbone, tiny.text
    plain = FluxBackbone(backbone_cfg, LoraConfig(rank=0)).state_dict()
    before = weights_read_seconds()
    with torch.device("meta"):
        loaded = FluxBackbone(backbone_cfg, LoraConfig(rank=0))
        text = FrozenTextEncoders(text_cfg)
        vae = FrozenVAE(tiny_model_config(**{"vae.kind": "autoencoder_kl"}).vae)
    assert weights_read_seconds() > before
    state = loaded.state_dict()
    assert all(t.device.type == "cpu" for t in state.values())
    assert all(torch.equal(state[k], plain[k]) for k in plain)
    assert all(p.device.type == "cpu" for p in text.parameters())
    assert text.t5_tokenizer is not None  # read from the folder as well
    assert all(p.device.type == "meta" for p in vae.parameters())  # drawn where the default device says


def test_the_compile_cache_goes_to_the_run_folder_unless_the_environment_names_one(tmp_path, monkeypatch):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    cfg = load_config(TOY_CONFIG, [f"run.dir={tmp_path}"])
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert use_compile_cache(cfg) == os.path.join(str(tmp_path), "toy", "compile_cache")
    monkeypatch.setenv(CACHE_ENV, default_cache_dir())  # what torch sets on its own when diffusers loads
    assert use_compile_cache(cfg) == os.path.join(str(tmp_path), "toy", "compile_cache")
    mine = str(tmp_path / "elsewhere")
    monkeypatch.setenv(CACHE_ENV, mine)  # the user's choice wins
    assert use_compile_cache(cfg) == mine
    monkeypatch.delenv(CACHE_ENV)
    named = load_config(TOY_CONFIG, [f"run.dir={tmp_path}", f"train.compile_cache_dir={tmp_path / 'cc'}"])
    assert use_compile_cache(named) == str(tmp_path / "cc")


COMPILE_ONCE = """
import sys
sys.path.insert(0, {root!r})
import torch
from torch._dynamo.utils import counters
from train.config import load_config
from train.timing.startup import use_compile_cache

use_compile_cache(load_config({config!r}, ["run.dir={run}"]))
torch.compile(lambda x: torch.sin(x) * 2 + x.cos())(torch.randn(64))
print("inductor", dict(counters["inductor"]))
"""


@pytest.mark.slow  # two inductor compilations in fresh processes: ~20 s on 2 cores
def test_a_second_process_reuses_what_the_first_compiled(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != CACHE_ENV}
    script = COMPILE_ONCE.format(root=ROOT, config=TOY_CONFIG, run=str(tmp_path))
    outs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True) for _ in "ab"]
    assert all(o.returncode == 0 for o in outs), outs[0].stderr[-2000:]
    assert "'fxgraph_cache_miss': 1" in outs[0].stdout and "fxgraph_cache_hit" not in outs[0].stdout
    assert "'fxgraph_cache_hit': 1" in outs[1].stdout, outs[1].stdout
    assert os.listdir(os.path.join(str(tmp_path), "toy", "compile_cache", "fxgraph"))
