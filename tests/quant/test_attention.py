"""Attention as quantizable layers: DecomposedMultiheadAttention equals nn.MultiheadAttention; after
decompose_attention_ the projections are ordinary Linear layers that quantize_, fine-tune and export."""

import pytest
import torch
from torch import nn

import hawq
from hawq.quant import DecomposedMultiheadAttention, QuantLinear, decompose_attention_, quantizable_layers

E, HEADS = 8, 2


def _inputs(batch_first: bool, kdim: int | None, vdim: int | None, b: int = 3, lq: int = 4, ls: int = 5):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, n, d, generator=g) for n, d in ((lq, E), (ls, kdim or E), (ls, vdim or E)))
    return (q, k, v) if batch_first else (q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))


def _masks(b: int = 3, lq: int = 4, ls: int = 5):
    kpm = torch.zeros(b, ls, dtype=torch.bool)
    kpm[0, -2:] = True
    causal = torch.triu(torch.ones(lq, ls, dtype=torch.bool), 2)
    per_head = torch.randn(b * HEADS, lq, ls, generator=torch.Generator().manual_seed(1))
    return [
        {},
        {"key_padding_mask": kpm},
        {"attn_mask": causal},
        {"attn_mask": causal.float() * -5.0, "key_padding_mask": kpm.float() * -1e4},
        {"attn_mask": per_head, "average_attn_weights": False},
        {"attn_mask": causal, "need_weights": False, "is_causal": True},
    ]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kv_dims", [(None, None), (6, 10)])
def test_decomposed_equals_multihead_attention(batch_first, kv_dims):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, HEADS, dropout=0.3, batch_first=batch_first, kdim=kv_dims[0],
                                vdim=kv_dims[1]).eval()
    dec = DecomposedMultiheadAttention.from_float(mha).eval()
    q, k, v = _inputs(batch_first, *kv_dims)
    for kw in _masks():
        (a, wa), (b, wb) = mha(q, k, v, **kw), dec(q, k, v, **kw)
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
        if wa is None:
            assert wb is None
        else:
            torch.testing.assert_close(wb, wa, atol=1e-6, rtol=1e-5)


def test_unbatched_input_and_training_dropout_shapes():
    mha = nn.MultiheadAttention(E, HEADS, dropout=0.5).eval()
    dec = DecomposedMultiheadAttention.from_float(mha)
    x = torch.randn(4, E)
    torch.testing.assert_close(dec(x, x, x)[0], mha(x, x, x)[0], atol=1e-6, rtol=1e-5)
    out, w = dec.train()(x, x, x)
    assert out.shape == (4, E) and w.shape == (4, 4)


def test_bias_kv_is_refused_in_one_line():
    with pytest.raises(ValueError, match="add_bias_kv"):
        DecomposedMultiheadAttention.from_float(nn.MultiheadAttention(E, HEADS, add_bias_kv=True))


class TinyTransformer(nn.Module):
    """(B, T, F) sequences -> class logits through a 1-layer nn.TransformerEncoder."""

    def __init__(self, features: int = 6, classes: int = 3, batch_first: bool = True):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(features, E)
        layer = nn.TransformerEncoderLayer(E, HEADS, 16, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(E, classes)

    def forward(self, x):
        h = self.embed(x)
        h = self.encoder(h if self.batch_first else h.transpose(0, 1))
        return self.head(h.mean(dim=1 if self.batch_first else 0))


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_layer_projections_become_layers_called_on_batch_first_inputs(batch_first):
    torch.manual_seed(0)
    model = TinyTransformer(batch_first=batch_first).eval()
    x = torch.randn(5, 7, 6)
    assert not any("self_attn" in n for n in quantizable_layers(model))  # never called as modules
    with pytest.raises(ValueError, match=r"hawq.decompose_attention_\(model\) first"):
        hawq.quantize_(model, {"encoder.layers.0.self_attn.out_proj": 4})
    ref = model(x)
    assert decompose_attention_(model) == ["encoder.layers.0.self_attn"]
    torch.testing.assert_close(model(x), ref, atol=1e-6, rtol=1e-5)
    seen = {}

    def record(name):
        def hook(mod, args, out):
            seen.setdefault(name, args[0].shape)
        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if n in quantizable_layers(model)]
    model(x)
    for h in hooks:
        h.remove()
    attn = [f"encoder.layers.0.self_attn.{p}_proj" for p in ("q", "k", "v", "out")]
    assert set(attn) <= set(seen) and set(seen) == set(quantizable_layers(model))
    assert all(seen[n][0] == 5 for n in attn)  # the batch on dim 0, whatever the layer's batch_first


def test_eval_fast_path_is_not_taken_after_decomposition():
    layer = nn.TransformerEncoderLayer(E, HEADS, 16, dropout=0.0, batch_first=True).eval()
    decompose_attention_(layer)
    calls = []
    layer.self_attn.q_proj.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        layer(torch.randn(2, 3, E), src_key_padding_mask=torch.tensor([[False, False, True]] * 2))
    assert calls


