"""Reference convolutional networks with a choice of normaliser, for trials, demos and benchmarks.

Every block is ``conv -> normaliser -> nn.ReLU`` with each module registered under its own
name, so the probe can follow the forward pass from a convolution to its normaliser and
activation. Convolutions have no bias when a normaliser follows, because the normaliser's
shift replaces it.
"""

import logging

from torch import nn

logger = logging.getLogger(__name__)

MODELS = ("small_cnn", "resnet")
NORMS = ("agc", "batchnorm", "none")

DEFAULT_WIDTH = {"small_cnn": 16, "resnet": 32}


def build_model(
    name: str,
    norm: str,
    in_channels: int = 1,
    num_classes: int = 10,
    width: int | None = None,
) -> nn.Module:
    """Build a classifier for images [N, in_channels, H, W] that returns logits [N, num_classes].

    ``name`` is ``"small_cnn"`` (5 convolutions, widths w, 2w, 2w, 4w, 4w, two stride-2 steps,
    global average pooling) or ``"resnet"`` (a stem and three stages of basic residual blocks,
    9 convolutions of 3x3 with widths w, 2w, 4w). ``norm`` is ``"agc"`` (AutoGainControl),
    ``"batchnorm"`` or ``"none"``. ``width`` defaults to 16 for the small CNN and 32 for the
    ResNet. Both accept any input size of at least 8x8, since global average pooling ends them.
    """
    _check_choice("model name", name, MODELS)
    _check_choice("norm", norm, NORMS)
    _check_positive_int("in_channels", in_channels)
    _check_positive_int("num_classes", num_classes)
    if width is None:
        width = DEFAULT_WIDTH[name]
    _check_positive_int("width", width)

    if name == "small_cnn":
        model = SmallCNN(in_channels, num_classes, width, norm)
    else:
        model = ResNet(in_channels, num_classes, width, norm)
    logger.debug("built %s with norm=%s, width=%d", name, norm, width)
    return model


def make_norm(norm: str, channels: int, dims: int = 2) -> nn.Module:
    """Return the normaliser module for ``channels`` filters of a ``dims``-D convolution."""
    if norm == "agc":
        from probe.agc import AutoGainControl

        return AutoGainControl(channels)
    if norm == "batchnorm":
        batch_norms = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
        return batch_norms[dims](channels)
    return nn.Identity()


class ConvBlock(nn.Sequential):
    """``conv (3x3) -> normaliser -> ReLU``, as the submodules ``conv``, ``norm`` and ``act``."""

    def __init__(self, in_channels: int, out_channels: int, norm: str, stride: int = 1):
        super().__init__()
        self.conv = _conv3x3(in_channels, out_channels, norm, stride)
        self.norm = make_norm(norm, out_channels)
        self.act = nn.ReLU()


class SmallCNN(nn.Module):
    """Five conv blocks, global average pooling and a linear classifier."""

    def __init__(self, in_channels: int, num_classes: int, width: int, norm: str):
        super().__init__()
        widths = [width, 2 * width, 2 * width, 4 * width, 4 * width]
        strides = [1, 2, 1, 2, 1]

        blocks = []
        previous = in_channels
        for channels, stride in zip(widths, strides):
            blocks.append(ConvBlock(previous, channels, norm, stride))
            previous = channels
        self.features = nn.Sequential(*blocks)

        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(previous, num_classes)

    def forward(self, x):
        x = self.features(x)
        x = self.pool(x).flatten(1)
        return self.fc(x)


class BasicBlock(nn.Module):
    """Residual block: two 3x3 conv layers, and a 1x1 conv on the shortcut when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, norm: str, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, norm, stride)
        self.norm1 = make_norm(norm, out_channels)
        self.act1 = nn.ReLU()
        self.conv2 = _conv3x3(out_channels, out_channels, norm, 1)
        self.norm2 = make_norm(norm, out_channels)
        self.act2 = nn.ReLU()

        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=norm == "none"),
                make_norm(norm, out_channels),
            )

    def forward(self, x):
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem block, stages of widths w (2 blocks), 2w and 4w (1 block each, stride 2), pooling, linear."""

    def __init__(self, in_channels: int, num_classes: int, width: int, norm: str):
        super().__init__()
        self.stem = ConvBlock(in_channels, width, norm)
        self.stage1 = nn.Sequential(BasicBlock(width, width, norm), BasicBlock(width, width, norm))
        self.stage2 = nn.Sequential(BasicBlock(width, 2 * width, norm, stride=2))
        self.stage3 = nn.Sequential(BasicBlock(2 * width, 4 * width, norm, stride=2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.stage3(self.stage2(self.stage1(x)))
        x = self.pool(x).flatten(1)
        return self.fc(x)


def _conv3x3(in_channels: int, out_channels: int, norm: str, stride: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=norm == "none")


def _check_choice(what: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"invalid {what} {value!r}: expected one of {', '.join(choices)}")


def _check_positive_int(what: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"invalid {what} {value!r}: expected a positive integer")
