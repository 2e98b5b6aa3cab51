"""Shared fixtures: deterministic torch settings and small real networks."""

import logging

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def deterministic_torch():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def runs_dir(tmp_path):
    path = tmp_path / "runs"
    path.mkdir()
    return path


@pytest.fixture
def probe_errors(caplog):
    """Collect ERROR records from the probe's loggers, so a test can assert there were none."""
    caplog.set_level(logging.ERROR, logger="probe")
    return caplog


class ConvBnReluNet(nn.Module):
    """conv -> batch norm -> ReLU -> global average pool -> linear, for hand-checked metrics."""

    def __init__(self, in_channels=2, filters=3, classes=4, inplace=False, norm=True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, filters, 3, padding=1, bias=not norm)
        self.bn = nn.BatchNorm2d(filters) if norm else nn.Identity()
        self.relu = nn.ReLU(inplace=inplace)
        self.fc = nn.Linear(filters, classes)

    def forward(self, x):
        a = self.relu(self.bn(self.conv(x)))
        return self.fc(a.mean(dim=(2, 3)))


@pytest.fixture
def conv_bn_relu_net():
    return ConvBnReluNet
