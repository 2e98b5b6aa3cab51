"""`Probe`: attach to a model, record per-filter statistics every `every` steps into a run folder.

The training loop is never interrupted by the probe: an internal error is logged once and the
probe stops recording, unless `strict=True`, which re-raises it.
"""

import logging
import math
import numbers
import os
import platform
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from probe import __version__, schema, store
from probe.discovery import find_layers, number_unseen_layers, unwrap_model
from probe.hooks import LayerHooks
from probe.writer import RunWriter

logger = logging.getLogger(__name__)

IF_EXISTS_MODES = ("error", "resume", "new")


class ProbeError(RuntimeError):
    """An internal error of the probe, raised only in strict mode."""


@dataclass
class ProbeOptions:
    """Validated options of a `Probe`."""

    run_dir: Path
    every: int = 1
    config: dict = field(default_factory=dict)
    strict: bool = False
    record_eval: bool = False
    if_exists: str = "error"
    flush_every_steps: int = 100
    flush_every_s: float = 10.0
    compile_stats: object = "auto"

    def __post_init__(self):
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"every={self.every!r} is invalid: it is the recording interval in "
                             "optimiser steps, so pass an integer >= 1 (1 records every step)")
        if self.if_exists not in IF_EXISTS_MODES:
            raise ValueError(f"if_exists={self.if_exists!r} is invalid; use one of "
                             f"{IF_EXISTS_MODES}")
        if not isinstance(self.config, dict):
            raise TypeError(f"config must be a dict of JSON values, got {type(self.config)!r}")
        if self.flush_every_steps < 1 or self.flush_every_s <= 0:
            raise ValueError(f"flush_every_steps={self.flush_every_steps!r} and "
                             f"flush_every_s={self.flush_every_s!r} must be positive")
        if self.compile_stats not in ("auto", True, False):
            raise ValueError(f"compile_stats={self.compile_stats!r} is invalid; use 'auto', "
                             "True or False")
        self.run_dir = Path(self.run_dir)

    def use_compiled_kernels(self):
        if self.compile_stats != "auto":
            return self.compile_stats
        return compiled_kernels_available()


def compiled_kernels_available():
    """Return True when torch.compile can build CPU kernels here (it needs a C++ compiler)."""
    if os.environ.get("DEEPCONTROL_COMPILE_STATS", "1") == "0":
        return False
    dynamo = getattr(torch, "_dynamo", None)
    if dynamo is None or not dynamo.is_dynamo_supported():
        return False
    return any(shutil.which(name) for name in ("g++", "c++", "clang++"))


def distributed_rank_and_size():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def library_versions():
    return {"python": platform.python_version(), "torch": torch.__version__,
            "deepcontrol": __version__}


