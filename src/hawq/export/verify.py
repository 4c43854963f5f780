"""Check an exported model in onnxruntime against PyTorch, and account for its size on disk.

Round-off: a deep fake-quantized model is not fixed by float32 arithmetic. A value within float32 error of a
rounding boundary of an activation quantizer lands on either neighbouring level, and each such one-level flip
spreads to more flips in the layers after it. Measured on random-weight, batch-norm re-estimated 1000-class
nets (all 8-bit): PyTorch float32 against PyTorch float64 on the same inputs agrees on top-1 for 98.4% of
64 images of ResNet-50 at 64 px (max |logit diff| 2.66, mean 0.45) and 99.6% of 256 images of ResNet-20 at
32 px; onnxruntime without graph optimizations is as far from float64 as PyTorch float32 is (ResNet-20:
mean |logit diff| 0.00085 both; ResNet-50: quantizer levels that differ, 41% by layer4, both).
onnxruntime's default optimizations add a little: they round the float bias of a Conv -> Relu -> Q unit to
int32 at scale s_x * s_w (mean |logit diff| from float64: ResNet-20 3.5-4.5x PyTorch float32's, ResNet-50
1.33x: 0.607 against 0.458 on 128 images, where top-1 agreement was 92.97%). So when top-1 agreement
falls short, `verify_onnx` measures that round-off on the first inputs and fails only if onnxruntime is
further from the float64 model than `ROUNDOFF_FACTOR` times PyTorch float32 is.

Outputs: (B, C) logits, one prediction per input, or (B, T, V) sequence logits (a language model's next-token
logits), flattened to (B*T, V): one prediction per position, agreement, accuracy and cross-entropy over all
B*T, labels (B, T). The round-off measurement keeps the first `ROUNDOFF_IMAGES` inputs (whole sequences).
Inputs go to onnxruntime in the graph input's type: float32 images, int64 token ids.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

ROUNDOFF_IMAGES = 128  # inputs kept for the round-off measurement
# onnxruntime's distance to float64 over PyTorch float32's, measured: 1.33 (ResNet-50), 3.5-4.5 (ResNet-20, three
# seeds; 0.87 with onnxruntime's bias rounding turned off)
ROUNDOFF_FACTOR = 8.0


def ort_session(model: str | Path | bytes, *, threads: int | None = None):
    """An onnxruntime CPU session with default graph optimizations (what a user gets)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])


# onnxruntime's input type names -> numpy; anything else is fed as float32
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
               "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
               "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


def run_onnx(model: str | Path | bytes, x: np.ndarray, session=None) -> np.ndarray:
    """The first output of `model` on `x`, cast to the graph input's type (int64 for token ids)."""
    sess = session if session is not None else ort_session(model)
    inp = sess.get_inputs()[0]
    dtype = np.dtype(_ORT_DTYPES.get(inp.type, np.float32))
    x = np.asarray(x)
    if dtype.kind in "iub" and x.dtype.kind == "f":
        raise ValueError(f"the ONNX model's input is {inp.type} (e.g. token ids) but got {x.dtype} values: pass "
                         "the integer tensor itself")
    return sess.run(None, {inp.name: np.ascontiguousarray(x, dtype=dtype)})[0]


def predictions(logits: np.ndarray) -> np.ndarray:
    """The argmax over the last axis, one per prediction: (B, C) -> (B,), (B, T, V) -> (B*T,)."""
    if logits.ndim not in (2, 3):
        raise ValueError(f"outputs of shape {tuple(logits.shape)} are neither (B, C) logits nor (B, T, V) "
                         "sequence logits: the ONNX check compares only those")
    return logits.argmax(-1).reshape(-1)


def cross_entropy_sum(logits: np.ndarray, labels: np.ndarray) -> float:
    """Summed cross-entropy (nats, float64) of (B, C) or (B, T, V) logits against (B,) or (B, T) labels."""
    z = logits.astype(np.float64).reshape(-1, logits.shape[-1])
    top = z.max(axis=1)
    lse = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
    return float((lse - z[np.arange(len(z)), labels.reshape(-1)]).sum())


