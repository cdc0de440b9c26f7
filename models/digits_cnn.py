"""A small CNN for scikit-learn's 8x8 handwritten digits: the quickstart model.

Three 3x3 conv + BN + ReLU stages (the middle one strided), global average
pooling and a linear classifier: only ops every edge runtime has.
"""

from __future__ import annotations

from torch import nn

from edgekit.artifact import TensorSpec
from edgekit.models.registry import register_model

_INPUTS = [TensorSpec(name="input", shape=["batch", 1, 8, 8], dtype="float32", layout="NCHW", low=0, high=1)]


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DigitsCNN(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 16, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn(in_channels, width),
            _conv_bn(width, 2 * width, stride=2),
            _conv_bn(2 * width, 4 * width),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, input):  # noqa: A002 - named like the model input
        x = self.pool(self.features(input)).flatten(1)
        return self.classifier(x)


@register_model(inputs=_INPUTS, task="classification", dims={"batch": 1})
def digits_cnn(num_classes: int = 10, width: int = 16) -> DigitsCNN:
    """Digits CNN, 16-32-64 channels (~24 K params)."""
    return DigitsCNN(num_classes, width)


@register_model(inputs=_INPUTS, task="classification", dims={"batch": 1})
def digits_cnn_tiny(num_classes: int = 10, width: int = 8) -> DigitsCNN:
    """Digits CNN, 8-16-32 channels (~6 K params)."""
    return DigitsCNN(num_classes, width)
