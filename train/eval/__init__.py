"""Evaluation: what a trained editor does on held-out edits, beside the rows that need no model and the oracle.

* ``evaluation.py``: the metrics as plain functions on tensors and the evaluation pass
  (``evaluate``, ``iterate_heldout``), which ``launch/eval.py`` and the in-run evaluation share;
* ``edit_success.py``: did an edit succeed, judged over the user's box, and which criterion failed
  (``edit_success_v1.py``: the first checker, for the first synthetic world's samples);
* ``baselines.py``: the editors that need no model (do-nothing, paint bucket, copy-the-reference,
  noise, oracle), the rows every table carries;
* ``heldout.py``: the held-out evaluation inside a run (``logging.eval_every``), logged as ``val/...``;
* ``report.py``, ``run_report.py``: the table and plot of one evaluation, and of a run's checkpoints;
* ``export.py``: trained weights out of a checkpoint (expert shards merged), for inference and evaluation.

Everything outside this folder imports from here.
"""

from train.eval.baselines import BASELINES, baseline_edits
from train.eval.edit_success import CHECKED_TASKS, CRITERIA, MATCH, edit_criteria, edit_success
from train.eval.evaluation import (
    EmbeddingEncoders,
    EvalSettings,
    cosine_per_sample,
    evaluate,
    flow_mse_per_sample,
    iterate_heldout,
    l1_per_sample,
    l2_per_sample,
    mask_iou_per_sample,
    masked_l1_per_sample,
    to_unit,
)
from train.eval.export import (
    EXPORT_FORMAT,
    EXPORT_VERSION,
    WeightsError,
    build_inference_model,
    export_checkpoint,
    load_for_inference,
    read_checkpoint_tensors,
    read_export,
    resolve_checkpoint,
)
from train.eval.heldout import HeldOutEval, balanced_by_task, ema_weights
from train.eval.report import ROW_NAMES, format_table, plot_results
from train.eval.run_report import markdown_table, plot_run, run_row

__all__ = [
    "BASELINES",
    "CHECKED_TASKS",
    "CRITERIA",
    "MATCH",
    "ROW_NAMES",
    "EXPORT_FORMAT",
    "EXPORT_VERSION",
    "EmbeddingEncoders",
    "EvalSettings",
    "HeldOutEval",
    "WeightsError",
    "balanced_by_task",
    "baseline_edits",
    "build_inference_model",
    "cosine_per_sample",
    "edit_criteria",
    "edit_success",
    "ema_weights",
    "evaluate",
    "export_checkpoint",
    "flow_mse_per_sample",
    "format_table",
    "iterate_heldout",
    "l1_per_sample",
    "l2_per_sample",
    "load_for_inference",
    "markdown_table",
    "mask_iou_per_sample",
    "masked_l1_per_sample",
    "plot_results",
    "plot_run",
    "read_checkpoint_tensors",
    "read_export",
    "resolve_checkpoint",
    "run_row",
    "to_unit",
]
