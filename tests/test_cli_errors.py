"""The CLIs' errors as a new user meets them (launch/edit.py, launch/export.py).

Bad input gets one ``error:`` line on stderr naming the argument and the file, exit code 2, no
traceback; what can be converted is converted with a ``note:``/``warning:`` line and the edit runs:

* edit: a missing / non-image / truncated / directory ``--image`` or ``--reference``, a missing or
  malformed ``--mask``, a box wholly outside the image, an empty instruction, ``--steps 0``, an
  output path that cannot be written, a CUDA device on a machine without one;
* edit: grayscale, RGBA (composited onto white), 16-bit (scaled, not clipped to white) images are
  converted to the same RGB pixels as their 8-bit RGB equivalents; a reference of another size is
  resized with a note; a box partly outside the image is clipped to it with a warning;
* export: a file (an export) or a missing dir as ``--checkpoint``, ``--out`` a directory.

The model is the tiny config at 32 px (as tests/helpers/eval_ep_worker.py builds it, ep_size 1, random
trainable weights), written once as an export in-process: nothing is trained.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from launch.edit import build_edit_batch
from launch.edit import main as edit_main
from launch.export import main as export_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W_, H_ = 48, 40  # the input images' size (not square, not the model's 32 px)


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> str:
    """The tiny model (32 px) as an export file, built in-process (no training, no extra ranks)."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from tests.helpers import eval_ep_worker as W
    from train.config import load_config
    from train.eval import EXPORT_FORMAT, EXPORT_VERSION, build_inference_model

    root = tmp_path_factory.mktemp("cli_export")
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), W.overrides(str(root), ep_size=1))
    model = build_inference_model(cfg)
    path = str(root / "tiny.safetensors")
    save_file(
        {n: p.detach().contiguous() for n, p in model.trainable_named_parameters()},
        path,
        metadata={
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "ema": "false",
            "source": "test",
            "config": OmegaConf.to_yaml(cfg, resolve=True),
        },
    )
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, str]:
    """The same picture as RGB, grayscale, RGBA, 16-bit; a smaller reference; junk files."""
    d = tmp_path_factory.mktemp("cli_images")
    rng = np.random.default_rng(0)
    rgb = (rng.random((H_, W_, 3)) * 255).astype(np.uint8)
    gray = rgb[..., 0]
    alpha = np.full((H_, W_), 255, np.uint8)
    alpha[:, : W_ // 2] = 0  # left half fully transparent
    files = {
        "rgb": Image.fromarray(rgb),
        "gray": Image.fromarray(gray),
        "gray_rgb": Image.fromarray(gray).convert("RGB"),
        "rgba": Image.fromarray(np.dstack([rgb, alpha])),
        "gray16": Image.fromarray(gray.astype(np.uint16) * 257),  # mode I;16, same picture at 16 bits
        "ref_small": Image.fromarray(rgb[:20, :30]),
        "mask_small": Image.fromarray((np.arange(24)[None, :].repeat(20, 0) >= 12).astype(np.uint8) * 255),
    }
    paths = {}
    for name, img in files.items():
        paths[name] = str(d / f"{name}.png")
        img.save(paths[name])
    assert Image.open(paths["gray16"]).mode == "I;16"
    paths["text"] = str(d / "notes.png")
    with open(paths["text"], "w") as f:
        f.write("not a png")
    paths["truncated"] = str(d / "truncated.png")
    with open(paths["rgb"], "rb") as f, open(paths["truncated"], "wb") as g:
        g.write(f.read()[:200])
    paths["dir"] = str(d)
    return paths


def _edit(export: str, out_dir, *args: str) -> list[str]:
    return ["--checkpoint", export, "--out", str(out_dir / "o.png"), "--steps", "1", *args]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err  # one line, no traceback
    return lines[0]


# ------------------------------------------------------------------------------------------ edit: refused
@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing image", "--image {missing}: no such file"),
        ("directory image", "--image {dir}: is a directory"),
        ("text file image", "--image {text}: not an image file"),
        ("truncated image", "--image {truncated}: unreadable image"),
        ("missing reference", "--reference {missing}: no such file"),
        ("text file reference", "--reference {text}: not an image file"),
        ("missing mask file", "--mask {missing}: no such file, and not a box"),
        ("mask not numbers", "--mask a,b,c,d: a box is four numbers"),
        ("mask reversed", "--mask 30,8,10,32: need x1 > x0 and y1 > y0"),
        ("mask outside", "--mask 100,8,300,32: the box lies wholly outside the 48x40 image"),
        ("mask below", "--mask 0,40,10,50: the box lies wholly outside the 48x40 image"),
        ("empty instruction", "--instruction is empty"),
        ("blank instruction", "--instruction is empty"),
        ("zero steps", "--steps 0: need at least 1"),
        ("out without extension", "--out {tmp}/o: unknown image extension"),
        ("out under a file", "--out {rgb}/o.png: {rgb} is a file, not a directory"),
        ("size zero", "--size 0 0: must be positive"),
    ],
)
def test_edit_refuses_bad_input_with_one_line_and_exit_code_2(export, images, tmp_path, capsys, case, expected):
    missing = str(tmp_path / "missing.png")
    args = {
        "missing image": ["--image", missing, "--instruction", "x"],
        "directory image": ["--image", images["dir"], "--instruction", "x"],
        "text file image": ["--image", images["text"], "--instruction", "x"],
        "truncated image": ["--image", images["truncated"], "--instruction", "x"],
        "missing reference": ["--image", images["rgb"], "--instruction", "x", "--reference", missing],
        "text file reference": ["--image", images["rgb"], "--instruction", "x", "--reference", images["text"]],
        "missing mask file": ["--image", images["rgb"], "--instruction", "x", "--mask", missing],
        "mask not numbers": ["--image", images["rgb"], "--instruction", "x", "--mask", "a,b,c,d"],
        "mask reversed": ["--image", images["rgb"], "--instruction", "x", "--mask", "30,8,10,32"],
        "mask outside": ["--image", images["rgb"], "--instruction", "x", "--mask", "100,8,300,32"],
        "mask below": ["--image", images["rgb"], "--instruction", "x", "--mask", "0,40,10,50"],
        "empty instruction": ["--image", images["rgb"], "--instruction", ""],
        "blank instruction": ["--image", images["rgb"], "--instruction", "  \t "],
        "zero steps": ["--image", images["rgb"], "--instruction", "x", "--steps", "0"],
        "out without extension": ["--image", images["rgb"], "--instruction", "x", "--out", str(tmp_path / "o")],
        "out under a file": ["--image", images["rgb"], "--instruction", "x", "--out", images["rgb"] + "/o.png"],
        "size zero": ["--image", images["rgb"], "--instruction", "x", "--size", "0", "0"],
    }[case]
    assert edit_main(_edit(export, tmp_path, *args)) == 2
    line = _error_line(capsys)
    assert expected.format(missing=missing, tmp=tmp_path, **images) in line, line
    assert not (tmp_path / "o.png").exists()


