"""The paper's models: build, load local weights, and run quantize -> calibrate -> forward -> backward.

Parameter counts of SqueezeNext are checked against two sources:
- the PyTorch port that the SqueezeNext authors' README (github.com/amirgholami/SqueezeNext) points to for
  pretrained weights, osmr/imgclsmob pytorch/pytorchcv/models/squeezenext.py, whose own test asserts
  sqnxt23_w1 = 724056, sqnxt23_w3d2 = 1511824, sqnxt23_w2 = 2583752, sqnxt23v5_w1 = 921816,
  sqnxt23v5_w3d2 = 1953616, sqnxt23v5_w2 = 3366344 trainable parameters (1000 classes);
- the SqueezeNext paper (arXiv 1803.10615), which lists 0.72M parameters for 1.0-SqNxt-23.
The HAWQ papers' SqueezeNext baseline of 9.86 MB (float32, MB = 2**20 bytes) is 2.0-SqNxt-23's 2583752.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import hawq.models.paper  # noqa: F401  (registers the entries until the package imports them)
import hawq.models.squeezenext  # noqa: F401
from hawq.models import create_model
from hawq.models.paper import create_timm_model, float_size_mb, load_weights, param_count
from hawq.quant import calibrate_, quant_layers, quantizable_layers, quantize_

SQNXT_PARAMS = {
    "sqnxt23_w1": 724056,
    "sqnxt23_w3d2": 1511824,
    "sqnxt23_w2": 2583752,
    "sqnxt23v5_w1": 921816,
    "sqnxt23v5_w3d2": 1953616,
    "sqnxt23v5_w2": 3366344,
}


@pytest.mark.parametrize("name", sorted(SQNXT_PARAMS))
def test_squeezenext_parameter_counts_match_reference(name):
    assert param_count(create_model(name)) == SQNXT_PARAMS[name]


def test_squeezenext_counts_match_paper_and_hawq_sizes():
    assert round(param_count(create_model("sqnxt23_w1")) / 1e6, 2) == 0.72  # paper: 1.0-SqNxt-23, 0.72M
    assert round(float_size_mb(create_model("sqnxt23_w2")), 2) == 9.86  # HAWQ: SqueezeNext baseline 9.86 MB
    assert round(float_size_mb(create_model("resnet50")), 1) == 97.5  # HAWQ lists 97.8 MB (with BN buffers)


def test_squeezenext_block_structure():
    m = create_model("sqnxt23_w1")
    assert [len(getattr(m, f"stage{i}")) for i in range(1, 5)] == [6, 6, 8, 1]
    assert [len(getattr(create_model("sqnxt23v5_w1"), f"stage{i}")) for i in range(1, 5)] == [2, 4, 14, 1]
    # 1 stem + 21 blocks x 5 + head + classifier = 23 weight layers on the main path, plus 4 projections
    convs = quantizable_layers(m)
    assert len([n for n in convs if "shortcut" not in n]) == 1 + 21 * 5 + 1 + 1
    assert len([n for n in convs if "shortcut" in n]) == 4
    b = m.stage2[0]  # first block of a stage: stride 2, r = 1, squeeze 64 -> 64 -> 32 -> 64 -> 64 -> 64
    assert b.squeeze1[0].stride == (2, 2) and b.squeeze2[0].out_channels == 16
    assert b.sep1x3[0].kernel_size == (1, 3) and b.sep3x1[0].kernel_size == (3, 1)


def _pipeline(model, x, y):
    """quantize every Conv2d/Linear to 4-bit weights and 8-bit inputs, calibrate, forward, backward."""
    model.eval()
    with torch.no_grad():
        ref = model(x)
    quantize_(model, {"re:.*": {"w_bits": 4, "a_bits": 8}})
    assert len(quant_layers(model)) == len(quantizable_layers(model)) > 0
    calibrate_(model, [(x, y)])
    with torch.no_grad():
        out = model(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert not torch.equal(out, ref)  # quantization changed something
    model.train()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    return out


@pytest.mark.parametrize(
    "name,size,channels",
    [("sqnxt23_w1", 32, 3), ("sqnxt23v5_w1", 32, 1), ("resnet50", 32, 1), ("inception_v3", 75, 3)],
)
def test_classifier_pipeline_on_tiny_inputs(name, size, channels):
    torch.manual_seed(0)
    model = create_model(name, in_channels=channels, num_classes=5)
    # Inception-V3 has no aux head, so train mode returns a logits tensor, which _pipeline feeds to the loss
    assert not any("AuxLogits" in n for n, _ in model.named_modules())
    x, y = torch.randn(2, channels, size, size), torch.tensor([1, 3])
    out = _pipeline(model, x, y)
    assert out.shape == (2, 5)


def test_retinanet_pipeline_on_tiny_inputs():
    torch.manual_seed(0)
    model = create_model("retinanet_resnet50_fpn", num_classes=3, min_size=64, max_size=64)
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0], [0, 0, 20, 20]]), "labels": torch.tensor([2, 1])},
    ]
    quantize_(model, {"re:.*": {"w_bits": 4, "a_bits": 8}})
    calibrate_(model, [(images, targets)])
    model.eval()
    with torch.no_grad():
        dets = model(images)
    assert len(dets) == 2 and set(dets[0]) == {"boxes", "scores", "labels"}
    model.train()
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert model.backbone.body.conv1.weight.grad is not None
    assert torch.isfinite(model.head.classification_head.cls_logits.weight.grad).all()


def test_local_weights_round_trip_with_ddp_prefix(tmp_path):
    torch.manual_seed(0)
    a = create_model("sqnxt23_w1", num_classes=7).eval()
    path = tmp_path / "w.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in a.state_dict().items()}}, path)
    b = create_model("sqnxt23_w1", num_classes=7, weights=str(path)).eval()
    x = torch.randn(2, 3, 48, 48)
    torch.testing.assert_close(a(x), b(x), atol=0, rtol=0)
    with pytest.raises(ValueError, match="num-classes"):
        create_model("sqnxt23_w1", num_classes=8, weights=str(path))
    with pytest.raises(ValueError, match="does not exist"):
        create_model("resnet50", weights=str(tmp_path / "nope.pt"))


@pytest.mark.slow
def test_inception_loads_torchvision_checkpoint_with_aux_head(tmp_path):
    from torchvision.models import inception_v3 as tv

    torch.manual_seed(0)
    full = tv(weights=None, aux_logits=True, init_weights=False, num_classes=6).eval()
    path = tmp_path / "inc.pt"
    torch.save(full.state_dict(), path)
    ours = create_model("inception_v3", num_classes=6, weights=str(path)).eval()
    assert ours.transform_input  # weights given: Google's [-1, 1] normalisation is applied
    full.transform_input = True
    x = torch.randn(1, 3, 80, 80)
    torch.testing.assert_close(ours(x), full(x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_retinanet_loads_checkpoint_into_frozen_batch_norm(tmp_path):
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    a = create_model("retinanet_resnet50_fpn", num_classes=3, min_size=64, max_size=64).eval()
    path = tmp_path / "r.pt"
    torch.save(a.state_dict(), path)
    b = create_model("retinanet_resnet50_fpn", num_classes=3, min_size=64, max_size=64, weights=str(path))
    b.eval()
    assert isinstance(b.backbone.body.bn1, FrozenBatchNorm2d)
    assert all(p.requires_grad for p in b.parameters())
    x = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        ha, hb = a.backbone(x[0][None]), b.backbone(x[0][None])
    for k in ha:
        torch.testing.assert_close(ha[k], hb[k], atol=1e-4, rtol=1e-4)


def test_weights_file_without_state_dict_is_rejected(tmp_path):
    path = tmp_path / "bad.pt"
    torch.save({"epoch": 3}, path)
    with pytest.raises(ValueError, match="no state dict"):
        load_weights(torch.nn.Linear(2, 2), path)


def test_timm_without_timm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(ValueError, match="pip install timm"):
        create_timm_model("resnet18")


def test_timm_model_when_installed():
    pytest.importorskip("timm")
    m = create_timm_model("resnet18", in_channels=1, num_classes=3).eval()
    assert m(torch.randn(1, 1, 32, 32)).shape == (1, 3)
    with pytest.raises(ValueError, match="no model"):
        create_timm_model("no_such_model_xyz")


RECIPES = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.json"))
NEW_CONFIG_KEYS = {"image_size", "num_classes", "label_map"}  # RunConfig keys the recipes add


def test_recipes_cover_the_paper_experiments():
    names = {json.loads(p.read_text())["config"]["model"] for p in RECIPES}
    assert names == {"resnet50", "inception_v3", "sqnxt23_w2", "retinanet_resnet50_fpn"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_is_consistent_and_its_budget_is_feasible(path):
    from dataclasses import fields

    from hawq.alloc import MB, fp32_size_bytes, min_size_bytes, sizing_table
    from hawq.config import RunConfig

    recipe = json.loads(path.read_text())
    assert recipe["kind"] == "hawq_recipe" and recipe["version"] == 1
    cfg, paper = recipe["config"], recipe["paper"]
    assert set(cfg) <= {f.name for f in fields(RunConfig)} | NEW_CONFIG_KEYS
    assert cfg["budget_mb"] == paper["hawq_v2"]["size_mb"]
    assert paper["metric"] in ("top1", "map") and paper["hawq_v2"]["value"] < paper["fp32"]["value"]
    kw = {"num_classes": cfg.get("num_classes", 1000)}
    table = sizing_table(create_model(cfg["model"], **kw))  # first and last layer at 8 bits
    assert min_size_bytes(table) < cfg["budget_mb"] * MB < fp32_size_bytes(table)
    if paper["fp32"]["size_mb"] is not None:  # the paper's float size is this model's (within 0.5%)
        assert fp32_size_bytes(table) / MB == pytest.approx(paper["fp32"]["size_mb"], rel=5e-3)
