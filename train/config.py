"""Training configuration: one OmegaConf tree (model + data + training sections) from YAML and dotlist.

Why structured configs: OmegaConf struct mode rejects unknown keys and wrong types while merging, and
``validate_config`` rejects impossible values, both before any process group or model exists, with a
message naming the key. The DeepSpeed JSON is *generated* from this tree (``deepspeed_config``), so
there is no second file to keep in sync. The resolved tree is saved next to every checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.config import DataConfig
from data.schema import TASKS
from moe.config import ModelConfig


class ConfigError(ValueError):
    """An unknown key or impossible value in the training config (message names the key)."""


@dataclass
class RunConfig:
    name: str = "tiny"
    dir: str = "runs"  # the run lives in <dir>/<name>: checkpoints/, tb/, images/, config.yaml
    seed: int = 0


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    eps: float = 1e-8
    clip_grad_norm: float = 1.0  # 0 = no clipping


@dataclass
class ScheduleConfig:
    warmup_steps: int = 100
    min_lr: float = 1e-6  # cosine decays from optim.lr to min_lr at train.steps


@dataclass
class StepsConfig:
    steps: int = 1000  # optimizer steps (with time_budget_s: the most the budget may give)
    # seconds of training the run may take (0 = no budget, train.steps it is): after time_budget_calibration
    # steps the run measures its step time once, sets the step count (at most train.steps) that fills the
    # budget, schedules the learning rate to end there and says so; the count is checkpointed with the
    # schedule, so a resumed run keeps it (train/timing/budget.py); a run of no more steps than the
    # calibration just runs them
    time_budget_s: float = 0.0
    time_budget_calibration: int = 60
    micro_batch: int = 1  # samples per rank per forward
    grad_accum: int = 1
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    zero_stage: int = 0  # 0, 1 or 2 (3 is not supported with the frozen backbone + MoE here)
    # torch.compile the backbone block by block, the expert layers' math and the losses
    # (CareEditModel.compile_regions): the full-size step is bound by kernel launches otherwise
    compile: bool = False
    # torch.compile backend when compile is on: inductor (the fast one) or a debugging backend such as
    # aot_eager (same graphs with eager kernels: how the CPU tests check compiled training)
    compile_backend: str = "inductor"
    # inductor's mode for the blocks compiled whole: default | reduce-overhead (CUDA graphs: the step is
    # otherwise bound by the host issuing ~10K kernels, docs/PERF.md) | max-autotune |
    # max-autotune-no-cudagraphs
    compile_mode: str = "default"
    # inductor's caches (compiled graphs and kernels) for this run: null = <run dir>/compile_cache, so a
    # resumed or requeued run on another node reuses what the first compiled (TORCHINDUCTOR_CACHE_DIR, when
    # set in the environment, wins)
    compile_cache_dir: Optional[str] = None
    # build the model under the training device: random-init parts (frozen parts without a weights folder,
    # the trainable parts) are drawn there instead of on the CPU and then moved; weights from local folders
    # are read on the CPU either way. On a GPU, random-init frozen parts then differ from the CPU-built ones
    # that launch/export.py, launch/eval.py and launch/edit.py rebuild: false for such a run you will evaluate
    init_on_device: bool = True
    # ZeRO 1/2 gradient buckets (elements) and overlap of their reduction with the backward; null = on with GPUs
    reduce_bucket_size: int = 50_000_000
    allgather_bucket_size: int = 50_000_000
    overlap_comm: Optional[bool] = None


@dataclass
class EMAConfig:
    enabled: bool = False
    decay: float = 0.999


@dataclass
class CheckpointConfig:
    every: int = 500  # steps; a checkpoint is also written at the end and on SIGTERM/SIGUSR1
    keep: int = 3  # keep the last K complete checkpoints (and the one `best` names, whatever its age)
    # write checkpoints beside the training: the state is copied to host memory at the step boundary (pinned
    # memory from a GPU; one checkpoint's share of this rank), a thread writes it, and the checkpoint is
    # committed once every rank has written its files. false: the step loop waits for the disk
    async_save: bool = True
    dir: Optional[str] = None  # default: <run dir>/checkpoints
    # the held-out metric (a name from VAL_METRICS, e.g. val/success_mean or val/flow_loss) that the `best`
    # pointer follows; null = no `best`. A checkpoint competes when the evaluation ran at its step (multiples
    # of logging.eval_every, and the last step): make checkpoint.every a multiple of it (the run warns if not)
    best_metric: Optional[str] = None
    best_mode: str = "max"  # max | min: which way is better (must agree with the metric: max for success)


@dataclass
class LoggingConfig:
    every: int = 10  # console + TensorBoard scalars
    images_every: int = 200  # validation image grid (0 = never)
    num_images: int = 4  # samples in the grid
    edit_steps: int = 8  # sampling steps for the grid's edits
    tensorboard_dir: Optional[str] = None  # default: <run dir>/tb
    progress_bar: bool = True
    # held-out evaluation inside the run (train/eval/heldout.py) every N steps and at the last step (0 = never),
    # on the first eval_samples samples of data.val_shards, with fixed noise, times and sampler seeds
    eval_every: int = 0
    eval_samples: int = 32  # samples for the held-out flow loss (inside / outside the fine mask)
    eval_edits: int = 8  # of those, how many (from the tasks in turn) are edited and scored like launch/eval.py
    eval_edit_steps: int = 8  # sampling steps per edit
    eval_batch_size: int = 8  # samples per forward


@dataclass
class GuardConfig:
    max_consecutive_skips: int = 5  # non-finite loss / grad norm steps in a row that stop the run
    # hang watchdog (train/faults/watchdog.py): a step running longer than max(hang_min_s, hang_factor x the median
    # of the recent steps) dumps every thread's stack and exits with code 75 (requeue); hang_factor 0 = off
    hang_factor: float = 20.0
    hang_min_s: float = 600.0
    hang_warmup_steps: int = 5  # steps timed before the watchdog arms (compilation, warm-up)
    # replica-consistency check (train/faults/replica_check.py) every N steps (0 = only before checkpoints: it
    # always runs before a checkpoint is written)
    replica_check_every: int = 200


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    train: StepsConfig = field(default_factory=StepsConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    guards: GuardConfig = field(default_factory=GuardConfig)


def _read_yaml(path: str, seen: tuple[str, ...] = ()) -> DictConfig:
    """Read a YAML file, merging the files named in its ``defaults:`` list (relative paths) first."""
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"config include cycle: {' -> '.join(seen + (path,))}")
    node = OmegaConf.load(path)
    bases = node.pop("defaults", None) or []
    merged = OmegaConf.create()
    for base in bases:
        base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        if not base_path.endswith((".yaml", ".yml")):
            base_path += ".yaml"
        merged = OmegaConf.merge(merged, _read_yaml(base_path, seen + (path,)))
    return OmegaConf.merge(merged, node)


def load_config(path: Optional[str], overrides: Optional[list[str]] = None) -> DictConfig:
    """Schema <- YAML (with ``defaults:`` includes) <- dotlist overrides; validated; read-only.

    Raises ConfigError naming the key for unknown keys, wrong types and impossible values.
    """
    schema = OmegaConf.structured(TrainConfig)
    try:
        layers = [schema]
        if path:
            layers.append(_read_yaml(path))
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.merge(*layers)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"config key '{key}': {e.msg if hasattr(e, 'msg') else e}") from None
    _resolve_weight_paths(cfg, path)
    validate_config(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


WEIGHT_PATH_KEYS = ("model.backbone.path", "model.vae.path", "model.text.t5_path", "model.text.clip_path")


def _resolve_weight_paths(cfg: DictConfig, config_path: Optional[str]) -> None:
    """Make the local weight folders absolute, so the resolved config saved next to every checkpoint
    (and read back by resume, export, eval and edit from any directory) names the same folders.
    A relative path is taken from the working directory, or else from the repository the config file
    lives in (``configs/pretrained/tiny`` in ``configs/tiny.yaml`` works from anywhere)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(config_path))) if config_path else None
    for key in WEIGHT_PATH_KEYS:
        value = OmegaConf.select(cfg, key)
        if value is None or os.path.isabs(value):
            continue
        candidates = [os.path.abspath(value)] + ([os.path.join(repo, value)] if repo else [])
        found = next((c for c in candidates if os.path.exists(c)), None)
        if found is None:
            raise ConfigError(f"{key}: no such folder '{value}' (looked in {', '.join(candidates)})")
        OmegaConf.update(cfg, key, found)


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