def compare_logits(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """max / mean |difference| and top-1 agreement over every prediction ((B, C) or (B, T, V); else nan)."""
    diff = np.abs(ref.astype(np.float64) - out.astype(np.float64))
    agree = float(np.mean(predictions(ref) == predictions(out))) if ref.ndim in (2, 3) else float("nan")
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()), "top1_agreement": agree}


@dataclass(frozen=True)
class VerifyReport:
    """onnxruntime against the PyTorch (fake-quantized) model on the same inputs; accuracies in 0..1.

    Agreement, accuracies and cross-entropies are over predictions: one per input of (B, C) outputs, one per
    position of (B, T, V) ones (n_predictions = B*T summed over the batches).
    """

    n_samples: int  # inputs (images, sequences)
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    torch_top1: float | None  # accuracy, when the batches carry labels
    onnx_top1: float | None
    n_predictions: int | None = None  # None in reports written before sequences were checked
    torch_cross_entropy: float | None = None  # mean nats per labeled prediction; exp() of it is the perplexity
    onnx_cross_entropy: float | None = None
    # measured only when top1_agreement is short (module docstring), on the first roundoff_images inputs:
    # PyTorch float32 vs the model in float64 (mean |logit diff|, top-1 agreement), onnxruntime vs float64
    roundoff_images: int = 0
    roundoff_mean_abs_diff: float | None = None
    roundoff_top1_agreement: float | None = None
    onnx_float64_mean_abs_diff: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VerifyReport:
        return cls(**d)


@torch.no_grad()
def verify_onnx(
    path: str | Path,
    model: nn.Module,
    batches: Iterable[Any],
    *,
    min_agreement: float = 0.999,
    n_batches: int | None = None,
    progress: bool = False,
) -> VerifyReport:
    """Run `path` in onnxruntime and `model` in PyTorch on `batches` of inputs or (inputs, labels).

    Raises ValueError when the top-1 agreement is below `min_agreement` and onnxruntime's logits are further
    from the model computed in float64 than `ROUNDOFF_FACTOR` times PyTorch float32's (module docstring).
    """
    sess = ort_session(path)
    kept: list[tuple[torch.Tensor, np.ndarray, np.ndarray]] = []  # (inputs, PyTorch, onnxruntime)
    n_kept = 0
    was_training = model.training
    model.eval()
    n = n_pred = n_agree = n_torch_ok = n_onnx_ok = n_labeled = 0
    max_diff, sum_diff, n_values, nll_torch, nll_onnx = 0.0, 0.0, 0, 0.0, 0.0
    try:
        for i, batch in enumerate(tqdm(batches, desc="onnxruntime check", disable=not progress)):
            if n_batches is not None and i >= n_batches:
                break
            x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
            ref = model(x).float().numpy()
            out = run_onnx(path, x.numpy(), session=sess)
            diff = np.abs(ref.astype(np.float64) - out)
            max_diff, sum_diff = max(max_diff, float(diff.max())), sum_diff + float(diff.sum())
            n_values += diff.size
            if n_kept < ROUNDOFF_IMAGES:
                k = ROUNDOFF_IMAGES - n_kept
                kept.append((x[:k].clone(), ref[:k], out[:k]))  # a copy: not the whole batch
                n_kept += len(kept[-1][0])
            p_ref, p_out = predictions(ref), predictions(out)
            n, n_pred, n_agree = n + len(x), n_pred + len(p_ref), n_agree + int((p_ref == p_out).sum())
            if y is not None:
                y = np.asarray(y).reshape(-1)
                if len(y) != len(p_ref):
                    raise ValueError(f"{len(y)} labels for {len(p_ref)} predictions of outputs {ref.shape}: "
                                     "label (B, C) logits by (B,) classes, (B, T, V) ones by (B, T) tokens")
                n_labeled += len(y)
                n_torch_ok, n_onnx_ok = n_torch_ok + int((p_ref == y).sum()), n_onnx_ok + int((p_out == y).sum())
                nll_torch, nll_onnx = nll_torch + cross_entropy_sum(ref, y), nll_onnx + cross_entropy_sum(out, y)
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("verify_onnx got no batches: pass a non-empty iterable of inputs or (inputs, labels)")
    report = VerifyReport(
        n_samples=n, max_abs_diff=max_diff, mean_abs_diff=sum_diff / n_values, top1_agreement=n_agree / n_pred,
        torch_top1=n_torch_ok / n_labeled if n_labeled else None,
        onnx_top1=n_onnx_ok / n_labeled if n_labeled else None, n_predictions=n_pred,
        torch_cross_entropy=nll_torch / n_labeled if n_labeled else None,
        onnx_cross_entropy=nll_onnx / n_labeled if n_labeled else None,
    )
    if report.top1_agreement >= min_agreement:
        return report
    report = replace(report, **_roundoff(model, kept))
    within = report.onnx_float64_mean_abs_diff is not None and (
        report.onnx_float64_mean_abs_diff <= ROUNDOFF_FACTOR * report.roundoff_mean_abs_diff)
    if not within:
        roundoff = "" if report.roundoff_mean_abs_diff is None else (
            f"; against the model in float64 on {report.roundoff_images} inputs, mean |logit diff| "
            f"{report.onnx_float64_mean_abs_diff:.3g} for onnxruntime, {report.roundoff_mean_abs_diff:.3g} for "
            f"PyTorch float32 (more than {ROUNDOFF_FACTOR:g}x its round-off)")
        raise ValueError(
            f"top-1 agreement {100 * report.top1_agreement:.2f}% below {100 * min_agreement:.1f}% between "
            f"onnxruntime and PyTorch on {_counted(n, n_pred)} (max |logit diff| {max_diff:.3g}){roundoff}: {path} "
            "does not compute the fake-quantized model; report this with the model and plan"
        )
    return report


