"""The deepcontrol command line: argument checks, help text, train, demo, dashboard and start."""

import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from probe import list_runs, open_run
from probe.cli import build_parser, dashboard_app_path, dashboard_command, main, summary_rows
from probe.train import TrainConfig, TrainResult

REPO = Path(__file__).resolve().parent.parent


def run_main(argv, capsys):
    """Run ``main(argv)`` in this process; return (exit status, stdout, stderr)."""
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# --- invalid arguments --------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, named",
    [
        (["train", "--norm", "layernorm"], "layernorm"),
        (["train", "--batch-size", "0"], "'0'"),
        (["train", "--batch-size", "many"], "'many'"),
        (["train", "--epochs", "-2"], "'-2'"),
        (["train", "--lr", "0"], "'0'"),
        (["train", "--lr", "inf"], "'inf'"),
        (["train", "--dataset", "mnist-idx"], "mnist-idx needs --data-path"),
        (["train", "--dataset", "cifar10"], "cifar10 needs --data-path"),
        (["train", "--dataset", "mnist-idx", "--data-path", "/no/such/folder"], "/no/such/folder"),
        (["train", "--every", "0"], "'0'"),
        (["dashboard", "--port", "70000"], "'70000'"),
        (["frobnicate"], "frobnicate"),
    ],
)
def test_invalid_argument_exits_2(argv, named, capsys):
    status, out, err = run_main(argv, capsys)
    assert status == 2
    assert named in err
    assert out == ""


def test_malformed_dataset_file_exits_1(tmp_path, capsys):
    labels = bytes([0, 0, 8, 1]) + struct.pack(">I", 2) + bytes([3, 7])
    images = bytes([0, 0, 8, 3]) + struct.pack(">3I", 2, 28, 28) + bytes(2 * 28 * 28)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(labels)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(labels)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(images)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(images[:-5])

    argv = ["train", "--dataset", "mnist-idx", "--data-path", str(tmp_path),
            "--runs-dir", str(tmp_path / "runs"), "--no-progress"]
    status, out, err = run_main(argv, capsys)
    assert status == 1
    assert "train-images-idx3-ubyte has 1563 data bytes" in err
    assert out == ""