class Probe:
    """Record per-filter statistics of every Conv1d/2d/3d and Linear layer of `model`.

    Call `step()` once per optimiser step, after `optimizer.step()` and before the gradients
    are zeroed in place, so that gradient norms and weight updates belong to the same step.

    Args:
        model: the network (plain, wrapped in DistributedDataParallel, or torch.compile'd).
        run_dir: the run folder; its last component is the run's name.
        every: record filter statistics on every `every`-th step (scalars are kept each step).
        config: JSON-serialisable values stored in run.json (hyperparameters, notes).
        strict: re-raise internal errors instead of logging them and stopping the recording.
        record_eval: also record forward passes under `torch.no_grad()` or in eval mode.
        if_exists: what to do when `run_dir` contains a run already: "error", "resume" (append to
            it) or "new" (use `<run_dir>-2`, `-3`, ...).
        flush_every_steps, flush_every_s: write a Parquet part after this many recorded steps
            or seconds, whichever comes first. A crash loses at most the unwritten steps.
        compile_stats: fuse the statistic kernels with torch.compile: True, False, or "auto"
            (when a C++ compiler is on PATH and DEEPCONTROL_COMPILE_STATS is not "0"). The
            first recorded step then spends a few seconds compiling, once per process.
    """

    def __init__(self, model, run_dir="runs/run", every=1, config=None, strict=False,
                 record_eval=False, if_exists="error", flush_every_steps=100, flush_every_s=10.0,
                 compile_stats="auto"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}; pass "
                            "the network itself, not its parameters or a function")
        self.options = ProbeOptions(Path(run_dir), every, dict(config or {}), strict,
                                    record_eval, if_exists, flush_every_steps, flush_every_s,
                                    compile_stats)
        self.model = unwrap_model(model)
        self.layers = find_layers(self.model)
        if not self.layers:
            raise ValueError(f"{type(self.model).__name__} has no Conv1d, Conv2d, Conv3d or "
                             "Linear layer to probe; pass the model that contains them")

        self.rank, self.world_size = distributed_rank_and_size()
        self.compiled = type(model).__name__ == "OptimizedModule"
        self.error = None
        self.closed = False
        self.step_index = 0
        self.writer = None
        self.pending_scalars = []
        self.dropped_scalar_names = set()
        self.last_wall_time = time.time()

        self.run_dir = self.create_run_folder()
        self.hooks = LayerHooks(self.model, self.layers, self.handle_error,
                                record_eval=record_eval,
                                compile_kernels=self.options.use_compiled_kernels())
        self.hooks.start_step(recording=True)
        if self.compiled:
            # Checked with torch 2.13: Dynamo runs these hooks, so every metric is recorded,
            # at the price of graph breaks around each hooked module.
            logger.info("model is torch.compile'd: probe hooks split the compiled graph")
        logger.info("probe recording %d layers into %s every %d steps", len(self.layers),
                    self.run_dir, every)

    # Set-up ---------------------------------------------------------------------------------

    def create_run_folder(self):
        meta = {
            "config": self.options.config,
            "layers": [],
            "world_size": self.world_size,
            "versions": library_versions(),
            "every": self.options.every,
        }
        run_dir = self.options.run_dir
        if self.rank == 0:
            run_dir = store.create_run(run_dir, meta, if_exists=self.options.if_exists)
        if self.world_size > 1:
            shared = [str(run_dir)]
            torch.distributed.broadcast_object_list(shared, src=0)
            run_dir = Path(shared[0])
        return Path(run_dir)

    def open_writer(self):
        number_unseen_layers(self.layers)
        self.layers.sort(key=lambda spec: spec.depth)
        self.writer = RunWriter(self.run_dir, [spec.describe() for spec in self.layers],
                                rank=self.rank,
                                flush_every_steps=self.options.flush_every_steps,
                                flush_every_s=self.options.flush_every_s)
        if self.rank == 0:
            store.update_meta(self.run_dir, layers=[spec.describe() for spec in self.layers])

    # Per step -------------------------------------------------------------------------------

    @property
    def recording(self):
        return self.error is None and not self.closed

    def step(self, loss=None, batch_size=None, **scalars):
        """Close the current optimiser step: store its scalars and, if sampled, its filters.

        Args:
            loss: the step's loss (a tensor or a number); stored as the `loss` scalar.
            batch_size: samples in this step on this process; by default the batch dimension
                of the first layer's last input.
            **scalars: any other numbers to store for this step (lr, accuracy, ...).
        """
        if not self.recording:
            self.step_index += 1
            return
        try:
            self.store_scalars(loss, batch_size, scalars)
            if self.hooks.recording:
                self.record_filters()
            self.step_index += 1
            self.hooks.start_step(recording=self.step_index % self.options.every == 0)
        except Exception as error:  # noqa: BLE001 - the training loop must never see it
            self.step_index += 1
            self.handle_error(error)

    def log(self, **scalars):
        """Add scalars (test accuracy, ...) to the last finished step."""
        if not self.recording or not scalars:
            return
        try:
            row = {"step": max(self.step_index - 1, 0), "wall_time": time.time()}
            row.update(scalars)
            self.pending_scalars.append(row)
            self.write_scalars()
        except Exception as error:  # noqa: BLE001
            self.handle_error(error)

    def store_scalars(self, loss, batch_size, scalars):
        now = time.time()
        if batch_size is None:
            batch_size = self.hooks.state.batch_size
        row = {"step": self.step_index, "wall_time": now,
               "batch_size": batch_size if batch_size is not None else math.nan}
        elapsed = now - self.last_wall_time
        row["samples_per_s"] = batch_size / elapsed if batch_size and elapsed > 0 else math.nan
        self.last_wall_time = now
        if loss is not None:
            row["loss"] = loss.detach() if isinstance(loss, torch.Tensor) else loss
        for name, value in scalars.items():
            if name in schema.SCALAR_KEYS or name in ("loss", "rank"):
                raise ValueError(f"scalar name {name!r} is reserved; rename it")
            if not isinstance(value, (numbers.Number, torch.Tensor)):
                self.warn_dropped_scalar(name, value)
                continue
            row[name] = value.detach() if isinstance(value, torch.Tensor) else value
        self.pending_scalars.append(row)
        if self.hooks.recording:
            self.write_scalars()

    def warn_dropped_scalar(self, name, value):
        if name in self.dropped_scalar_names:
            return
        self.dropped_scalar_names.add(name)
        warnings.warn(f"scalar {name}={value!r} is not a number or tensor and is not recorded; "
                      "pass a float, an int or a one-element tensor", stacklevel=3)

    def write_scalars(self):
        """Copy the pending scalar rows to the host (one copy for all tensors) and queue them."""
        tensors = [(i, name, value) for i, row in enumerate(self.pending_scalars)
                   for name, value in row.items() if isinstance(value, torch.Tensor)]
        if tensors:
            stacked = torch.stack([v.detach().float().reshape(()) for _, _, v in tensors]).cpu()
            for (i, name, _), value in zip(tensors, stacked.tolist()):
                self.pending_scalars[i][name] = value
        if self.writer is None:
            return
        for row in self.pending_scalars:
            self.writer.add_scalars(row)
        self.pending_scalars.clear()

    def record_filters(self):
        if self.writer is None:
            self.open_writer()
            self.write_scalars()
        self.check_writer()
        metrics, mask = self.hooks.finish_step()
        if metrics is None:
            return
        values = metrics.to("cpu", copy=metrics.device.type == "cpu").numpy()
        self.writer.add_filters(self.step_index, values, layer_mask=torch.tensor(mask).numpy())

    def check_writer(self):
        if self.writer is not None and self.writer.error is not None:
            raise ProbeError(f"the Parquet writer failed: {self.writer.error!r}")

    # Errors and shutdown --------------------------------------------------------------------

    def handle_error(self, error):
        """Log an internal error once and stop recording; re-raise it in strict mode."""
        if self.error is None:
            self.error = error
            logger.error("probe stopped recording after an internal error; training goes on. "
                         "Pass strict=True to raise instead.", exc_info=error)
            self.hooks.remove()
        if self.options.strict:
            raise ProbeError(f"probe failed: {error!r}") from error

    def close(self, status=schema.STATUS_FINISHED):
        """Remove every hook, write what is pending and mark the run `status`."""
        if self.closed:
            return
        self.closed = True
        self.hooks.remove()
        try:
            if self.writer is None and self.pending_scalars:
                self.open_writer()
            if self.writer is not None:
                self.write_scalars()
                self.writer.close()
                if self.writer.error is not None and self.error is None:
                    logger.error("the Parquet writer failed: %r", self.writer.error)
            if self.rank == 0:
                store.update_meta(self.run_dir, status=status, heartbeat=time.time(),
                                  steps=self.step_index)
        except Exception as error:  # noqa: BLE001
            logger.error("closing the probe failed", exc_info=error)
            if self.options.strict:
                raise

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback):
        self.close(schema.STATUS_FAILED if exc_type is not None else schema.STATUS_FINISHED)
        return False

    def __del__(self):
        if not getattr(self, "closed", True):
            hooks = getattr(self, "hooks", None)
            if hooks is not None:
                hooks.remove()
