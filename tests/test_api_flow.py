"""The README's Python API flow on a tiny model: traces -> table -> best plan -> quantize_ -> fine-tune."""

import torch

import hawq
from hawq.alloc import MB, best_plan, model_size_bytes, sensitivity_table
from hawq.data.fashion_mnist import TensorDataset
from hawq.hessian import estimate_traces
from hawq.train import TrainConfig, evaluate, train


def test_readme_flow():
    torch.manual_seed(0)
    model = hawq.create_model("tiny_cnn", in_channels=1, num_classes=10).eval()
    x, y = torch.randn(64, 1, 12, 12), torch.randint(0, 10, (64,))
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    traces = estimate_traces(model, batches, progress=False)
    table = sensitivity_table(model, traces.means(), bits=(2, 3, 4, 8))
    budget = model_size_bytes(table, 3)
    plan = best_plan(table, budget_bytes=budget)
    assert plan.size_bytes <= budget and budget / MB < 0.01
    hawq.quantize_(model, plan)
    assert isinstance(model.conv2, hawq.quant.QuantConv2d) and model.conv2.w_bits == plan.w_bits["conv2"]
    data = TensorDataset(x, y)
    train(model, data, TrainConfig(n_images=64, batch_size=16, lr=0.005), progress=False)
    assert 0.0 <= evaluate(model, data) <= 100.0
