"""Config: merging, struct-mode errors and validation name the key, before any process group exists."""

import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as torch_dist

from train.config import ConfigError, deepspeed_config, load_config
from train.engine import build_optimizer, warmup_cosine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def test_tiny_merges_base_and_overrides():
    cfg = load_config(TINY, ["train.steps=7", "optim.lr=0.002"])
    assert cfg.train.steps == 7 and cfg.optim.lr == 0.002
    assert cfg.checkpoint.keep == 2  # from tiny.yaml
    assert cfg.guards.max_consecutive_skips == 5  # from base.yaml via defaults:
    assert cfg.model.backbone.path == os.path.join(ROOT, "configs", "pretrained", "tiny")  # the embedded base


def _leaves(cfg) -> dict:
    """{dotted key: value} of a config's leaves."""
    from omegaconf import OmegaConf

    def walk(node: dict, prefix: str):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    return dict(walk(OmegaConf.to_container(cfg, resolve=True), ""))


def test_h200_recipe_is_the_cpu_editor_with_a_larger_micro_batch():
    """configs/mid.yaml trains the same model on the same base as tiny.yaml; only the step's size, its
    count and what follows from them (precision, warm-up, loaders, evaluation sizes) and the resolution
    may differ."""
    tiny, mid = _leaves(load_config(TINY)), _leaves(load_config(os.path.join(ROOT, "configs", "mid.yaml")))
    differ = {k for k in tiny.keys() | mid.keys() if tiny.get(k) != mid.get(k)}
    allowed = {"run.name", "train.steps", "train.micro_batch", "train.precision", "schedule.warmup_steps"}
    allowed |= {"train.time_budget_s", "data.image_size"}  # a fixed step count; 128 px (16x16 tokens)
    allowed |= {k for k in differ if k.startswith(("logging.", "data.num_workers", "data.shuffle_buffer"))}
    assert differ <= allowed, sorted(differ - allowed)
    assert mid["train.micro_batch"] == 8 * tiny["train.micro_batch"]
    assert not any(k.startswith("model.") for k in differ)


def test_relative_weight_paths_resolve_from_the_repository_and_missing_ones_are_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative to the working directory first, then to the config's repository
    cfg = load_config(TINY)
    assert cfg.model.text.t5_path == os.path.join(ROOT, "configs", "pretrained", "tiny")
    (tmp_path / "mine").mkdir()
    cfg = load_config(TINY, ["model.backbone.path=mine"])
    assert cfg.model.backbone.path == str(tmp_path / "mine")
    with pytest.raises(ConfigError, match="model.vae.path: no such folder 'nowhere'"):
        load_config(TINY, ["model.vae.path=nowhere"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.stepz=3", "stepz"),
        ("model.experts.rnak=3", "rnak"),
        ("train.steps=many", "train.steps"),
        ("train.zero_stage=3", "train.zero_stage"),
        ("schedule.min_lr=1.0", "schedule.min_lr"),
        ("model.experts.ep_size=3", "model.experts.ep_size"),
        ("model.router.top_k=9", "model.router.top_k"),
        ("data.image_size=60", "data.image_size"),
        ("train.compile=true train.compile_backend=nope", "train.compile_backend"),
        ("train.compile=true train.compile_mode=fast", "train.compile_mode"),
        ("train.compile_mode=reduce-overhead", "train.compile_mode"),  # without train.compile: a silent no-op
        ("train.compile=true train.compile_backend=aot_eager train.compile_mode=reduce-overhead", "train.compile_mode"),
    ],
)
def test_bad_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(TINY, override.split())
    assert not torch_dist.is_initialized()


@pytest.mark.parametrize(
    "overrides, grouped",
    [
        ([], True),  # auto: grouped GEMMs at ep_size 1 (no host sync there)
        (["model.experts.ep_size=2"], False),  # auto: the per-expert loop behind the all-to-all
        (["model.experts.grouped_gemm=false"], False),
        (["model.experts.ep_size=2", "model.experts.grouped_gemm=true"], True),
        (["model.experts.grouped_gemm=null"], True),
    ],
)
def test_grouped_gemm_auto_resolves_by_ep_size(overrides, grouped, monkeypatch):
    from omegaconf import OmegaConf

    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_config(TINY, overrides)
    assert OmegaConf.to_object(cfg.model).experts.use_grouped_gemm() is grouped


def test_grouped_gemm_rejects_a_non_boolean():
    with pytest.raises(ConfigError, match=r"model\.experts\.grouped_gemm"):
        load_config(TINY, ["model.experts.grouped_gemm=sometimes"])


def test_ep_size_must_divide_world(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="model.experts.ep_size"):
        load_config(TINY, ["model.experts.ep_size=4"])


def test_ep_size_counts_slurm_tasks_only_inside_an_srun_step(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for key in ("SLURM_STEP_ID", "SLURM_STEPID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "2")  # a batch script's own shell: this process runs alone
    with pytest.raises(ConfigError, match=r"must divide the number of processes \(1\)"):
        load_config(TINY, ["model.experts.ep_size=2"])
    monkeypatch.setenv("SLURM_STEP_ID", "0")  # one of 2 srun tasks
    assert load_config(TINY, ["model.experts.ep_size=2"]).model.experts.ep_size == 2


@pytest.mark.parametrize(
    "recipe, world", [("gpu_smoke.yaml", "2"), ("flux_full.yaml", "8"), ("flux_full_1gpu.yaml", "1")]
)
def test_gpu_recipes_validate(recipe, world, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", world)
    cfg = load_config(os.path.join(ROOT, "configs", recipe))
    ds = deepspeed_config(cfg, world_size=int(world), on_gpu=True)
    assert ds["bf16"]["enabled"] is True


def test_launcher_fails_fast_without_building_anything(tmp_path):
    t0 = time.time()
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "launch", "train.py"),
            "--config",
            TINY,
            f"run.dir={tmp_path}",
            "train.zero_stage=5",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert "train.zero_stage" in r.stderr
    assert "process group" not in (r.stdout + r.stderr).lower()  # deepspeed's init log never appears
    assert not any(tmp_path.iterdir())  # no run dir, no checkpoints
    assert time.time() - t0 < 60


def test_deepspeed_config_is_generated_from_the_tree():
    cfg = load_config(
        TINY, ["train.micro_batch=3", "train.grad_accum=2", "train.zero_stage=2", "optim.clip_grad_norm=0.5"]
    )
    ds = deepspeed_config(cfg, world_size=4, on_gpu=False)
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 24
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is False  # auto = fp32 on CPU
    assert deepspeed_config(cfg, world_size=4, on_gpu=True)["bf16"]["enabled"] is True


def test_optimizer_is_fused_adamw_with_the_plain_one_s_numbers():
    """The trainer's AdamW is fused (one kernel or loop for all tensors) and steps like torch's plain
    single-tensor AdamW with the same settings."""
    torch.manual_seed(0)
    optim = load_config(TINY, ["optim.weight_decay=0.1"]).optim
    weights = [torch.randn(5, 3), torch.randn(3)]
    fused_p = [torch.nn.Parameter(w.clone()) for w in weights]
    plain_p = [torch.nn.Parameter(w.clone()) for w in weights]
    fused = build_optimizer([{"params": fused_p}], optim)
    plain = torch.optim.AdamW(
        plain_p, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay, foreach=False
    )
    assert fused.defaults["fused"] is True
    for _ in range(3):
        grads = [torch.randn_like(w) for w in weights]
        for params, opt in ((fused_p, fused), (plain_p, plain)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(fused_p, plain_p):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert not torch.equal(a, torch.zeros_like(a))


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)
