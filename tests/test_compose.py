"""The compositional set and its per-region checker: samples are a pure function of (seed, split, index) on
streams apart from each other and from the single-edit set; every sample has two separated regions whose
conditions conflict; the loader draws one box per region and labels them; per region, the oracle passes and
do-nothing, the paint bucket, noise and copy-the-reference fail; a leak of one region's condition into the
other fails that region only and is measured as cross-bleed; the band around the boxes is measured.

Samples are validation samples written at 128 px and resized by the loader's own transform, as the
evaluation sees them.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np
import pytest
import torch

from data import augment
from data.compose import box_gap, separation_px
from data.schema import SampleError, check_regions, region_boxes
from data.synthetic import SPLITS, make_sample, write_synthetic
from data.world import COLORS
from train.eval.compose import (
    BLEEDS,
    COMPOSE_BASELINES,
    REGION_METRICS,
    compose_baselines,
    compose_results,
    counterfactuals,
    region_box_masks,
)
from train.eval.edit_success import edit_criteria, first_failure

N = 40  # 5% is two samples


def _compose(split: str, i: int, size: int = 128):
    return make_sample(0, split, i, size, "v2", "compose")


def _digest(rec) -> str:
    h = hashlib.sha256()
    for im in (rec.src, rec.tgt, rec.ref):
        h.update(np.asarray(im).tobytes())
    return h.hexdigest() + rec.instruction


def test_splits_are_pure_functions_on_streams_apart_from_each_other_and_the_single_edits():
    assert [_digest(_compose("val", i)) for i in (0, 7)] == [_digest(_compose("val", i)) for i in (0, 7)]
    assert _digest(_compose("val", 3)) != _digest(make_sample(1, "val", 3, 128, "v2", "compose"))
    pictures = {}
    for split in SPLITS:
        recs = [_compose(split, i, 64) for i in range(30)]
        assert all(r.key.startswith(f"cmp0-{split}-") for r in recs)
        pictures[split] = {hashlib.sha256(np.asarray(r.src).tobytes()).hexdigest() for r in recs}
        assert len(pictures[split]) == 30
    single = {hashlib.sha256(np.asarray(make_sample(0, "val", i, 64).src).tobytes()).hexdigest() for i in range(30)}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not pictures[a] & pictures[b], (a, b)
    assert not pictures["val"] & single


def test_every_sample_has_two_separated_regions_whose_conditions_conflict():
    orders = set()
    for i in range(N):
        rec = _compose("val", i)
        check = rec.extra["check"]
        text, ref = (r["check"] for r in check["regions"])
        boxes = region_boxes(rec.extra)
        assert [r["role"] for r in rec.extra["regions"]] == ["text", "reference"]
        assert box_gap(*boxes) >= separation_px(128)
        check_regions(boxes, rec.mask)  # disjoint, each holds part of the fine mask, together all of it
        assert f"make the {text['old_color']} {text['old_finish']} {text['shape']} {text['color']}" in rec.instruction
        assert (
            f"replace the {ref['old_color']} {ref['old_finish']} {ref['old_shape']} with the object" in rec.instruction
        )
        # the conflict: the reference's colour is none the text names or the objects had; another finish
        assert ref["color"] not in (text["color"], text["old_color"], ref["old_color"])
        assert ref["finish"] != text["finish"] and ref["shape"] != ref["old_shape"]
        src, tgt = np.asarray(rec.src).astype(int), np.asarray(rec.tgt).astype(int)
        assert (src[rec.mask == 0] == tgt[rec.mask == 0]).all()  # nothing changes outside the two regions
        ref_img = np.asarray(rec.ref)
        assert (ref_img < 230).any(axis=-1).mean() > 0.05 and tuple(ref_img[2, 2]) == (255,) * 3  # an object on white
        orders.add(check["order"])
        assert rec.instruction.startswith("make" if check["order"] == "text_first" else "replace")
    assert orders == {"text_first", "reference_first"}


def test_malformed_regions_are_refused():
    rec = _compose("val", 0)
    boxes = region_boxes(rec.extra)
    with pytest.raises(SampleError, match="bad_regions"):
        region_boxes({"regions": list(reversed(rec.extra["regions"]))})  # roles out of order
    with pytest.raises(SampleError, match="overlap"):
        check_regions([boxes[0], boxes[0]], rec.mask)
    with pytest.raises(SampleError, match="outside every region box"):
        check_regions([boxes[0], [*boxes[1][:2], boxes[1][2] - 1, boxes[1][3]]], rec.mask)
    with pytest.raises(SampleError, match="holds no edit pixel"):
        check_regions([boxes[0], [0, 0, 1, 1]], rec.mask)  # objects never reach the image's corner


def _samples(size: int, n: int = N) -> dict:
    """Batched unit-range tensors of ``n`` compositional samples at ``size`` px, as the evaluation loads them,
    with the checker's verdict (compose_results) on every editor that needs no model and on each leak."""
    out = defaultdict(list)
    for i in range(n):
        rec = _compose("val", i)
        d = augment.transform(rec.src, rec.tgt, rec.ref, rec.mask, (size, size), None, regions=region_boxes(rec.extra))
        for k in ("source", "target", "reference"):
            out[k].append(augment.to_float(d[k]).add(1).div(2))
        out["fine"].append(d["fine_mask"])
        out["coarse"].append(d["coarse_mask"])
        out["labels"].append(d["region_labels"])
        out["checks"].append(rec.extra["check"])
    s = {k: (v if k == "checks" else torch.stack(v)) for k, v in out.items()}
    renders = [counterfactuals(c, size) for c in s["checks"]]
    has_ref = torch.ones(n, dtype=torch.bool)
    edits = compose_baselines(s["source"], s["target"], s["reference"], has_ref, s["fine"], s["checks"])
    edits |= {kind: torch.stack([r[kind] for r in renders]) for kind in BLEEDS}
    s["edits"] = edits
    s["judged"] = {
        k: compose_results(e, s["source"], s["target"], s["fine"], s["checks"], renders) for k, e in edits.items()
    }
    return s