# The held-out metrics the in-run evaluation logs (train/eval/heldout.py), with the direction that is better;
# ``val/success/<task>`` (a task of data.schema.TASKS) is also one, better when higher.
VAL_METRICS = {
    "val/flow_loss": "min",
    "val/flow_loss_inside": "min",
    "val/flow_loss_outside": "min",
    "val/success_mean": "max",
    "val/success_samples": "max",
    "val/l1": "min",
    "val/l1_inside": "min",
    "val/l1_outside": "min",
    "val/l1_outside_box": "min",
    "val/mask_iou": "max",
}
FLOW_METRICS = ("val/flow_loss", "val/flow_loss_inside", "val/flow_loss_outside")


def metric_direction(name: str) -> Optional[str]:
    """'max' or 'min' for a held-out metric name, None for a name the evaluation does not log."""
    if name in VAL_METRICS:
        return VAL_METRICS[name]
    if name.startswith("val/success/"):
        return "max" if name[len("val/success/") :] in TASKS else None
    return None


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the modes that record CUDA graphs


def validate_config(cfg: TrainConfig) -> None:
    """Reject impossible values (ours, then ModelConfig's and DataConfig's), naming the key.

    ``cfg`` is the merged tree (a DictConfig of ``TrainConfig``'s fields, as OmegaConf's structured
    configs are read: the annotation names the schema)."""
    _validate_steps(cfg.train)
    o, s = cfg.optim, cfg.schedule
    _check(o.lr > 0, "optim.lr", "must be > 0")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "must be two values in [0, 1)")
    _check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _check(o.clip_grad_norm >= 0, "optim.clip_grad_norm", "must be >= 0 (0 = off)")
    _check(s.warmup_steps >= 0, "schedule.warmup_steps", "must be >= 0")
    _check(0 <= s.min_lr <= o.lr, "schedule.min_lr", f"must be between 0 and optim.lr ({o.lr})")
    _check(0 < cfg.ema.decay < 1, "ema.decay", "must be in (0, 1)")
    _check(cfg.checkpoint.every >= 1, "checkpoint.every", "must be >= 1")
    _check(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
    _check(cfg.logging.every >= 1, "logging.every", "must be >= 1")
    _check(cfg.logging.images_every >= 0, "logging.images_every", "must be >= 0 (0 = never)")
    _validate_eval(cfg.logging, cfg.checkpoint)
    _check(
        not cfg.logging.eval_every or bool(cfg.data.val_shards),
        "logging.eval_every",
        "the held-out evaluation needs data.val_shards (its samples); set it, or logging.eval_every=0",
    )
    _validate_guards(cfg.guards)
    _check(cfg.train.reduce_bucket_size >= 1, "train.reduce_bucket_size", "must be >= 1 (elements)")
    _check(cfg.train.allgather_bucket_size >= 1, "train.allgather_bucket_size", "must be >= 1 (elements)")
    # before any launcher env; SLURM_NTASKS counts only inside an srun step (a batch script's own shell
    # carries it too, but a process started there without srun is alone: train.distributed)
    in_srun_step = "SLURM_STEP_ID" in os.environ or "SLURM_STEPID" in os.environ
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1") if in_srun_step else "1"))
    ep = cfg.model.experts.ep_size
    _check(world % ep == 0, "model.experts.ep_size", f"{ep} must divide the number of processes ({world})")
    for section in ("model", "data"):
        obj = OmegaConf.to_object(cfg[section])
        try:
            obj.validate()
        except ValueError as e:
            msg = str(e)
            raise ConfigError(msg if msg.startswith(f"{section}.") else f"{section}: {msg}") from None


def _validate_steps(t: StepsConfig) -> None:
    """Step counts, precision, ZeRO stage and compilation."""
    _check(t.steps >= 1, "train.steps", "must be >= 1")
    _check(t.time_budget_s >= 0, "train.time_budget_s", "must be >= 0 (0 = no budget)")
    _check(t.time_budget_calibration >= 2, "train.time_budget_calibration", "must be >= 2 (the steps timed)")
    _check(t.micro_batch >= 1, "train.micro_batch", "must be >= 1")
    _check(t.grad_accum >= 1, "train.grad_accum", "must be >= 1")
    _check(t.precision in ("auto", "bf16", "fp32"), "train.precision", f"'{t.precision}' is not auto, bf16 or fp32")
    _check(t.zero_stage in (0, 1, 2), "train.zero_stage", f"{t.zero_stage} is not 0, 1 or 2")
    if t.compile:
        import torch._dynamo  # torch only here: a config is checked (launch/train.py) before torch is loaded

        backends = torch._dynamo.list_backends(exclude_tags=())
        _check(
            t.compile_backend in backends,
            "train.compile_backend",
            f"'{t.compile_backend}' is not a torch.compile backend ({', '.join(backends)})",
        )
        _check(
            t.compile_mode == "default" or t.compile_backend == "inductor",
            "train.compile_mode",
            f"'{t.compile_mode}' is a mode of the inductor backend, not of '{t.compile_backend}'",
        )
    _check(
        t.compile_mode in COMPILE_MODES,
        "train.compile_mode",
        f"'{t.compile_mode}' is not one of {', '.join(COMPILE_MODES)}",
    )
    _check(t.compile or t.compile_mode == "default", "train.compile_mode", "needs train.compile=true")


def _validate_guards(g: GuardConfig) -> None:
    _check(g.max_consecutive_skips >= 1, "guards.max_consecutive_skips", "must be >= 1")
    _check(g.hang_factor == 0 or g.hang_factor > 1, "guards.hang_factor", "must be > 1 (0 = off)")
    _check(g.hang_min_s > 0, "guards.hang_min_s", "must be > 0")
    _check(g.hang_warmup_steps >= 1, "guards.hang_warmup_steps", "must be >= 1")
    _check(g.replica_check_every >= 0, "guards.replica_check_every", "must be >= 0 (0 = only before checkpoints)")


def _validate_eval(lg: LoggingConfig, ck: CheckpointConfig) -> None:
    """The in-run evaluation and the `best` pointer: sizes, and a metric the evaluation logs at checkpoint steps."""
    _check(lg.eval_every >= 0, "logging.eval_every", "must be >= 0 (0 = never)")
    _check(lg.eval_samples >= 1, "logging.eval_samples", "must be >= 1")
    _check(
        0 <= lg.eval_edits <= lg.eval_samples,
        "logging.eval_edits",
        f"must be between 0 and logging.eval_samples ({lg.eval_samples})",
    )
    _check(lg.eval_edit_steps >= 1, "logging.eval_edit_steps", "must be >= 1")
    _check(lg.eval_batch_size >= 1, "logging.eval_batch_size", "must be >= 1")
    _check(ck.best_mode in ("max", "min"), "checkpoint.best_mode", f"'{ck.best_mode}' is not max or min")
    if ck.best_metric is None:
        return
    direction = metric_direction(ck.best_metric)
    _check(
        direction is not None,
        "checkpoint.best_metric",
        f"'{ck.best_metric}' is not a held-out metric ({', '.join(VAL_METRICS)}, or val/success/<task>)",
    )
    _check(
        ck.best_mode == direction,
        "checkpoint.best_mode",
        f"{ck.best_metric} is better when {'higher' if direction == 'max' else 'lower'}: set {direction}",
    )
    _check(lg.eval_every >= 1, "logging.eval_every", f"must be >= 1 for checkpoint.best_metric={ck.best_metric}")
    _check(
        ck.best_metric in FLOW_METRICS or lg.eval_edits >= 1,
        "logging.eval_edits",
        f"must be >= 1 for checkpoint.best_metric={ck.best_metric} (a metric of the sampled edits)",
    )


def as_train_config(cfg: TrainConfig | DictConfig) -> TrainConfig:
    """The validated tree (``load_config``) as the typed dataclasses: ``TrainConfig`` with its ``ModelConfig``
    and ``DataConfig``. A run converts once, where it starts, and hands each component its own section."""
    if isinstance(cfg, TrainConfig):
        return cfg
    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, TrainConfig):
        raise TypeError(f"expected the training config tree (load_config), got {type(obj).__name__}")
    return obj


