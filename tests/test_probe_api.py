"""The Probe's public behaviour: arguments, run folders, sampling, scalars, errors, DDP."""

import logging
import os
import shutil
import socket
import sys
import textwrap
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import probe


def small_model():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def run_steps(p, model, steps, batch=4):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        loss = model(torch.randn(batch, 1, 6, 6)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        p.step(loss=loss, lr=0.05)


# Arguments ------------------------------------------------------------------------------------

@pytest.mark.parametrize("every", [0, -3, 1.5, "2"])
def test_invalid_every_names_value(runs_dir, every):
    with pytest.raises(ValueError, match=f"every={every!r}"):
        probe.Probe(small_model(), run_dir=runs_dir / "x", every=every)


def test_model_without_layers_rejected(runs_dir):
    with pytest.raises(ValueError, match="no Conv1d, Conv2d, Conv3d or Linear"):
        probe.Probe(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), run_dir=runs_dir / "x")


def test_non_module_rejected(runs_dir):
    with pytest.raises(TypeError, match="must be a torch.nn.Module, got list"):
        probe.Probe(list(small_model().parameters()), run_dir=runs_dir / "x")


def test_invalid_if_exists_rejected(runs_dir):
    with pytest.raises(ValueError, match="if_exists='overwrite'"):
        probe.Probe(small_model(), run_dir=runs_dir / "x", if_exists="overwrite")


def test_existing_run_dir_rejected_then_resumed_or_renamed(runs_dir):
    model = small_model()
    with probe.Probe(model, run_dir=runs_dir / "exp") as p:
        run_steps(p, model, 2)

    with pytest.raises(FileExistsError, match="if_exists='resume'"):
        probe.Probe(model, run_dir=runs_dir / "exp")

    with probe.Probe(model, run_dir=runs_dir / "exp", if_exists="new") as p:
        run_steps(p, model, 1)
    assert p.run_dir == runs_dir / "exp-2"

    with probe.Probe(model, run_dir=runs_dir / "exp", if_exists="resume") as p:
        run_steps(p, model, 1)
    assert p.run_dir == runs_dir / "exp"
    parts = list((runs_dir / "exp" / "filters").rglob("part-*.parquet"))
    assert len(parts) == 2


# Sampling and scalars ---------------------------------------------------------------------------

def test_every_records_sampled_steps_and_all_scalars(runs_dir):
    model = small_model()
    with probe.Probe(model, run_dir=runs_dir / "every", every=3) as p:
        run_steps(p, model, 10)
    run = probe.open_run(p.run_dir)

    assert sorted(run.filters()["step"].unique()) == [0, 3, 6, 9]
    scalars = run.scalars()
    assert list(scalars["step"]) == list(range(10))
    assert scalars["loss"].notna().all()
    assert (scalars["lr"] == 0.05).all()
    assert (scalars["batch_size"] == 4).all()
    assert run.meta["every"] == 3
    assert run.meta["steps"] == 10


def test_loss_scalar_matches_tensor(runs_dir):
    model = small_model()
    losses = []
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with probe.Probe(model, run_dir=runs_dir / "loss", every=2) as p:
        for _ in range(5):
            loss = model(torch.randn(4, 1, 6, 6)).square().mean()
            losses.append(loss.item())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            p.step(loss=loss, batch_size=4)
        p.log(test_accuracy=0.5)
    scalars = probe.open_run(p.run_dir).scalars().set_index("step")

    np.testing.assert_allclose(scalars["loss"].to_numpy(), losses, rtol=1e-6)
    assert scalars.loc[4, "test_accuracy"] == 0.5
    assert pd.isna(scalars.loc[3, "test_accuracy"])


def test_non_numeric_scalar_warns_and_is_dropped(runs_dir):
    model = small_model()
    with probe.Probe(model, run_dir=runs_dir / "text") as p:
        with pytest.warns(UserWarning, match="note='hello' is not a number"):
            run_steps_with_note(p, model)
    scalars = probe.open_run(p.run_dir).scalars()
    assert "note" not in scalars.columns
    assert len(scalars) == 1


def run_steps_with_note(p, model):
    model(torch.randn(2, 1, 6, 6)).sum().backward()
    p.step(note="hello")


# Errors inside the probe -------------------------------------------------------------------------

def break_writer_folder(run_dir):
    """Replace the rank folder of filter parts by a file, so the next part cannot be written."""
    folder = run_dir / "filters" / "rank=0"
    shutil.rmtree(folder)
    folder.write_text("not a folder")


def test_internal_error_logged_once_training_continues(runs_dir, caplog):
    caplog.set_level(logging.ERROR, logger="probe")
    model = small_model()
    with probe.Probe(model, run_dir=runs_dir / "broken", flush_every_steps=1) as p:
        run_steps(p, model, 2)
        p.writer.flush()
        break_writer_folder(p.run_dir)
        run_steps(p, model, 2)
        p.writer.flush()  # the writer thread has now tried the part and failed
        run_steps(p, model, 3)
        assert p.error is not None
        assert p.hooks.handles == []

    # One record from the probe; the writer also reports its own failure, once.
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    probe_errors = [r for r in errors if r.name == "probe.probe"]
    assert len(probe_errors) == 1
    assert "stopped recording" in probe_errors[0].getMessage()
    assert len(errors) <= 2


def test_internal_error_raises_in_strict_mode(runs_dir):
    model = small_model()
    with pytest.raises(probe.probe.ProbeError, match="writer failed"):
        with probe.Probe(model, run_dir=runs_dir / "strict", flush_every_steps=1,
                         strict=True) as p:
            run_steps(p, model, 2)
            p.writer.flush()
            break_writer_folder(p.run_dir)
            run_steps(p, model, 2)
            p.writer.flush()
            run_steps(p, model, 3)


# DistributedDataParallel ------------------------------------------------------------------------

DDP_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    import torch.distributed as dist
    from torch import nn
    import probe

    rank, world, port, run_dir = int(sys.argv[1]), 2, sys.argv[2], sys.argv[3]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(10 + rank)
    with probe.Probe(ddp, run_dir=run_dir) as p:
        for _ in range(3):
            loss = ddp(torch.randn(3 + rank, 1, 6, 6, generator=generator)).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            p.step(loss=loss)
    dist.destroy_process_group()
""")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_write_one_partition_each(runs_dir, tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    port = str(free_port())
    run_dir = runs_dir / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen([sys.executable, str(script), str(rank), port, str(run_dir)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
               for rank in range(2)]
    outputs = [worker.communicate(timeout=180)[0].decode() for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs

    run = probe.open_run(run_dir)
    frame = run.filters()
    assert run.meta["world_size"] == 2
    assert run.meta["status"] == "finished"
    assert sorted(frame["rank"].unique()) == [0, 1]
    assert set(frame["layer"]) == {"0", "4"}
    # Each rank records its own batch: 3 samples on rank 0, 4 on rank 1.
    conv = frame[frame["layer"] == "0"]
    assert conv.groupby("rank")["active_samples"].max().tolist() == [3, 4]
    for rank in (0, 1):
        assert (run.path / "filters" / f"rank={rank}").is_dir()


def test_unknown_layer_name_rejected(runs_dir):
    model = small_model()
    with probe.Probe(model, run_dir=runs_dir / "names") as p:
        run_steps(p, model, 1)
    run = probe.open_run(p.run_dir)

    with pytest.raises(ValueError, match=r"\['stage1.conv'\] not found .* its layers are \['0', '5'\]"):
        run.filters(layers=["stage1.conv"])
    assert len(run.filters(layers="0")) == 4
