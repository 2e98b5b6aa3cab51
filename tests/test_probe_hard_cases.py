"""Cases that break hook-based tools: in-place activations, shared modules, checkpointing,
validation passes, half precision, non-finite values, torch.compile, leaks."""

import copy
import gc
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import probe
from probe.schema import METRICS


def train(model, steps, run_dir, x=None, lr=0.05, batch=8, make_loss=None, between=None,
          **probe_options):
    """Run `steps` real SGD steps under a probe; return the opened run."""
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    with probe.Probe(model, run_dir=run_dir, **probe_options) as p:
        for _ in range(steps):
            inputs = x if x is not None else torch.randn(batch, 2, 6, 6, generator=generator)
            out = model(inputs)
            loss = make_loss(out) if make_loss else out.square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            p.step(loss=loss)
            if between is not None:
                between(model)
    return probe.open_run(p.run_dir)


def metric_values(run):
    frame = run.filters().sort_values(["step", "layer", "filter"]).reset_index(drop=True)
    return frame[["step", "layer", "filter", *METRICS]]


def assert_same_metrics(got, expected, rtol=1e-5):
    assert list(got["layer"]) == list(expected["layer"])
    assert list(got["step"]) == list(expected["step"])
    for name in METRICS:
        np.testing.assert_allclose(got[name].to_numpy(float), expected[name].to_numpy(float),
                                   rtol=rtol, atol=1e-6, err_msg=name)


# In-place activations -------------------------------------------------------------------------

@pytest.mark.parametrize("norm", [True, False], ids=["with-batchnorm", "without-batchnorm"])
def test_inplace_relu_after_conv_trains(runs_dir, conv_bn_relu_net, probe_errors, norm):
    model = conv_bn_relu_net(inplace=True, norm=norm)
    reference = copy.deepcopy(model)
    for module in reference.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False

    run = train(model, 3, runs_dir / "inplace")
    expected = train(reference, 3, runs_dir / "copy")

    assert not probe_errors.records
    assert_same_metrics(metric_values(run), metric_values(expected))


# Modules called more than once ----------------------------------------------------------------

class SharedReluNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


def test_shared_relu_resolved_per_call(runs_dir):
    model = SharedReluNet()
    x = torch.randn(5, 2, 6, 6)
    reference = copy.deepcopy(model)
    first = F.relu(reference.bn1(reference.conv1(x)))
    second = F.relu(reference.bn2(reference.conv2(first)))

    run = train(model, 1, runs_dir / "shared-relu", x=x)
    frame = run.filters().sort_values(["layer", "filter"])

    layers = {layer["name"]: layer for layer in run.meta["layers"]}
    assert layers["conv1"]["activation"] == "relu"
    assert layers["conv2"]["activation"] == "relu"
    for layer, activated in (("conv1", first), ("conv2", second)):
        expected = (activated == 0).float().mean(dim=(0, 2, 3)).detach().numpy()
        got = frame[frame["layer"] == layer]["sparsity"].to_numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-6)