def resolve_precision(t: StepsConfig, on_gpu: bool) -> str:
    """``train.precision``: ``auto`` means bf16 on GPU and fp32 on CPU (CPU bf16 is slow and breaks
    exact-resume tests)."""
    if t.precision == "auto":
        return "bf16" if on_gpu else "fp32"
    return t.precision


def deepspeed_config(cfg: TrainConfig, world_size: int, on_gpu: bool) -> dict:
    """The DeepSpeed config dict, generated from the training config (the single source of truth): its
    ``train`` and ``optim`` sections."""
    t = cfg.train
    precision = resolve_precision(t, on_gpu)
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch * t.grad_accum * world_size,
        "gradient_clipping": float(cfg.optim.clip_grad_norm),
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": False},
    }
    if t.zero_stage > 0:
        overlap = on_gpu if t.overlap_comm is None else bool(t.overlap_comm)
        ds["zero_optimization"].update(
            {
                "contiguous_gradients": True,
                "overlap_comm": overlap,
                "reduce_bucket_size": int(t.reduce_bucket_size),
                "allgather_bucket_size": int(t.allgather_bucket_size),
            }
        )
    return ds


def save_resolved(cfg: TrainConfig, path: str) -> None:
    """Write the resolved config as YAML (atomically: a half-written config would mislead a resume)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(OmegaConf.to_yaml(cfg, resolve=True))
    os.replace(tmp, path)


def run_dir(cfg: TrainConfig) -> str:
    """``<run.dir>/<run.name>``: the run's checkpoints, logs, images and resolved config."""
    return os.path.join(cfg.run.dir, cfg.run.name)


def checkpoint_dir(cfg: TrainConfig) -> str:
    """``checkpoint.dir``, or ``checkpoints/`` in the run directory."""
    return cfg.checkpoint.dir or os.path.join(run_dir(cfg), "checkpoints")


def tensorboard_dir(cfg: TrainConfig) -> str:
    """``logging.tensorboard_dir``, or ``tb/`` in the run directory."""
    return cfg.logging.tensorboard_dir or os.path.join(run_dir(cfg), "tb")
