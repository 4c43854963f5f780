"""Attention whose projections are ordinary nn.Linear modules, so that they can be quantized.

`nn.MultiheadAttention` keeps its q, k, v projections as one packed `in_proj_weight` (or three bare
parameters) and applies `out_proj.weight` through F.multi_head_attention_forward without calling the
module: hooks never see them and swapping `out_proj` for a fake-quant layer changes nothing. torchvision's
Swin window attention does the same with its `qkv` and `proj` Linear layers (F.linear on their weights).

`decompose_attention_(model)` replaces, in place:
- every nn.MultiheadAttention by a `DecomposedMultiheadAttention` holding q_proj, k_proj, v_proj and
  out_proj as plain nn.Linear, with the same forward signature, return value and numerics;
- every torchvision ShiftedWindowAttention(V2) by a subclass whose forward calls `self.qkv(...)` and
  `self.proj(...)` as modules (parameters, buffers and state-dict keys unchanged).

Every projection reads a tensor with the data batch on dim 0: sequence-first inputs are transposed before
projecting, and Swin's windows are folded back to (B, windows * tokens, C) around each projection.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_SWIN_MODULE = "torchvision.models.swin_transformer"
_SWIN_CLASSES = ("ShiftedWindowAttention", "ShiftedWindowAttentionV2")


def _split_packed_keys(state_dict: dict, prefix: str, *args) -> None:
    """Let a state dict of the undecomposed nn.MultiheadAttention load: in_proj_weight / in_proj_bias
    (or q/k/v_proj_weight) become q_proj, k_proj, v_proj entries."""
    for kind in ("weight", "bias"):
        packed = state_dict.pop(f"{prefix}in_proj_{kind}", None)
        if packed is not None:
            for p, part in zip("qkv", packed.chunk(3)):
                state_dict[f"{prefix}{p}_proj.{kind}"] = part
    for p in "qkv":
        w = state_dict.pop(f"{prefix}{p}_proj_weight", None)
        if w is not None:
            state_dict[f"{prefix}{p}_proj.weight"] = w


class DecomposedMultiheadAttention(nn.Module):
    """nn.MultiheadAttention with separate q/k/v/out projections called as nn.Linear modules.

    forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False) -> (output, weights or None), as nn.MultiheadAttention.
    Build it with `from_float(mha)`. `in_proj_weight`/`in_proj_bias` are None and `_qkv_same_embed_dim` is
    False, so nn.TransformerEncoderLayer never takes its fused fast path (which would bypass the modules).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 kdim: int | None = None, vdim: int | None = None, batch_first: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        kw = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.dropout, self.batch_first = dropout, batch_first
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        # read by nn.TransformerEncoderLayer / nn.TransformerEncoder to decide on their fused fast path
        self._qkv_same_embed_dim = False
        self.in_proj_weight = self.in_proj_bias = self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        self._register_load_state_dict_pre_hook(_split_packed_keys)

    @classmethod
    def from_float(cls, mha: nn.MultiheadAttention) -> DecomposedMultiheadAttention:
        """The same attention with copied weights (packed in_proj_weight split into q, k, v)."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("nn.MultiheadAttention with add_bias_kv or add_zero_attn cannot be decomposed: "
                             "build it without them to quantize its projections")
        w = mha.out_proj.weight
        new = cls(mha.embed_dim, mha.num_heads, mha.dropout, bias=mha.out_proj.bias is not None,
                  kdim=mha.kdim, vdim=mha.vdim, batch_first=mha.batch_first, device=w.device, dtype=w.dtype)
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.chunk(3)
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = (None,) * 3 if mha.in_proj_bias is None else mha.in_proj_bias.chunk(3)
        with torch.no_grad():
            for lin, wt, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases):
                lin.weight.copy_(wt)
                if b is not None:
                    lin.bias.copy_(b)
            new.out_proj.weight.copy_(w)
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        new.requires_grad_(w.requires_grad)
        return new.train(mha.training)

    def _additive_mask(self, attn_mask: Tensor | None, key_padding_mask: Tensor | None, b: int, lq: int,
                       ls: int, dtype: torch.dtype) -> Tensor | None:
        """attn_mask ((L, S) or (B*heads, L, S)) and key_padding_mask ((B, S)) as one float mask that
        broadcasts to (B, heads, L, S); True in a bool mask means "may not attend" (-inf)."""
        def as_float(m: Tensor) -> Tensor:
            if m.dtype == torch.bool:
                return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
            return m.to(dtype)

        out = None
        if attn_mask is not None:
            out = as_float(attn_mask)
            out = out.view(b, self.num_heads, lq, ls) if out.dim() == 3 else out.view(1, 1, lq, ls)
        if key_padding_mask is not None:
            kpm = as_float(key_padding_mask).view(b, 1, 1, ls)
            out = kpm if out is None else out + kpm
        return out

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint: pass the causal mask too")
        unbatched = query.dim() == 2
        if unbatched:  # (L, E) -> (1, L, E)
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, B, E) -> (B, L, E): every projection sees the batch on dim 0
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, lq, _ = query.shape
        ls = key.shape[1]
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(query).view(b, lq, h, d).transpose(1, 2)  # (B, heads, L, d)
        k = self.k_proj(key).view(b, ls, h, d).transpose(1, 2)  # (B, heads, S, d)
        v = self.v_proj(value).view(b, ls, h, d).transpose(1, 2)
        scores = (q * math.sqrt(1.0 / d)) @ k.transpose(-2, -1)  # (B, heads, L, S)
        if is_causal and key_padding_mask is None and not need_weights:
            # as F.multi_head_attention_forward: the hint replaces attn_mask by the standard causal mask
            attn_mask = ~torch.ones(lq, ls, dtype=torch.bool, device=scores.device).tril()
        mask = self._additive_mask(attn_mask, key_padding_mask, b, lq, ls, scores.dtype)
        if mask is not None:
            scores = scores + mask
        weights = scores.softmax(dim=-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, p=self.dropout)
        out = self.out_proj((weights @ v).transpose(1, 2).reshape(b, lq, self.embed_dim))  # (B, L, E)
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        if average_attn_weights:
            weights = weights.mean(dim=1)
        return out, (weights.squeeze(0) if unbatched else weights)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


# ------------------------------------------------------------------------------ torchvision Swin
def _is_swin_attention(m: nn.Module) -> bool:
    return type(m).__module__ == _SWIN_MODULE and type(m).__name__ in _SWIN_CLASSES


def _window_attention(self: nn.Module, x: Tensor, relative_position_bias: Tensor) -> Tensor:
    """torchvision's shifted_window_attention (0.29) with `self.qkv` and `self.proj` called as modules."""
    window_size, num_heads = self.window_size, self.num_heads
    logit_scale = getattr(self, "logit_scale", None)
    b, height, width, c = x.shape
    pad_r = (window_size[1] - width % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - height % window_size[0]) % window_size[0]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_h, pad_w, _ = x.shape
    shift = list(self.shift_size)
    if window_size[0] >= pad_h:
        shift[0] = 0
    if window_size[1] >= pad_w:
        shift[1] = 0
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    n_win = (pad_h // window_size[0]) * (pad_w // window_size[1])
    x = x.view(b, pad_h // window_size[0], window_size[0], pad_w // window_size[1], window_size[1], c)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b * n_win, window_size[0] * window_size[1], c)  # B*nW, T, C
    t = x.size(1)
    qkv = self.qkv(x.reshape(b, n_win * t, c)).reshape(b * n_win, t, 3 * c)  # batch on dim 0 for the layer
    if logit_scale is not None and self.qkv.bias is not None:  # V2 keeps the key bias at zero
        zero_k = torch.zeros_like(self.qkv.bias)
        zero_k[c:2 * c] = 1
        qkv = qkv - self.qkv.bias * zero_k
    qkv = qkv.reshape(b * n_win, t, 3, num_heads, c // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * (c // num_heads) ** -0.5).matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    if sum(shift) > 0:
        mask = x.new_zeros((pad_h, pad_w))
        h_slices = ((0, -window_size[0]), (-window_size[0], -shift[0]), (-shift[0], None))
        w_slices = ((0, -window_size[1]), (-window_size[1], -shift[1]), (-shift[1], None))
        count = 0
        for hs in h_slices:
            for ws in w_slices:
                mask[hs[0]:hs[1], ws[0]:ws[1]] = count
                count += 1
        mask = mask.view(pad_h // window_size[0], window_size[0], pad_w // window_size[1], window_size[1])
        mask = mask.permute(0, 2, 1, 3).reshape(n_win, t)
        mask = mask.unsqueeze(1) - mask.unsqueeze(2)
        mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
        attn = attn.view(b, n_win, num_heads, t, t) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, t, t)
    attn = F.dropout(F.softmax(attn, dim=-1), p=self.attention_dropout, training=self.training)
    x = attn.matmul(v).transpose(1, 2).reshape(b, n_win * t, c)
    x = F.dropout(self.proj(x), p=self.dropout, training=self.training).reshape(b * n_win, t, c)
    x = x.view(b, pad_h // window_size[0], pad_w // window_size[1], window_size[0], window_size[1], c)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, pad_h, pad_w, c)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :height, :width, :].contiguous()


def _swin_forward(self: nn.Module, x: Tensor) -> Tensor:
    return _window_attention(self, x, self.get_relative_position_bias())


def _module_calling_class(cls: type) -> type:
    """A subclass of a torchvision Swin attention class whose forward calls its Linear layers; defined
    once per class at module level (so that whole models still pickle)."""
    name = f"ModuleCalling{cls.__name__}"
    if name not in globals():
        sub = type(name, (cls,), {"forward": _swin_forward, "__module__": __name__, "__qualname__": name})
        globals()[name] = sub
    return globals()[name]


# ------------------------------------------------------------------------------ the transform
def _set_module(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def decompose_attention_(model: nn.Module) -> list[str]:
    """Make every attention projection of `model` a quantizable nn.Linear module, in place.

    nn.MultiheadAttention -> DecomposedMultiheadAttention (q_proj, k_proj, v_proj, out_proj); torchvision
    Swin window attention -> a subclass calling `qkv` and `proj` as modules. Returns the fqns swapped.
    Weights saved before decomposition load with `--weights` (built first, decomposed after); a state
    dict of a decomposed model has q_proj/k_proj/v_proj keys instead of in_proj_weight.
    """
    if isinstance(model, nn.MultiheadAttention):
        raise ValueError("the model itself is an nn.MultiheadAttention: use "
                         "DecomposedMultiheadAttention.from_float(model) instead")
    swapped = []
    for fqn, m in list(model.named_modules()):
        if isinstance(m, nn.MultiheadAttention):
            _set_module(model, fqn, DecomposedMultiheadAttention.from_float(m))
            swapped.append(fqn)
        elif _is_swin_attention(m):
            m.__class__ = _module_calling_class(type(m))
            swapped.append(fqn)
    if swapped:
        for m in model.modules():
            if isinstance(m, nn.TransformerEncoder):  # its nested-tensor path reads in_proj_weight
                m.use_nested_tensor = False
    return swapped


def hidden_linear_layers(model: nn.Module) -> list[str]:
    """Linear layers that attention applies by their weight, never calling the module (until
    `decompose_attention_`): nn.MultiheadAttention's out_proj, torchvision Swin's qkv and proj."""
    out = []
    for fqn, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            out += [f"{fqn}.{n}" if fqn else n for n, c in m.named_modules() if isinstance(c, nn.Linear)]
        elif _is_swin_attention(m):
            out += [f"{fqn}.{n}" if fqn else n for n in ("qkv", "proj")]
    return out
