"""Every recorded metric against a value computed independently with plain torch.

The reference recomputes the forward pass with functional calls on copies of the weights, takes
per-sample gradient norms in explicit loops over samples, and applies the metric definitions of
the design document directly.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import probe
from probe.schema import METRICS


def train_one_step(model, x, target, run_dir, lr=0.1, **probe_options):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    with probe.Probe(model, run_dir=run_dir, **probe_options) as p:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        p.step(loss=loss, lr=lr)
    return probe.open_run(p.run_dir)


def reference_metrics(model, x, target, lr, bn_training=True):
    """Metrics per layer name for one SGD step of ConvBnReluNet, computed by hand."""
    conv_w = model.conv.weight.detach().clone().requires_grad_(True)
    fc_w = model.fc.weight.detach().clone().requires_grad_(True)
    fc_b = model.fc.bias.detach().clone().requires_grad_(True)
    bn = model.bn

    z = F.conv2d(x, conv_w, model.conv.bias, padding=1)
    z.retain_grad()
    if isinstance(bn, nn.BatchNorm2d):
        mean = z.mean(dim=(0, 2, 3))
        var = ((z - mean[None, :, None, None]) ** 2).mean(dim=(0, 2, 3))
        if not bn_training:
            mean, var = bn.running_mean, bn.running_var
        gain = bn.weight.detach() / torch.sqrt(var + bn.eps)
        y = (z - mean[None, :, None, None]) * gain[None, :, None, None] \
            + bn.bias.detach()[None, :, None, None]
    else:
        gain = torch.ones(z.shape[1])
        y = z
    a = torch.relu(y)
    logits = F.linear(a.mean(dim=(2, 3)), fc_w, fc_b)
    logits.retain_grad()
    F.cross_entropy(logits, target).backward()

    def per_sample_effective_batch(grad):
        norms = torch.stack([grad[n].reshape(grad.shape[1], -1).norm(dim=1)
                             for n in range(grad.shape[0])])  # [N, C]
        total, total_sq = norms.sum(0), (norms ** 2).sum(0)
        return torch.where(total_sq > 0, total ** 2 / total_sq, torch.zeros_like(total))

    def weight_metrics(weight, grad):
        after = weight.detach() - lr * grad
        update = (after - weight.detach()).reshape(len(after), -1).norm(dim=1)
        weight_norm = after.reshape(len(after), -1).norm(dim=1)
        return grad.reshape(len(grad), -1).norm(dim=1), weight_norm, update / weight_norm

    conv_grad_norm, conv_weight_norm, conv_update = weight_metrics(conv_w, conv_w.grad)
    fc_grad_norm, fc_weight_norm, fc_update = weight_metrics(fc_w, fc_w.grad)
    samples = x.shape[0]
    conv_active = torch.tensor([sum(bool((a[n, c] != 0).any()) for n in range(samples))
                                for c in range(a.shape[1])], dtype=torch.float32)
    logits_values = logits.detach()
    return {
        "conv": {
            "gain": gain,
            "out_rms": y.detach().pow(2).mean(dim=(0, 2, 3)).sqrt(),
            "out_mean": y.detach().mean(dim=(0, 2, 3)),
            "sparsity": (a == 0).float().mean(dim=(0, 2, 3)),
            "active_samples": conv_active,
            "effective_batch": per_sample_effective_batch(z.grad),
            "grad_norm": conv_grad_norm,
            "weight_norm": conv_weight_norm,
            "update_ratio": conv_update,
        },
        "fc": {
            "gain": torch.ones(logits.shape[1]),
            "out_rms": logits_values.pow(2).mean(0).sqrt(),
            "out_mean": logits_values.mean(0),
            "sparsity": (logits_values <= 0).float().mean(0),
            "active_samples": (logits_values != 0).float().sum(0),
            "effective_batch": per_sample_effective_batch(logits.grad[:, :, None]),
            "grad_norm": fc_grad_norm,
            "weight_norm": fc_weight_norm,
            "update_ratio": fc_update,
        },
    }


def recorded(run, layer):
    frame = run.filters(layers=[layer]).sort_values(["step", "filter"])
    return {name: frame[name].to_numpy(dtype=np.float64) for name in METRICS}


@pytest.mark.parametrize("norm", [True, False], ids=["batchnorm", "no-norm"])
def test_metrics_match_reference(runs_dir, conv_bn_relu_net, norm):
    model = conv_bn_relu_net(norm=norm)
    x = torch.randn(6, 2, 5, 5)
    x[2] = -10.0  # a sample whose ReLU map is all zero for some filters
    target = torch.tensor([0, 1, 2, 3, 0, 1])
    expected = reference_metrics(copy.deepcopy(model), x, target, lr=0.1)

    run = train_one_step(model, x, target, runs_dir / "ref", lr=0.1)

    for layer in ("conv", "fc"):
        got = recorded(run, layer)
        for name in METRICS:
            np.testing.assert_allclose(got[name], expected[layer][name].detach().numpy(), rtol=2e-4,
                                       atol=1e-6, err_msg=f"{layer}.{name}")


def test_inplace_relu_matches_reference(runs_dir, conv_bn_relu_net):
    model = conv_bn_relu_net(inplace=True)
    x = torch.randn(4, 2, 5, 5)
    target = torch.tensor([0, 1, 2, 3])
    expected = reference_metrics(copy.deepcopy(model), x, target, lr=0.1)

    run = train_one_step(model, x, target, runs_dir / "inplace", lr=0.1)

    got = recorded(run, "conv")
    for name in METRICS:
        np.testing.assert_allclose(got[name], expected["conv"][name].detach().numpy(), rtol=2e-4,
                                   atol=1e-6, err_msg=name)


def test_layer_map_in_run_json(runs_dir, conv_bn_relu_net):
    model = conv_bn_relu_net()
    run = train_one_step(model, torch.randn(2, 2, 5, 5), torch.tensor([0, 1]), runs_dir / "map")

    layers = {layer["name"]: layer for layer in run.meta["layers"]}
    assert layers["conv"]["normaliser"] == "bn"
    assert layers["conv"]["activation"] == "relu"
    assert layers["fc"]["normaliser"] is None
    assert layers["fc"]["activation"] is None
    assert [layer["name"] for layer in run.meta["layers"]] == ["conv", "fc"]
    assert run.meta["status"] == "finished"


class LinearProbeNet(nn.Module):
    """One bias-free linear layer whose output is the loss input, for effective-batch extremes."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2, bias=False)
        self.head = nn.Linear(2, 1, bias=False)

    def forward(self, x):
        return self.head(self.fc(x))


