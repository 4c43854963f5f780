"""ImageNet ImageFolder loaders and the COCO reader on tiny trees written to a temporary folder."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from hawq.data.coco import (
    CocoDetection,
    coco_loader,
    coco_map,
    detection_collate,
    detections_to_coco,
    write_synthetic_coco,
)
from hawq.data.imagenet import IMAGENET_MEAN, IMAGENET_STD, eval_transform, imagenet_loaders

pytest.importorskip("pycocotools")


def _image_tree(root, classes=("n01", "n02"), per_class=3, size=(40, 30)):
    for split in ("train", "val"):
        for k, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", size, (40 * k + i, 100, 200)).save(d / f"{i}.JPEG")
    return root


def test_imagenet_loaders_shapes_labels_and_transform(tmp_path):
    root = _image_tree(tmp_path)
    train, val = imagenet_loaders(root, image_size=32, batch_size=2, workers=0, seed=0)
    x, y = next(iter(train))
    assert x.shape == (2, 3, 32, 32) and y.dtype == torch.int64
    assert len(val.dataset) == 6 and val.dataset.classes == ["n01", "n02"]
    xs, ys = zip(*val)
    assert torch.cat(ys).tolist() == [0, 0, 0, 1, 1, 1]  # val is not shuffled
    # val: resize the short side to 32*256/224 = 37, centre crop 32, normalise; a flat image stays flat
    im = Image.new("RGB", (40, 30), (40, 100, 200))
    t = eval_transform(32)(im)
    expect = (torch.tensor([40, 100, 200]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(t.mean(dim=(1, 2)), expect, atol=2e-2, rtol=0)
    assert t.shape == (3, 32, 32)


def test_imagenet_same_seed_same_order_and_subset(tmp_path):
    root = _image_tree(tmp_path)
    a, _ = imagenet_loaders(root, image_size=32, batch_size=2, workers=0, seed=3, max_train_images=4)
    b, _ = imagenet_loaders(root, image_size=32, batch_size=2, workers=0, seed=3, max_train_images=4)
    assert len(a.dataset) == 4
    torch.manual_seed(0)
    ya = [y.tolist() for _, y in a]
    torch.manual_seed(0)
    yb = [y.tolist() for _, y in b]
    assert ya == yb


def test_imagenet_missing_tree_says_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="train/ and val/"):
        imagenet_loaders(tmp_path, image_size=32, workers=0)


def test_coco_dataset_boxes_are_xyxy_and_crowd_skipped(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (50, 40)).save(tmp_path / "img" / "a.png")
    ann = {
        "images": [{"id": 7, "file_name": "a.png", "width": 50, "height": 40}],
        "categories": [{"id": 5, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 5, "bbox": [10, 5, 20, 10], "area": 200, "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 2, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 1},
            {"id": 3, "image_id": 7, "category_id": 2, "bbox": [1, 2, 0, 4], "area": 0, "iscrowd": 0},
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    ds = CocoDetection(tmp_path / "img", tmp_path / "ann.json")
    image, target = ds[0]
    assert image.shape == (3, 40, 50) and image.dtype == torch.float32
    assert target["boxes"].tolist() == [[10.0, 5.0, 30.0, 15.0]]
    assert target["labels"].tolist() == [2]  # category 5 is the second of the sorted ids (2, 5)
    assert int(target["image_id"]) == 7
    assert ds.num_classes == 3 and ds.label_to_cat == {1: 2, 2: 5} and ds.class_names == ["dog", "cat"]
    raw = CocoDetection(tmp_path / "img", tmp_path / "ann.json", label_map="category_id")
    assert raw[0][1]["labels"].tolist() == [5] and raw.num_classes == 6 and raw.label_to_cat == {2: 2, 5: 5}
    gray, _ = CocoDetection(tmp_path / "img", tmp_path / "ann.json", mode="L")[0]
    assert gray.shape == (1, 40, 50)


def test_coco_errors_name_the_missing_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        CocoDetection(tmp_path, tmp_path / "nope.json")
    images_dir, ann_file = write_synthetic_coco(tmp_path, n_images=1)
    (images_dir / "000001.png").unlink()
    with pytest.raises(ValueError, match="missing"):
        CocoDetection(images_dir, ann_file)[0]


class _Oracle(torch.nn.Module):
    """Returns the ground truth (perfect detector) or shifted boxes (poor detector)."""

    def __init__(self, ds: CocoDetection, shift: float = 0.0) -> None:
        super().__init__()
        self.ds, self.shift = ds, shift

    def forward(self, images):
        outs = []
        for im in images:
            # identify the image by its pixels: the synthetic images are all different
            i = next(k for k in range(len(self.ds)) if torch.equal(self.ds[k][0], im))
            t = self.ds[i][1]
            n = len(t["labels"])
            outs.append({"boxes": t["boxes"] + self.shift, "scores": torch.ones(n), "labels": t["labels"]})
        return outs


def test_coco_map_perfect_and_shifted_detections(tmp_path):
    images_dir, ann_file = write_synthetic_coco(tmp_path, n_images=4, image_size=64, n_classes=2, seed=1)
    ds = CocoDetection(images_dir, ann_file)
    loader = coco_loader(ds, batch_size=2)
    images, targets = next(iter(loader))
    assert isinstance(images, list) and len(images) == 2 and isinstance(targets[0], dict)
    perfect = coco_map(_Oracle(ds), loader)
    assert perfect["map"] == pytest.approx(1.0) and perfect["map50"] == pytest.approx(1.0)
    assert perfect["n_images"] == 4
    # a 2 px shift keeps every IoU above .5 on these boxes (sides >= 10 px) but fails the strict thresholds
    shifted = coco_map(_Oracle(ds, shift=2.0), loader)
    assert shifted["map50"] == pytest.approx(1.0) and 0.05 < shifted["map"] < 0.5
    assert coco_map(_Nothing(), loader) == {"map": 0.0, "map50": 0.0, "n_images": 4.0}


class _Nothing(torch.nn.Module):
    def forward(self, images):
        none = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0).long()}
        return [none for _ in images]


def test_detections_to_coco_converts_boxes_and_labels():
    out = {"boxes": torch.tensor([[1.0, 2.0, 4.0, 8.0]]), "scores": torch.tensor([0.5]),
           "labels": torch.tensor([1])}
    recs = detections_to_coco([out], [3], {1: 17})
    assert recs == [{"image_id": 3, "category_id": 17, "bbox": [1.0, 2.0, 3.0, 6.0], "score": 0.5}]
    assert detection_collate([(torch.zeros(1), {"a": 1})]) == ([torch.zeros(1)], [{"a": 1}])
