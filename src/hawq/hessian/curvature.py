"""Is the loss's Hessian block of a layer its Gauss-Newton block? Proved per layer from the model's own ops.

For cross-entropy, H_ll = G_ll + sum_ic (dL/dz_ic) d^2 z_ic / dW_l^2, so the Gauss-Newton trace is the
Hessian trace exactly when the logits z are piecewise linear in W_l (other weights fixed). That is proved,
not guessed from a list of op names that can miss one:

  * one forward pass on one image is recorded at the ATen level (TorchDispatchMode: every op that really
    runs, whatever Python code called it), and every tensor carries the set of layers whose weights it
    depends on (a bit mask, propagated from the weight tensors themselves);
  * an op is harmless for layer l if it is on an allowlist of ops that are piecewise linear in each input
    (add, view, relu, max-pool, eval batch norm, ...) or multilinear with at most one input depending on
    l (conv, matmul, mul by a constant, ...);
  * anything else that touches a tensor depending on l (GELU, LayerNorm, logsumexp, std, a norm, softmax,
    a product of two tensors that both depend on l, a layer applied twice, an op we do not know) makes l
    curved, and the op is named.

A layer proved piecewise linear gets the exact Gauss-Newton trace; a curved one is estimated as such
(`gn_residual`: the exact GN part plus a probed residual). The same recording finds, for each layer, the
dimension of its input that indexes the images (sequence-first 3-D inputs), whether images interact
(batch statistics), and which layers the forward never calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# piecewise linear in every tensor input: structure, sums, PL activations, selections
_PL_OPS = {
    "add", "add_", "sub", "sub_", "rsub", "neg", "neg_", "sum", "mean", "cumsum",
    "view", "_unsafe_view", "reshape", "flatten", "unflatten", "permute", "transpose", "transpose_", "t",
    "expand", "expand_as", "squeeze", "squeeze_", "unsqueeze", "unsqueeze_", "select", "slice", "narrow",
    "index", "index_select", "gather", "take", "masked_select", "cat", "stack", "split", "split_with_sizes",
    "chunk", "unbind", "roll", "flip", "repeat", "tile", "clone", "contiguous", "_to_copy", "to", "copy_",
    "alias", "as_strided", "as_strided_", "detach", "lift_fresh", "lift_fresh_copy", "constant_pad_nd",
    "pad", "reflection_pad2d", "replication_pad2d", "zero_", "fill_", "masked_fill", "masked_fill_", "where",
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "threshold",
    "threshold_", "clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max", "clamp_max_", "abs", "maximum",
    "minimum", "max", "min", "amax", "amin", "max_pool1d", "max_pool2d", "max_pool3d",
    "max_pool2d_with_indices", "max_pool3d_with_indices", "adaptive_max_pool2d", "adaptive_max_pool1d",
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
    "_adaptive_avg_pool2d", "adaptive_avg_pool3d", "upsample_nearest2d", "upsample_bilinear2d",
    "_upsample_nearest_exact2d", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle",
    "native_channel_shuffle", "im2col", "col2im", "unfold", "diagonal", "tril", "triu", "sort", "topk",
    "dropout", "feature_dropout", "native_batch_norm", "_native_batch_norm_legit_no_training",
    "cudnn_batch_norm", "miopen_batch_norm",
    "new_zeros", "new_ones", "new_empty", "new_full", "zeros_like", "ones_like", "empty_like", "full_like",
    "empty", "zeros", "ones", "full", "arange", "scalar_tensor", "_local_scalar_dense", "hardsigmoid",
}
# multilinear: linear in each tensor input separately (curved only when two inputs share a layer)
_MULTILINEAR = {
    "mul", "mul_", "mm", "addmm", "bmm", "baddbmm", "matmul", "convolution", "_convolution", "conv2d",
    "linear", "einsum", "dot", "mv", "addmv", "outer", "addcmul", "addcmul_", "tensordot",
}
# linear in the first input only (the others are divisors)
_LINEAR_IN_FIRST = {"div", "div_"}
# outputs that do not depend on the values in a differentiable way
_CONSTANT_OUT = {"eq", "ne", "lt", "le", "gt", "ge", "argmax", "argmin", "sign", "isnan", "isinf",
                 "logical_not", "logical_and", "logical_or", "bitwise_and", "bitwise_or", "floor", "ceil",
                 "round", "trunc", "floor_divide"}
_TRAINING_BN = {"_native_batch_norm_legit", "_native_batch_norm_legit_functional"}
_BN_WITH_FLAG = {"native_batch_norm", "cudnn_batch_norm", "miopen_batch_norm"}  # args[5]: training
_PRETTY = {"gelu": "GELU", "silu": "SiLU", "silu_": "SiLU", "hardswish": "Hardswish", "hardswish_": "Hardswish",
           "sigmoid": "Sigmoid", "tanh": "Tanh", "native_layer_norm": "LayerNorm", "_softmax": "softmax",
           "native_group_norm": "GroupNorm", "logsumexp": "logsumexp", "linalg_vector_norm": "vector norm",
           "_scaled_dot_product_flash_attention_for_cpu": "attention", "std": "std", "var": "var"}


@dataclass
class ModelInfo:
    """What one recorded forward says about the model, per layer (in the order of `modules`)."""

    curved: dict[int, list[str]] = field(default_factory=dict)  # layer index -> why it is curved
    calls: list[int] = field(default_factory=list)  # calls of each layer per forward
    used: list[bool] = field(default_factory=list)  # the layer's weight enters the forward (called or not)
    batch_stats: bool = False  # batch norm with batch statistics: images are not independent
    width: int = 0  # last dim of the output (the classes)
    out_dim: int = 0  # dims of the output
    batch_dims: list[int] = field(default_factory=list)  # dim of each layer's input indexing the images
    unsplit: dict[int, str] = field(default_factory=dict)  # layers whose input has no per-image part: why

    def curved_layers(self) -> list[int]:
        return sorted(self.curved)


class _Taint(TorchDispatchMode):
    """Propagates per-layer dependency masks through every ATen op and records what makes a layer curved."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:  # no torch.compile inside: skip the wrapper that imports dynamo (~4 s)
        return False

    def __init__(self, weights: Sequence[Tensor]) -> None:
        super().__init__()
        self.masks: dict[int, int] = {id(w): 1 << i for i, w in enumerate(weights)}
        self.keep: list[Tensor] = []  # holds outputs alive so that ids stay unique during the forward
        self.reasons: dict[int, set[str]] = {}
        self.batch_stats = False
        self.weight_ids = {id(w): i for i, w in enumerate(weights)}
        self.used: set[int] = set()

    def _curve(self, mask: int, why: str) -> None:
        i = 0
        while mask:
            if mask & 1:
                self.reasons.setdefault(i, set()).add(why)
            mask >>= 1
            i += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)
        leaves = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        ins = [self.masks.get(id(t), 0) for t in leaves]
        self.used.update(self.weight_ids[id(t)] for t in leaves if id(t) in self.weight_ids)
        union = 0
        for b in ins:
            union |= b
        if name in _TRAINING_BN or (name in _BN_WITH_FLAG and len(args) > 5 and args[5]):
            self.batch_stats = True
        if union:
            if name in _MULTILINEAR:
                shared = 0
                for i, a in enumerate(ins):
                    for b in ins[i + 1 :]:
                        shared |= a & b
                if shared:  # (a layer applied twice shows here too; `calls` names it)
                    self._curve(shared, f"a product of two weight-dependent tensors ({name})")
            elif name in _LINEAR_IN_FIRST:
                rest = 0
                for b in ins[1:]:
                    rest |= b
                if rest:
                    self._curve(rest, f"division by a weight-dependent tensor ({name})")
            elif name not in _PL_OPS and name not in _CONSTANT_OUT:
                self._curve(union, _PRETTY.get(name, name))
        out = func(*args, **kwargs)
        if union and name not in _CONSTANT_OUT:
            for t in tree_leaves(out):
                if isinstance(t, Tensor):
                    self.masks[id(t)] = self.masks.get(id(t), 0) | union
                    self.keep.append(t)
            if name.endswith("_") and args and isinstance(args[0], Tensor):  # in place
                self.masks[id(args[0])] = self.masks.get(id(args[0]), 0) | union
        return out


