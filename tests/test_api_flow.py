"""The README's Python API flow on a tiny learnable task: traces -> table -> best plan -> quantize_ -> fine-tune.

Each step is checked for what it is for: the trained model is far above chance, 8-bit weights keep its
accuracy, the plan meets its budget and keeps the first and last layer at 8 bits, and fine-tuning the
low-bit plan recovers accuracy (never lowers it)."""

import copy

import torch

import hawq
from hawq.alloc import MB, best_plan, model_size_bytes, plan_for_bits, sensitivity_table
from hawq.data.fashion_mnist import TensorDataset
from hawq.hessian import estimate_traces
from hawq.train import TrainConfig, evaluate, train


def _textures(n: int, seed: int) -> TensorDataset:
    """Four classes of noisy 12x12 images: horizontal stripes, vertical stripes, a checkerboard, none."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    r = torch.arange(12)
    patterns = torch.stack([(r[:, None] % 2).expand(12, 12), (r[None, :] % 2).expand(12, 12),
                            (r[:, None] + r[None, :]) % 2, torch.zeros(12, 12, dtype=torch.long)]).float()
    return TensorDataset(torch.randn(n, 1, 12, 12, generator=g) + patterns[y][:, None], y)


def test_readme_flow():
    torch.manual_seed(0)
    train_set, test_set = _textures(512, 0), _textures(256, 1)
    model = hawq.create_model("tiny_cnn", in_channels=1, num_classes=4)
    train(model, train_set, TrainConfig(n_images=2048, batch_size=32, lr=0.1), progress=False)
    model.eval()
    fp32 = evaluate(model, test_set)
    assert fp32 >= 85.0, fp32  # chance is 25%

    batches = [(train_set.images[i : i + 64], train_set.labels[i : i + 64]) for i in range(0, 256, 64)]
    traces = estimate_traces(model, batches, progress=False, rel_tol=0.2)
    table = sensitivity_table(model, traces.means(), bits=(2, 3, 4, 8))
    budget = model_size_bytes(table, 2)
    plan = best_plan(table, budget_bytes=budget)
    assert plan.size_bytes <= budget and budget / MB < 0.01
    assert plan.w_bits["conv1"] == 8 and plan.w_bits["fc"] == 8 and plan.w_bits["conv2"] == 2

    q8 = copy.deepcopy(model)
    hawq.quantize_(q8, plan_for_bits(table, 8))
    assert evaluate(q8, test_set) >= fp32 - 2.0  # 8-bit weights keep the accuracy

    hawq.quantize_(model, plan)
    assert isinstance(model.conv2, hawq.quant.QuantConv2d) and model.conv2.w_bits == plan.w_bits["conv2"]
    before = evaluate(model, test_set)
    train(model, train_set, TrainConfig(n_images=1024, batch_size=32, lr=0.01), progress=False)
    after = evaluate(model, test_set)
    assert after >= before and after >= fp32 - 5.0, (fp32, before, after)
