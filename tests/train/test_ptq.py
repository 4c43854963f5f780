"""Post-training steps: batch-norm re-estimation, bias correction, the steps together."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import hawq
from hawq.train import PostTrainConfig, bias_correct_, post_train_, reestimate_bn_


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    model = hawq.create_model("tiny_cnn", in_channels=1)
    with torch.no_grad():
        model.bn1.running_mean.fill_(3.0)  # statistics far from the data's
        model.bn1.running_var.fill_(9.0)
    return model.eval()


def _batches(n: int = 4, b: int = 16, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 1, 28, 28, generator=g), torch.zeros(b, dtype=torch.long)) for _ in range(n)]


def test_bn_reestimation_gives_the_quantized_layers_output_statistics():
    model = hawq.quantize_(_cnn(), {"conv1": 2})
    data = _batches()
    weights = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("bn1.running")}
    used = reestimate_bn_(model, data, n_images=48)
    assert used == 48
    with torch.no_grad():
        y = torch.cat([model.conv1(x) for x, _ in data])[:48]  # the quantized conv's outputs
    torch.testing.assert_close(model.bn1.running_mean, y.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bn1.running_var, y.transpose(0, 1).reshape(y.shape[1], -1).var(1),
                               rtol=1e-4, atol=1e-6)
    assert model.bn1.momentum == 0.1 and not model.training and not model.bn1.training
    for k, v in weights.items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(model.state_dict()[k], v), k


def test_bias_correction_removes_the_mean_output_error():
    torch.manual_seed(0)
    fp32 = nn.Sequential(nn.Linear(20, 8))
    q = hawq.quantize_(copy.deepcopy(fp32), {"0": 2})
    x = torch.randn(256, 20) + 1.0  # a non-zero input mean: the weight error shifts the output mean
    with torch.no_grad():
        before = (q(x) - fp32(x)).mean(0).abs().max()
        assert bias_correct_(q, [(x,)]) == ["0"]
        after = (q(x) - fp32(x)).mean(0).abs().max()
    assert before > 1e-2 and after < 1e-5


def test_post_train_runs_every_step_and_is_deterministic():
    def run():
        m = hawq.quantize_(_cnn(), {"conv2": {"w_bits": 3, "a_bits": 4}, "fc": {"w_bits": 4, "a_bits": 4}})
        rec = post_train_(m, lambda: _batches(), PostTrainConfig(act_range="mse"))
        return m, rec

    (m1, rec), (m2, _) = run(), run()
    assert rec["bn_images_used"] == 64 and rec["weight_range"] == "mse"
    assert m1.conv2.w_range == "mse" and m1.conv2.calibrated
    x = _batches(1, seed=5)[0][0]
    with torch.no_grad():
        assert torch.equal(m1(x), m2(x))


def test_post_train_config_refuses_unknown_ranges():
    with pytest.raises(ValueError, match="weight range"):
        PostTrainConfig(weight_range="minmax")
    with pytest.raises(ValueError, match="activation range"):
        PostTrainConfig(act_range="max")
