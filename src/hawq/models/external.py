"""Models from outside the registry: `torchvision:NAME` and a user's `path/to/file.py:function`.

- `torchvision:NAME`: any torchvision classification builder, `torchvision.models.get_model(NAME,
  weights=None, num_classes=...)`; nothing is downloaded (local weights load through `weights=PATH`).
  GoogLeNet and Inception-V3 are built without their auxiliary heads (as the registry's inception_v3):
  the logits alone come back in training too, and the heads' weights are dropped from a checkpoint.
  `in_channels` other than 3 replaces the first convolution executed on the input.
- `path/to/file.py:function`: the file is imported and the function called with `num_classes=` and
  `in_channels=` when its signature takes them; it must return an nn.Module.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hawq.models.paper import load_weights

_NO_AUX = {"googlenet": ("aux1.", "aux2."), "inception_v3": ("AuxLogits.",)}
NATIVE_IMAGE_SIZE = {"inception_v3": 299}  # torchvision builders' native resolution, else 224


def torchvision_names() -> list[str]:
    """Every torchvision classification builder (not detection, segmentation, video or quantized ones)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def is_external(name: str) -> bool:
    return name.startswith("torchvision:") or _file_spec(name) is not None


def native_image_size(name: str) -> int | None:
    """The input resolution a `torchvision:NAME` model is built for (None for other names)."""
    if not name.startswith("torchvision:"):
        return None
    return NATIVE_IMAGE_SIZE.get(name[len("torchvision:"):], 224)


def _file_spec(name: str) -> tuple[str, str] | None:
    path, sep, fn = name.rpartition(":")
    return (path, fn) if sep and path.endswith(".py") and fn else None


def _first_conv(model: nn.Module, image_size: int) -> str | None:
    """fqn of the first Conv2d executed on a (1, 3, S, S) input."""
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: order.append(n))
             for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, image_size, image_size))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return order[0] if order else None


def _set_in_channels(model: nn.Module, fqn: str, in_channels: int) -> None:
    old = model.get_submodule(fqn)
    if old.groups != 1:
        raise ValueError(f"the first convolution {fqn!r} is grouped: in_channels={in_channels} is not supported")
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
                    1, old.bias is not None, old.padding_mode)
    parent, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def create_torchvision_model(name: str, in_channels: int = 3, num_classes: int = 1000,
                             weights: str | None = None, **kwargs: Any) -> nn.Module:
    """A torchvision classification model with random weights (or local `weights`), never downloading."""
    import torchvision

    names = torchvision_names()
    if name not in names:
        close = [n for n in names if name.lower()[:4] in n][:6]
        hint = f" (close: {', '.join(close)})" if close else ""
        raise ValueError(f"torchvision has no classification model {name!r}{hint}: see "
                         "torchvision.models.list_models(module=torchvision.models)")
    if in_channels < 1 or num_classes < 1:
        raise ValueError(f"in_channels and num_classes must be positive (got {in_channels}, {num_classes})")
    if name in _NO_AUX:
        kwargs.setdefault("aux_logits", False)
        kwargs.setdefault("init_weights", True)
    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"torchvision model {name!r} cannot be built with num_classes={num_classes}: {e}") from e
    if in_channels != 3:
        first = _first_conv(model, native_image_size(f"torchvision:{name}"))
        if first is None:
            raise ValueError(f"torchvision model {name!r} has no convolution to take in_channels={in_channels}")
        _set_in_channels(model, first, in_channels)
    if weights:
        drop = _NO_AUX.get(name, ()) if not kwargs.get("aux_logits", False) else ()
        load_weights(model, weights, drop_prefixes=drop)
    return model


def create_file_model(spec: str, in_channels: int = 3, num_classes: int = 1000, weights: str | None = None,
                      **kwargs: Any) -> nn.Module:
    """`path/to/file.py:function`: import the file and call the function (with num_classes= and
    in_channels= when it accepts them)."""
    parsed = _file_spec(spec)
    if parsed is None:
        raise ValueError(f"model {spec!r} is not of the form path/to/file.py:function")
    path, fn_name = Path(parsed[0]), parsed[1]
    if not path.is_file():
        raise ValueError(f"model file {path} does not exist: pass --model path/to/file.py:function")
    mod_name = f"hawq_user_model_{abs(hash(str(path.resolve())))}"
    module = sys.modules.get(mod_name)
    if module is None:
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.path.insert(0, str(path.resolve().parent))  # the file may import its neighbours
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:
            raise ValueError(f"model file {path} cannot be imported: {type(e).__name__}: {e}") from e
        finally:
            sys.path.remove(str(path.resolve().parent))
        sys.modules[mod_name] = module
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        found = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                 and getattr(v, "__module__", None) == mod_name]
        raise ValueError(f"{path} has no function {fn_name!r} (it defines: {', '.join(found) or 'none'})")
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kw = {k: v for k, v in {"num_classes": num_classes, "in_channels": in_channels, **kwargs}.items()
          if takes_any or k in params}
    model = fn(**kw)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{path}:{fn_name} returned a {type(model).__name__}, not an nn.Module")
    return load_weights(model, weights) if weights else model
