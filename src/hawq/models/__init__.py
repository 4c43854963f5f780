"""Model registry: `create_model(name, **kwargs)`; entries register with `@register_model`."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model, e.g. `create_model("resnet20", in_channels=1, num_classes=10)`.

    `timm:NAME` builds a timm model when timm is installed, `torchvision:NAME` any torchvision
    classification model, `path/to/file.py:function` a user's own builder (never downloading weights)."""
    if name.startswith("torchvision:"):
        return external.create_torchvision_model(name[len("torchvision:") :], **kwargs)
    if external.is_external(name):
        return external.create_file_model(name, **kwargs)
    if name.startswith("timm:"):
        from hawq.models.paper import create_timm_model

        return create_timm_model(name[len("timm:") :], **kwargs)
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(list_models())}, "
                         "torchvision:NAME or path/to/file.py:function")
    return _REGISTRY[name](**kwargs)


from hawq.models import char_gpt, external, paper, resnet_cifar, retinanet_tiny, squeezenext, tiny  # noqa: E402,F401

__all__ = ["create_model", "list_models", "register_model"]