def effective_batch_after_step(run_dir, x, loss_of_output):
    model = LinearProbeNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with probe.Probe(model, run_dir=run_dir) as p:
        loss = loss_of_output(model(x))
        loss.backward()
        optimizer.step()
        p.step(loss=loss)
    frame = probe.open_run(p.run_dir).filters(layers=["fc"])
    return frame["effective_batch"].to_numpy()


def test_effective_batch_equal_samples_is_n(runs_dir):
    x = torch.ones(8, 3)
    got = effective_batch_after_step(runs_dir / "equal", x, lambda out: out.sum())
    np.testing.assert_allclose(got, [8.0, 8.0], rtol=1e-5)


def test_effective_batch_one_sample_is_one(runs_dir):
    x = torch.randn(8, 3)
    got = effective_batch_after_step(runs_dir / "one", x, lambda out: out[3].sum())
    np.testing.assert_allclose(got, [1.0, 1.0], rtol=1e-5)


def test_effective_batch_no_gradient_is_zero(runs_dir):
    x = torch.randn(8, 3)
    got = effective_batch_after_step(runs_dir / "none", x, lambda out: 0.0 * out.sum())
    np.testing.assert_array_equal(got, [0.0, 0.0])


def test_active_samples_known_zeros(runs_dir):
    conv = nn.Conv2d(1, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight[:] = torch.tensor([1.0, -1.0]).reshape(2, 1, 1, 1)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4, 1))
    x = torch.zeros(5, 1, 2, 2)
    x[0, 0, 0, 0] = 1.0  # sample 0: one positive value -> filter 0 active, filter 1 not
    x[1] = -1.0  # sample 1: all negative -> filter 1 active at every position, filter 0 not
    x[2, 0, 1, 1] = -2.0  # sample 2: filter 1 active at one position
    # samples 3 and 4 stay zero -> active for no filter

    with probe.Probe(model, run_dir=runs_dir / "zeros") as p:
        loss = model(x).sum()
        loss.backward()
        p.step(loss=loss)
    frame = probe.open_run(p.run_dir).filters(layers=["0"]).sort_values("filter")

    np.testing.assert_array_equal(frame["active_samples"].to_numpy(), [1, 2])
    # zeros over 5 samples x 4 positions: filter 0 has 1 non-zero, filter 1 has 4 + 1
    np.testing.assert_allclose(frame["sparsity"].to_numpy(), [19 / 20, 15 / 20])