class SharedConvNet(nn.Module):
    """One convolution applied to two inputs; its calls are aggregated into one row per filter."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.relu = nn.ReLU()

    def forward(self, x):
        left, right = x.chunk(2, dim=3)
        return self.relu(self.conv(left)).sum() + 3 * self.relu(self.conv(right)).sum()


def test_shared_conv_aggregates_calls(runs_dir):
    model = SharedConvNet()
    x = torch.randn(4, 2, 5, 8)
    weight = model.conv.weight.detach().clone()

    run = train(model, 1, runs_dir / "shared-conv", x=x, make_loss=lambda out: out)
    row = run.filters().sort_values("filter")

    # Reference: both calls' samples form one batch of 2N; gradient signals are per call.
    left, right = x.chunk(2, dim=3)
    z_left = F.conv2d(left, weight, padding=1).requires_grad_(True)
    z_right = F.conv2d(right, weight, padding=1).requires_grad_(True)
    (F.relu(z_left).sum() + 3 * F.relu(z_right).sum()).backward()
    activated = torch.cat([F.relu(z_left), F.relu(z_right)]).detach()
    signal = torch.cat([z_left.grad, z_right.grad]).flatten(2).norm(dim=2)  # [2N, C]
    expected_effective = signal.sum(0) ** 2 / (signal ** 2).sum(0)
    expected_active = (activated.flatten(2) != 0).any(dim=2).sum(0)
    expected_rms = torch.cat([z_left, z_right]).detach().pow(2).mean(dim=(0, 2, 3)).sqrt()

    np.testing.assert_allclose(row["effective_batch"], expected_effective.numpy(), rtol=1e-5)
    np.testing.assert_array_equal(row["active_samples"], expected_active.numpy())
    np.testing.assert_allclose(row["out_rms"], expected_rms.numpy(), rtol=1e-5)
    assert (row["active_samples"] <= 8).all()


# First layer, checkpointing, validation -------------------------------------------------------

def test_first_layer_input_without_grad(runs_dir, conv_bn_relu_net, probe_errors):
    model = conv_bn_relu_net()
    x = torch.randn(4, 2, 5, 5)
    assert not x.requires_grad

    run = train(model, 2, runs_dir / "first", x=x)

    frame = run.filters(layers=["conv"])
    assert len(frame) == 2 * 3
    assert (frame["grad_norm"] > 0).all()
    assert not probe_errors.records


class CheckpointedNet(nn.Module):
    def __init__(self, reentrant=None):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4),
                                   nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Linear(4, 3)
        self.reentrant = reentrant

    def forward(self, x):
        if self.reentrant is None:
            features = self.block(x)
        else:
            features = checkpoint(self.block, x, use_reentrant=self.reentrant)
        return self.head(features.mean(dim=(2, 3)))


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpointing_counts_once(runs_dir, probe_errors, reentrant):
    plain = CheckpointedNet(reentrant=None)
    checkpointed = copy.deepcopy(plain)
    checkpointed.reentrant = reentrant
    x = torch.randn(6, 2, 6, 6, requires_grad=reentrant)  # reentrant needs an input with grad

    expected = metric_values(train(plain, 3, runs_dir / "plain", x=x))
    got = metric_values(train(checkpointed, 3, runs_dir / "checkpointed", x=x))

    assert not probe_errors.records
    assert_same_metrics(got, expected)


def test_checkpointing_state_does_not_grow(runs_dir):
    model = CheckpointedNet(reentrant=False)
    sizes = []

    def record_state_size(_):
        state = p.hooks.state
        sizes.append((len(state.flow), len(state.accumulators), len(p.pending_scalars)))

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with probe.Probe(model, run_dir=runs_dir / "growth") as p:
        for _ in range(20):
            loss = model(torch.randn(4, 2, 6, 6)).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            p.step(loss=loss)
            record_state_size(model)

    assert sizes[0] == sizes[-1]
    assert sizes[-1][0] == 0


def validate(model):
    model.eval()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 2, 6, 6))
    model.train()


def test_validation_not_recorded(runs_dir, conv_bn_relu_net):
    model = conv_bn_relu_net()
    reference = copy.deepcopy(model)

    got = train(model, 3, runs_dir / "validated", between=validate)
    expected = train(reference, 3, runs_dir / "plain", between=lambda m: None)

    assert_same_metrics(metric_values(got), metric_values(expected))


def test_validation_recorded_when_asked(runs_dir, conv_bn_relu_net):
    model = conv_bn_relu_net()
    reference = copy.deepcopy(model)

    got = train(model, 3, runs_dir / "validated", between=validate, record_eval=True)
    expected = train(reference, 3, runs_dir / "plain", between=lambda m: None)

    # Steps after the first include the validation batches of 16 samples in their statistics.
    later_got = got.filters(steps=(1, 2), layers=["conv"])
    later_expected = expected.filters(steps=(1, 2), layers=["conv"])
    assert later_got["active_samples"].max() > later_expected["active_samples"].max()


# Precision and non-finite values --------------------------------------------------------------

def test_fp16_large_values_stay_finite(runs_dir):
    conv = nn.Conv2d(1, 2, 1, bias=False).half()
    with torch.no_grad():
        conv.weight[:] = torch.tensor([1.0, 0.5]).reshape(2, 1, 1, 1)
    model = nn.Sequential(conv, nn.ReLU())
    x = torch.full((4, 1, 8, 8), 3000.0, dtype=torch.float16)  # squares overflow fp16 (max 65504)

    with probe.Probe(model, run_dir=runs_dir / "fp16") as p:
        out = model(x)
        out.float().mean().backward()
        p.step()
    frame = probe.open_run(p.run_dir).filters().sort_values("filter")

    np.testing.assert_allclose(frame["out_rms"], [3000.0, 1500.0], rtol=1e-3)
    assert np.isfinite(frame[list(METRICS)].to_numpy(float)).all()


def test_cpu_autocast_records_float32_statistics(runs_dir, conv_bn_relu_net, probe_errors):
    model = conv_bn_relu_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with probe.Probe(model, run_dir=runs_dir / "autocast") as p:
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(torch.randn(4, 2, 5, 5) * 100).float().square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            p.step(loss=loss)
    frame = probe.open_run(p.run_dir).filters()

    assert len(frame) == 2 * (3 + 4)
    assert np.isfinite(frame[list(METRICS)].to_numpy(float)).all()
    assert not probe_errors.records


def test_nan_and_inf_recorded_as_is(runs_dir, conv_bn_relu_net, probe_errors):
    model = conv_bn_relu_net(norm=False)
    inputs = [torch.randn(4, 2, 5, 5) for _ in range(3)]
    inputs[1][0, 0, 0, 0] = float("nan")

    # No optimiser step, so that the NaN gradient of step 1 does not reach the weights.
    with probe.Probe(model, run_dir=runs_dir / "nan") as p:
        for x in inputs:
            model.zero_grad()
            loss = model(x).sum()
            loss.backward()
            p.step(loss=loss)
    run = probe.open_run(p.run_dir)
    frame = run.filters(layers=["conv"])

    assert frame[frame["step"] == 0]["out_rms"].notna().all()
    assert frame[frame["step"] == 1]["out_rms"].isna().all()
    assert frame[frame["step"] == 1]["grad_norm"].isna().all()
    assert frame[frame["step"] == 2]["out_rms"].notna().all()
    assert np.isnan(run.scalars().set_index("step").loc[1, "loss"])
    assert not probe_errors.records


def test_inf_gradient_recorded(runs_dir):
    model = nn.Sequential(nn.Linear(3, 2))
    with probe.Probe(model, run_dir=runs_dir / "inf") as p:
        out = model(torch.ones(2, 3))
        out.register_hook(lambda grad: torch.full_like(grad, float("inf")))
        out.sum().backward()
        p.step()
    frame = probe.open_run(p.run_dir).filters()

    assert np.isinf(frame["grad_norm"]).all()


# torch.compile ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_compiled_model_records_same_metrics(runs_dir):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 3 * 3, 2))
    reference = copy.deepcopy(model)
    x = torch.randn(4, 2, 5, 5)

    got = train(torch.compile(model), 2, runs_dir / "compiled", x=x)
    expected = train(reference, 2, runs_dir / "eager", x=x)

    assert_same_metrics(metric_values(got), metric_values(expected), rtol=1e-4)


# Leaks ------------------------------------------------------------------------------------------

def hook_count(model):
    count = 0
    for module in model.modules():
        count += len(module._forward_hooks) + len(module._forward_pre_hooks)
        count += len(module._backward_hooks) + len(getattr(module, "_backward_pre_hooks", {}))
        for parameter in module.parameters(recurse=False):
            count += len(getattr(parameter, "_post_accumulate_grad_hooks", None) or {})
    return count


def resident_memory_bytes():
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    import resource

    return pages * resource.getpagesize()


@pytest.mark.slow
def test_200_steps_no_memory_growth_no_hooks_left(runs_dir, conv_bn_relu_net):
    model = conv_bn_relu_net(filters=16)
    before_hooks = hook_count(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    memory = []

    with probe.Probe(model, run_dir=runs_dir / "long", flush_every_steps=20) as p:
        assert hook_count(model) > before_hooks
        for step in range(200):
            loss = model(torch.randn(16, 2, 12, 12)).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            p.step(loss=loss)
            if step % 20 == 19:
                gc.collect()
                memory.append(resident_memory_bytes())

    assert hook_count(model) == before_hooks
    growth = memory[-1] - memory[1]
    assert growth < 8 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MiB: {memory}"
    assert len(probe.open_run(p.run_dir).filters(layers=["conv"])) == 200 * 16


def test_hooks_removed_after_exception(runs_dir, conv_bn_relu_net):
    model = conv_bn_relu_net()
    before = hook_count(model)

    with pytest.raises(ZeroDivisionError):
        with probe.Probe(model, run_dir=runs_dir / "crash") as p:
            model(torch.randn(2, 2, 5, 5)).sum().backward()
            p.step()
            raise ZeroDivisionError("user code failed")

    assert hook_count(model) == before
    assert probe.open_run(p.run_dir).meta["status"] == "failed"
    assert len(probe.open_run(p.run_dir).filters()) == 3 + 4
