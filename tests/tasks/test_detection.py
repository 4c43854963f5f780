"""The Fashion-MNIST detection set and the RetinaNet task: generation, loss, Hessian-vector products, mAP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from hawq import calibrate_, quantize_
from hawq.data.detection_synth import (
    detection_loader,
    load_detection_split,
    make_detection_set,
    make_tiny_detection_set,
)
from hawq.data.fashion_mnist import find_data_dir
from hawq.models.retinanet_tiny import create_detector
from hawq.tasks.detection import (
    dense_loss,
    detection_loss,
    evaluate_map,
    fixed_layers,
    pack_targets,
    train_detector,
    unpack_targets,
)


@pytest.fixture(scope="module")
def tiny_set(fake_fmnist, tmp_path_factory):
    return make_tiny_detection_set(tmp_path_factory.mktemp("det") / "set", fmnist_dir=fake_fmnist)


@pytest.fixture(scope="module", params=["fake", "real"])
def any_set(request, tiny_set, tmp_path_factory):
    """The tiny set from the fake items, and (where installed) from the real Fashion-MNIST items."""
    if request.param == "fake":
        return tiny_set
    try:
        real = find_data_dir()
    except ValueError:
        pytest.skip("Fashion-MNIST is not installed")
    return make_tiny_detection_set(tmp_path_factory.mktemp("real") / "set", fmnist_dir=real)


@pytest.fixture(scope="module")
def tiny_train(tiny_set):
    return load_detection_split(tiny_set, "train")


def small_detector(**kw):
    return create_detector(canvas=64, width=16, **kw)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_set(fake_fmnist, tmp_path, tiny_set):
    again = make_tiny_detection_set(tmp_path / "a", fmnist_dir=fake_fmnist)
    assert _files(again.root) == _files(tiny_set.root)
    other = make_tiny_detection_set(tmp_path / "b", fmnist_dir=fake_fmnist, seed=1)
    assert other.train_json.read_bytes() != tiny_set.train_json.read_bytes()


def test_existing_set_is_reused_and_a_different_one_refused(fake_fmnist, tiny_set):
    before = tiny_set.val_json.stat().st_mtime_ns
    assert make_tiny_detection_set(tiny_set.root, fmnist_dir=fake_fmnist) == tiny_set
    assert tiny_set.val_json.stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="delete it"):
        make_tiny_detection_set(tiny_set.root, fmnist_dir=fake_fmnist, seed=3)


def test_bad_parameters_are_value_errors(fake_fmnist, tmp_path):
    with pytest.raises(ValueError, match="scale"):
        make_detection_set(tmp_path / "s", fake_fmnist, n_train=1, n_val=1, canvas=32, scale=(0.5, 2.0))
    with pytest.raises(ValueError, match="objects"):
        make_detection_set(tmp_path / "s", fake_fmnist, n_train=1, n_val=1, objects=(3, 2))


@pytest.mark.parametrize("split", ["train", "val"])
def test_boxes_are_inside_the_canvas_and_tight(any_set, split):
    coco = json.loads(getattr(any_set, f"{split}_json").read_text())
    assert {c["id"] for c in coco["categories"]} == set(range(1, 11))
    n_boxes = 0
    for im in coco["images"]:
        with Image.open(getattr(any_set, f"{split}_images") / im["file_name"]) as png:
            pixels = np.asarray(png)
        assert pixels.shape == (im["height"], im["width"])
        covered = np.zeros_like(pixels, dtype=bool)
        for a in (a for a in coco["annotations"] if a["image_id"] == im["id"]):
            x, y, w, h = a["bbox"]
            assert 0 <= x and 0 <= y and x + w <= im["width"] and y + h <= im["height"] and w > 0 and h > 0
            crop = pixels[y : y + h, x : x + w]
            for edge in (crop[0], crop[-1], crop[:, 0], crop[:, -1]):  # every side touches ink: tight
                assert edge.any()
            assert not covered[y : y + h, x : x + w].any()  # boxes do not overlap
            covered[y : y + h, x : x + w] = True
            n_boxes += 1
        assert not pixels[~covered].any()  # no ink outside the boxes
    assert n_boxes >= len(coco["images"])  # at least one item per canvas


def test_targets_and_packing_round_trip(tiny_train):
    images, targets = next(iter(detection_loader(tiny_train, 3)))
    assert images.shape == (3, 1, 64, 64) and 0 <= images.min() and images.max() <= 1
    back = unpack_targets(pack_targets(targets))
    for t, b in zip(targets, back):
        torch.testing.assert_close(b["boxes"], t["boxes"])
        assert torch.equal(b["labels"], t["labels"]) and t["labels"].min() >= 1


def test_flip_mirrors_boxes_with_the_image(tiny_train):
    plain = next(iter(detection_loader(tiny_train, 6)))
    flipped = next(iter(detection_loader(tiny_train, 6, flip=True, seed=0)))
    n_flipped = 0
    for im, fim, t, ft in zip(plain[0], flipped[0], plain[1], flipped[1]):
        if torch.equal(im, fim):
            assert torch.equal(t["boxes"], ft["boxes"])
            continue
        n_flipped += 1
        assert torch.equal(im.flip(-1), fim)
        x1, y1, x2, y2 = ft["boxes"].long().unbind(1)
        for i in range(len(x1)):  # the mirrored box is tight around the mirrored item
            crop = fim[0, y1[i] : y2[i], x1[i] : x2[i]]
            assert crop[:, 0].any() and crop[:, -1].any()
    assert 0 < n_flipped < 6


def test_dense_loss_equals_torchvision_training_loss(tiny_train):
    model = small_detector().train()
    images, targets = next(iter(detection_loader(tiny_train, 4)))
    ref = model(list(images), targets)
    ours = detection_loss(model, images, targets)  # train mode: same batch statistics
    torch.testing.assert_close(ours, ref["classification"] + ref["bbox_regression"])
    ours.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "weight" in n and "bn" not in n)


def test_dense_path_runs_the_same_network_as_the_list_path(tiny_train):
    model = small_detector().eval()
    images, _ = next(iter(detection_loader(tiny_train, 2)))
    feats = []
    hook = model.backbone.register_forward_hook(lambda m, i, o: feats.append(o))
    with torch.no_grad():
        detections = model(list(images))
        dense = model(images)
    hook.remove()
    torch.testing.assert_close(feats[0], feats[1])
    assert len(detections) == 2 and dense.shape == (2, len(model.anchors(1)[0]), 11 + 4)


def _hvp_norms(model, images, targets) -> dict[str, float]:
    """|H_ll v_l| summed, for the diagonal Hessian block of each of three layers (one per branch)."""
    model.eval()
    names = ["backbone.convs.2", "head.classification_head.conv.0.0", "head.regression_head.conv.1.0"]
    params = [model.get_submodule(n).weight for n in names]
    grads = torch.autograd.grad(detection_loss(model, images, targets), params, create_graph=True)
    gen = torch.Generator().manual_seed(0)
    out = {}
    for n, g, p in zip(names, grads, params):
        v = torch.randint(0, 2, p.shape, generator=gen).float() * 2 - 1
        (hv,) = torch.autograd.grad(g, p, v, retain_graph=True, allow_unused=True)
        out[n] = 0.0 if hv is None else float(hv.abs().sum())
    return out


def test_hessian_vector_products_reach_every_branch(tiny_train):
    model = small_detector()
    train_detector(model, detection_loader(tiny_train, 6), epochs=2, lr=1e-2, progress=False)
    images, targets = next(iter(detection_loader(tiny_train, 6)))
    norms = _hvp_norms(model, images, targets)
    assert all(v > 0 for v in norms.values()), norms
    # with torchvision's default L1 box loss the regression head's Hessian is exactly zero (why we use smooth L1)
    model.head.regression_head._loss_type = "l1"
    assert _hvp_norms(model, images, targets)["head.regression_head.conv.1.0"] == 0.0


class _Oracle(nn.Module):
    """Returns given detections batch after batch, as a detector in eval mode would."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs, self.i = outputs, 0

    def forward(self, images):
        out = self.outputs[self.i : self.i + len(images)]
        self.i += len(images)
        return out