def test_edit_refuses_cuda_without_cuda(export, images, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc = edit_main(_edit(export, tmp_path, "--image", images["rgb"], "--instruction", "x", "--device", "cuda"))
    assert rc == 2 and "--device cuda: CUDA is not available" in _error_line(capsys)


def test_cli_missing_image_as_a_new_user_runs_it(export, tmp_path):
    """The real command line (a subprocess): one line naming the file, exit code 2, no traceback."""
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "launch", "edit.py"),
            "--checkpoint",
            export,
            "--image",
            "missing.png",
            "--instruction",
            "make it blue",
            "--out",
            "out.png",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --image missing.png: no such file"], proc.stderr
    assert not (tmp_path / "out.png").exists()


# ------------------------------------------------------------------------------------------ edit: converted
def test_grayscale_rgba_and_16bit_inputs_become_the_rgb_they_show(images, capsys):
    def source(name: str) -> torch.Tensor:
        return build_edit_batch(images[name], "x", (32, 32)).source

    assert capsys.readouterr().err == ""
    plain = source("rgb")
    assert capsys.readouterr().err == ""  # an RGB input needs no note
    # grayscale: the same pixels as its RGB copy (three equal channels)
    assert torch.equal(source("gray"), source("gray_rgb"))
    assert "--image {}: grayscale image; converted to RGB".format(images["gray"]) in capsys.readouterr().err
    # 16-bit: scaled to 8 bits, the same picture as the 8-bit grayscale (PIL alone would clip it to white)
    sixteen = source("gray16")
    assert torch.equal(sixteen, source("gray_rgb"))
    assert "16-bit grayscale image, scaled to 8 bits" in capsys.readouterr().err
    # RGBA: opaque half unchanged, transparent half white (not the hidden RGB under alpha 0)
    rgba = build_edit_batch(images["rgba"], "x", (H_, W_)).source
    rgb = build_edit_batch(images["rgb"], "x", (H_, W_)).source
    assert torch.equal(rgba[..., W_ // 2 :], rgb[..., W_ // 2 :])
    assert torch.equal(rgba[..., : W_ // 2], torch.ones_like(rgba[..., : W_ // 2]))
    assert "RGBA image with transparency, composited onto white; converted to RGB" in capsys.readouterr().err
    assert not torch.equal(plain, sixteen)


def test_reference_of_another_size_is_resized_with_a_note(images, capsys):
    capsys.readouterr()
    batch = build_edit_batch(images["rgb"], "x", (32, 32), reference=images["ref_small"])
    assert batch.reference.shape == (1, 3, 32, 32) and batch.has_reference.tolist() == [True]
    expected = np.asarray(Image.open(images["ref_small"]).resize((32, 32), Image.BICUBIC), dtype=np.float32)
    assert torch.equal(batch.reference[0], torch.from_numpy(expected / 127.5 - 1).permute(2, 0, 1))
    err = capsys.readouterr().err
    assert f"note: --reference {images['ref_small']}: 30x20, the image 48x40: resized to 32x32" in err
    build_edit_batch(images["rgb"], "x", (32, 32), reference=images["rgb"])  # same size: no note
    assert capsys.readouterr().err == ""


def test_box_partly_outside_is_clipped_with_a_warning(images, capsys):
    capsys.readouterr()
    clipped = build_edit_batch(images["rgb"], "x", (H_, W_), mask="8,8,300,32")
    err = capsys.readouterr().err
    assert "warning: --mask 8,8,300,32: the box extends past the 48x40 image; clipped to 8,8,48,32" in err
    inside = build_edit_batch(images["rgb"], "x", (H_, W_), mask="8,8,48,32")
    assert capsys.readouterr().err == ""  # a box inside the image: no warning
    assert torch.equal(clipped.fine_mask, inside.fine_mask) and clipped.bbox.tolist() == [[8, 8, 48, 32]]
    negative = build_edit_batch(images["rgb"], "x", (H_, W_), mask="-5,-3,10,10")
    assert "clipped to 0,0,10,10" in capsys.readouterr().err and negative.bbox.tolist() == [[0, 0, 10, 10]]


def test_edit_runs_on_converted_inputs_and_says_so(export, images, tmp_path, capsys):
    """End to end: a 16-bit image, a reference and a mask PNG of other sizes; then a clipped box."""
    capsys.readouterr()
    out = tmp_path / "sub" / "edit.png"
    rc = edit_main(
        [
            "--checkpoint",
            export,
            "--image",
            images["gray16"],
            "--reference",
            images["ref_small"],
            "--mask",
            images["mask_small"],
            "--instruction",
            "make it blue",
            "--out",
            str(out),
            "--steps",
            "1",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert Image.open(out).size == (32, 32) and Image.open(out).mode == "RGB"
    notes = [line for line in captured.err.splitlines() if line.startswith("note: ")]
    assert len(notes) == 3, captured.err
    assert "16-bit grayscale" in notes[0] and "--mask" in notes[1] and "--reference" in notes[2]
    assert "error" not in captured.err and f"wrote {out}" in captured.out
    rc = edit_main(
        [
            "--checkpoint",
            export,
            "--image",
            images["rgb"],
            "--mask",
            "8,8,300,32",
            "--instruction",
            "x",
            "--out",
            str(out),
            "--steps",
            "1",
        ]
    )
    assert rc == 0 and "clipped to 8,8,48,32" in capsys.readouterr().err


def test_edit_keep_outside_box_returns_the_input_outside_the_box(export, tmp_path):
    """``--keep-outside-box``: with configs/tiny.yaml's lossless codec the edit outside the box is the input,
    to 8-bit rounding; without it the model redraws the whole image."""
    rgb = (np.random.default_rng(1).random((32, 32, 3)) * 255).astype(np.uint8)  # the model's size: no resizing
    src = tmp_path / "in32.png"
    Image.fromarray(rgb).save(src)
    outside = np.ones((32, 32), bool)
    outside[8:20, 4:24] = False  # the box below, on the codec's 4-pixel grid
    worst = {}
    for keep in (True, False):
        out = tmp_path / f"keep_{keep}.png"
        args = ["--checkpoint", export, "--image", str(src), "--mask", "4,8,24,20", "--instruction", "make it blue"]
        args += ["--out", str(out), "--steps", "2", "--keep-outside-box" if keep else "--no-keep-outside-box"]
        assert edit_main(args) == 0
        worst[keep] = np.abs(np.asarray(Image.open(out)).astype(int) - rgb)[outside].max()
    assert worst[True] <= 1 and worst[False] > 8, worst


# ------------------------------------------------------------------------------------------ export
def test_export_refuses_bad_paths_with_one_line_and_exit_code_2(export, tmp_path, capsys):
    capsys.readouterr()
    assert export_main(["--checkpoint", export, "--out", str(tmp_path / "w.safetensors")]) == 2
    assert f"--checkpoint {export}: is a file" in _error_line(capsys)
    missing = str(tmp_path / "no_run")
    assert export_main(["--checkpoint", missing, "--out", str(tmp_path / "w.safetensors")]) == 2
    assert f"{missing}: no such checkpoint directory" in _error_line(capsys)
    assert export_main(["--checkpoint", missing, "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path}: is a directory" in _error_line(capsys)
    assert not (tmp_path / "w.safetensors").exists()
