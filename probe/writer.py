"""Background Parquet writer for one rank of a run: the training loop queues, a thread writes parts.

Each flush writes ``filters/rank=<r>/part-<k>.parquet`` and ``scalars/rank=<r>/part-<k>.parquet``
under their temporary names ``.part-<k>.parquet.tmp`` and renames them with os.replace, so a
reader (or a crash) never exposes half a part. A process killed at any moment loses only the
steps queued since the last flush.

Inside a filters part rows are sorted by (layer, filter, step): a filter's values of consecutive
steps sit next to each other, which is what the byte-stream-split float encoding and zstd need to
compress well.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from probe import schema, store

log = logging.getLogger(__name__)

N_METRICS = len(schema.METRICS)
FLOAT_METRICS = tuple(m for m in schema.METRICS if m not in schema.INTEGER_METRICS)

# Parquet settings of a filters part; the choices are measured in benchmarks/bench_writer.py.
FILTER_PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 1,
    "use_dictionary": ["layer", *schema.INTEGER_METRICS],
    "column_encoding": {
        "step": "DELTA_BINARY_PACKED",
        "filter": "DELTA_BINARY_PACKED",
        **{metric: "BYTE_STREAM_SPLIT" for metric in FLOAT_METRICS},
    },
    # Step statistics let DuckDB skip parts outside a step range. A part is one row group that
    # covers every layer and filter, so statistics on those would never skip anything.
    "write_statistics": ["step"],
    "row_group_size": 1 << 22,
}
SCALAR_PARQUET_OPTIONS: dict[str, Any] = {"compression": "zstd", "compression_level": 3}


@dataclass
class FilterBatch:
    """One step's filter rows as queued by ``RunWriter.add_filters``."""

    step: int
    values: np.ndarray  # [rows, N_METRICS] float32, rows of the present layers in layer order
    mask_key: bytes  # RunWriter.layers.mask_key(layer_mask); b"" when every layer is present


@dataclass
class _FlushRequest:
    done: threading.Event = field(default_factory=threading.Event)


_STOP = object()


@dataclass
class _PendingPart:
    """Filter batches and scalar rows received since the last flush."""

    batches: list[FilterBatch] = field(default_factory=list)
    scalars: list[dict[str, Any]] = field(default_factory=list)
    steps: set[int] = field(default_factory=set)
    rows: int = 0

    def add(self, item: object) -> None:
        if isinstance(item, FilterBatch):
            self.batches.append(item)
            self.steps.add(item.step)
            self.rows += item.values.shape[0]
        elif isinstance(item, dict):
            self.scalars.append(item)
            self.steps.add(item["step"])


class _LayerTable:
    """Layer names and filter counts, and where each layer's rows start for a given layer mask."""

    def __init__(self, layers: Iterable[Mapping[str, Any]]):
        self.names = [str(layer["name"]) for layer in layers]
        self.filters = np.array([int(layer["filters"]) for layer in layers], dtype=np.int64)
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"layer names must be unique, got {self.names}")
        if np.any(self.filters <= 0):
            raise ValueError(f"every layer needs at least one filter, got {dict(zip(self.names, self.filters))}")
        self._slices: dict[bytes, list[tuple[int, int, int]]] = {}

    def mask_key(self, mask: np.ndarray | None) -> bytes:
        if mask is None:
            return b""
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (len(self.names),):
            raise ValueError(f"layer_mask must have shape ({len(self.names)},), got {mask.shape}")
        return mask.tobytes()

    def rows(self, key: bytes) -> int:
        return sum(stop - start for _, start, stop in self.slices(key))

    def slices(self, key: bytes) -> list[tuple[int, int, int]]:
        """Return (layer index, first row, end row) of each present layer for a mask key."""
        if key not in self._slices:
            present = np.frombuffer(key, dtype=bool) if key else np.ones(len(self.names), dtype=bool)
            slices, start = [], 0
            for index in np.flatnonzero(present):
                stop = start + int(self.filters[index])
                slices.append((int(index), start, stop))
                start = stop
            self._slices[key] = slices
        return self._slices[key]