def test_map_is_one_for_the_ground_truth_and_lower_otherwise(tiny_set, tiny_train):
    loader = detection_loader(tiny_train, 3)
    gt = [{"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"]))}
          for _, ts in loader for t in ts]
    perfect = evaluate_map(_Oracle(gt), loader, tiny_set.train_json)
    assert perfect["map"] == pytest.approx(1.0) and perfect["map50"] == pytest.approx(1.0)
    wrong = [dict(d) for d in gt]
    wrong[0] = {**gt[0], "labels": gt[0]["labels"] % 10 + 1}  # first image: every label wrong
    shifted = [dict(d) for d in gt]
    shifted[1] = {**gt[1], "boxes": gt[1]["boxes"] + torch.tensor([0.0, 0.0, 8.0, 8.0])}  # looser boxes
    for bad in (wrong, shifted):
        assert evaluate_map(_Oracle(bad), loader)["map"] < 1.0
    assert evaluate_map(_Oracle([{k: v[:0] for k, v in d.items()} for d in gt]), loader)["map"] == 0.0


def test_quantize_calibrate_and_layer_roles(tiny_train):
    model = small_detector().eval()
    fixed = fixed_layers(model)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert names[0] in fixed and set(fixed.values()) == {8} and len(fixed) == 3
    quantize_(model, {n: {"w_bits": fixed.get(n, 4), "a_bits": fixed.get(n, 4)} for n in names})
    calibrate_(model, detection_loader(tiny_train, 3), n_batches=1)
    images, targets = next(iter(detection_loader(tiny_train, 3)))
    with torch.no_grad():
        assert torch.isfinite(dense_loss(model, model(images), targets))
        assert len(model(list(images))) == 3


def test_same_seed_same_weights():
    a, b, c = small_detector(seed=1), small_detector(seed=1), small_detector(seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.backbone.convs[0].weight, c.backbone.convs[0].weight)
