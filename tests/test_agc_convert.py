"""to_agc: which batch norms it converts, what else it leaves alone, and that the result trains."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from probe.agc import AutoGainControl, to_agc
from probe.models import build_model


def batch_norm_names(model):
    return [name for name, module in model.named_modules() if isinstance(module, nn.BatchNorm2d)]


def agc_names(model):
    return [name for name, module in model.named_modules() if isinstance(module, AutoGainControl)]


def test_resnet_converted_everywhere_with_same_shapes():
    torch.manual_seed(0)
    model = build_model("resnet", "batchnorm", width=8)
    before = batch_norm_names(model)
    x = torch.randn(2, 1, 28, 28)
    shape = model(x).shape

    to_agc(model)

    assert agc_names(model) == before
    assert batch_norm_names(model) == []
    assert model(x).shape == shape
    for name in before:
        assert model.get_submodule(name).num_features == 8 * {"stage2": 2, "stage3": 4}.get(name.split(".")[0], 1)


def test_conversion_is_idempotent():
    model = to_agc(build_model("small_cnn", "batchnorm", width=4))
    state = {name: value.clone() for name, value in model.state_dict().items()}

    again = to_agc(model)

    assert again is model
    assert {name: value for name, value in again.state_dict().items()}.keys() == state.keys()
    for name, value in again.state_dict().items():
        assert torch.equal(value, state[name]), name


class ConvBiasNet(nn.Module):
    """conv (with bias) -> bn -> relu, and a second conv whose output also feeds an addition."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.act = nn.ReLU()
        self.shared_conv = nn.Conv2d(3, 3, 3, padding=1)
        self.shared_bn = nn.BatchNorm2d(3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        x = self.act(self.bn(self.conv(x)))
        raw = self.shared_conv(x)
        x = self.shared_bn(raw) + raw
        return self.head(x.mean((2, 3)))


def test_conv_bias_dropped_only_when_redundant():
    model = ConvBiasNet()
    head_weight = model.head.weight.detach().clone()

    to_agc(model)

    assert model.conv.bias is None
    assert model.shared_conv.bias is not None
    assert isinstance(model.head, nn.Linear)
    assert torch.equal(model.head.weight, head_weight)
    assert isinstance(model.act, nn.ReLU)


@pytest.mark.parametrize("keep_affine", [False, True])
def test_affine_copied_only_on_request(keep_affine):
    model = ConvBiasNet()
    with torch.no_grad():
        model.bn.weight.fill_(3.0)
        model.bn.bias.fill_(-0.5)
    default = AutoGainControl(3)

    to_agc(model, keep_affine=keep_affine)

    expected_weight = torch.full((3,), 3.0) if keep_affine else default.weight
    expected_bias = torch.full((3,), -0.5) if keep_affine else default.bias
    assert isinstance(model.bn, AutoGainControl)
    assert torch.equal(model.bn.weight, expected_weight)
    assert torch.equal(model.bn.bias, expected_bias)
    assert torch.equal(model.bn.mean_scale_logit, default.mean_scale_logit)


class RegisteredOutOfOrder(nn.Module):
    """The batch norm is registered before its convolution; only the forward pass pairs them."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(5)
        self.conv = nn.Conv1d(2, 5, 3)

    def forward(self, x):
        return self.bn(self.conv(x))


class NormAfterPooling(nn.Module):
    """Module order suggests conv -> bn, but the batch norm reads a pooled map."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(F.max_pool2d(self.conv(x), 2))


def test_pairs_follow_forward_not_module_order():
    model = to_agc(RegisteredOutOfOrder())

    assert isinstance(model.bn, AutoGainControl)
    assert model(torch.randn(2, 2, 9)).shape == (2, 5, 7)


def test_batch_norm_not_after_conv_named():
    with pytest.raises(ValueError, match="cannot convert batch norm bn: in the traced forward pass it is not called, or its input"):
        to_agc(NormAfterPooling())


def test_model_without_batch_norm_rejected():
    with pytest.raises(ValueError, match="found no batch norm to convert in SmallCNN"):
        to_agc(build_model("small_cnn", "none", width=4))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x):
        if x.sum() > 0:
            return self.bn(self.conv(x))
        return x


def test_untraceable_model_explained():
    with pytest.raises(RuntimeError, match="could not trace DataDependent with torch.fx"):
        to_agc(DataDependent())


@pytest.mark.slow
def test_converted_resnet_trains():
    from probe.data import load_dataset

    data = load_dataset("digits", seed=0)
    torch.manual_seed(0)
    model = to_agc(build_model("resnet", "batchnorm", width=8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(0)

    losses = []
    for _ in range(25):
        index = torch.randint(len(data.train_x), (32,), generator=generator)
        loss = F.cross_entropy(model(data.train_x[index]), data.train_y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, losses
