"""File size of exported plans: it grows with every bit, and stays close to what the allocator computes."""

from __future__ import annotations

import hawq
from hawq.alloc import model_size_bytes, sizing_table
from hawq.export import export_onnx, size_breakdown

# The weight bits of the default run's plan (ResNet-20 on Fashion-MNIST, plan.json of `hawq run`)
DEFAULT_PLAN_BITS = {
    "conv1": 8, "fc": 8, "layer2.0.downsample.0": 8, "layer3.0.downsample.0": 4,
    **{f"layer{s}.{b}.conv{c}": 4 for s in (1, 2) for b in range(3) for c in (1, 2)},
    **{f"layer3.{b}.conv{c}": 3 for b in (0, 1) for c in (1, 2)},
    **{f"layer3.2.conv{c}": 2 for c in (1, 2)},
}


def test_file_size_grows_with_every_bit(quantized, tmp_path) -> None:
    names = hawq.quantizable_layers(hawq.create_model("resnet20", in_channels=1))
    sizes = {}
    for bits in range(2, 9):
        plan = {n: {"w_bits": bits, "a_bits": None} for n in names}
        model, x = quantized("resnet20", plan, n_calib=2)
        sizes[bits] = export_onnx(model, tmp_path / f"m{bits}.onnx", x[:1]).file_size_bytes
    n_params = sum(model.get_submodule(n).weight.numel() for n in names)
    for bits in range(2, 8):
        # one more bit per weight costs n_params / 8 bytes, give or take the bit-packed widths' decoder
        # (a ~0.9 KB function and one ~40-byte call per layer)
        assert abs(sizes[bits + 1] - sizes[bits] - n_params / 8) < 2048, (bits, sizes)
    assert all(sizes[b] < sizes[b + 1] for b in range(2, 8)), sizes


def test_default_plan_file_is_close_to_the_allocator_size(quantized, tmp_path) -> None:
    model, x = quantized("resnet20", {n: {"w_bits": b, "a_bits": None} for n, b in DEFAULT_PLAN_BITS.items()})
    allocator_bytes = model_size_bytes(sizing_table(hawq.create_model("resnet20", in_channels=1)),
                                       DEFAULT_PLAN_BITS)
    assert allocator_bytes == 107_704  # the default run's plan.json size_bytes
    parts = size_breakdown(export_onnx(model, tmp_path / "m.onnx", x[:2]).path)
    ratio = parts["file_size_bytes"] / allocator_bytes
    print(f"default plan: file {parts['file_size_bytes']} bytes, allocator {allocator_bytes:.0f} bytes, "
          f"ratio {ratio:.3f}, graph and metadata {parts['protobuf_overhead_bytes']} bytes")
    assert parts["container_padding_bytes"] == 0
    assert parts["int_weight_bytes"] == parts["plan_weight_bytes"] == 101_392
    assert ratio <= 1.10
