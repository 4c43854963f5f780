"""SqueezeNext (Gholami et al. 2018, "SqueezeNext: Hardware-Aware Neural Network Design", arXiv 1803.10615).

A SqueezeNext block (the paper's Fig. 1, right) squeezes the channels twice with 1x1 convolutions
(in -> in/r -> in/2r), expands back with a separable 3x3 pair (1x3 then 3x1) and a final 1x1 expansion,
and adds a residual: identity, or a 1x1 projection where the shape changes. Every convolution is
conv + batch norm + ReLU. r = 1 in the first block of a stage (which strides by 2), 4 where the block
reduces the channels, else 2. The 23-layer variants have four stages of 32/64/128/256 base channels
with blocks [6, 6, 8, 1] (SqNxt-23) or [2, 4, 14, 1] (SqNxt-23v5, the paper's hardware-guided redistribution),
after a 7x7 stride-2 convolution of 64 channels and a 3x3 max-pool, and before a 1x1 convolution to
128 channels, global average pooling and the classifier. "w" is the paper's width multiplier
(1.0-SqNxt-23 = `sqnxt23_w1`).

The layer arrangement (biases on the convolutions, ceil-mode pooling) follows the PyTorch port that the
authors' repository (amirgholami/SqueezeNext) points to for pretrained weights (osmr/imgclsmob,
pytorchcv `sqnxt23_w1` ...), so parameter counts agree with it exactly (tests/models/test_paper_models.py).
Global average pooling replaces the port's fixed 7x7 pool, so any input size of 32 px or more works.
"""

from __future__ import annotations

from torch import Tensor, nn

from hawq.models import register_model

BASE_CHANNELS = (32, 64, 128, 256)
BLOCKS = {"23": (6, 6, 8, 1), "23v5": (2, 4, 14, 1)}
STEM_CHANNELS, HEAD_CHANNELS = 64, 128


def conv_bn_relu(
    c_in: int, c_out: int, kernel: int | tuple[int, int], stride: int = 1, padding: int | tuple[int, int] = 0
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=True),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SqnxtBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        r = 1 if stride == 2 else (4 if c_in > c_out else 2)
        mid, squeeze = c_in // r, c_in // (2 * r)
        self.squeeze1 = conv_bn_relu(c_in, mid, 1, stride)  # (B, in, H, W) -> (B, in/r, H/s, W/s)
        self.squeeze2 = conv_bn_relu(mid, squeeze, 1)  # -> in/2r
        self.sep1x3 = conv_bn_relu(squeeze, mid, (1, 3), padding=(0, 1))  # -> in/r
        self.sep3x1 = conv_bn_relu(mid, mid, (3, 1), padding=(1, 0))
        self.expand = conv_bn_relu(mid, c_out, 1)  # -> out
        self.shortcut = conv_bn_relu(c_in, c_out, 1, stride) if (stride != 1 or c_in != c_out) else None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.expand(self.sep3x1(self.sep1x3(self.squeeze2(self.squeeze1(x)))))
        return self.relu(out + identity)


class SqueezeNext(nn.Module):
    def __init__(
        self, version: str = "23", width: float = 1.0, in_channels: int = 3, num_classes: int = 1000
    ) -> None:
        super().__init__()
        if version not in BLOCKS:
            raise ValueError(f"unknown SqueezeNext version {version!r}: use one of {', '.join(BLOCKS)}")
        if width <= 0:
            raise ValueError(f"width multiplier must be positive, got {width}")
        stem, head = int(STEM_CHANNELS * width), int(HEAD_CHANNELS * width)
        self.stem = nn.Sequential(
            conv_bn_relu(in_channels, stem, 7, stride=2, padding=1),  # (B, C, H, W) -> (B, 64w, ~H/2, ~W/2)
            nn.MaxPool2d(3, stride=2, ceil_mode=True),
        )
        stages, c = [], stem
        for i, (base, n) in enumerate(zip(BASE_CHANNELS, BLOCKS[version])):
            c_out = int(base * width)
            blocks = []
            for j in range(n):
                blocks.append(SqnxtBlock(c, c_out, stride=2 if (j == 0 and i > 0) else 1))
                c = c_out
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2, self.stage3, self.stage4 = stages
        self.head = conv_bn_relu(c, head, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(head, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:  # x: (B, C, H, W), H, W >= 32
        x = self.stem(x)
        x = self.stage4(self.stage3(self.stage2(self.stage1(x))))
        return self.fc(self.pool(self.head(x)).flatten(1))  # (B, num_classes)


def _build(version: str, width: float, in_channels: int, num_classes: int, weights: str | None) -> nn.Module:
    from hawq.models.paper import load_weights

    model = SqueezeNext(version, width, in_channels, num_classes)
    return load_weights(model, weights) if weights else model


@register_model
def sqnxt23_w1(in_channels: int = 3, num_classes: int = 1000, weights: str | None = None) -> nn.Module:
    """1.0-SqNxt-23 (724,056 parameters with 1000 classes)."""
    return _build("23", 1.0, in_channels, num_classes, weights)


@register_model
def sqnxt23_w3d2(in_channels: int = 3, num_classes: int = 1000, weights: str | None = None) -> nn.Module:
    """1.5-SqNxt-23."""
    return _build("23", 1.5, in_channels, num_classes, weights)


@register_model
def sqnxt23_w2(in_channels: int = 3, num_classes: int = 1000, weights: str | None = None) -> nn.Module:
    """2.0-SqNxt-23: the SqueezeNext of the HAWQ papers (2.58M parameters = 9.86 MB in float32)."""
    return _build("23", 2.0, in_channels, num_classes, weights)


@register_model
def sqnxt23v5_w1(in_channels: int = 3, num_classes: int = 1000, weights: str | None = None) -> nn.Module:
    """1.0-SqNxt-23v5."""
    return _build("23v5", 1.0, in_channels, num_classes, weights)


@register_model
def sqnxt23v5_w3d2(in_channels: int = 3, num_classes: int = 1000, weights: str | None = None) -> nn.Module:
    """1.5-SqNxt-23v5."""
    return _build("23v5", 1.5, in_channels, num_classes, weights)


@register_model
def sqnxt23v5_w2(in_channels: int = 3, num_classes: int = 1000, weights: str | None = None) -> nn.Module:
    """2.0-SqNxt-23v5."""
    return _build("23v5", 2.0, in_channels, num_classes, weights)
