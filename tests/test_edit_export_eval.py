"""Issue 6: export a trained checkpoint, edit from it, and the evaluation metrics.

* metrics on hand-made images: identical images give L1 = L2 = 0 and IoU 1; known differences give
  the values worked out by hand in each test;
* a DeepSpeed checkpoint written at ep_size 2 by 2 gloo ranks (tests/helpers/eval_ep_worker.py) exports to
  one ep_size 1 safetensors file whose tensors are exactly the ranks' trainable weights (and EMA)
  under global expert ids; the checkpoint and the export give the same edit for the same seed, bit
  for bit, and both match the edit the ep_size 2 model made before saving;
* a corrupt or truncated weights file (export or DeepSpeed shard) is refused with an error naming it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from tests.helpers import eval_ep_worker as W
from train.eval import (
    WeightsError,
    l1_per_sample,
    l2_per_sample,
    load_for_inference,
    mask_iou_per_sample,
    masked_l1_per_sample,
    read_checkpoint_tensors,
    read_export,
    resolve_checkpoint,
    to_unit,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------ metrics
def test_identical_images_give_zero_error_and_full_iou():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 3, 8, 8, generator=g)
    mask = (torch.rand(3, 1, 8, 8, generator=g) > 0.5).float()
    assert l1_per_sample(img, img).tolist() == [0.0, 0.0, 0.0]
    assert l2_per_sample(img, img).tolist() == [0.0, 0.0, 0.0]
    inside, outside = masked_l1_per_sample(img, img, mask)
    assert inside.tolist() == [0.0] * 3 and outside.tolist() == [0.0] * 3
    assert mask_iou_per_sample(mask, mask).tolist() == [1.0, 1.0, 1.0]


def test_known_differences_give_hand_computed_values():
    # 2x2 image, 3 channels (12 values). Pixel (0,0) is off by 0.6 in one channel, pixel
    # (1,1) by 0.2 in all three. L1 = (0.6 + 3*0.2) / 12 = 0.1; L2 = (0.36 + 3*0.04) / 12 = 0.04.
    target = torch.zeros(1, 3, 2, 2)
    pred = target.clone()
    pred[0, 0, 0, 0] = 0.6
    pred[0, :, 1, 1] = 0.2
    assert l1_per_sample(pred, target).item() == pytest.approx(0.1)
    assert l2_per_sample(pred, target).item() == pytest.approx(0.04)
    # mask = pixel (0,0) only: inside = channel mean 0.6/3 = 0.2; outside = (0 + 0 + 0.2) / 3 pixels
    mask = torch.zeros(1, 1, 2, 2)
    mask[0, 0, 0, 0] = 1
    inside, outside = masked_l1_per_sample(pred, target, mask)
    assert inside.item() == pytest.approx(0.2) and outside.item() == pytest.approx(0.2 / 3)
    # an empty region has no inside error (NaN), the outside is the plain L1
    inside, outside = masked_l1_per_sample(pred, target, torch.zeros(1, 1, 2, 2))
    assert math.isnan(inside.item()) and outside.item() == pytest.approx(0.1)


def test_iou_thresholds_refined_mask_at_one_half():
    # refined: 0.5 (counts, >=), 0.7, 0.49 (does not), 0.0; fine: pixels 0 and 2.
    refined = torch.tensor([0.5, 0.7, 0.49, 0.0]).reshape(1, 1, 2, 2)
    fine = torch.tensor([1.0, 0.0, 1.0, 0.0]).reshape(1, 1, 2, 2)
    # predicted {0, 1}, truth {0, 2}: intersection 1, union 3
    assert mask_iou_per_sample(refined, fine).item() == pytest.approx(1 / 3)
    assert mask_iou_per_sample(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)).item() == 1.0  # both empty
    assert mask_iou_per_sample(torch.zeros(1, 1, 2, 2), fine).item() == 0.0
    # a coarser refined mask is upsampled (nearest) to the fine mask's size: 1x1 "on" covers all 4
    assert mask_iou_per_sample(torch.ones(1, 1, 1, 1), fine).item() == pytest.approx(0.5)


def test_embedding_metrics_with_local_encoders(tmp_path):
    from tests.helpers.eval_encoders import make_tiny_encoders
    from train.eval import EmbeddingEncoders, cosine_per_sample

    assert set(EmbeddingEncoders().skipped()) == {"clip_i", "clip_t", "dino"}  # nothing given: all skipped
    clip, dino = make_tiny_encoders(str(tmp_path))
    enc = EmbeddingEncoders(clip, dino)
    assert enc.skipped() == {}
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    for embed in (enc.clip_image, enc.dino_image):
        same = cosine_per_sample(embed(a), embed(a.clone()))
        assert same.tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
        assert (cosine_per_sample(embed(a), embed(1 - a)) < 0.9999).all()
    assert enc.clip_text(["make it blue", "remove"]).shape == enc.clip_image(b).shape  # CLIP-T: one space


def test_to_unit_maps_model_range():
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0])
    assert to_unit(x).tolist() == [0.0, 0.5, 1.0, 1.0]


# ------------------------------------------------------------------------------------------ export
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ep2_run(tmp_path_factory):
    """Checkpoint dir written at ep_size 2 by 2 gloo ranks, and the ranks' own record of it."""
    run_dir = str(tmp_path_factory.mktemp("ep2"))
    mp.spawn(W.worker, args=(2, _free_port(), run_dir), nprocs=2, join=True)
    expected = {}
    for r in range(2):
        expected.update(load_file(os.path.join(run_dir, f"expected_rank{r}.safetensors")))
    return os.path.join(run_dir, "ep2", "checkpoints"), expected