def _counted(n_inputs: int, n_predictions: int) -> str:
    return f"{n_inputs} inputs" if n_inputs == n_predictions else f"{n_predictions} predictions of {n_inputs} inputs"


@torch.no_grad()
def _roundoff(model: nn.Module, kept: list[tuple[torch.Tensor, np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """PyTorch float32 and onnxruntime against `model` in float64 on the kept inputs (empty if no float64)."""
    try:
        m64 = copy.deepcopy(model).double().eval()
        # token ids stay integers; float inputs go to float64 with the model
        ref64 = np.concatenate([m64(x.double() if x.is_floating_point() else x).numpy() for x, _, _ in kept])
    except Exception:  # a model that does not run in float64: no round-off measurement, the plain check
        return {}
    ref = np.concatenate([r for _, r, _ in kept]).astype(np.float64)
    out = np.concatenate([o for _, _, o in kept]).astype(np.float64)
    return {
        "roundoff_images": len(ref),
        "roundoff_mean_abs_diff": float(np.abs(ref - ref64).mean()),
        "roundoff_top1_agreement": float(np.mean(predictions(ref) == predictions(ref64))),
        "onnx_float64_mean_abs_diff": float(np.abs(out - ref64).mean()),
    }


def _tensor_bytes(t) -> int:
    from onnx import numpy_helper

    return len(t.raw_data) if t.raw_data else numpy_helper.to_array(t).nbytes


def _layer_table(model) -> dict[str, list]:
    """fqn -> [n_params, w_bits, a_bits, levels initializer] from the metadata (older files: a list of dicts)."""
    from hawq.export.onnx_export import METADATA_KEY

    meta = json.loads({p.key: p.value for p in model.metadata_props}.get(METADATA_KEY, "{}"))
    if isinstance(meta, list):
        return {x["fqn"]: [x["n_params"], x["w_bits"], x["a_bits"], None] for x in meta}
    return meta


def _roles(model) -> dict[str, str]:
    """Initializer name -> what it holds, read from the nodes that consume it."""
    from hawq.export._pack import DECODER_DOMAIN

    roles: dict[str, str] = {}
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.domain in ("", "ai.onnx"):
            for i, kind in enumerate(("int_weight" if n.op_type == "DequantizeLinear" else "", "scale",
                                      "zero_point")):
                if i < len(n.input) and kind:
                    roles.setdefault(n.input[i], kind)
        elif n.domain == DECODER_DOMAIN and n.input:
            roles[n.input[0]] = "packed_weight"
    return roles


def size_breakdown(path: str | Path) -> dict[str, int | float]:
    """Bytes on disk of an exported model, by what they hold.

    int_weight_bytes: integer weights, native (INT8/INT4/INT2) and bit-packed, of which
    packed_weight_bytes are bit-packed 3/5/6/7-bit ones; scale_bytes / zero_point_bytes: Q/DQ parameters;
    float_param_bytes: every other tensor (biases, float layers, clip bounds); protobuf_overhead_bytes: the
    rest of the file (graph, names, attributes, decoder functions, metadata). plan_weight_bytes is
    sum(n_params * w_bits) / 8 over the quantized layers, the size an allocator computes;
    container_padding_bytes is what storage adds to it (1-bit weights in INT2, and rounding each layer to
    whole bytes / whole groups of eight packed values).
    """
    import onnx

    path = Path(path)
    model = onnx.load(str(path))
    roles = _roles(model)
    totals = {"int_weight": 0, "scale": 0, "zero_point": 0, "float_param": 0}
    packed = n_float_params = 0
    for t in model.graph.initializer:
        role = roles.get(t.name, "float_param")
        if role == "int_weight" and t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            role = "float_param"  # a float tensor DequantizeLinear reads is no integer weight
        if role == "packed_weight":
            role, packed = "int_weight", packed + _tensor_bytes(t)
        if role == "float_param":
            n_float_params += math.prod(t.dims)
        totals[role] += _tensor_bytes(t)
    file_size = path.stat().st_size
    layers = _layer_table(model).values()
    plan_bits = sum(n_params * w_bits for n_params, w_bits, *_ in layers if w_bits is not None)
    out: dict[str, int | float] = {f"{k}_bytes": v for k, v in totals.items()}
    out.update(
        file_size_bytes=file_size,
        protobuf_overhead_bytes=file_size - sum(totals.values()),
        n_float_params=n_float_params,
        packed_weight_bytes=packed,
        plan_weight_bytes=plan_bits / 8,
        container_padding_bytes=totals["int_weight"] - plan_bits / 8,
    )
    return out


def layer_levels(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """fqn -> (int8 levels, float32 per-channel scales) of every quantized weight stored in `path`.

    Decoded in numpy from the file (native sub-byte types and bit-packed bytes alike); levels * scales is
    the weight the model computes with (with any folded batch norm scale inside the scales).
    """
    import onnx
    from onnx import numpy_helper

    from hawq.export._pack import DECODER_ATTR, DECODER_DOMAIN, unpack_fields

    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    by_input: dict[str, list] = {}
    for n in model.graph.node:
        for name in n.input:
            by_input.setdefault(name, []).append(n)
    out = {}
    for fqn, (_, w_bits, _, name) in _layer_table(model).items():
        if w_bits is None or name is None:
            continue
        node = by_input[name][0]
        if node.domain == DECODER_DOMAIN:
            shape = tuple(next(a.ints for a in node.attribute if a.name == DECODER_ATTR))
            levels = unpack_fields(inits[name].raw_data, w_bits, shape)
            node = by_input[node.output[0]][0]
        else:
            levels = numpy_helper.to_array(inits[name]).astype(np.int8)
        out[fqn] = levels, numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
    return out
