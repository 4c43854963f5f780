"""Each paper model runs the whole pipeline (`hawq run`) on a tiny ImageFolder tree or COCO set."""

import json

import numpy as np
import pytest
from PIL import Image

from hawq.cli import main


def image_tree(root, classes=("n01", "n02", "n03"), per_class=4, size=(48, 40), seed=0):
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                img = rng.integers(0, 80, size=(size[1], size[0], 3), dtype=np.uint8)
                img[:, :, c] += 150  # class = dominant colour
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


@pytest.mark.parametrize("model, size", [("resnet50", 32), ("inception_v3", 75), ("sqnxt23_w1", 32)])
def test_paper_classifier_runs_every_stage(model, size, tmp_path):
    tree = image_tree(tmp_path / "imagenet")
    out = tmp_path / "run"
    args = ["run", "--quiet", "--dataset", "imagenet", "--data-dir", str(tree), "--model", model, "--image-size",
            str(size), "--epochs", "3", "--batch-size", "4", "--lr", "0.01", "--ft-images", "8", "--baselines", "4",
            "--trace-max-images", "8", "--out", str(out)]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert {"fp32", "hawq", "uniform4"} <= set(res["models"])
    plan = json.loads((out / "plan.json").read_text())
    assert plan["size_bytes"] <= plan["budget_bytes"]
    traces = json.loads((out / "traces.json").read_text())
    assert len(traces["layers"]) == len(plan["layers"]) > 20
    assert (out / "report.md").exists()


def test_recipe_sets_defaults_and_records_the_paper(tmp_path):
    tree = image_tree(tmp_path / "imagenet")
    recipe = json.loads(open("configs/resnet50_imagenet.json").read())
    out = tmp_path / "run"
    args = ["run", "--quiet", "--recipe", "configs/resnet50_imagenet.json", "--data-dir", str(tree),
            "--device", "cpu", "--image-size", "32", "--epochs", "1", "--batch-size", "4", "--lr", "0.01",
            "--ft-images", "8", "--baselines", "4", "--trace-max-images", "8", "--budget-bits", "3",
            "--out", str(out)]
    assert main(args) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"] == "resnet50" and cfg["dataset"] == "imagenet"
    assert cfg["trace_batch_size"] == recipe["config"]["trace_batch_size"]  # from the recipe
    assert cfg["image_size"] == 32  # the command line wins
    res = json.loads((out / "results.json").read_text())
    assert res["paper"]["hawq_v2"]["value"] == recipe["paper"]["hawq_v2"]["value"]
    assert res["delta_vs_paper"] == pytest.approx(res["models"]["hawq"]["top1"] - recipe["paper"]["hawq_v2"]["value"],
                                                  abs=1e-3)


def coco_tree(root, n_images=4, size=64):
    from hawq.data.coco import write_synthetic_coco

    for split, seed in (("train", 0), ("val", 1)):
        images, ann = write_synthetic_coco(root / f"_{split}", n_images=n_images, image_size=size, n_classes=2,
                                           seed=seed)
        images.rename(root / split)
        ann.rename(root / f"{split}.json")
    return root


def test_retinanet_on_coco_runs_every_stage(tmp_path):
    tree = coco_tree(tmp_path / "coco")
    out = tmp_path / "run"
    args = ["run", "--quiet", "--task", "detection", "--dataset", "coco", "--model", "retinanet_resnet50_fpn",
            "--data-dir", str(tree), "--image-size", "64", "--epochs", "1", "--batch-size", "2", "--lr", "1e-4",
            "--ft-images", "2", "--baselines", "4", "--trace-max-images", "2", "--out", str(out)]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["metric"] == "map50" and {"fp32", "hawq", "uniform4"} <= set(res["models"])
    plan = json.loads((out / "plan.json").read_text())
    assert plan["layers"]["backbone.body.conv1"]["w_bits"] == 8
    assert len(plan["layers"]) > 60  # every conv of ResNet-50, the FPN and the heads
    traces = json.loads((out / "traces.json").read_text())  # focal + smooth L1: its own output Hessian
    assert traces["method"] == "gn_residual" and "output Hessian is elementwise" in traces["reason"]
