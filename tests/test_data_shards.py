"""Schema, config, shard writing (build_shards, convert_magicbrush) and the synthetic set."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from data.build_shards import main as build_main
from data.config import DataConfig
from data.convert_magicbrush import convert
from data.schema import TAG_TO_ID, TAG_VOCAB, UNK_ID, SampleError, bbox_from_mask, tags_to_ids
from data.synthetic import EDIT_KINDS, make_sample, write_synthetic


def _members(pattern_or_path):
    out = {}
    import glob

    for p in sorted(glob.glob(pattern_or_path)):
        with tarfile.open(p) as tf:
            for m in tf.getmembers():
                key, suffix = m.name.split(".", 1)
                out.setdefault(key, {})[suffix] = tf.extractfile(m).read()
    return out


def test_tags_map_to_ids_with_unk_not_dropped():
    ids = tags_to_ids({"scope": "local", "type": "teleport", "preservation": ["background", "vibe"], "mood": "x"})
    assert ids == [TAG_TO_ID["scope:local"], UNK_ID, TAG_TO_ID["preservation:background"], UNK_ID, UNK_ID]
    assert TAG_VOCAB[UNK_ID] == "<unk>" and len(set(TAG_VOCAB)) == len(TAG_VOCAB)


def test_bbox_is_end_exclusive_and_empty_mask_refused():
    m = np.zeros((10, 12), np.uint8)
    m[2:5, 3:9] = 255
    assert bbox_from_mask(m) == [3, 2, 9, 5]
    with pytest.raises(SampleError) as e:
        bbox_from_mask(np.zeros((4, 4)))
    assert e.value.reason == "empty_mask"


@pytest.mark.parametrize(
    "key,value",
    [
        ("image_size", 100),
        ("buckets", [[64]]),
        ("shuffle_buffer", 0),
        ("max_bad_fraction", 1.5),
        ("random_crop_scale", 0.0),
        ("num_workers", -1),
    ],
)
def test_config_validate_names_the_key(key, value):
    with pytest.raises(ValueError, match=f"data.{key}"):
        DataConfig(**{key: value}).validate()


def test_config_is_an_omegaconf_structured_config():
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), {"buckets": [[256, 384]], "seed": 3})
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, DataConfig) and obj.buckets == [[256, 384]] and obj.validate() is obj


def _png(path, arr):
    Image.fromarray(arr).save(path)


def test_build_shards_checks_every_sample_and_reports(tmp_path, capsys):
    root = tmp_path / "raw"
    root.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(9):
        src = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
        mask = np.zeros((20, 24), np.uint8)
        mask[3 + i % 5 : 9, 4 : 10 + i] = 255
        _png(root / f"{i}_s.png", src)
        _png(root / f"{i}_t.png", 255 - src)
        _png(root / f"{i}_m.png", mask)
        lines.append(
            dict(
                src=f"{i}_s.png",
                tgt=f"{i}_t.png",
                mask=f"{i}_m.png",
                instruction=f"edit {i}",
                task="recolor",
                tags={"scope": "local", "type": "recolor"},
                source="omniedit",
                key=f"k{i}",
            )
        )
    _png(root / "1_m.png", np.full((20, 24), 7, np.uint8))  # non-binary
    _png(root / "2_t.png", np.zeros((21, 24, 3), np.uint8))  # size mismatch
    lines[3]["instruction"] = ""
    lines[4]["mask"] = "nope.png"
    lines[5]["task"] = "teleport"
    (root / "6_s.png").write_bytes(b"not a png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(ln) for ln in lines) + "\n")
    out = tmp_path / "shards"
    build_main(["--manifest", str(manifest), "--root", str(root), "--out", str(out), "--shard-size-mb", "0.001"])
    printed = capsys.readouterr().out
    report = json.loads((out / "edit.report.json").read_text())
    assert report["written"] == 3 and len(report["shards"]) == 3  # tiny shard size: one sample each
    assert report["skipped"] == {
        "mask_not_binary": 1,
        "size_mismatch": 1,
        "empty_instruction": 1,
        "missing_file": 1,
        "unknown_task": 1,
        "decode_error": 1,
    }
    assert "edit-{000000..000002}.tar" in printed
    members = _members(str(out / "edit-*.tar"))
    assert sorted(members) == ["k0", "k7", "k8"]
    meta = json.loads(members["k7"]["json"])
    assert meta["bbox"] == [4, 5, 17, 9] and (meta["width"], meta["height"]) == (24, 20)
    # a process pool gives the same shards and report
    build_main(["--manifest", str(manifest), "--root", str(root), "--out", str(tmp_path / "p"), "--workers", "2"])
    assert json.loads((tmp_path / "p" / "edit.report.json").read_text())["skipped"] == report["skipped"]
    assert sorted(_members(str(tmp_path / "p" / "edit-*.tar"))) == ["k0", "k7", "k8"]


def test_convert_magicbrush_fake_tree(tmp_path):
    split = tmp_path / "mb" / "train"
    rng = np.random.default_rng(1)
    sessions = {}
    for img_id, turns in (("101", 2), ("202", 1)):
        d = split / "images" / img_id
        d.mkdir(parents=True)
        _png(d / f"{img_id}-input.png", rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
        sessions[img_id] = []
        for t in range(1, turns + 1):
            _png(d / f"{img_id}-output{t}.png", rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
            inp = f"{img_id}-input.png" if t == 1 else f"{img_id}-output{t - 1}.png"
            sessions[img_id].append(
                {
                    "input": inp,
                    "mask": f"{img_id}-mask{t}.png",
                    "output": f"{img_id}-output{t}.png",
                    "instruction": f"turn {t}",
                }
            )
    # 101 turn 1: RGBA, white region with a soft edge, and a transparent white patch (= background)
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[2:6, 2:8, :3] = 255
    rgba[6, 2:8, :3] = 140  # soft edge above threshold
    rgba[7, 2:8, :3] = 100  # soft edge below threshold
    rgba[10:14, 10:14] = (255, 255, 255, 0)
    Image.fromarray(rgba, "RGBA").save(split / "images" / "101" / "101-mask1.png")
    m2 = np.zeros((16, 16), np.uint8)
    m2[8:12, 1:3] = 255
    _png(split / "images" / "101" / "101-mask2.png", m2)
    # 202 has no mask file: reported, not fatal
    (split / "edit_sessions.json").write_text(json.dumps(sessions))
    reps = convert(str(tmp_path / "mb"), str(tmp_path / "out"), progress=False)
    assert reps["train"].written == 2 and dict(reps["train"].skipped) == {"missing_file": 1}
    members = _members(str(tmp_path / "out" / "magicbrush-train-*.tar"))
    m = np.asarray(Image.open(io.BytesIO(members["mb-101-1"]["mask.png"])))
    assert json.loads(members["mb-101-1"]["json"])["bbox"] == [2, 2, 8, 7]
    assert set(np.unique(m)) == {0, 255} and m[10:14, 10:14].max() == 0
    assert json.loads(members["mb-101-2"]["json"])["instruction"] == "turn 2"


def test_synthetic_is_deterministic_varied_and_split(tmp_path):
    a, b = make_sample(3, "train", 17), make_sample(3, "train", 17)
    assert a.key == b.key and np.array_equal(np.asarray(a.tgt), np.asarray(b.tgt)) and np.array_equal(a.mask, b.mask)
    samples = [make_sample(0, "train", i, 64) for i in range(60)]
    assert {s.task for s in samples} == set(EDIT_KINDS)
    for s in samples:
        src, tgt, inside = np.asarray(s.src, np.int16), np.asarray(s.tgt, np.int16), s.mask > 0
        assert (s.ref is not None) == (s.task == "replace")
        assert np.abs(src - tgt)[~inside].max(initial=0) == 0  # nothing changes outside the fine mask
        assert np.abs(src - tgt)[inside].mean() > 5  # and something changes inside
        if s.task == "style":
            assert inside.all()
    val = [make_sample(0, "val", i, 64) for i in range(60)]
    assert not {s.key for s in samples} & {s.key for s in val}
    assert not any(np.array_equal(np.asarray(x.src), np.asarray(y.src)) for x, y in zip(samples, val))


def test_synthetic_cli_writes_shards_and_if_absent_returns_quickly(tmp_path):
    pats = write_synthetic(str(tmp_path), train=30, val=10, test=0, size=32, samples_per_shard=12, progress=False)
    assert pats["train"].endswith("train-{000000..000002}.tar") and pats["val"].endswith("val-{000000..000000}.tar")
    t = time.time()
    cmd = [
        sys.executable,
        "-m",
        "data.synthetic",
        "--out",
        str(tmp_path),
        "--train",
        "30",
        "--val",
        "10",
        "--test",
        "0",
        "--size",
        "32",
        "--samples-per-shard",
        "12",
        "--if-absent",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert "train-{000000..000002}.tar" in out and time.time() - t < 20
    assert len(_members(str(tmp_path / "train-*.tar"))) == 30


def test_data_layer_never_imports_model_or_trainer():
    import ast
    import pathlib

    for path in pathlib.Path(__file__).resolve().parents[1].joinpath("data").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            )
            for name in names:
                assert name.split(".")[0] not in ("moe", "train", "launch"), f"{path.name} imports {name}"
