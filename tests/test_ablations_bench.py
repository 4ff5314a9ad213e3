"""bench/ablations.py: the variant list comes from configs/ablations.yaml and every set is a valid config of
the recipe; the statistics (mean, sample std, paired t, verdict) match a hand computation; the report's
tables hold those numbers; finished jobs are reused; the report section replaces only its own markers."""

from __future__ import annotations

import argparse
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import ablations  # noqa: E402


def test_variants_are_the_grid_sets_with_common_overrides_first(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "name: g\nbase: configs/tiny.yaml\ncommon: [train.steps=7]\nsets:\n"
        "  - {name: full, overrides: []}\n  - {name: k1, overrides: [model.router.top_k=1]}\n"
    )
    assert ablations.load_variants(str(grid)) == {
        "full": ["train.steps=7"],
        "k1": ["train.steps=7", "model.router.top_k=1"],
    }
    grid.write_text("name: g\nsets:\n  - {name: k1, overrides: [model.router.top_k=1]}\n")
    with pytest.raises(ValueError, match="'full'"):
        ablations.load_variants(str(grid))


def test_every_set_of_the_grid_is_a_valid_config_of_the_recipe():
    """Each job's train command, as the bench builds it, loads and validates before anything runs."""
    from omegaconf import OmegaConf

    from train.config import load_config

    variants = ablations.load_variants()
    assert list(variants)[0] == "full" and {"static-fusion", "uniform-router", "k1", "tag-moe"} <= set(variants)
    args = ablations.parse_args(["--steps", "40", "--checkpoint-every", "10", "--set", "train.precision=fp32"])
    for name, overrides in variants.items():
        cmd = ablations.train_command(name, 2, overrides, args)
        assert cmd[1:3] == ["-m", "launch.train"]
        dotlist = cmd[cmd.index("--config") + 2 :]
        cfg = load_config(os.path.join(ROOT, args.config), dotlist)
        assert cfg.run.seed == 2 and cfg.train.steps == 40 and cfg.checkpoint.every == 10
        assert cfg.train.time_budget_s == 0  # the same steps for every arm, not a wall-clock budget
        assert cfg.checkpoint.keep == 5  # every checkpoint kept: the frontier's points
        wanted = OmegaConf.from_dotlist(overrides)  # common, then the set's: the last of a key wins
        for o in overrides:  # the variant's overrides are applied (they come last)
            key = o.split("=", 1)[0]
            assert OmegaConf.select(cfg, key) == OmegaConf.select(wanted, key), (name, o)
    full, adapt = variants["full"], variants["adaptedit"]
    assert load_config(os.path.join(ROOT, "configs", "tiny.yaml"), full).model.repaint.mode == "coupled"
    assert load_config(os.path.join(ROOT, "configs", "tiny.yaml"), adapt).model.loss.region_alpha == 2


def test_statistics_match_a_hand_computation():
    m, sd = ablations.mean_std([0.1, 0.12, 0.08])
    assert m == pytest.approx(0.1) and sd == pytest.approx(0.02)
    m, sd, t, n = ablations.paired_t([0.1, 0.12, 0.08])
    assert (n, t) == (3, pytest.approx(0.1 / (0.02 / math.sqrt(3))))  # 8.66 > 4.303 (df 2)
    assert ablations.verdict(t, n) == "supported"
    assert ablations.verdict(-t, n) == "contradicted"
    assert ablations.verdict(4.0, 3) == "not resolved"  # below the df-2 critical value 4.303
    assert ablations.verdict(5.0, 2) == "not resolved"  # df 1 needs 12.706
    assert ablations.paired_t([0.05, 0.05])[2] == math.inf
    assert math.isnan(ablations.paired_t([0.05])[2]) and ablations.verdict(math.nan, 1) == "not resolved"
    assert math.isnan(ablations.mean_std([math.nan])[0])


def _result(variant: str, seed: int, success_by_task: dict[str, float], steps=(500, 1000), routing=None) -> dict:
    per_task = {t: {"success": s, "count": 10} for t, s in success_by_task.items()}
    mean = sum(success_by_task.values()) / len(success_by_task)
    metrics = {"success_mean_over_tasks": mean, "l1_inside": 0.2, "l1_outside": 0.02, "mask_iou": 0.6}
    base = {"metrics": {"success_mean_over_tasks": 0.0, "l1_inside": 0.3, "l1_outside": 0.0, "mask_iou": 0.8},
            "per_task": {t: {"success": 0.0} for t in success_by_task}}  # fmt: skip
    oracle = {"metrics": {"success_mean_over_tasks": 1.0, "l1_inside": 0.0, "l1_outside": 0.0, "mask_iou": 1.0},
              "per_task": {t: {"success": 1.0} for t in success_by_task}}  # fmt: skip
    ev = {"metrics": metrics, "per_task": per_task, "baselines": {"do_nothing": base, "oracle": oracle}}
    by_step = {str(s): ev | {"num_samples": 50} for s in steps}
    by_step[str(steps[0])] = by_step[str(steps[0])] | {"metrics": metrics | {"success_mean_over_tasks": mean / 2}}
    return {"variant": variant, "seed": seed, "overrides": [], "steps": steps[-1], "micro_batch": 16, "set": [],
            "train_wall_s": 100.0, "by_step": by_step, "routing": routing or {},
            "environment": {"date": "2026-12-01", "device": "X", "torch": "t"}}  # fmt: skip


