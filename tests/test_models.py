"""build_model: shapes, layer structure per normaliser, and argument checks."""

import pytest
import torch
from torch import nn

from probe.agc import AutoGainControl
from probe.models import build_model

NORM_TYPES = {"agc": AutoGainControl, "batchnorm": nn.BatchNorm2d}


@pytest.mark.parametrize("norm", ["agc", "batchnorm", "none"])
@pytest.mark.parametrize("name", ["small_cnn", "resnet"])
@pytest.mark.parametrize("in_channels, side", [(1, 28), (3, 32), (1, 8)])
def test_logits_shape(name, norm, in_channels, side):
    model = build_model(name, norm, in_channels=in_channels, num_classes=7, width=4)

    logits = model(torch.randn(2, in_channels, side, side))

    assert logits.shape == (2, 7)


@pytest.mark.parametrize("norm", ["agc", "batchnorm", "none"])
@pytest.mark.parametrize("name", ["small_cnn", "resnet"])
def test_norm_follows_every_conv(name, norm):
    model = build_model(name, norm, width=4)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.modules() if type(m) is NORM_TYPES.get(norm)]
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]

    if norm == "none":
        assert norms == []
        assert all(conv.bias is not None for conv in convs)
    else:
        assert len(norms) == len(convs)
        assert all(conv.bias is None for conv in convs)
    assert len(relus) >= 5


def test_small_cnn_has_five_convs_and_pooling():
    model = build_model("small_cnn", "agc")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]

    assert len(convs) == 5
    assert [conv.out_channels for conv in convs] == [16, 32, 32, 64, 64]
    assert any(isinstance(m, nn.AdaptiveAvgPool2d) for m in model.modules())


def test_resnet_widths_and_depth():
    model = build_model("resnet", "batchnorm")
    convs_3x3 = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]

    assert len(convs_3x3) >= 8
    assert {conv.out_channels for conv in convs_3x3} == {32, 64, 128}


def test_resnet_backward_reaches_every_weight():
    model = build_model("resnet", "agc", width=4)

    model(torch.randn(2, 1, 16, 16)).sum().backward()

    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "vgg", "norm": "agc"}, "invalid model name 'vgg'"),
        ({"name": "resnet", "norm": "layernorm"}, "invalid norm 'layernorm'"),
        ({"name": "resnet", "norm": "agc", "width": 0}, "invalid width 0"),
        ({"name": "resnet", "norm": "agc", "in_channels": -1}, "invalid in_channels -1"),
    ],
)
def test_invalid_arguments_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_model(**kwargs)
