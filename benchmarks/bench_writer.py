"""Measure the Parquet writer: rows per second of its thread and bytes per row on disk.

Usage::

    python benchmarks/bench_writer.py [--filters 4000] [--steps 1000] [--rounds 3] [--run RUN_DIR]

The data imitate a CNN trained with batch norm: each filter's metrics drift smoothly over the
steps, the batch-dependent ones carry sampling noise, and about 1 in 10,000 values is NaN or Inf.
Configurations are run in alternation, ``--rounds`` times each, and the median is printed.

Targets: the writer thread handles >= 10M rows/s, and a part takes <= 20 bytes per row.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from probe import schema  # noqa: E402
from probe.writer import FILTER_PARQUET_OPTIONS, FilterBatch, RunWriter, write_filters_part  # noqa: E402

TARGET_ROWS_PER_S = 10e6
TARGET_BYTES_PER_ROW = 20.0

# Output channels of a VGG-like network, 4,000 filters in all.
LAYER_WIDTHS = (64, 64, 128, 128, 256, 256, 512, 512, 1024, 1024, 32)


def realistic_filter_values(n_filters: int, n_steps: int, seed: int = 0, batch: int = 128,
                            positions: int = 196) -> np.ndarray:
    """Return synthetic per-filter metrics, [n_steps, n_filters, len(METRICS)] float32.

    Each filter has its own smooth random walk, and the noise of a metric follows its source.
    Batch statistics (gain, sparsity, effective batch) vary by 0.5 to 2 % between steps and
    gradient norms by about 20 %. The out_rms and out_mean of a batch-norm layer follow its
    slowly changing affine parameters. A real small_cnn run gives about the same bytes per row.
    """
    rng = np.random.default_rng(seed)
    shape = (n_steps, n_filters)

    def drift(start, step_scale):
        return start + np.cumsum(rng.normal(0, step_scale, shape), axis=0)

    def noise(scale):
        return rng.normal(0, scale, shape)

    out = np.empty((n_steps, n_filters, len(schema.METRICS)), dtype=np.float32)
    column = {name: index for index, name in enumerate(schema.METRICS)}
    weight = drift(rng.uniform(0.5, 1.5, n_filters), 1e-3)
    bias = drift(rng.normal(0, 0.1, n_filters), 1e-3)
    out[..., column["gain"]] = weight * (1 + noise(5e-3))
    out[..., column["out_rms"]] = np.sqrt(weight**2 + bias**2) * (1 + noise(1e-6))
    out[..., column["out_mean"]] = bias + noise(1e-6)
    zero_probability = np.clip(drift(0.5, 2e-3), 0.05, 0.95)
    out[..., column["sparsity"]] = rng.binomial(batch * positions, zero_probability) / (batch * positions)
    out[..., column["active_samples"]] = batch - rng.binomial(4, 0.1, shape)
    out[..., column["effective_batch"]] = np.clip(drift(0.7 * batch, 0.2) * (1 + noise(0.02)), 1, batch)
    grad_norm = np.exp(drift(-3.0, 0.01) + noise(0.2))
    weight_norm = np.exp(drift(0.0, 1e-4))
    out[..., column["grad_norm"]] = grad_norm
    out[..., column["weight_norm"]] = weight_norm
    out[..., column["update_ratio"]] = 0.01 * grad_norm / weight_norm

    special = rng.random(out.shape) < 1e-4
    special[..., column["active_samples"]] = False
    out[special] = rng.choice(np.array([np.nan, np.inf, -np.inf], dtype=np.float32), size=special.sum())
    return out


def layers_for(n_filters: int) -> list[dict]:
    widths = list(LAYER_WIDTHS) if n_filters == sum(LAYER_WIDTHS) else [n_filters]
    return [{"name": f"features.{i}.conv", "filters": width} for i, width in enumerate(widths)]


def time_writer_thread(data: np.ndarray, layers: list[dict], flush_every_steps: int) -> tuple[float, float, int]:
    """Run a RunWriter over ``data``; returns (wall s, process CPU s, bytes on disk).

    Both times run from the first add_filters to the return of close(). The caller only queues
    arrays, so they measure the thread's work on the whole run: building Arrow tables and
    writing the parts.
    """
    with tempfile.TemporaryDirectory() as folder:
        writer = RunWriter(folder, layers, flush_every_steps=flush_every_steps, flush_every_s=600,
                           max_queue_bytes=data.nbytes + 1)
        wall, cpu = time.perf_counter(), time.process_time()
        for step in range(data.shape[0]):
            writer.add_filters(step, data[step])
        writer.close()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        assert writer.error is None, writer.error
        assert writer.dropped_steps == 0
        size = sum(path.stat().st_size for path in Path(folder, schema.FILTERS_DIR).rglob(schema.PART_GLOB))
    return wall, cpu, size


def table_builder(folder: str, layers: list[dict]) -> RunWriter:
    """Return a closed RunWriter, used only for its build_filters_table."""
    writer = RunWriter(Path(folder, "unused"), layers)
    writer.close()
    return writer


def time_format(data: np.ndarray, layers: list[dict], flush_every_steps: int, write,
                step_major: bool) -> tuple[float, float, int]:
    """Write ``data`` as parts with the function ``write``; returns (build CPU s, write CPU s, bytes).

    Times are process CPU seconds, so other programs on the machine do not inflate them.
    """
    build_s = write_s = 0.0
    size = 0
    with tempfile.TemporaryDirectory() as folder:
        writer = table_builder(folder, layers)
        for index, first in enumerate(range(0, data.shape[0], flush_every_steps)):
            start = time.process_time()
            steps = range(first, min(first + flush_every_steps, data.shape[0]))
            table = writer.build_filters_table([FilterBatch(step, data[step], b"") for step in steps])
            if step_major:
                layer_codes = table["layer"].combine_chunks().indices.to_numpy()
                order = np.lexsort((table["filter"].to_numpy(), layer_codes, table["step"].to_numpy()))
                table = table.take(order)
            build_s += time.process_time() - start

            path = Path(folder, f"part-{index}.parquet")
            start = time.process_time()
            write(table, path)
            write_s += time.process_time() - start
            size += path.stat().st_size
    return build_s, write_s, size


FLOAT_METRICS = [m for m in schema.METRICS if m not in schema.INTEGER_METRICS]
def parquet_writer(**options):
    """Return a function that writes a whole table with pq.write_table and ``options``."""
    def write(table, path):
        pq.write_table(table, path, **options)
    return write


def write_row_group_per_layer(table, path):
    """Write a part with one row group per layer and layer statistics, for comparison."""
    codes = table["layer"].combine_chunks().indices.to_numpy()
    starts = np.concatenate([[0], np.flatnonzero(np.diff(codes)) + 1])
    ends = np.append(starts[1:], len(codes))
    options = {**FILTER_PARQUET_OPTIONS, "write_statistics": ["step", "layer"]}
    options.pop("row_group_size")
    with pq.ParquetWriter(path, table.schema, **options) as writer:
        for start, end in zip(starts, ends):
            writer.write_table(table.slice(start, end - start), row_group_size=end - start)


PLAIN_FLOATS = {"step": "DELTA_BINARY_PACKED", "filter": "DELTA_BINARY_PACKED"}
FORMATS = {
    "chosen: zstd-1, byte-stream-split floats, (layer, filter, step) order": (write_filters_part, False),
    "same, rows in (step, layer, filter) order": (write_filters_part, True),
    "same, a row group per layer with layer statistics": (write_row_group_per_layer, False),
    "zstd-1, plain floats": (parquet_writer(**{**FILTER_PARQUET_OPTIONS, "column_encoding": PLAIN_FLOATS}), False),
    "zstd-3, byte-stream-split floats": (parquet_writer(**{**FILTER_PARQUET_OPTIONS, "compression_level": 3}), False),
    "lz4, byte-stream-split floats": (parquet_writer(**{**FILTER_PARQUET_OPTIONS, "compression": "lz4", "compression_level": None}), False),
    "pyarrow defaults (snappy, dictionary)": (parquet_writer(), False),
}


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--filters", type=int, default=sum(LAYER_WIDTHS), help="filters per step")
    parser.add_argument("--steps", type=int, default=1000, help="recorded steps")
    parser.add_argument("--flush-every-steps", type=int, default=100, help="steps per part")
    parser.add_argument("--rounds", type=int, default=3, help="repetitions of each configuration")
    parser.add_argument("--run", type=Path, action="append", default=[],
                        help="also print the bytes per row of this existing run folder (repeatable)")
    args = parser.parse_args()

    data = realistic_filter_values(args.filters, args.steps)
    layers = layers_for(args.filters)
    rows = args.filters * args.steps
    print(f"# {rows:,} rows ({args.filters} filters x {args.steps} steps), {args.flush_every_steps} steps per part, "
          f"{args.rounds} rounds, median shown")
    print(f"# CPU: {cpu_model()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}")

    thread_runs = []
    format_runs: dict[str, list[tuple[float, float, int]]] = {name: [] for name in FORMATS}
    for _ in range(args.rounds):
        thread_runs.append(time_writer_thread(data, layers, args.flush_every_steps))
        for name, (write, step_major) in FORMATS.items():
            format_runs[name].append(time_format(data, layers, args.flush_every_steps, write, step_major))

    wall_s = statistics.median(wall for wall, _, _ in thread_runs)
    cpu_s = statistics.median(cpu for _, cpu, _ in thread_runs)
    thread_bytes = thread_runs[0][2]
    print()
    print(f"| configuration | M rows/s per CPU s (target >= {TARGET_ROWS_PER_S / 1e6:.0f}) | M rows/s wall | "
          f"bytes/row (target <= {TARGET_BYTES_PER_ROW:.0f}) |")
    print("|---|---|---|---|")
    print(f"| RunWriter thread, add_filters to close | {rows / cpu_s / 1e6:.1f} | {rows / wall_s / 1e6:.1f} | "
          f"{thread_bytes / rows:.2f} |")
    for name, runs in format_runs.items():
        total_s = statistics.median(build + write for build, write, _ in runs)
        write_s = statistics.median(write for _, write, _ in runs)
        print(f"| {name} | {rows / total_s / 1e6:.1f} (Parquet encoding alone {rows / write_s / 1e6:.1f}) | | "
              f"{runs[0][2] / rows:.2f} |")
    print()
    print_layer_query_times(data, layers, args.flush_every_steps, args.rounds)
    print()
    print_column_sizes(data, layers, args.flush_every_steps)
    for run_dir in args.run:
        print_run_size(run_dir)


def print_run_size(run_dir: Path) -> None:
    """Print the bytes per row of the filter parts of a recorded run, for comparison."""
    parts = sorted(Path(run_dir, schema.FILTERS_DIR).rglob(schema.PART_GLOB))
    rows = sum(pq.ParquetFile(path).metadata.num_rows for path in parts)
    if rows == 0:
        print(f"# {run_dir}: no filter rows")
        return
    size = sum(path.stat().st_size for path in parts)
    print(f"# recorded run {run_dir}: {rows:,} rows in {len(parts)} parts, {size / rows:.2f} bytes/row")


def print_layer_query_times(data: np.ndarray, layers: list[dict], flush_every_steps: int, rounds: int) -> None:
    """Print how long DuckDB takes to read one layer's rows, with and without a row group per layer."""
    layer = layers[len(layers) // 2]["name"]
    sql = "SELECT * FROM read_parquet($files) WHERE layer = $layer"
    print(f"| part layout | seconds to read layer {layer} (median of {rounds}) |")
    print("|---|---|")
    for name, write in (("one row group per part (chosen)", write_filters_part),
                        ("a row group per layer", write_row_group_per_layer)):
        with tempfile.TemporaryDirectory() as folder:
            writer = table_builder(folder, layers)
            files = []
            for first in range(0, data.shape[0], flush_every_steps):
                steps = range(first, min(first + flush_every_steps, data.shape[0]))
                table = writer.build_filters_table([FilterBatch(step, data[step], b"") for step in steps])
                files.append(str(Path(folder, f"part-{first}.parquet")))
                write(table, files[-1])
            times = []
            for _ in range(rounds):
                start = time.perf_counter()
                duckdb.connect().sql(sql, params={"files": files, "layer": layer}).to_arrow_table()
                times.append(time.perf_counter() - start)
        print(f"| {name} | {statistics.median(times):.3f} |")


def print_column_sizes(data: np.ndarray, layers: list[dict], flush_every_steps: int) -> None:
    """Print the bytes per row of each column in the chosen format, from one part's metadata."""
    steps = min(flush_every_steps, data.shape[0])
    with tempfile.TemporaryDirectory() as folder:
        writer = table_builder(folder, layers)
        table = writer.build_filters_table([FilterBatch(step, data[step], b"") for step in range(steps)])
        path = Path(folder, "part.parquet")
        write_filters_part(table, path)
        metadata = pq.ParquetFile(path).metadata
    sizes = {}
    for group in range(metadata.num_row_groups):
        for index in range(metadata.num_columns):
            column = metadata.row_group(group).column(index)
            sizes[column.path_in_schema] = sizes.get(column.path_in_schema, 0) + column.total_compressed_size
    print("| column | bytes/row in the chosen format |")
    print("|---|---|")
    for name, size in sizes.items():
        print(f"| {name} | {size / table.num_rows:.3f} |")


if __name__ == "__main__":
    main()
