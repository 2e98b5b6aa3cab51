"""A training process killed with SIGKILL leaves only readable parts and loses only unflushed steps."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from probe import schema, store

FLUSH_EVERY_STEPS = 5

# A real tiny training loop with the Probe. After each step it prints the step index and the
# highest step the writer has finished writing, so the test knows what was on disk before the kill.
TRAINING_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from torch import nn
    from probe import Probe

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 4, (16,))
    with Probe(model, run_dir=sys.argv[1], flush_every_steps=int(sys.argv[2]), flush_every_s=600) as probe:
        step = 0
        while True:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            probe.step(loss=loss)
            print(step, probe.writer.last_flushed_step, flush=True)
            step += 1
    """
)


@pytest.mark.slow
def test_sigkill_loses_only_unflushed_steps(tmp_path):
    run_dir = tmp_path / "killed"
    repo_root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    stderr_path = tmp_path / "stderr.txt"
    with open(stderr_path, "w") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-c", TRAINING_SCRIPT, str(run_dir), str(FLUSH_EVERY_STEPS)],
            stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
        )
    last_step, last_flushed = -1, None
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                pytest.fail(f"training process ended early: {stderr_path.read_text()}")
            step, flushed = line.split()
            last_step, last_flushed = int(step), None if flushed == "None" else int(flushed)
            if last_step >= 23 and last_step % FLUSH_EVERY_STEPS == 3:
                break
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert last_flushed is not None

    run = store.open_run(run_dir)
    filters = run.filters()
    scalars = run.scalars()

    assert all(path.name.endswith(".tmp") for path, _ in run.skipped)
    steps = sorted(set(filters["step"]))
    assert steps == list(range(len(steps)))
    rows_per_step = sum(layer["filters"] for layer in run.layers())
    assert rows_per_step == 8 + 4
    assert (filters.groupby("step").size() == rows_per_step).all()

    # Everything reported as flushed before the kill is on disk; later steps may be lost.
    assert steps[-1] >= last_flushed
    lost = last_step - steps[-1]
    assert lost <= last_step - last_flushed
    assert list(scalars["step"]) == list(range(len(scalars)))
    assert len(scalars) >= last_flushed + 1


EXIT_WITHOUT_CLOSE_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    from probe.writer import RunWriter

    writer = RunWriter(sys.argv[1], [{"name": "conv", "filters": 2}], flush_every_s=600)
    writer.add_filters(0, np.full((2, 9), 7.0, dtype=np.float32))
    writer.add_scalars({"step": 0, "loss": 0.5})
    """
)


def test_exit_without_close_writes_queue(tmp_path):
    run_dir = tmp_path / "forgotten"
    repo_root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    subprocess.run([sys.executable, "-c", EXIT_WITHOUT_CLOSE_SCRIPT, str(run_dir)], env=env, check=True, timeout=60)

    run = store.Run(run_dir, meta={"name": "forgotten", "status": schema.STATUS_FINISHED})
    filters = run.filters()
    assert list(filters["gain"]) == [7.0, 7.0]
    assert list(run.scalars()["loss"]) == [0.5]