@pytest.fixture(scope="module", params=[64, pytest.param(128, marks=pytest.mark.slow)])  # 128 px: the slow suite
def samples(request):
    return _samples(request.param)


def test_the_loader_draws_one_box_per_region_and_the_checker_the_same(samples):
    s = samples
    torch.testing.assert_close(region_box_masks(s["fine"], s["checks"]), s["coarse"], rtol=0, atol=0)
    for i in range(N):
        labels, fine = s["labels"][i, 0], s["fine"][i, 0] > 0
        assert set(labels.unique().tolist()) == {0, 1, 2}
        assert torch.equal(labels > 0, s["coarse"][i, 0] > 0)
        for lab in (1, 2):  # each label is one box, the box around its region's part of the fine mask
            ys, xs = torch.nonzero(labels == lab, as_tuple=True)
            box = torch.zeros_like(fine)
            box[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
            assert torch.equal(box, labels == lab)
            part = fine & box
            assert part[ys.min()].any() and part[ys.max()].any() and part[:, xs.min()].any() and part[:, xs.max()].any()
        assert not (fine & (labels == 0)).any()


def test_the_loader_batches_region_labels_and_flips_them_with_the_images(tmp_path):
    from data.config import DataConfig
    from data.loader import EditLoader
    from data.shards import expand_shards

    out = write_synthetic(str(tmp_path / "c"), train=12, val=0, test=0, size=64, progress=False, edits="compose")
    single = write_synthetic(str(tmp_path / "s"), train=4, val=0, test=0, size=64, progress=False)
    flat = DataConfig(image_size=64, shuffle_buffer=1, num_workers=0)
    flip = DataConfig(image_size=64, shuffle_buffer=1, num_workers=0, random_crop_scale=1.0, hflip=True, seed=3)
    evald = next(iter(EditLoader(flat, expand_shards(out["train"]), 12, 0, 1, exact=True)))
    trained = next(iter(EditLoader(flip, expand_shards(out["train"]), 12, 0, 1)))
    assert evald.region_labels.shape == (12, 1, 64, 64) and evald.region_labels.dtype == torch.long
    assert torch.equal(evald.region_labels > 0, evald.coarse_mask > 0)
    flipped = 0
    by_key = {k: i for i, k in enumerate(evald.keys)}
    for i, key in enumerate(trained.keys):
        j = by_key[key]
        same = torch.equal(trained.source[i], evald.source[j])
        mirrored = torch.equal(trained.source[i], evald.source[j].flip(-1))
        assert same or mirrored
        expect = evald.region_labels[j] if same else evald.region_labels[j].flip(-1)
        assert torch.equal(trained.region_labels[i], expect)
        flipped += mirrored and not same
    assert flipped > 0
    plain = next(iter(EditLoader(flat, expand_shards(single["train"]), 4, 0, 1, exact=True)))
    assert plain.region_labels is None  # single edits carry none


def _rates(s: dict, edit: str) -> dict[str, float]:
    return {k: float(v.nanmean()) for k, v in s["judged"][edit].items() if "/" not in k}


def test_per_region_the_oracle_passes_and_every_editor_without_a_model_fails(samples):
    s = samples
    rates = {name: _rates(s, name) for name in COMPOSE_BASELINES}
    assert rates["oracle"]["success_text"] == rates["oracle"]["success_reference"] == 1.0
    assert rates["do_nothing"]["success_text"] == rates["do_nothing"]["success_reference"] == 0.0
    for name in ("paint_bucket", "noise", "copy_reference"):
        assert max(rates[name]["success_text"], rates[name]["success_reference"]) <= 0.05, (name, rates[name])
    for name in ("oracle", "do_nothing"):  # neither paints one region's condition into the other
        assert all(rates[name][f"bleed_{k}"] == 0.0 for k in BLEEDS), (name, rates[name])
    assert rates["oracle"]["band_error"] == 0.0 and rates["do_nothing"]["band_error"] > 0.05


def test_a_leak_fails_its_region_only_and_is_measured_as_bleed(samples):
    s = samples
    for kind in BLEEDS:
        role = kind.rsplit("_", 1)[1]
        other = "reference" if role == "text" else "text"
        rates = _rates(s, kind)
        assert rates[f"bleed_{kind}"] >= 0.95 and rates[f"bleed_into_{role}"] >= 0.95, (kind, rates)
        assert rates[f"bleed_into_{other}"] == 0.0, (kind, rates)
        assert rates[f"success_{role}"] <= 0.05 and rates[f"success_{other}"] >= 0.95, (kind, rates)
        assert rates["success"] <= 0.05


def test_edit_criteria_judges_a_compositional_sample_by_both_regions(samples):
    n = 12  # the checker itself is tested above; this is how the evaluation reaches it
    s = {k: v[:n] for k, v in samples.items() if k in ("source", "target", "fine", "checks")}
    s["leak"] = samples["edits"]["colour_into_text"][:n]
    tasks = ["compose"] * n
    judge = lambda e: edit_criteria(e, s["source"], s["target"], s["fine"], tasks, s["checks"])  # noqa: E731
    right = judge(s["target"])
    assert right["success"].tolist() == right["outside"].tolist() == [1.0] * n
    nothing = judge(s["source"])
    assert nothing["success"].tolist() == [0.0] * n and first_failure(nothing, 0) == "shape"
    leaked = judge(s["leak"])
    assert leaked["success"].tolist() == [0.0] * n and leaked["outside"].tolist() == [1.0] * n
    assert leaked["colour"].mean() <= 0.1
    # the per-region numbers reach the evaluation as the checker gives them, and only with compositional samples
    want = compose_results(s["leak"], s["source"], s["target"], s["fine"], s["checks"])
    for key in REGION_METRICS:
        assert torch.equal(leaked[key].nan_to_num(-1), want[key].nan_to_num(-1)), key
    assert leaked["success_text"].tolist() == [0.0] * n and leaked["success_reference"].tolist() == [1.0] * n
    single = edit_criteria(s["target"][:1], s["source"][:1], s["target"][:1], s["fine"][:1], ["recolor"], [None])
    assert not set(REGION_METRICS) & set(single)


def test_named_colours_stay_apart_from_the_matching_threshold():
    """Cross-bleed tells colours apart by the checker's MATCH: each palette colour is farther than it from
    every other (their dark and light tones may not be; the checker leaves pixels matching the source out)."""
    from train.eval.edit_success import MATCH

    rgb = {k: np.asarray(v) / 255 for k, v in COLORS.items()}
    assert min(np.linalg.norm(rgb[a] - rgb[b]) for a in rgb for b in rgb if a != b) >= 2 * MATCH - 1e-6
