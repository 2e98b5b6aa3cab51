"""Page shown when the runs folder is missing or contains no run."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from dashboard.source import RUNS_DIR_ENV

EXAMPLE = '''import torch
from probe import Probe

model = torch.nn.Sequential(
    torch.nn.Conv2d(1, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
    torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10),
)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

with Probe(model, run_dir="runs/first-run", config={"lr": 0.1}) as probe:
    for step in range(100):
        x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        probe.step(loss=loss, lr=optimizer.param_groups[0]["lr"], batch_size=len(x))
'''


def render(root: Path) -> None:
    st.title("Deep Control")
    if root.is_dir():
        st.subheader("No runs recorded yet")
        st.write("The runs folder below contains no run (a sub-folder with a run.json):")
    else:
        st.subheader("Runs folder not found")
        st.write("This folder does not exist:")
    st.code(str(root.resolve()), language=None)
    st.write(
        "Record a run by wrapping a training loop in a Probe, as in the script below, then reload "
        f"this page. To read runs from another folder, set {RUNS_DIR_ENV} or start the dashboard "
        "with `deepcontrol dashboard RUNS_DIR`."
    )
    st.code(EXAMPLE, language="python")