@pytest.fixture(scope="module")
def exported(ep2_run, tmp_path_factory):
    from launch.export import main as export_main

    ckpt, _ = ep2_run
    out = tmp_path_factory.mktemp("export")
    paths = {"weights": str(out / "w.safetensors"), "ema": str(out / "ema.safetensors")}
    assert export_main(["--checkpoint", ckpt, "--out", paths["weights"]]) == 0
    assert export_main(["--checkpoint", ckpt, "--out", paths["ema"], "--ema"]) == 0
    return paths


@pytest.mark.multiprocess  # uses the 2-rank checkpoint
def test_checkpoint_really_is_expert_parallel(ep2_run):
    ckpt, _ = ep2_run
    tag = resolve_checkpoint(ckpt)
    names = sorted(f for f in os.listdir(tag) if f.startswith("layer_"))
    # 3 expert layers x 4 global experts, one file each, from two ranks
    assert names == [f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt" for layer in range(3) for e in range(4)]
    assert os.path.isfile(os.path.join(tag, "train_state_rank1.pt"))


@pytest.mark.multiprocess  # uses the 2-rank checkpoint
def test_export_holds_exactly_the_trained_weights_merged(ep2_run, exported):
    _, expected = ep2_run
    tensors, cfg = read_export(exported["weights"])
    assert cfg.model.experts.ep_size == 1
    weights = {k: v for k, v in expected.items() if not k.startswith(("ema/", "edit/"))}
    assert set(tensors) == set(weights)  # every trainable tensor, nothing frozen, nothing extra
    assert any(".deepspeed_experts.3." in k for k in tensors)  # rank 1's local expert 1 is global 3
    for k, v in weights.items():
        assert torch.equal(tensors[k], v), k
    ema, _ = read_export(exported["ema"])
    assert set(ema) == set(weights)
    for k in weights:
        assert torch.equal(ema[k], expected[f"ema/{k}"]), k
    assert any(not torch.equal(ema[k], weights[k]) for k in weights)  # the EMA really is different


@pytest.mark.multiprocess  # uses the 2-rank checkpoint
def test_same_edit_from_checkpoint_and_export(ep2_run, exported, tmp_path):
    from launch.edit import main as edit_main

    ckpt, expected = ep2_run
    edits = {}
    for name, path in (("checkpoint", ckpt), ("export", exported["weights"])):
        model, _ = load_for_inference(path)
        g = torch.Generator().manual_seed(W.EDIT_SEED)
        edits[name] = model.edit(W.test_batch(), num_steps=W.EDIT_STEPS, generator=g)
    a, b = edits["checkpoint"], edits["export"]
    assert torch.equal(a.images, b.images) and torch.equal(a.refined_mask, b.refined_mask)
    assert a.utilisation == b.utilisation
    # the ep_size 1 reload computes what the ep_size 2 model computed before saving (dense vs all-to-all)
    torch.testing.assert_close(a.images, expected["edit/images"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.refined_mask, expected["edit/refined_mask"], rtol=1e-4, atol=1e-4)
    # the CLI, on an image file with a box mask, gives the same PNG from both
    from PIL import Image

    src = tmp_path / "in.png"
    Image.fromarray((torch.rand(40, 48, 3).numpy() * 255).astype("uint8")).save(src)
    outs = []
    for name, path in (("ckpt", resolve_checkpoint(ckpt)), ("export", exported["weights"])):
        out = tmp_path / f"{name}.png"
        rc = edit_main(
            [
                "--checkpoint",
                path,
                "--image",
                str(src),
                "--instruction",
                "make it blue",
                "--mask",
                "4,6,30,20",
                "--out",
                str(out),
                "--steps",
                "2",
                "--seed",
                "1",
                "--size",
                "32",
                "32",
                "--refined-mask-out",
                str(tmp_path / f"{name}_m.png"),
                "--routing-map-out",
                str(tmp_path / f"{name}_r.png"),
            ]
        )
        assert rc == 0
        outs.append(out.read_bytes())
        assert Image.open(tmp_path / f"{name}_m.png").size == (32, 32)
    assert outs[0] == outs[1]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ep4_checkpoint_merges_to_the_same_weights_and_edit(tmp_path):
    """ep_size 4 (one expert of each layer per rank, 4 gloo ranks): the same merge, the same edit."""
    from train.eval import export_checkpoint

    run_dir = str(tmp_path)
    mp.spawn(W.worker, args=(4, _free_port(), run_dir, 4), nprocs=4, join=True)
    expected = {}
    for r in range(4):
        expected.update(load_file(os.path.join(run_dir, f"expected_rank{r}.safetensors")))
    ckpt = os.path.join(run_dir, "ep2", "checkpoints")
    tensors = export_checkpoint(ckpt, os.path.join(run_dir, "w.safetensors"))
    weights = {k: v for k, v in expected.items() if not k.startswith(("ema/", "edit/"))}
    assert set(tensors) == set(weights) and all(torch.equal(tensors[k], v) for k, v in weights.items())
    model, _ = load_for_inference(os.path.join(run_dir, "w.safetensors"))
    res = model.edit(W.test_batch(), num_steps=W.EDIT_STEPS, generator=torch.Generator().manual_seed(W.EDIT_SEED))
    torch.testing.assert_close(res.images, expected["edit/images"], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------ corrupt files
@pytest.mark.multiprocess  # uses the 2-rank checkpoint
def test_truncated_or_corrupt_export_is_refused_naming_the_file(exported, tmp_path):
    data = open(exported["weights"], "rb").read()
    cases = {
        "truncated.safetensors": data[: len(data) // 2],
        "header_cut.safetensors": data[:20],
        "garbage.safetensors": b"\xff" * 64,
        "empty.safetensors": b"",
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(WeightsError, match=name):
            read_export(str(path))
    # a valid safetensors file that is not an export: refused too (no config to build the model from)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(WeightsError, match="not a care-edit export"):
        read_export(str(foreign))


@pytest.mark.multiprocess  # uses the 2-rank checkpoint
def test_truncated_deepspeed_shard_is_refused_naming_the_file(ep2_run, tmp_path, capsys):
    from launch.edit import main as edit_main

    ckpt, _ = ep2_run
    copy = tmp_path / "ckpt"
    shutil.copytree(resolve_checkpoint(ckpt), copy)
    shard = copy / "layer_1_expert_2_mp_rank_00_model_states.pt"
    held = len(torch.load(shard, weights_only=True))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(WeightsError, match="layer_1_expert_2_mp_rank_00_model_states.pt"):
        read_checkpoint_tensors(str(copy))
    rc = edit_main(
        ["--checkpoint", str(copy), "--image", "unused.png", "--instruction", "x", "--out", str(tmp_path / "o.png")]
    )
    assert rc == 2 and "layer_1_expert_2" in capsys.readouterr().err
    shard.unlink()  # a missing expert file: the trainable tensors it held are reported missing
    with pytest.raises(WeightsError, match=f"lacks {held} of .*deepspeed_experts.2"):
        load_for_inference(str(copy))


# ------------------------------------------------------------------------------------------ eval CLI
@pytest.mark.multiprocess  # uses the 2-rank checkpoint
def test_eval_cli_writes_json_and_plot_and_names_skipped_metrics(exported, tmp_path, capsys):
    from data.synthetic import main as synthetic_main
    from launch.eval import main as eval_main
    from tests.helpers.eval_encoders import make_tiny_encoders

    data = tmp_path / "syn"
    synthetic_main(["--out", str(data), "--train", "4", "--val", "6", "--size", "32", "--samples-per-shard", "8"])
    out = tmp_path / "eval"
    clip, _ = make_tiny_encoders(str(tmp_path / "enc"))
    capsys.readouterr()
    rc = eval_main(
        [
            "--checkpoint",
            exported["weights"],
            "--data",
            f"{data}/val-{{000000..000000}}.tar",
            "--out",
            str(out),
            "--steps",
            "1",
            "--limit",
            "5",
            "--batch-size",
            "5",
            "--clip",
            clip,
        ]
    )
    stdout = capsys.readouterr().out
    assert rc == 0
    assert "skipping dino: no --dino path given" in stdout and "skipping clip" not in stdout
    result = json.loads((out / "eval.json").read_text())
    assert result["num_samples"] == 5
    m = result["metrics"]
    assert 0 < m["l1"] < 1 and 0 < m["l2"] < m["l1"] and 0 <= m["mask_iou"] <= 1 and m["flow_mse"] > 0
    assert m["flow_mse_inside"] > 0 and m["flow_mse_outside"] > 0 and 0 <= m["l1_source"] < 1
    assert sum(v["count"] for v in result["per_task"].values()) == 5
    for util in result["utilisation_per_task"].values():
        assert set(util) == {"text", "mask", "reference", "base"}
    assert set(result["skipped_metrics"]) == {"dino"} and "dino" not in m
    assert -1 <= m["clip_i"] <= 1 and -1 <= m["clip_t"] <= 1
    assert (out / "eval.png").stat().st_size > 0
    # no --text-guidance / --image-guidance: the recipe's model.sampling, recorded and printed
    sampling = read_export(exported["weights"])[1].model.sampling
    assert result["guidance"] == {
        "text": sampling.text_guidance,
        "image": sampling.image_guidance,
        "keep_outside_box": sampling.keep_outside_box,
    }
    assert f"sampling: 1 Euler steps, text guidance {sampling.text_guidance}, image" in stdout
    # edit success beside the do-nothing and oracle rows, on the same 5 samples, and their table
    assert result["num_checked"] == 5 and 0 <= m["success"] <= 1 and 0 <= m["success_mean_over_tasks"] <= 1
    assert result["baselines"]["do_nothing"]["metrics"]["success"] == 0.0
    assert result["baselines"]["oracle"]["metrics"]["success"] == 1.0
    assert result["baselines"]["do_nothing"]["metrics"]["l1"] == pytest.approx(m["l1_source"])
    rows = [
        line.split()[0] for line in stdout.splitlines() if line.split()[:1] in (["model"], ["do-nothing"], ["oracle"])
    ]
    assert rows == ["model", "do-nothing", "oracle"]