def test_report_tables_and_verdicts():
    tasks = ("add", "recolor", "remove", "replace", "style")
    full = [0.30, 0.32, 0.28]
    static = [0.20, 0.21, 0.19]  # full - static = 0.10, 0.11, 0.09: t = 0.10 / (0.01 / sqrt 3) = 17.3
    results = []
    for seed in range(3):
        results.append(_result("full", seed, dict.fromkeys(tasks, full[seed])))
        results.append(_result("static-fusion", seed, dict.fromkeys(tasks, static[seed])))
    md = ablations.report(results, ["full", "static-fusion", "k1"], {}, "python bench/ablations.py")
    row = next(line for line in md.splitlines() if line.startswith("| static-fusion | 3 |"))
    assert "**20.0 ± 1.0%**" in row and "-10.0 ± 1.0 pt" in row
    assert "| full | 3 | 30.0 ± 2.0% |" in md
    assert "| do-nothing (the source) | - | 0.0% |" in md and "| oracle (the target) | - | 100.0% |" in md
    frontier = next(line for line in md.splitlines() if line.startswith("| full | 15.0 ± 1.0%"))
    assert frontier.endswith("| 30.0 ± 2.0% |")  # step 500 (half) and step 1000
    claim = next(line for line in md.splitlines() if "beats static fusion" in line)
    assert "+10.0 ± 1.0 pt" in claim and "+10, +11, +9" in claim and claim.endswith("| supported |")
    assert "K = 3 of 4 beats K = 1" not in md  # no k1 results: no row
    assert "on `configs/tiny.yaml`'s recipe" in md  # results from before `config` was recorded
    for r in results:
        r["config"] = "configs/mid.yaml"
    assert "on `configs/mid.yaml`'s recipe" in ablations.report(results, ["full"], {}, "cmd")
    with pytest.raises(ValueError, match="reference"):
        ablations.report(results[1::2], ["full", "static-fusion"], {}, "cmd")


def test_routing_contrast_by_hand():
    def routing(w_add, w_style):
        return {t: {"block0": {"weight_inside_mask": {"text": w, "mask": 0.5}}} for t, w in (("add", w_add), ("style", w_style))}  # fmt: skip

    # text: tasks differ by 0.4 (std 0.2828) in each seed, seeds by 0.02; mask: all equal
    rs = [{"seed": 0, "routing": routing(0.1, 0.5)}, {"seed": 1, "routing": routing(0.12, 0.52)}]
    task_spread, seed_spread = ablations.routing_contrast(rs)
    assert task_spread == pytest.approx((0.4 / math.sqrt(2) + 0.0) / 2)
    assert seed_spread == pytest.approx((0.02 / math.sqrt(2) * 2 + 0.0 * 2) / 4)


def test_finished_jobs_are_reused_and_sections_replaced(tmp_path, monkeypatch):
    args = argparse.Namespace(out=str(tmp_path), results=None)
    os.makedirs(tmp_path / "results")
    (tmp_path / "results" / "k1_s3.json").write_text('{"variant": "k1", "seed": 3, "marker": 1}')

    def no_run(*a, **k):
        raise AssertionError("a finished job ran again")

    monkeypatch.setattr(ablations, "_run", no_run)
    assert ablations.run_job("k1", 3, [], args)["marker"] == 1
    (tmp_path / "results" / "environment.json").write_text("{}")
    assert [r["variant"] for r in ablations.load_results(str(tmp_path / "results"))] == ["k1"]

    doc = tmp_path / "R.md"
    doc.write_text("head\n<!-- ablation-grid:start -->\nold\n<!-- ablation-grid:end -->\ntail\n")
    ablations.write_section(str(doc), "new table")
    assert doc.read_text() == "head\n<!-- ablation-grid:start -->\nnew table\n<!-- ablation-grid:end -->\ntail\n"


def test_documented_command_rebuilds_the_grid():
    """The command printed above the report carries every argument that changes the results."""
    args = ablations.parse_args(["--config", "configs/tiny.yaml", "--eval-batch-size", "50", "--set", "a.b=1"])
    cmd = ablations.documented_command(args, {"run_device": "cuda", "run_parallel": 11})
    assert cmd.startswith("python bench/ablations.py --config configs/tiny.yaml --steps 3000 --micro-batch 8 ")
    assert "--set a.b=1" in cmd and "--eval-batch-size 50" in cmd and cmd.endswith("--device cuda --parallel 11")
    reparsed = ablations.parse_args(cmd.split()[2:])
    assert (reparsed.config, reparsed.eval_batch_size, reparsed.set) == (args.config, 50, ["a.b=1"])


def test_steps_and_batch_default_to_the_recipe():
    args = ablations.parse_args([])
    assert (args.config, args.steps, args.micro_batch) == ("configs/mid.yaml", 1000, 64)
    args = ablations.parse_args(["--config", "configs/tiny.yaml"])
    assert (args.steps, args.micro_batch) == (3000, 8)  # the recipe's cap on steps
    assert ablations.parse_args(["--config", "configs/tiny.yaml", "--steps", "7"]).steps == 7
