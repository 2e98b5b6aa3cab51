"""Reference training loop: real short runs on scikit-learn digits, read back from disk."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from probe import open_run
from probe.data import load_dataset
from probe.models import build_model
from probe.schema import METRICS
from probe.train import TrainConfig, _training_subset, train


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def digits_config(runs_dir, **overrides) -> TrainConfig:
    settings = dict(
        dataset="digits", batch_size=32, epochs=2, lr=0.1, seed=0, threads=1,
        runs_dir=str(runs_dir), progress=False,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


# --- short real runs ----------------------------------------------------------------------


# Peak learning rates that train each normaliser well in 2 epochs on digits at batch 32.
DIGITS_LR = {"batchnorm": 0.1, "agc": 0.05, "none": 0.1}


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["batchnorm", "agc", "none"])
def test_train_learns_and_records(digits, runs_dir, norm):
    result = train(digits_config(runs_dir, norm=norm, lr=DIGITS_LR[norm]), digits)

    steps_per_epoch = math.ceil(len(digits.train_x) / 32)
    assert result.steps == 2 * steps_per_epoch
    assert not result.diverged
    assert len(result.epoch_accuracies) == 2
    if norm != "none":
        assert result.test_accuracy > 0.8

    run = open_run(result.run_dir)
    assert run.status == "finished"
    scalars = run.scalars()
    assert scalars["step"].tolist() == list(range(result.steps))

    losses = scalars["loss"].to_numpy()
    assert np.isfinite(losses).all()
    assert losses[-10:].mean() < losses[:10].mean()

    accuracies = scalars["test_accuracy"].dropna()
    assert accuracies.index.tolist() == [steps_per_epoch - 1, result.steps - 1]
    assert accuracies.tolist() == pytest.approx(result.epoch_accuracies)

    filters = run.filters()
    assert sorted(filters["step"].unique().tolist()) == list(range(result.steps))
    for metric in METRICS:
        assert metric in filters.columns
        assert np.isfinite(filters[metric].to_numpy()).all(), metric


@pytest.mark.slow
def test_train_same_seed_same_numbers(digits, runs_dir):
    first = train(digits_config(runs_dir, norm="batchnorm", epochs=1, run_name="a"), digits)
    second = train(digits_config(runs_dir, norm="batchnorm", epochs=1, run_name="b"), digits)
    other = train(digits_config(runs_dir, norm="batchnorm", epochs=1, run_name="c", seed=1), digits)

    first_scalars = open_run(first.run_dir).scalars()
    second_scalars = open_run(second.run_dir).scalars()
    assert first_scalars["loss"].tolist() == second_scalars["loss"].tolist()
    assert first.test_accuracy == second.test_accuracy

    first_filters = open_run(first.run_dir).filters().sort_values(["step", "layer", "filter"])
    second_filters = open_run(second.run_dir).filters().sort_values(["step", "layer", "filter"])
    for metric in ("grad_norm", "weight_norm", "update_ratio", "gain"):
        assert first_filters[metric].tolist() == second_filters[metric].tolist(), metric

    other_scalars = open_run(other.run_dir).scalars()
    assert other_scalars["loss"].tolist() != first_scalars["loss"].tolist()


def test_train_matches_plain_sgd(digits, runs_dir):
    """The loop equals hand-written SGD with momentum 0.9 and a cosine decay of the peak lr."""
    config = digits_config(runs_dir, norm="batchnorm", epochs=1, train_subset=96, lr=0.05)
    result = train(config, digits)
    recorded = open_run(result.run_dir).scalars()

    train_x, train_y = _training_subset(digits, 96, seed=0)
    torch.manual_seed(0)
    model = build_model("small_cnn", "batchnorm", 1, 10)
    velocities = [torch.zeros_like(p) for p in model.parameters()]
    order = torch.randperm(96, generator=torch.Generator().manual_seed(0))
    total_steps = 3

    expected_losses, expected_lrs = [], []
    for step in range(total_steps):
        lr = 0.05 * (1 + math.cos(math.pi * step / total_steps)) / 2
        index = order[32 * step : 32 * (step + 1)]
        loss = nn.functional.cross_entropy(model(train_x[index]), train_y[index])
        model.zero_grad()
        loss.backward()
        with torch.no_grad():
            for parameter, velocity in zip(model.parameters(), velocities):
                velocity.mul_(0.9).add_(parameter.grad)
                parameter.sub_(lr * velocity)
        expected_losses.append(loss.item())
        expected_lrs.append(lr)

    assert recorded["lr"].tolist() == pytest.approx(expected_lrs, rel=1e-6)
    assert recorded["loss"].tolist() == pytest.approx(expected_losses, rel=1e-4)


def test_train_divergence_is_reported(digits, runs_dir):
    config = digits_config(runs_dir, norm="none", epochs=2, lr=1e6)
    result = train(config, digits)

    assert result.diverged
    assert result.diverged_step is not None
    assert result.steps == result.diverged_step
    assert result.steps < 2 * math.ceil(len(digits.train_x) / 32)
    assert "diverged at step" in result.summary()

    run = open_run(result.run_dir)
    assert run.status == "finished"
    losses = run.scalars()["loss"].to_numpy()
    assert not np.isfinite(losses[-1])


def test_train_without_recording(digits, runs_dir):
    result = train(digits_config(runs_dir, norm="batchnorm", epochs=1, record=False), digits)
    assert result.run_dir is None
    assert list(runs_dir.iterdir()) == []

    result.model.eval()
    with torch.no_grad():
        predictions = result.model(digits.test_x).argmax(dim=1)
    assert (predictions == digits.test_y).float().mean().item() == pytest.approx(result.test_accuracy)
    row = json.loads(json.dumps(result.to_dict()))
    assert row["config"]["norm"] == "batchnorm"
    assert "model" not in row


# --- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [("norm", "layernorm"), ("batch_size", 0), ("epochs", -1), ("lr", 0.0),
     ("lr", float("nan")), ("dataset", "imagenet"), ("every", 0), ("threads", 0)],
)
def test_config_rejects_invalid_value(field, value):
    with pytest.raises(ValueError, match=f"invalid {field} {value!r}"):
        TrainConfig(**{field: value})


def test_training_subset_is_balanced(digits):
    images, labels = _training_subset(digits, 200, seed=3)
    assert images.shape == (200, 1, 8, 8)
    assert torch.bincount(labels, minlength=10).tolist() == [20] * 10

    again, _ = _training_subset(digits, 200, seed=3)
    assert torch.equal(images, again)