class RunWriter:
    """Write one rank's filter rows and scalars of a run folder from a background thread.

    ``layers`` are dicts with at least ``name`` and ``filters``, in the order the rows of
    ``add_filters`` use. A flush happens every ``flush_every_steps`` recorded steps, every
    ``flush_every_s`` seconds, when the buffered rows reach ``max_part_rows``, on ``flush()`` and
    on ``close()``. Queued but unwritten filter values are limited to ``max_queue_bytes``: a
    step arriving beyond that loses its filter rows (counted in ``dropped_steps``), because the
    training loop must not wait for the disk.

    An exception in the thread is stored in ``error`` and logged once, and the writer stops; the
    calling code checks ``error``, no method raises it.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        layers: Iterable[Mapping[str, Any]],
        rank: int = 0,
        flush_every_steps: int = 100,
        flush_every_s: float = 10.0,
        max_queue_bytes: int = 256 << 20,
        max_part_rows: int = 4 << 20,
    ):
        if flush_every_steps < 1:
            raise ValueError(f"flush_every_steps must be >= 1, got {flush_every_steps}")
        if flush_every_s <= 0:
            raise ValueError(f"flush_every_s must be > 0 seconds, got {flush_every_s}")
        self.run_dir = Path(run_dir)
        self.rank = int(rank)
        self.flush_every_steps = int(flush_every_steps)
        self.flush_every_s = float(flush_every_s)
        self.max_queue_bytes = int(max_queue_bytes)
        self.max_part_rows = int(max_part_rows)
        self.layers = _LayerTable(layers)
        self._layer_dictionary = pa.array(self.layers.names, type=pa.string())

        self.error: BaseException | None = None
        self.dropped_steps = 0
        self.dropped_rows = 0
        self.parts_written = 0
        self.rows_written = 0
        self.bytes_written = 0
        # Highest step written to a finished part so far (None before the first part).
        self.last_flushed_step: int | None = None

        self._filters_dir = self.run_dir / schema.FILTERS_DIR / f"rank={self.rank}"
        self._scalars_dir = self.run_dir / schema.SCALARS_DIR / f"rank={self.rank}"
        self._filters_dir.mkdir(parents=True, exist_ok=True)
        self._scalars_dir.mkdir(parents=True, exist_ok=True)
        self._next_part = store.next_part_index(self.run_dir, self.rank)

        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._queued_bytes = 0
        self._queued_lock = threading.Lock()
        self._closed = False
        # A daemon thread does not block interpreter exit; the exit hook still writes what is queued
        # when the caller forgot close(). The weak reference lets an unused writer be collected.
        self._thread = threading.Thread(target=self._run, name=f"RunWriter-rank{self.rank}", daemon=True)
        self._thread.start()
        self._exit_hook = functools.partial(_close_at_exit, weakref.ref(self))
        atexit.register(self._exit_hook)

    # --- training-loop side --------------------------------------------------------------------

    def add_filters(self, step: int, values: np.ndarray, layer_mask: np.ndarray | None = None) -> bool:
        """Queue the per-filter values of one step; returns False when they were dropped.

        ``values`` is [rows, len(METRICS)] float32, the rows of the layers where ``layer_mask`` is
        True (all layers for None) in layer order. The writer keeps the array: do not modify it.
        """
        if self._closed:
            raise RuntimeError("add_filters called after close(); create a new RunWriter to write more")
        key = self.layers.mask_key(layer_mask)
        expected = (self.layers.rows(key), N_METRICS)
        if values.dtype != np.float32 or values.shape != expected:
            raise ValueError(
                f"values must be float32 of shape {expected} for this layer mask, "
                f"got {values.dtype} {values.shape}"
            )
        if self.error is not None:
            return False

        with self._queued_lock:
            room = self._queued_bytes + values.nbytes <= self.max_queue_bytes
            if room:
                self._queued_bytes += values.nbytes
        if not room:
            self._count_drop(step, values.shape[0])
            return False
        self._queue.put(FilterBatch(int(step), values, key))
        return True

    def add_scalars(self, row: Mapping[str, Any]) -> None:
        """Queue one scalars row: ``step`` plus wall_time, batch_size, samples_per_s and user keys.

        Values are converted to int (step, batch_size) or float here, so a value that is not a
        number raises TypeError in the caller, naming the key.
        """
        if self._closed:
            raise RuntimeError("add_scalars called after close(); create a new RunWriter to write more")
        if "step" not in row:
            raise ValueError(f"a scalars row needs a 'step' key, got keys {sorted(row)}")
        converted = {key: _convert_scalar(key, value) for key, value in row.items()}
        if self.error is None:
            self._queue.put(converted)

    def flush(self, timeout: float | None = None) -> bool:
        """Block until everything queued so far is on disk; returns False on error or timeout."""
        if self._closed or not self._thread.is_alive():
            return self.error is None
        request = _FlushRequest()
        self._queue.put(request)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not request.done.wait(0.05):
            if not self._thread.is_alive():
                return False
            if deadline is not None and time.monotonic() > deadline:
                return False
        return self.error is None

    def close(self, timeout: float | None = None) -> None:
        """Write what is queued and stop the thread; calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._exit_hook)
        self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("writer of %s (rank %d) did not stop within %s s", self.run_dir, self.rank, timeout)
        if self.dropped_steps:
            log.warning(
                "writer of %s dropped the filter rows of %d step(s) (%d rows) because its queue was full",
                self.run_dir, self.dropped_steps, self.dropped_rows,
            )

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _count_drop(self, step: int, rows: int) -> None:
        self.dropped_steps += 1
        self.dropped_rows += rows
        if self.dropped_steps == 1:
            log.warning(
                "writer queue of %s is full (%d MiB queued): dropped the filter rows of step %d. "
                "Later drops are only counted in RunWriter.dropped_steps; record less often "
                "(a larger `every`) or raise max_queue_bytes.",
                self.run_dir, self.max_queue_bytes >> 20, step,
            )

    # --- writer thread -------------------------------------------------------------------------

    def _run(self) -> None:
        pending = _PendingPart()
        last_flush = time.monotonic()
        try:
            while True:
                wait = max(0.0, last_flush + self.flush_every_s - time.monotonic())
                try:
                    item = self._queue.get(timeout=wait)
                except queue.Empty:
                    item = None

                if isinstance(item, FilterBatch):
                    with self._queued_lock:
                        self._queued_bytes -= item.values.nbytes

                if self._flush_due(item, pending, last_flush):
                    if pending.steps:
                        self._write_part(pending.batches, pending.scalars)
                    self._beat()
                    pending = _PendingPart()
                    last_flush = time.monotonic()
                pending.add(item)

                if isinstance(item, _FlushRequest):
                    item.done.set()
                if item is _STOP:
                    return
        except BaseException as exc:  # the thread boundary: store it for the training loop
            self.error = exc
            log.exception("writer of %s (rank %d) failed and stopped writing", self.run_dir, self.rank)
            self._release_waiters()

    def _flush_due(self, item: object, pending: _PendingPart, last_flush: float) -> bool:
        """Decide whether the pending part is written before ``item`` is added to it.

        A part ends where a new step begins, so that a step's filters and scalars (queued
        together by the probe) land in the same part.
        """
        if item is _STOP or isinstance(item, _FlushRequest):
            return True
        if item is None:
            return time.monotonic() - last_flush >= self.flush_every_s
        if time.monotonic() - last_flush >= self.flush_every_s and pending.steps:
            return True
        step = item.step if isinstance(item, FilterBatch) else item["step"]
        if step not in pending.steps and len(pending.steps) >= self.flush_every_steps:
            return True
        if isinstance(item, FilterBatch):
            return pending.rows > 0 and pending.rows + item.values.shape[0] > self.max_part_rows
        return False

    def _release_waiters(self) -> None:
        """Release the flush requests still queued after a failure, so no caller waits forever."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _FlushRequest):
                item.done.set()

    def _write_part(self, batches: list[FilterBatch], scalars: list[dict[str, Any]]) -> None:
        index = self._next_part
        self._next_part += 1
        if batches:
            table = self.build_filters_table(batches)
            self._write_atomically(table, self._filters_dir, index, write_filters_part)
            self.rows_written += table.num_rows
        if scalars:
            self._write_atomically(build_scalars_table(scalars), self._scalars_dir, index, write_scalars_part)
        self.parts_written += 1
        written_steps = [batch.step for batch in batches] + [row["step"] for row in scalars]
        if self.last_flushed_step is not None:
            written_steps.append(self.last_flushed_step)
        self.last_flushed_step = max(written_steps)

    def _beat(self) -> None:
        """Refresh the heartbeat in run.json (rank 0, and only when a run.json exists)."""
        if self.rank == 0 and (self.run_dir / schema.RUN_FILE).is_file():
            store.heartbeat(self.run_dir)

    def _write_atomically(self, table: pa.Table, folder: Path, index: int, write: Callable[[pa.Table, Path], None]) -> None:
        tmp = folder / store.tmp_part_name(index)
        write(table, tmp)
        self.bytes_written += tmp.stat().st_size
        # NOTE: no fsync, so a power loss (not a process crash) can still lose the latest parts.
        os.replace(tmp, folder / store.part_name(index))

    def build_filters_table(self, batches: list[FilterBatch]) -> pa.Table:
        """Build one filters part from queued batches, rows sorted by (layer, filter, step)."""
        per_layer: list[list[tuple[int, np.ndarray]]] = [[] for _ in self.layers.names]
        for batch in sorted(batches, key=lambda batch: batch.step):
            for layer, start, stop in self.layers.slices(batch.mask_key):
                per_layer[layer].append((batch.step, batch.values[start:stop]))
        total = sum(len(blocks) * int(self.layers.filters[layer]) for layer, blocks in enumerate(per_layer))

        metrics = np.empty((N_METRICS, total), dtype=np.float32)
        steps = np.empty(total, dtype=np.int64)
        filters = np.empty(total, dtype=np.int32)
        layer_codes = np.empty(total, dtype=np.int32)
        position = 0
        for layer, blocks in enumerate(per_layer):
            if not blocks:
                continue
            n_filters, n_steps = int(self.layers.filters[layer]), len(blocks)
            end = position + n_filters * n_steps
            # [steps, filters, metrics] -> [metrics, filters, steps]: filter-major, step-minor rows.
            target = metrics[:, position:end].reshape(N_METRICS, n_filters, n_steps)
            for column, (_, block) in enumerate(blocks):
                target[:, :, column] = block.T
            step_numbers = np.fromiter((step for step, _ in blocks), dtype=np.int64, count=n_steps)
            steps[position:end] = np.tile(step_numbers, n_filters)
            filters[position:end] = np.repeat(np.arange(n_filters, dtype=np.int32), n_steps)
            layer_codes[position:end] = layer
            position = end

        columns: dict[str, pa.Array] = {
            "step": pa.array(steps),
            "layer": pa.DictionaryArray.from_arrays(pa.array(layer_codes), self._layer_dictionary),
            "filter": pa.array(filters),
        }
        for index, metric in enumerate(schema.METRICS):
            if metric in schema.INTEGER_METRICS:
                columns[metric] = _count_column(metrics[index])
            else:
                columns[metric] = pa.array(metrics[index])
        return pa.table(columns)


def write_filters_part(table: pa.Table, path: Path) -> None:
    # NOTE: a row group per layer would let DuckDB skip the other layers. In
    # benchmarks/bench_writer.py that read one layer 2.1 times faster at 17 % lower write throughput.
    pq.write_table(table, path, **FILTER_PARQUET_OPTIONS)


def write_scalars_part(table: pa.Table, path: Path) -> None:
    pq.write_table(table, path, **SCALAR_PARQUET_OPTIONS)


def _close_at_exit(writer_ref: weakref.ref) -> None:
    writer = writer_ref()
    if writer is not None:
        writer.close()


def _count_column(values: np.ndarray) -> pa.Array:
    """Store a count as int32; a NaN or Inf count (no count at all) becomes null."""
    finite = np.isfinite(values)
    counts = np.where(finite, values, 0).astype(np.int32)
    return pa.array(counts, mask=None if finite.all() else ~finite)


INTEGER_SCALARS = ("step", "batch_size")


def _convert_scalar(key: str, value: Any) -> int | float | None:
    """Convert a scalar to int (step, batch_size) or float; an unknown batch_size (NaN) becomes null."""
    if value is None:
        return None
    try:
        number = float(value)
        if key not in INTEGER_SCALARS:
            return number
        if key == "batch_size" and np.isnan(number):
            return None
        if not number.is_integer():
            raise ValueError(f"{number} is not a whole number")
        return int(number)
    except (TypeError, ValueError) as exc:
        kind = "a whole number" if key in INTEGER_SCALARS else "a number"
        raise TypeError(f"scalar {key!r} must be {kind}, got {type(value).__name__} {value!r}") from exc


def build_scalars_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Build one scalars part: step and batch_size int64, every other column float64."""
    names: list[str] = []
    for row in rows:
        names.extend(key for key in row if key not in names)
    columns = {}
    for name in names:
        kind = pa.int64() if name in INTEGER_SCALARS else pa.float64()
        columns[name] = pa.array([row.get(name) for row in rows], type=kind)
    return pa.table(columns)
