"""The HAWQ-V2 paper's ImageNet and COCO models from torchvision, plus timm models by name.

Nothing is downloaded: every entry builds the architecture with torchvision's `weights=None` and, given
`weights=PATH`, loads a local state dict (a plain state dict, or a checkpoint dict holding one under
"state_dict" or "model"; "module." prefixes of DistributedDataParallel checkpoints are stripped).
torchvision's own pretrained files (e.g. resnet50-0676ba61.pth, inception_v3_google-0cc3c7bd.pth,
retinanet_resnet50_fpn_coco-eeacb38b.pth) load as they are.

Inception-V3 is built without its auxiliary classifier, so `forward` returns the logits alone in
training and evaluation alike: the aux head only adds a training loss term, and the paper's model size
(91.2 MB) counts the network without it. Its `AuxLogits.*` weights are dropped when a torchvision
checkpoint is loaded. torchvision's Google weights expect inputs normalised to [-1, 1];
`transform_input=True` (the default when weights are given) converts ImageNet-normalised inputs to that.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from hawq.models import register_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    from hawq.artifacts import load_torch

    obj = load_torch(path)
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path} holds no state dict: save one with torch.save(model.state_dict(), path)")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def load_weights(model: nn.Module, path: str | os.PathLike, drop_prefixes: tuple[str, ...] = ()) -> nn.Module:
    """Load a local state dict into `model` strictly; keys under `drop_prefixes` are ignored.

    A shape mismatch (e.g. a 1000-class head into a 10-class model) is a ValueError naming the layers.
    """
    sd = {k: v for k, v in _state_dict(path).items() if not k.startswith(drop_prefixes) and
          not k.endswith("num_batches_tracked")}
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"shapes differ for {wrong[:4]} (e.g. {tuple(sd[wrong[0]].shape)} in the file, "
                         f"{tuple(own[wrong[0]].shape)} in the model: check --num-classes / in_channels)")
        if missing:
            parts.append(f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}")
        raise ValueError(f"weights {path} do not fit the model: " + "; ".join(parts))
    model.load_state_dict(sd, strict=False)  # only num_batches_tracked may be absent
    return model


def _replace_first_conv(model: nn.Module, fqn: str, in_channels: int) -> None:
    """Give the stem convolution `in_channels` inputs (a fresh layer of the same shape otherwise)."""
    old = model.get_submodule(fqn)
    if old.in_channels == in_channels:
        return
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                    old.dilation, old.groups, old.bias is not None)
    parent_name, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _check(in_channels: int, num_classes: int) -> None:
    if in_channels < 1 or num_classes < 1:
        raise ValueError(f"in_channels and num_classes must be positive (got {in_channels}, {num_classes})")


@register_model
def resnet50(in_channels: int = 3, num_classes: int = 1000, weights: str | None = None) -> nn.Module:
    """torchvision ResNet-50 (25.6M parameters, 97.5 MB in float32)."""
    from torchvision.models import resnet50 as tv_resnet50

    _check(in_channels, num_classes)
    model = tv_resnet50(weights=None, num_classes=num_classes)
    _replace_first_conv(model, "conv1", in_channels)
    return load_weights(model, weights) if weights else model


@register_model
def inception_v3(
    in_channels: int = 3,
    num_classes: int = 1000,
    weights: str | None = None,
    transform_input: bool | None = None,
) -> nn.Module:
    """torchvision Inception-V3 without the auxiliary head; inputs of 75 px or more (299 px on ImageNet)."""
    from torchvision.models import inception_v3 as tv_inception_v3

    _check(in_channels, num_classes)
    if transform_input is None:
        transform_input = weights is not None
    if transform_input and in_channels != 3:
        raise ValueError("transform_input re-normalises RGB inputs: use it with in_channels=3 only")
    model = tv_inception_v3(weights=None, aux_logits=False, init_weights=weights is None,
                            num_classes=num_classes, transform_input=transform_input)
    _replace_first_conv(model, "Conv2d_1a_3x3.conv", in_channels)
    return load_weights(model, weights, drop_prefixes=("AuxLogits.",)) if weights else model


@register_model
def retinanet_resnet50_fpn(
    in_channels: int = 3,
    num_classes: int = 91,
    weights: str | None = None,
    min_size: int = 800,
    max_size: int = 1333,
    **kwargs: Any,
) -> nn.Module:
    """torchvision RetinaNet with a ResNet-50-FPN backbone (the paper's COCO detector).

    `num_classes` counts label 0 (torchvision's COCO weights use the 91 COCO category ids, so build with
    91 and a `CocoDetection(..., label_map="category_id")` set to evaluate them). `min_size`/`max_size`
    are the detector's own resize (800/1333 on COCO; small for tests). With `weights`, the backbone uses
    frozen batch norm as torchvision's COCO model does; otherwise plain batch norm. All layers trainable.
    """
    from torchvision.models.detection import retinanet_resnet50_fpn as tv_retinanet
    from torchvision.ops.misc import FrozenBatchNorm2d

    _check(in_channels, num_classes)
    if in_channels == 3:
        mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    else:
        mean, std = [0.5] * in_channels, [0.25] * in_channels
    kwargs.setdefault("image_mean", mean)
    kwargs.setdefault("image_std", std)
    if weights:
        # torchvision's COCO model has frozen batch norm (kept: detection batches are too small for batch
        # statistics); every convolution stays trainable so that Hessian-vector products reach all layers
        from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
        from torchvision.models.detection.retinanet import RetinaNet, _default_anchorgen
        from torchvision.models.resnet import resnet50 as tv_resnet50
        from torchvision.ops.feature_pyramid_network import LastLevelP6P7

        body = tv_resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
        backbone = _resnet_fpn_extractor(body, 5, returned_layers=[2, 3, 4],
                                         extra_blocks=LastLevelP6P7(256, 256))
        model: nn.Module = RetinaNet(backbone, num_classes, min_size=min_size, max_size=max_size,
                                     anchor_generator=_default_anchorgen(), **kwargs)
    else:
        model = tv_retinanet(weights=None, weights_backbone=None, num_classes=num_classes,
                             min_size=min_size, max_size=max_size, **kwargs)
    _replace_first_conv(model, "backbone.body.conv1", in_channels)
    return load_weights(model, weights) if weights else model


def create_timm_model(
    name: str, in_channels: int = 3, num_classes: int = 1000, weights: str | None = None, **kwargs: Any
) -> nn.Module:
    """A timm model by name (`create_model("timm:resnet18")`), never downloading: pretrained=False.

    Local weights load through `weights=PATH` like every other entry.
    """
    try:
        import timm
    except ImportError as e:
        raise ValueError(f"model 'timm:{name}' needs timm: pip install timm") from e
    if name not in timm.list_models():
        raise ValueError(f"timm has no model {name!r}: see timm.list_models()")
    model = timm.create_model(name, pretrained=False, in_chans=in_channels, num_classes=num_classes, **kwargs)
    return load_weights(model, weights) if weights else model


def param_count(model: nn.Module) -> int:
    """Trainable parameters (what the papers' parameter counts mean)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def float_size_mb(model: nn.Module) -> float:
    """Parameters in float32, in MB of 2**20 bytes (the papers' convention: ResNet-50 = 97.5 MB)."""
    return sum(p.numel() for p in model.parameters()) * 4 / 2**20
