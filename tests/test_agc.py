"""AutoGainControl layer: gradients, batch independence, state, gain record and input checks."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from probe.agc import (
    AutoGainControl,
    AutoGainControlLeakyReLU,
    _AutoGainControlFunction,
    _InPlaceAutoGainControlLeakyReLUFunction,
    auto_gain_control_reference,
)

SHAPES = {1: (3, 4, 7), 2: (2, 3, 4, 3), 3: (2, 2, 2, 3, 2)}
EPS = 1e-5
SLOPE = 0.1


def make_inputs(dims, dtype=torch.float64, seed=0):
    """Input [N, C, *spatial] with a non-zero map mean, and parameters away from zero."""
    generator = torch.Generator().manual_seed(seed)
    shape = SHAPES[dims]
    channels = shape[1]
    z = torch.randn(shape, generator=generator, dtype=dtype) + 0.7
    weight = torch.rand(channels, generator=generator, dtype=dtype) + 0.5
    bias = torch.randn(channels, generator=generator, dtype=dtype)
    logit = torch.randn(channels, generator=generator, dtype=dtype)
    return [t.requires_grad_() for t in (z, weight, bias, logit)]


def plain(z, weight, bias, logit):
    return _AutoGainControlFunction.apply(z, weight, bias, logit, EPS)[0]


def in_place(z, weight, bias, logit):
    return _InPlaceAutoGainControlLeakyReLUFunction.apply(z.clone(), weight, bias, logit, EPS, SLOPE)[0]


def in_place_reference(z, weight, bias, logit):
    return F.leaky_relu(auto_gain_control_reference(z, weight.abs() + EPS, bias, logit, EPS), SLOPE)


def plain_reference(z, weight, bias, logit):
    return auto_gain_control_reference(z, weight, bias, logit, EPS)


CASES = {"plain": (plain, plain_reference), "in_place": (in_place, in_place_reference)}


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("variant", sorted(CASES))
def test_gradcheck_float64(variant, dims):
    function, _ = CASES[variant]
    assert torch.autograd.gradcheck(function, make_inputs(dims))


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("variant", sorted(CASES))
def test_matches_plain_formula(variant, dims):
    function, reference = CASES[variant]
    inputs = make_inputs(dims)
    output = function(*inputs)
    expected = reference(*inputs)
    torch.testing.assert_close(output, expected, rtol=1e-10, atol=1e-10)

    grad_output = torch.randn_like(output)
    grads = torch.autograd.grad(output, inputs, grad_output)
    expected_grads = torch.autograd.grad(expected, inputs, grad_output)
    for name, grad, expected_grad in zip(("z", "weight", "bias", "logit"), grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-10, msg=f"grad {name}")


def test_formula_by_hand():
    # One sample, one filter, map [1, 3]: m = 2, a = 0.5, z - a m = [0, 1, 2],
    # mean square = 5/3, so y = 2 * [0, 1, 2] / sqrt(5/3) + 1 with weight 2, bias 1.
    layer = AutoGainControl(1, eps=1e-12, mean_scale=0.5, weight=2.0)
    with torch.no_grad():
        layer.bias.fill_(1.0)
    z = torch.tensor([[[1.0, 2.0, 3.0]]], dtype=torch.float64)
    layer = layer.double()

    output = layer(z)

    expected = 2 * torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64) / (5 / 3) ** 0.5 + 1
    torch.testing.assert_close(output[0, 0], expected)


@pytest.mark.parametrize(
    "shape, memory_format",
    [((2, 4, 5, 6), torch.channels_last), ((2, 4, 3, 5, 6), torch.channels_last_3d)],
)
def test_channels_last_keeps_layout_and_values(shape, memory_format):
    layer = AutoGainControl(4)
    z = torch.randn(shape)
    z_last = z.to(memory_format=memory_format)

    output = layer(z_last)

    assert output.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(output, layer(z))


def test_channels_last_in_place_gradients():
    z, weight, bias, logit = make_inputs(2)
    z_last = z.detach().to(memory_format=torch.channels_last).requires_grad_()
    output = in_place(z_last, weight, bias, logit)
    expected = in_place_reference(z, weight, bias, logit)

    grad_output = torch.randn_like(expected)
    torch.testing.assert_close(output, expected)
    torch.testing.assert_close(
        torch.autograd.grad(output, z_last, grad_output)[0],
        torch.autograd.grad(expected, z, grad_output)[0],
    )


def make_layer(kind, channels=4):
    torch.manual_seed(0)
    if kind == "plain":
        layer = AutoGainControl(channels, mean_scale=0.3)
    else:
        layer = AutoGainControlLeakyReLU(channels, negative_slope=SLOPE, mean_scale=0.3)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2.0)
        layer.bias.uniform_(-1.0, 1.0)
    return layer


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("kind", ["plain", "in_place"])
def test_sample_alone_equals_sample_in_batch(kind, mode):
    layer = make_layer(kind)
    layer.train(mode == "train")
    batch = torch.randn(8, 4, 6, 6) * torch.linspace(0.1, 10.0, 8).view(8, 1, 1, 1)

    in_batch = layer(batch.clone())
    for n in range(len(batch)):
        alone = layer(batch[n:n + 1].clone())
        torch.testing.assert_close(alone[0], in_batch[n], rtol=1e-6, atol=1e-6)


def test_batch_norm_depends_on_batch():
    batch_norm = nn.BatchNorm2d(4).train()
    batch = torch.randn(8, 4, 6, 6) * torch.linspace(0.1, 10.0, 8).view(8, 1, 1, 1)

    in_batch = batch_norm(batch)
    alone = batch_norm(batch[:1])

    assert (alone[0] - in_batch[0]).abs().max() > 0.1


@pytest.mark.parametrize("kind", ["plain", "in_place"])
def test_forward_changes_no_state(kind):
    layer = make_layer(kind)
    before = {name: value.clone() for name, value in layer.state_dict().items()}
    z = torch.randn(3, 4, 5, 5)

    train_output = layer.train()(z.clone())
    eval_output = layer.eval()(z.clone())

    assert set(before) == {"weight", "bias", "mean_scale_logit"}
    for name, value in layer.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert torch.equal(train_output, eval_output)


@pytest.mark.parametrize("kind", ["plain", "in_place"])
def test_state_dict_round_trip_exact(kind):
    layer = make_layer(kind)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)

    restored = AutoGainControl(4) if kind == "plain" else AutoGainControlLeakyReLU(4, SLOPE)
    restored.load_state_dict(torch.load(buffer))
    z = torch.randn(3, 4, 5, 5)

    assert torch.equal(restored(z.clone()), layer(z.clone()))


@pytest.mark.parametrize("kind", ["plain", "in_place"])
def test_last_gain_is_batch_mean_of_scaled_gain(kind):
    layer = make_layer(kind)
    z = torch.randn(5, 4, 6, 6, dtype=torch.float64) + 1.0
    layer = layer.double()
    assert layer.last_gain is None

    layer(z.clone())

    a = torch.sigmoid(layer.mean_scale_logit.detach()).view(1, 4, 1, 1)
    centred = z - a * z.mean((2, 3), keepdim=True)
    gain = 1 / torch.sqrt(centred.pow(2).mean((2, 3)) + layer.eps)
    weight = layer.weight.detach()
    if kind == "in_place":
        weight = weight.abs() + layer.eps
    expected = (weight * gain).mean(0)

    assert layer.last_gain.dtype == torch.float32
    assert layer.last_gain.shape == (4,)
    assert not layer.last_gain.requires_grad
    torch.testing.assert_close(layer.last_gain, expected.float())


def test_in_place_overwrites_input():
    layer = make_layer("in_place")
    z = torch.randn(2, 4, 5, 5)

    output = layer(z)

    assert output.data_ptr() == z.data_ptr()


def full_size_saved(function, z):
    """Return the storages of size ``z.numel()`` or more that ``function`` keeps for backward."""
    storages = {}

    def pack(tensor):
        if tensor.numel() >= z.numel():
            storages[tensor.untyped_storage().data_ptr()] = tensor
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = function(z)
    return storages, output


def test_plain_keeps_one_full_tensor():
    layer = make_layer("plain")
    z = torch.randn(4, 4, 8, 8, requires_grad=True)

    storages, _ = full_size_saved(layer, z)

    assert list(storages) == [z.untyped_storage().data_ptr()]


def test_in_place_keeps_only_its_output():
    layer = make_layer("in_place")
    x = torch.randn(4, 4, 8, 8, requires_grad=True)
    z = x * 1.0

    storages, output = full_size_saved(layer, z)

    assert list(storages) == [output.untyped_storage().data_ptr()]


@pytest.mark.parametrize(
    "kwargs, value",
    [
        ({"num_features": 0}, "0"),
        ({"num_features": 4, "eps": -1.0}, "-1.0"),
        ({"num_features": 4, "eps": 0.0}, "0.0"),
        ({"num_features": 4, "mean_scale": 1.0}, "1.0"),
        ({"num_features": 4, "mean_scale": 0.0}, "0.0"),
        ({"num_features": 4, "weight": float("nan")}, "nan"),
    ],
)
def test_invalid_hyperparameters_name_value(kwargs, value):
    with pytest.raises(ValueError, match=f"invalid {list(kwargs)[-1]} {value}"):
        AutoGainControl(**kwargs)


def test_invalid_negative_slope_names_value():
    with pytest.raises(ValueError, match="invalid negative_slope 0"):
        AutoGainControlLeakyReLU(4, negative_slope=0)


def test_wrong_channel_count_names_both():
    layer = AutoGainControl(16)

    with pytest.raises(ValueError, match="has 16 filters but the input has 8 channels"):
        layer(torch.randn(2, 8, 4, 4))


def test_input_without_positions_rejected():
    layer = AutoGainControl(16)

    with pytest.raises(ValueError, match=r"got shape \(2, 16\)"):
        layer(torch.randn(2, 16))


@pytest.mark.parametrize("variant", sorted(CASES))
def test_fused_and_plain_backward_agree(variant):
    # A contiguous gradient takes batch norm's fused kernel; an expanded one takes the plain path.
    function, reference = CASES[variant]
    inputs = make_inputs(2)
    output = function(*inputs)
    expected = reference(*inputs)
    expanded = torch.ones((), dtype=output.dtype).expand(output.shape)

    grads_fused = torch.autograd.grad(output, inputs, expanded.contiguous(), retain_graph=True)
    grads_plain = torch.autograd.grad(output, inputs, expanded)
    expected_grads = torch.autograd.grad(expected, inputs, expanded)

    names = ("z", "weight", "bias", "logit")
    for name, fused, plain, expected_grad in zip(names, grads_fused, grads_plain, expected_grads):
        torch.testing.assert_close(fused, expected_grad, rtol=1e-9, atol=1e-10, msg=f"fused grad {name}")
        torch.testing.assert_close(plain, expected_grad, rtol=1e-9, atol=1e-10, msg=f"plain grad {name}")


def test_in_place_rejects_leaf_input():
    layer = AutoGainControlLeakyReLU(4)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)

    with pytest.raises(ValueError, match="writes its output over its input"):
        layer(z)


def test_empty_input_rejected():
    layer = AutoGainControl(4)

    with pytest.raises(ValueError, match=r"empty input of shape \(0, 4, 3, 3\)"):
        layer(torch.randn(0, 4, 3, 3))