def _record_inputs(model: nn.Module, modules: Sequence[nn.Module], x: Tensor) -> list[list[Tensor]]:
    inputs: list[list[Tensor]] = [[] for _ in modules]
    handles = [
        m.register_forward_pre_hook(lambda mod, args, k=k: inputs[k].append(args[0].detach()))
        for k, m in enumerate(modules)
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return inputs


def _sample(t: Tensor, n: int = 1 << 16) -> Tensor:
    flat = t.reshape(-1)
    return flat[:: max(1, flat.numel() // n)]


def _batch_dim(single: Tensor, pair: Tensor, is_conv: bool) -> int | None:
    """The dim of `pair` (a layer's input for two images) whose first half is `single` (its input for the
    first image alone): the dim that indexes the images. None: no such dim (the images interact)."""
    for d in [0] if is_conv else range(pair.dim()):
        if single.dim() != pair.dim() or 2 * single.shape[d] != pair.shape[d]:
            continue
        a, b = _sample(single), _sample(pair.narrow(d, 0, single.shape[d]))
        if torch.allclose(a, b, rtol=1e-4, atol=1e-5 * (1 + float(a.abs().max()) if a.numel() else 1.0)):
            return d
    return None


def inspect_model(model: nn.Module, modules: Sequence[nn.Module], x: Tensor, names: Sequence[str]) -> ModelInfo:
    """Record one forward on x[:1] (curvature, calls, output width) and, when x holds two images, compare
    each layer's input for the first image alone with its input for both (which dim indexes the images)."""
    info = ModelInfo()
    weights = [m.weight for m in modules]
    calls = [0] * len(modules)
    one: list[list[Tensor]] = [[] for _ in modules]

    def pre(mod, args, k):
        calls[k] += 1
        one[k].append(args[0].detach())

    handles = [m.register_forward_pre_hook(lambda mod, args, k=k: pre(mod, args, k)) for k, m in enumerate(modules)]
    taint = _Taint(weights)
    try:
        with torch.enable_grad(), taint:
            out = model(x[:1].detach())
    finally:
        for h in handles:
            h.remove()
    info.calls = calls
    info.used = [i in taint.used for i in range(len(modules))]
    info.batch_stats = taint.batch_stats
    info.curved = {i: sorted(r) for i, r in taint.reasons.items() if info.used[i]}
    for i, c in enumerate(calls):
        if c > 1:
            info.curved.setdefault(i, []).append(f"called {c} times per forward")
    info.out_dim = out.dim() if isinstance(out, Tensor) else 0
    info.width = int(out.shape[-1]) if isinstance(out, Tensor) and out.dim() >= 1 else 0
    info.batch_dims = [0] * len(modules)
    del taint, out
    if x.shape[0] >= 2 and info.out_dim >= 1:
        both = _record_inputs(model, modules, x[:2])
        for k, m in enumerate(modules):
            for a, ab in zip(one[k], both[k]):
                d = _batch_dim(a, ab, isinstance(m, nn.Conv2d))
                if d is None and a.shape == ab.shape:
                    info.unsplit[k] = "reads the same input for every image (it does not depend on the batch)"
                elif d is None:
                    info.unsplit[k] = ("sees the images mixed: its input for two images is not its inputs for "
                                       "each image side by side (images interact, or the batch is folded in)")
                if d is None:
                    continue
                info.batch_dims[k] = d
    return info


def describe(info: ModelInfo, names: Sequence[str], limit: int = 3) -> str:
    """'GELU, LayerNorm (12 layers: a, b, c, ...)': why and where the model is curved, for notes."""
    idx = info.curved_layers()
    why = sorted({r for i in idx for r in info.curved[i]})
    where = ", ".join(names[i] for i in idx[:limit]) + (", ..." if len(idx) > limit else "")
    return f"{', '.join(why[:6])}{', ...' if len(why) > 6 else ''} ({len(idx)} of {len(names)} layers: {where})"
