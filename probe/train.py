"""Reference training loop used by the command line, the demo and the benchmarks.

Plain SGD with momentum 0.9 and a cosine learning-rate decay over all steps, on a dataset in
memory (``probe.data``). A :class:`probe.Probe` wraps the loop: it records per-filter
statistics, the loss and the learning rate of every step, and the test accuracy after each
epoch. The same seed gives the same numbers on the same CPU build and thread count.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from probe.data import DATASETS, Dataset, load_dataset
from probe.models import MODELS, NORMS, build_model

logger = logging.getLogger(__name__)

MOMENTUM = 0.9
EVAL_BATCH_SIZE = 500


@dataclass
class TrainConfig:
    """Settings of one training run. ``lr`` is the peak learning rate of the cosine decay."""

    norm: str = "agc"
    network: str = "small_cnn"
    dataset: str = "mnist5k"
    data_path: str | None = None
    batch_size: int = 64
    epochs: int = 5
    lr: float = 0.1
    seed: int = 0
    width: int | None = None
    train_subset: int | None = None
    run_name: str | None = None
    runs_dir: str = "runs"
    every: int = 1
    threads: int | None = None
    record: bool = True
    progress: bool = True

    def __post_init__(self):
        _check_choice("norm", self.norm, NORMS)
        _check_choice("network", self.network, MODELS)
        _check_choice("dataset", self.dataset, DATASETS)
        _check_positive("batch_size", self.batch_size)
        _check_positive("epochs", self.epochs)
        _check_positive("every", self.every)
        if self.width is not None:
            _check_positive("width", self.width)
        if self.train_subset is not None:
            _check_positive("train_subset", self.train_subset)
        if self.threads is not None:
            _check_positive("threads", self.threads)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"invalid lr {self.lr!r}: expected a positive finite number")

    def default_run_name(self) -> str:
        return f"{self.network}-{self.norm}-b{self.batch_size}-s{self.seed}"


@dataclass
class TrainResult:
    """Outcome of :func:`train`: accuracies are fractions in [0, 1], times in seconds."""

    config: TrainConfig
    test_accuracy: float
    final_loss: float
    steps: int
    time_s: float
    run_dir: Path | None
    epoch_accuracies: list[float] = field(default_factory=list)
    diverged: bool = False
    diverged_step: int | None = None
    model: nn.Module | None = field(default=None, repr=False, compare=False)

    def summary(self) -> str:
        """Return a one-line summary for logs and the command line."""
        c = self.config
        status = f"diverged at step {self.diverged_step}" if self.diverged else "finished"
        where = f", run {self.run_dir}" if self.run_dir is not None else ""
        return (
            f"{c.network} norm={c.norm} batch={c.batch_size} {status}: "
            f"test accuracy {100 * self.test_accuracy:.2f}%, loss {self.final_loss:.4f}, "
            f"{self.steps} steps in {self.time_s:.1f} s{where}"
        )

    def to_dict(self) -> dict:
        """Return the result without the model, as JSON-serialisable values."""
        row = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "model"}
        row["config"] = asdict(self.config)
        row["run_dir"] = str(self.run_dir) if self.run_dir is not None else None
        return row


def train(config: TrainConfig, dataset: Dataset | None = None) -> TrainResult:
    """Train ``config.network`` on ``config.dataset`` and return the test accuracy and timing.

    Pass ``dataset`` to reuse data already loaded for ``config.dataset``.
    A non-finite loss stops training: the result then has ``diverged=True`` and the step,
    and the run is still closed and readable.
    """
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _train(config, dataset)
    finally:
        torch.set_num_threads(threads)


def _train(config: TrainConfig, dataset: Dataset | None) -> TrainResult:
    if dataset is None:
        dataset = load_dataset(config.dataset, config.data_path, seed=config.seed)
    train_x, train_y = _training_subset(dataset, config.train_subset, config.seed)

    torch.manual_seed(config.seed)
    model = build_model(
        config.network, config.norm, dataset.in_channels, dataset.num_classes, width=config.width
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=MOMENTUM)
    steps_per_epoch = math.ceil(len(train_x) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    shuffle = torch.Generator().manual_seed(config.seed)

    run_dir = Path(config.runs_dir) / (config.run_name or config.default_run_name())
    started = time.perf_counter()
    with _open_probe(model, run_dir, config) as probe:
        loop = _Loop(model, optimizer, scheduler, probe, total_steps, config.progress)
        try:
            for _ in range(config.epochs):
                order = torch.randperm(len(train_x), generator=shuffle)
                loop.run_epoch(train_x, train_y, order, config.batch_size)
                accuracy = evaluate(model, dataset.test_x, dataset.test_y)
                loop.end_epoch(accuracy)
                if loop.diverged_step is not None:
                    break
        finally:
            loop.close()
        actual_run_dir = Path(probe.run_dir) if probe is not None else None
    elapsed = time.perf_counter() - started

    result = TrainResult(
        config=config,
        test_accuracy=loop.accuracies[-1],
        final_loss=loop.last_loss,
        steps=loop.steps,
        time_s=elapsed,
        run_dir=actual_run_dir,
        epoch_accuracies=loop.accuracies,
        diverged=loop.diverged_step is not None,
        diverged_step=loop.diverged_step,
        model=model,
    )
    logger.info("%s", result.summary())
    return result


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Return the fraction of ``images`` [N, C, H, W] that ``model`` classifies as ``labels``."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(images), EVAL_BATCH_SIZE):
        logits = model(images[start : start + EVAL_BATCH_SIZE])
        correct += int((logits.argmax(dim=1) == labels[start : start + EVAL_BATCH_SIZE]).sum())
    model.train(was_training)
    return correct / max(len(images), 1)


class _Loop:
    """Per-step state of one run: steps, last loss, divergence, progress bar, accuracies."""

    def __init__(self, model, optimizer, scheduler, probe, total_steps: int, progress: bool):
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.probe = probe
        self.loss_fn = nn.CrossEntropyLoss()
        self.steps = 0
        self.last_loss = float("nan")
        self.diverged_step: int | None = None
        self.accuracies: list[float] = []
        self.bar = tqdm(total=total_steps, disable=not progress, unit="step", leave=False)

    def run_epoch(self, images, labels, order, batch_size: int) -> None:
        self.model.train()
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            if not self.train_step(images[index], labels[index]):
                return

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        """Run one SGD step on a batch; return False when the loss is not finite."""
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        if self.probe is not None:
            self.probe.step(loss=loss, lr=lr, batch_size=len(x))

        self.steps += 1
        self.last_loss = float(loss.detach())
        self.bar.update(1)
        if not math.isfinite(self.last_loss):
            self.diverged_step = self.steps
            logger.warning("loss is %s at step %d: training stopped", self.last_loss, self.steps)
            return False
        if self.steps % 20 == 0:
            self.bar.set_postfix(loss=f"{self.last_loss:.3f}", lr=f"{lr:.3g}")
        return True

    def end_epoch(self, accuracy: float) -> None:
        self.accuracies.append(accuracy)
        if self.probe is not None:
            self.probe.log(test_accuracy=accuracy)
        self.bar.set_postfix(loss=f"{self.last_loss:.3f}", test_acc=f"{100 * accuracy:.1f}%")
        logger.info("epoch %d: test accuracy %.4f", len(self.accuracies), accuracy)

    def close(self) -> None:
        self.bar.close()


class _NoProbe:
    """Context manager used in place of the probe when ``config.record`` is false."""

    run_dir = None

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _open_probe(model: nn.Module, run_dir: Path, config: TrainConfig):
    if not config.record:
        return _NoProbe()
    from probe.probe import Probe

    return Probe(model, run_dir=run_dir, every=config.every, config=asdict(config), if_exists="new")


def _training_subset(
    dataset: Dataset, size: int | None, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``size`` training images drawn in turn from each class in a seeded random
    order, so a subset keeps the classes balanced, or all images when ``size`` is None."""
    if size is None or size >= len(dataset.train_x):
        return dataset.train_x, dataset.train_y

    order = torch.randperm(len(dataset.train_y), generator=torch.Generator().manual_seed(seed))
    labels = dataset.train_y[order]
    rank_in_class = torch.zeros_like(labels)
    for label in labels.unique():
        members = labels == label
        rank_in_class[members] = torch.arange(int(members.sum()))

    round_robin = torch.argsort(rank_in_class * dataset.num_classes + labels, stable=True)
    chosen = order[round_robin[:size]]
    return dataset.train_x[chosen], dataset.train_y[chosen]


def _check_choice(setting: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"invalid {setting} {value!r}: expected one of {', '.join(choices)}")


def _check_positive(setting: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"invalid {setting} {value!r}: expected a positive integer")
