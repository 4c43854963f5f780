"""Models from outside the registry: torchvision:NAME and path/to/file.py:function."""

import textwrap

import pytest
import torch
from torch import nn

from hawq.cli import main
from hawq.models import create_model

pytest.importorskip("torchvision")

USER_FILE = """
import torch
from torch import nn

from helper import width  # a neighbour of this file


def small(num_classes):
    return nn.Sequential(nn.Conv2d(3, width(), 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width(), num_classes))


def anything(**kw):
    return nn.Linear(kw["in_channels"], kw["num_classes"])


def not_a_model():
    return 3
"""


@pytest.fixture
def user_file(tmp_path):
    (tmp_path / "helper.py").write_text("def width():\n    return 4\n")
    path = tmp_path / "my_models.py"
    path.write_text(textwrap.dedent(USER_FILE))
    return path


def test_torchvision_builder_with_classes_and_channels():
    model = create_model("torchvision:resnet18", num_classes=7, in_channels=1)
    assert model.fc.out_features == 7 and model.conv1.in_channels == 1
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_torchvision_inception_and_googlenet_without_aux_heads():
    model = create_model("torchvision:googlenet", num_classes=4).train()
    assert not hasattr(model, "aux1") or model.aux1 is None
    assert isinstance(model(torch.randn(2, 3, 64, 64)), torch.Tensor)  # logits alone in training too


def test_torchvision_weights_load_from_a_local_file(tmp_path):
    torch.manual_seed(0)
    src = create_model("torchvision:squeezenet1_1", num_classes=3)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    model = create_model("torchvision:squeezenet1_1", num_classes=3, weights=str(tmp_path / "w.pth"))
    assert torch.equal(model.features[0].weight, src.features[0].weight)
    with pytest.raises(ValueError, match="do not fit"):
        create_model("torchvision:squeezenet1_1", num_classes=5, weights=str(tmp_path / "w.pth"))


def test_unknown_torchvision_name():
    with pytest.raises(ValueError, match="torchvision has no classification model 'resnet19'"):
        create_model("torchvision:resnet19")
    with pytest.raises(ValueError, match="no classification model 'fasterrcnn_resnet50_fpn'"):
        create_model("torchvision:fasterrcnn_resnet50_fpn")


def test_user_file_function(user_file):
    model = create_model(f"{user_file}:small", num_classes=6, in_channels=3)
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 6)
    assert isinstance(create_model(f"{user_file}:anything", num_classes=2, in_channels=5), nn.Linear)


@pytest.mark.parametrize("spec, message", [
    ("{dir}/missing.py:small", "does not exist"),
    ("{file}:nope", "has no function 'nope'"),
    ("{file}:not_a_model", "returned a int, not an nn.Module"),
    ("no_such_model", "unknown model 'no_such_model'"),
])
def test_bad_user_model(user_file, spec, message):
    with pytest.raises(ValueError, match=message):
        create_model(spec.format(dir=user_file.parent, file=user_file), num_classes=2)


@pytest.mark.parametrize("model", ["torchvision:resnet19", "{file}:nope", "{dir}/missing.py:f"])
def test_cli_bad_model_is_one_line_and_writes_nothing(model, user_file, fake_fmnist, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "--quick", "--quiet", "--model", model.format(file=user_file, dir=user_file.parent),
                 "--data-dir", str(fake_fmnist), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("hawq: error:")
    assert not out.exists() or not any(out.iterdir())


TRANSFORMER_FILE = """
import torch
from torch import nn


class PatchTransformer(nn.Module):
    def __init__(self, in_channels, num_classes, dim=16):
        super().__init__()
        self.head = nn.Linear(dim, num_classes)  # declared first, runs last
        self.embed = nn.Linear(in_channels * 16, dim)
        layer = nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)

    def forward(self, x):  # (B, C, 28, 28) -> 49 patches of 4x4
        p = x.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).reshape(x.shape[0], 49, -1)
        return self.head(self.encoder(self.embed(p)).mean(dim=1))


def build(in_channels, num_classes):
    return PatchTransformer(in_channels, num_classes)
"""


@pytest.mark.slow
def test_cli_runs_a_user_transformer_end_to_end(fake_fmnist, tmp_path):
    """A user's file with nn.TransformerEncoder: attention decomposed by the CLI, every stage, QDQ export."""
    import json

    src = tmp_path / "src"
    src.mkdir()
    path = src / "user_transformer.py"
    path.write_text(textwrap.dedent(TRANSFORMER_FILE))
    out = tmp_path / "run"
    assert main(["run", "--quick", "--quiet", "--model", f"{path}:build", "--data-dir", str(fake_fmnist),
                 "--out", str(out), "--epochs", "1", "--ft-images", "64", "--baselines", "4",
                 "--trace-method", "hutchinson"]) == 0
    assert [p.name for p in src.iterdir()] == ["user_transformer.py"]  # the model cache went to the cache
    plan = json.loads((out / "plan.json").read_text())["layers"]
    attn = [f"encoder.layers.0.self_attn.{p}_proj" for p in ("q", "k", "v", "out")]
    assert set(attn) <= set(plan)
    assert plan["embed"]["w_bits"] == 8 and plan["head"]["w_bits"] == 8  # found by execution, not order
    assert main(["export", "--quiet", "--out", str(out)]) == 0
    export = json.loads((out / "results.json").read_text())["export"]
    assert export["verify"]["top1_agreement"] == 1.0


def test_cli_trains_a_torchvision_model_on_a_generated_imagefolder(tmp_path):
    """`--model torchvision:NAME` on the ImageFolder task, on bench/make_imagefolder.py's tree."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "make_imagefolder", Path(__file__).resolve().parents[2] / "bench" / "make_imagefolder.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    tree = mod.make_imagefolder(tmp_path / "tree", n_classes=3, per_class=2, size=8)
    assert sorted(p.name for p in (tree / "val").iterdir()) == ["n00000000", "n00000001", "n00000002"]
    assert len(list((tree / "train" / "n00000002").iterdir())) == 2
    out = tmp_path / "run"
    assert main(["train", "--quick", "--quiet", "--dataset", "imagenet", "--model", "torchvision:squeezenet1_1",
                 "--data-dir", str(tree), "--image-size", "32", "--epochs", "1", "--out", str(out)]) == 0
    state = torch.load(out / "fp32.pt", weights_only=True)["state_dict"]
    assert state["classifier.1.weight"].shape[0] == 3
