"""First and last layer from one traced forward: the first layer reading the input, the last feeding the
output, whatever the module order and whatever auxiliary heads the model holds."""

import pytest
import torch
from torch import nn

from hawq import first_last_layers
from hawq.alloc import default_fixed

torchvision = pytest.importorskip("torchvision")


class Backwards(nn.Module):
    """Modules declared in the reverse of their execution, plus a side layer whose output is dropped."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 3)
        self.side = nn.Linear(8, 8)
        self.mid = nn.Conv2d(4, 8, 3, padding=1)
        self.stem = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x):
        h = self.mid(torch.relu(self.stem(x))).mean(dim=(2, 3))
        out = self.fc(h)
        self.side(h)  # executed last, feeds nothing
        return out


def test_execution_and_dependence_not_module_order():
    model = Backwards()
    assert first_last_layers(model, torch.randn(1, 1, 8, 8)) == ("stem", "fc")
    assert default_fixed(model, torch.randn(1, 1, 8, 8)) == {"stem": 8, "fc": 8}
    assert default_fixed(model) == {"fc": 8, "stem": 8}  # module order: fc first, stem last
    assert all(p.requires_grad for p in model.parameters()) and model.training  # left as it was


@pytest.mark.parametrize("name, kwargs, size, expected", [
    ("inception_v3", {"aux_logits": True, "init_weights": False}, 80, ("Conv2d_1a_3x3.conv", "fc")),
    ("googlenet", {"aux_logits": True, "init_weights": False}, 64, ("conv1.conv", "fc")),
    ("squeezenet1_1", {}, 64, ("features.0", "classifier.1")),
    ("densenet121", {}, 32, ("features.conv0", "classifier")),
    ("mobilenet_v3_small", {}, 32, ("features.0.0", "classifier.3")),
])
def test_torchvision_architectures(name, kwargs, size, expected):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=5, **kwargs)
    assert first_last_layers(model, torch.randn(1, 3, size, size)) == expected