def test_subprocess_exit_status(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "probe.cli", "train", "--norm", "groupnorm"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert completed.returncode == 2
    assert "groupnorm" in completed.stderr


# --- help text ----------------------------------------------------------------------------


TRAIN_OPTIONS_AND_UNITS = {
    "--norm": "normaliser",
    "--network": "architecture",
    "--width": "filters",
    "--batch-size": "images per SGD step",
    "--epochs": "passes over the training images",
    "--lr": "per step",
    "--seed": "seed",
    "--dataset": "mnist5k",
    "--data-path": "folder",
    "--train-subset": "images",
    "--run-name": "sub-folder name",
    "--runs-dir": "folder",
    "--every": "SGD steps",
    "--threads": "CPU threads",
    "--no-progress": "progress bar",
}


def test_train_help_lists_every_option(capsys):
    status, out, _ = run_main(["train", "--help"], capsys)
    assert status == 0
    flat = " ".join(out.split())
    for option, unit in TRAIN_OPTIONS_AND_UNITS.items():
        assert option in flat, option
        assert unit in flat, (option, unit)


def test_help_covers_every_parser_option():
    """Every option the parser accepts has help text, so none is undocumented."""
    parser = build_parser()
    subparsers = parser._subparsers._group_actions[0].choices
    assert set(subparsers) == {"train", "demo", "dashboard", "start"}
    for name, subparser in subparsers.items():
        for action in subparser._actions:
            assert action.help, (name, action.dest)


def test_dashboard_and_start_help_name_port_unit(capsys):
    for command in ("dashboard", "start"):
        status, out, _ = run_main([command, "--help"], capsys)
        assert status == 0
        assert "TCP port" in out
        assert "127.0.0.1" in " ".join(out.split())


# --- train --------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_command_prints_summary(tmp_path, capsys):
    argv = ["train", "--dataset", "digits", "--norm", "batchnorm", "--epochs", "1",
            "--batch-size", "32", "--lr", "0.1", "--runs-dir", str(tmp_path), "--run-name",
            "cli-run", "--every", "5", "--threads", "1", "--no-progress"]
    status, out, _ = run_main(argv, capsys)

    assert status == 0
    lines = out.strip().splitlines()
    assert len(lines) == 1
    assert "test accuracy" in lines[0]
    assert "cli-run" in lines[0]

    run = open_run(tmp_path / "cli-run")
    assert run.meta["every"] == 5
    assert run.meta["config"]["batch_size"] == 32
    recorded_steps = sorted(run.filters()["step"].unique().tolist())
    assert recorded_steps == list(range(0, 45, 5))


# --- demo ---------------------------------------------------------------------------------


def test_demo_summary_averages_seeds():
    def result(norm, seed, accuracy, time_s):
        config = TrainConfig(norm=norm, batch_size=64, seed=seed)
        return TrainResult(config, accuracy, 0.1, 10, time_s, None)

    results = [result("agc", 0, 0.90, 10.0), result("agc", 1, 0.96, 14.0),
               result("batchnorm", 0, 0.50, 8.0)]
    rows = summary_rows(results)

    assert [row["norm"] for row in rows] == ["agc", "batchnorm"]
    assert rows[0]["seeds"] == 2
    assert rows[0]["mean test accuracy"] == "93.0%"
    assert rows[0]["min-max"] == "90.0-96.0%"
    assert rows[0]["mean time (s)"] == "12.0"
    assert rows[1]["mean test accuracy"] == "50.0%"


@pytest.mark.slow
def test_demo_quick_trains_five_runs(tmp_path, capsys):
    argv = ["demo", "--quick", "--runs-dir", str(tmp_path), "--threads", "1", "--no-progress"]
    status, out, _ = run_main(argv, capsys)
    assert status == 0

    runs = {run.name: run for run in list_runs(tmp_path)}
    expected = {"demo-agc-b64-s0", "demo-batchnorm-b64-s0", "demo-none-b64-s0",
                "demo-agc-b1-s0", "demo-batchnorm-b1-s0"}
    assert set(runs) == expected
    for run in runs.values():
        assert run.status == "finished"

    rows = [[cell.strip() for cell in line.strip("|").split("|")]
            for line in out.splitlines() if line.startswith("| ")]
    per_run_header = rows[0]
    assert per_run_header[:5] == ["norm", "batch", "seed", "epochs", "train images"]
    assert "test accuracy" in per_run_header
    assert "time (s)" in per_run_header
    for cells in rows[1:6]:
        assert cells[4] == "500", cells
        assert cells[per_run_header.index("test accuracy")].endswith("%"), cells

    summary_header = rows[6]
    assert summary_header[:4] == ["norm", "batch", "seeds", "mean test accuracy"]
    assert len(rows) == 6 + 1 + 5


# --- dashboard server ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        return listener.getsockname()[1]


def wait_for_health(port: int, server: subprocess.Popen, timeout_s: float = 90.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as reply:
                if reply.status == 200:
                    return True
        except OSError:
            time.sleep(0.5)
    return False


def stop(server: subprocess.Popen) -> int:
    server.send_signal(signal.SIGINT)
    try:
        return server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        return server.wait()


def test_dashboard_command_binds_localhost():
    command = dashboard_command(Path("dashboard/app.py"), 8600)
    assert command[command.index("--server.address") + 1] == "127.0.0.1"
    assert command[command.index("--server.port") + 1] == "8600"


@pytest.mark.slow
@pytest.mark.skipif(dashboard_app_path() is None, reason="dashboard/app.py is not in this checkout")
def test_start_with_runs_serves_dashboard(tmp_path):
    """With a run present, start prints the runs table and serves without training again."""
    runs_dir = tmp_path / "runs"
    subprocess.run(
        [sys.executable, "-m", "probe.cli", "train", "--dataset", "digits", "--epochs", "1",
         "--norm", "batchnorm", "--runs-dir", str(runs_dir), "--run-name", "existing",
         "--threads", "1", "--no-progress"],
        check=True, cwd=REPO, timeout=300, capture_output=True,
    )
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "probe.cli", "start", "--runs-dir", str(runs_dir), "--port", str(port)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    try:
        healthy = wait_for_health(port, server)
    finally:
        status = stop(server)
    out = server.stdout.read()

    assert healthy, out
    assert "existing" in out
    assert "training the demo" not in out
    assert f"http://127.0.0.1:{port}" in out
    assert status == 130
    assert [run.name for run in list_runs(runs_dir)] == ["existing"]


@pytest.mark.slow
def test_dashboard_sigterm_stops_server(tmp_path):
    """Killing the `deepcontrol dashboard` PID with SIGTERM also stops its Streamlit child."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "probe.cli", "dashboard", str(tmp_path / "runs"), "--port", str(port)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    try:
        healthy = wait_for_health(port, server)
        server.send_signal(signal.SIGTERM)
        status = server.wait(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()

    assert healthy, server.stdout.read()
    assert status == 130
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2)