def test_double_backward_through_decomposed_attention():
    torch.manual_seed(0)
    model = TinyTransformer()
    decompose_attention_(model)
    w = model.encoder.layers[0].self_attn.k_proj.weight
    loss = nn.functional.cross_entropy(model(torch.randn(4, 5, 6)), torch.tensor([0, 1, 2, 0]))
    (g,) = torch.autograd.grad(loss, w, create_graph=True)
    (hv,) = torch.autograd.grad((g * torch.ones_like(g)).sum(), w)
    assert torch.isfinite(hv).all() and hv.abs().sum() > 0


def test_quantize_finetune_and_export_tiny_transformer(tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = TinyTransformer()
    decompose_attention_(model)
    x, y = torch.randn(16, 5, 6), torch.randint(0, 3, (16,))
    names = quantizable_layers(model)
    hawq.quantize_(model, {n: {"w_bits": 4 if "self_attn" in n else 8, "a_bits": 8} for n in names})
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in names)
    hawq.calibrate_(model, [(x, y)])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = model.encoder.layers[0].self_attn.q_proj.weight.detach().clone()
    for _ in range(3):  # fine-tuning reaches the projections through the straight-through estimator
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert not torch.equal(before, model.encoder.layers[0].self_attn.q_proj.weight)
    report = hawq.export_onnx(model.eval(), tmp_path / "t.onnx", x)
    assert {layer.fqn for layer in report.layers} == set(names)
    assert report.example_max_abs_diff < 1e-3 and report.example_top1_agreement == 1.0


def test_swin_window_attention_calls_its_linear_layers():
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models.swin_transformer import SwinTransformer, SwinTransformerBlockV2

    torch.manual_seed(0)
    for kw in ({}, {"block": SwinTransformerBlockV2}):
        model = SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[2], num_heads=[2], window_size=[2, 2],
                                num_classes=3, **kw).eval()
        x = torch.randn(2, 3, 16, 16)
        hidden = [n for n in model.state_dict() if n.endswith("attn.qkv.weight")]
        assert hidden and not any(n.removesuffix(".weight") in quantizable_layers(model) for n in hidden)
        ref = model(x)
        assert len(decompose_attention_(model)) == 2
        torch.testing.assert_close(model(x), ref, atol=1e-6, rtol=1e-5)
        seen = set()
        for n, m in model.named_modules():
            if n in quantizable_layers(model):
                m.register_forward_hook(lambda mod, a, o, n=n, seen=seen: seen.add(n))
        model(x)
        assert set(quantizable_layers(model)) == seen  # every listed layer runs as a module
    assert torchvision  # imported for the skip


@pytest.mark.slow
def test_vision_transformer_quantizes_and_exports(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                               hidden_dim=32, mlp_dim=64, num_classes=10).eval()
    nn.init.normal_(vit.heads.head.weight)  # torchvision zero-initialises the head
    x = torch.randn(4, 3, 32, 32)
    ref = vit(x)
    decompose_attention_(vit)
    torch.testing.assert_close(vit(x), ref, atol=1e-5, rtol=1e-5)
    assert hawq.first_last_layers(vit, x[:1]) == ("conv_proj", "heads.head")
    names = quantizable_layers(vit)
    hawq.quantize_(vit, {n: {"w_bits": 8, "a_bits": 8} for n in names})
    hawq.calibrate_(vit, [(x,)])
    report = hawq.export_onnx(vit, tmp_path / "vit.onnx", x)
    assert len(report.layers) == len(names) == 14
    assert report.example_max_abs_diff < 1e-3 and report.example_top1_agreement == 1.0


@pytest.mark.slow
def test_swin_and_maxvit_quantize_and_export(tmp_path):
    """Swin (after decomposition) and MaxViT (its own attention, Linear layers called as modules)."""
    pytest.importorskip("onnxruntime")
    from torchvision.models.maxvit import MaxVit
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    models = {
        "swin": (SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[2], num_heads=[2], window_size=[2, 2],
                                 num_classes=3), 16),
        "maxvit": (MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16],
                          block_layers=[1], head_dim=8, stochastic_depth_prob=0.0, num_classes=3), 32),
    }
    for name, (model, size) in models.items():
        model.eval()
        x = torch.randn(4, 3, size, size)
        decompose_attention_(model)
        names = quantizable_layers(model)
        hawq.quantize_(model, {n: {"w_bits": 4, "a_bits": 8} for n in names})
        hawq.calibrate_(model, [(x,)])
        report = hawq.export_onnx(model, tmp_path / f"{name}.onnx", x)
        assert len(report.layers) == len(names), name
        assert report.example_max_abs_diff < 1e-4 and report.example_top1_agreement == 1.0, name


@pytest.mark.parametrize("kv_dims", [(None, None), (6, 10)])
def test_state_dict_of_the_undecomposed_model_loads(kv_dims):
    torch.manual_seed(0)
    src = nn.Sequential(nn.MultiheadAttention(E, HEADS, kdim=kv_dims[0], vdim=kv_dims[1], batch_first=True))
    torch.manual_seed(1)
    dst = nn.Sequential(nn.MultiheadAttention(E, HEADS, kdim=kv_dims[0], vdim=kv_dims[1], batch_first=True))
    decompose_attention_(dst)
    dst.load_state_dict(src.state_dict())  # strict: every key of the packed layout is consumed
    q, k, v = _inputs(True, *kv_dims)
    torch.testing.assert_close(dst[0](q, k, v)[0], src[0](q, k, v)[0], atol=1e-6, rtol=1e-5)