def test_eval_batch_norm_gain_uses_running_variance(runs_dir, conv_bn_relu_net):
    model = conv_bn_relu_net()
    with torch.no_grad():
        model.bn.running_var[:] = torch.tensor([4.0, 0.25, 1.0])
        model.bn.weight[:] = torch.tensor([2.0, 1.0, 3.0])
    model.eval()
    x = torch.randn(3, 2, 5, 5)

    with probe.Probe(model, run_dir=runs_dir / "eval", record_eval=True) as p:
        model(x).sum().backward()
        p.step()
    frame = probe.open_run(p.run_dir).filters(layers=["conv"]).sort_values("filter")

    expected = torch.tensor([2.0, 1.0, 3.0]) / torch.sqrt(torch.tensor([4.0, 0.25, 1.0]) + 1e-5)
    np.testing.assert_allclose(frame["gain"].to_numpy(), expected.numpy(), rtol=1e-6)


@pytest.mark.parametrize("fused", [False, True], ids=["agc-relu", "agc-leaky-relu-in-place"])
def test_agc_layer_metrics_match_reference(runs_dir, fused):
    from probe.agc import AutoGainControl, AutoGainControlLeakyReLU

    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
    norm = AutoGainControlLeakyReLU(3, negative_slope=0.1) if fused else AutoGainControl(3)
    layers = [conv, norm] if fused else [conv, norm, nn.ReLU()]
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(3 * 5 * 5, 2))
    x = torch.randn(4, 2, 5, 5)

    # Reference: the plain AGC formula on a copy of the weights; the gain is the batch mean
    # of |scale| * g for the in-place layer and weight * g for the plain one.
    with torch.no_grad():
        z = F.conv2d(x, conv.weight, padding=1)
        weight = norm.weight.abs() + norm.eps if fused else norm.weight
        normalised = probe.agc.auto_gain_control_reference(z, weight, norm.bias,
                                                           norm.mean_scale_logit, norm.eps)
        a = torch.sigmoid(norm.mean_scale_logit)[None, :, None, None]
        centred = z - a * z.mean(dim=(2, 3), keepdim=True)
        g = torch.rsqrt(centred.pow(2).mean(dim=(2, 3)) + norm.eps)  # [N, C]
        expected_gain = (weight[None, :] * g).mean(0)
        activated = F.leaky_relu(normalised, 0.1) if fused else F.relu(normalised)

    with probe.Probe(model, run_dir=runs_dir / "agc") as p:
        model(x).sum().backward()
        p.step()
    run = probe.open_run(p.run_dir)
    frame = run.filters(layers=["0"]).sort_values("filter")

    assert run.meta["layers"][0]["normaliser"] == "1"
    assert run.meta["layers"][0]["activation"] == ("1" if fused else "2")
    np.testing.assert_allclose(frame["gain"], expected_gain.numpy(), rtol=1e-5)
    np.testing.assert_allclose(frame["out_rms"],
                               normalised.pow(2).mean(dim=(0, 2, 3)).sqrt().numpy(), rtol=1e-4)
    np.testing.assert_allclose(frame["out_mean"], normalised.mean(dim=(0, 2, 3)).numpy(),
                               rtol=1e-4, atol=1e-6)
    expected_sparsity = (activated <= 0).float().mean(dim=(0, 2, 3)) if fused else \
        (activated == 0).float().mean(dim=(0, 2, 3))
    np.testing.assert_allclose(frame["sparsity"], expected_sparsity.numpy(), rtol=1e-6)


class ResidualBlock(nn.Module):
    """conv -> batch norm -> (+ input) -> ReLU: the convolution has no activation of its own."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)) + x)


def test_normaliser_without_activation_sparsity(runs_dir):
    model = ResidualBlock()
    x = torch.randn(4, 3, 5, 5)
    with torch.no_grad():
        z = F.conv2d(x, model.conv.weight, padding=1)
        mean = z.mean(dim=(0, 2, 3), keepdim=True)
        var = z.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        y = (z - mean) / torch.sqrt(var + model.bn.eps)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with probe.Probe(model, run_dir=runs_dir / "residual") as p:
        for _ in range(3):  # later steps run with the layer map already known
            optimizer.zero_grad()
            model(x).sum().backward()
            optimizer.step()
            p.step()
    run = probe.open_run(p.run_dir)
    frame = run.filters(layers=["conv"]).sort_values(["step", "filter"])

    assert run.meta["layers"][0]["activation"] is None
    expected = (y <= 0).float().mean(dim=(0, 2, 3)).numpy()
    for step in range(3):
        got = frame[frame["step"] == step]["sparsity"].to_numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-6, err_msg=f"step {step}")
