"""Time the dashboard's queries and view renders on a large run (10 million filter rows by default).

The run is written with ``probe.writer.RunWriter`` in the real on-disk format. It has 12
convolution layers (32 to 512 filters, 2496 in all) with random-walk metrics. About 2% of the
filters die during the run and one of them revives, so the health queries have work to do.

    python benchmarks/bench_dashboard.py                 # generate (once) and time
    python benchmarks/bench_dashboard.py --rows 2000000  # smaller run

Each query is timed cold (Streamlit's cache cleared before each call), as the median of
``--repeats`` calls. The baseline, timed in the same loop and alternated with the DuckDB query,
is the same layer heatmap computed by reading the filter columns with pyarrow and aggregating
with pandas. View renders go through Streamlit's AppTest with a cold cache (first draw of a
view once the run folder has been listed) and warm (the same view redrawn).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

logging.getLogger("streamlit").setLevel(logging.ERROR)

LAYER_FILTERS = (32, 32, 64, 64, 128, 128, 256, 256, 256, 256, 512, 512)
BATCH_SIZE = 128
QUERY_TARGET_S = 0.3
VIEW_TARGET_S = 1.5


def _metrics_for_step(state: dict, rng: np.random.Generator, step: int, steps: int) -> np.ndarray:
    """Advance the random walks one step and return [filters, len(METRICS)] float32 values."""
    from probe import schema

    n = state["gain"].shape[0]
    for name in ("gain", "out_rms", "grad_norm", "weight_norm"):
        state[name] *= np.exp(rng.normal(0.0, 0.02, n)).astype(np.float32)
    state["sparsity"] = np.clip(state["sparsity"] + rng.normal(0.0, 0.01, n).astype(np.float32), 0.0, 1.0)

    active = np.full(n, BATCH_SIZE, dtype=np.float32)
    dead_now = state["dies_at"] <= step
    revived = state["revives_at"] <= step
    active[dead_now & ~revived] = 0.0
    values = np.empty((n, len(schema.METRICS)), dtype=np.float32)
    columns = {
        "gain": state["gain"],
        "out_rms": state["out_rms"],
        "out_mean": rng.normal(0.0, 0.1, n).astype(np.float32),
        "sparsity": np.where(active == 0, 1.0, state["sparsity"]),
        "active_samples": active,
        "effective_batch": np.where(active == 0, 0.0, BATCH_SIZE * (0.5 + 0.3 * state["sparsity"])),
        "grad_norm": np.where(active == 0, 0.0, state["grad_norm"]),
        "weight_norm": state["weight_norm"],
        "update_ratio": np.where(active == 0, 0.0, 1e-3 * (1.0 + 0.1 * rng.standard_normal(n))),
    }
    for i, name in enumerate(schema.METRICS):
        values[:, i] = columns[name]
    return values


def generate_run(run_dir: Path, rows: int, seed: int = 0) -> int:
    """Write a run of about ``rows`` filter rows into ``run_dir``; returns the number of steps."""
    from probe import store
    from probe.writer import RunWriter

    n = sum(LAYER_FILTERS)
    steps = max(1, rows // n)
    layers = [
        {"name": f"features.{i}.conv", "type": "Conv2d", "filters": f, "normaliser": f"features.{i}.agc",
         "normaliser_type": "AutoGainControl", "activation": f"features.{i}.relu", "activation_type": "ReLU", "depth": i}
        for i, f in enumerate(LAYER_FILTERS)
    ]
    store.create_run(run_dir, {"config": {"batch_size": BATCH_SIZE, "synthetic": True}, "layers": layers, "every": 1})

    rng = np.random.default_rng(seed)
    dies_at = np.full(n, np.iinfo(np.int64).max)
    dying = rng.choice(n, size=n // 50, replace=False)
    dies_at[dying] = rng.integers(steps // 10, steps, size=len(dying))
    revives_at = np.full(n, np.iinfo(np.int64).max)
    revives_at[dying[0]] = dies_at[dying[0]] + 50
    state = {
        "gain": rng.uniform(0.5, 2.0, n).astype(np.float32),
        "out_rms": np.ones(n, dtype=np.float32),
        "grad_norm": rng.uniform(1e-3, 1e-2, n).astype(np.float32),
        "weight_norm": rng.uniform(0.5, 1.5, n).astype(np.float32),
        "sparsity": rng.uniform(0.2, 0.6, n).astype(np.float32),
        "dies_at": dies_at,
        "revives_at": revives_at,
    }

    writer = RunWriter(run_dir, layers, flush_every_steps=100, flush_every_s=3600.0)
    started = time.time()
    for step in range(steps):
        writer.add_filters(step, _metrics_for_step(state, rng, step, steps))
        writer.add_scalars({"step": step, "wall_time": started + step * 0.05, "batch_size": BATCH_SIZE,
                            "samples_per_s": BATCH_SIZE / 0.05, "loss": 2.3 * np.exp(-step / steps), "lr": 0.1})
        if step % 500 == 499:
            writer.flush()
    writer.close()
    if writer.error is not None:
        raise RuntimeError(f"writing the benchmark run failed: {writer.error}")
    store.update_meta(run_dir, status="finished")
    return steps


def clear_caches() -> None:
    """Empty Streamlit's query cache and the per-part summary cache (a cold start)."""
    import streamlit as st

    from dashboard import summaries

    st.cache_data.clear()
    summaries.CACHE.clear()


def _median_time(function, repeats: int, keep_parts: bool = False) -> float:
    """Median seconds of ``function`` with empty caches; ``keep_parts`` keeps per-part summaries."""
    import streamlit as st

    times = []
    for _ in range(repeats):
        if keep_parts:
            function()
            st.cache_data.clear()
        else:
            clear_caches()
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def pandas_layer_heatmap(files: list[str], first: int, width: int):
    """Baseline: the mean-gain layer heatmap with pyarrow + pandas instead of DuckDB."""
    import pyarrow.parquet as pq

    frame = pq.ParquetDataset(files).read(columns=["step", "layer", "gain"]).to_pandas()
    frame["bucket"] = (frame["step"] - first) // width
    return frame.groupby(["layer", "bucket"], observed=True)["gain"].mean()


def time_queries(source, repeats: int) -> list[tuple]:
    """Return (name, cold s, open s, target s) of each query; see ``print_table``."""
    from dashboard import health, queries

    first, last, _recorded = queries.step_range(source.filter_parts)
    largest = source.layers[-1]
    layer_width = queries.bucket_width(first, last, len(source.layers))
    filter_width = queries.bucket_width(first, last, LAYER_FILTERS[-1])
    line_width = queries.bucket_width(first, last, 1, queries.MAX_POINTS)
    fp, sp = source.filter_parts, source.scalar_parts
    cases = [
        ("step_range", lambda: queries.step_range(fp), None),
        ("layer heatmap, mean", lambda: queries.layer_heatmap(fp, sp, "gain", "mean", first, layer_width), QUERY_TARGET_S),
        ("layer heatmap, median", lambda: queries.layer_heatmap(fp, sp, "gain", "median", first, layer_width), QUERY_TARGET_S),
        ("layer heatmap, p90", lambda: queries.layer_heatmap(fp, sp, "grad_norm", "p90", first, layer_width), QUERY_TARGET_S),
        ("layer heatmap, eff. batch fraction", lambda: queries.layer_heatmap(fp, sp, "effective_batch_fraction", "mean", first, layer_width), QUERY_TARGET_S),
        ("filter heatmap (512 filters)", lambda: queries.filter_heatmap(fp, sp, largest, "gain", first, filter_width), QUERY_TARGET_S),
        ("quantile bands (one layer)", lambda: queries.quantile_bands(fp, sp, largest, "gain", first, line_width), None),
        ("depth profile (one step)", lambda: queries.depth_profile(fp, sp, "gain", last // 2), None),
        ("filter history (one filter)", lambda: queries.filter_history(fp, largest, 7, line_width), None),
        ("scalars", lambda: queries.scalars(sp), None),
        ("dead filters", lambda: health.dead_episodes(fp, 10), None),
        ("recent gains", lambda: health.recent_gains(fp, 20), None),
        ("layer series (health)", lambda: health.layer_series(fp, sp), None),
    ]
    results = []
    for name, query, target in cases:
        results.append((name, _median_time(query, repeats), _median_time(query, repeats, keep_parts=True), target))

    # A/B: the DuckDB heatmap and the pandas baseline alternate inside one loop.
    files = [p for p, _s, _m in fp]
    duck, base = [], []
    for _ in range(repeats):
        clear_caches()
        started = time.perf_counter()
        queries.layer_heatmap(fp, sp, "gain", "mean", first, layer_width)
        duck.append(time.perf_counter() - started)
        started = time.perf_counter()
        pandas_layer_heatmap(files, first, layer_width)
        base.append(time.perf_counter() - started)
    results.append(("baseline: pandas layer heatmap, mean", statistics.median(base), None, None))
    results.append(("  ratio baseline / dashboard, cold (x)", statistics.median(base) / statistics.median(duck), None, None))
    return results


def time_views(runs_dir: Path, run_name: str, repeats: int) -> list[tuple]:
    """Return (view, cold s, open s, target s) of AppTest renders of every view."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    os.environ["DEEPCONTROL_RUNS_DIR"] = str(runs_dir)
    app = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=120)
    app.query_params["run"] = [run_name, f"{run_name}-b"]
    app.run()
    results = []
    for view in ("runs", "scalars", "layers", "filters", "distribution", "depth", "compare", "health"):
        cold, opened, warm = [], [], []
        app.radio(key="view").set_value(view)
        for _ in range(repeats):
            clear_caches()
            cold.append(_timed_run(app))
            st.cache_data.clear()
            opened.append(_timed_run(app))
            warm.append(_timed_run(app))
            if app.exception:
                raise RuntimeError(f"view {view} raised: {app.exception[0].value}")
        results.append((f"view {view}", statistics.median(cold), statistics.median(opened), VIEW_TARGET_S))
        results.append((f"view {view}, redrawn (all cached)", statistics.median(warm), None, VIEW_TARGET_S))
    return results


def _timed_run(app) -> float:
    started = time.perf_counter()
    app.run()
    return time.perf_counter() - started


def rss_mb() -> float:
    """Return this process's resident memory in MB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def live_session(out: Path, refreshes: int) -> list[tuple[int, int, float, int]]:
    """Redraw the layers view of a live run: it gains a part before each of the first half of
    the redraws, then stops growing for the second half.

    Returns (refresh, parts on disk, RSS in MB, summary rows cached) every refreshes // 10
    redraws. Memory may grow with the data (bounded by the caches) but must stay flat while
    the data does not change.
    """
    import shutil

    from streamlit.testing.v1 import AppTest

    from dashboard import summaries
    from probe import store
    from probe.writer import RunWriter

    runs_dir = out.parent / f"{out.name}-live"
    shutil.rmtree(runs_dir, ignore_errors=True)
    layers = [{"name": f"conv{i}", "type": "Conv2d", "filters": 64, "depth": i} for i in range(12)]
    store.create_run(runs_dir / "live", {"config": {}, "layers": layers, "every": 1})
    writer = RunWriter(runs_dir / "live", layers, flush_every_steps=10_000, flush_every_s=3600.0)
    rng = np.random.default_rng(0)

    os.environ["DEEPCONTROL_RUNS_DIR"] = str(runs_dir)
    app = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=120)
    app.query_params.update(run="live", view="layers", stat="median")
    samples = []
    step = 0
    for refresh in range(1, refreshes + 1):
        for _ in range(10 if refresh <= refreshes // 2 else 0):
            writer.add_filters(step, rng.random((12 * 64, 9), dtype=np.float32))
            writer.add_scalars({"step": step, "wall_time": time.time(), "batch_size": 64, "samples_per_s": 1.0})
            step += 1
        writer.flush()
        app.run()
        if refresh % max(1, refreshes // 10) == 0:
            samples.append((refresh, writer.parts_written, rss_mb(), summaries.CACHE.rows))
    writer.close()
    return samples


def print_table(title: str, rows: list[tuple[str, float, float | None, float | None]]) -> None:
    """Print cold times (no cache), open times (per-part summaries built) and the verdict.

    The target applies to the open time: the run has been opened once, as in the dashboard
    after its first view of a metric.
    """
    print(f"\n{title}")
    print(f"{'case':44s} {'cold s':>8s} {'open s':>8s} {'target s':>9s}  ok")
    for name, cold, opened, target in rows:
        if name.strip().startswith("ratio"):
            print(f"{name:44s} {cold:8.2f}")
            continue
        measured = cold if opened is None else opened
        if target is None:
            verdict = ""
        else:
            verdict = "yes" if measured <= target else "NO"
        opened_text = "" if opened is None else f"{opened:.3f}"
        target_text = "" if target is None else f"{target:.2f}"
        print(f"{name:44s} {cold:8.3f} {opened_text:>8s} {target_text:>9s}  {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000, help="filter rows of the generated run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "dashboard-runs",
                        help="runs folder for the generated run (reused when it has the same size)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per case (median reported)")
    parser.add_argument("--refreshes", type=int, default=300, help="redraws in the live-session memory check")
    args = parser.parse_args()

    from dashboard.source import load_catalog

    # Two runs of the same size, so that the Compare view has a pair to draw.
    run_name = f"bench-{args.rows}"
    for seed, name in enumerate((run_name, f"{run_name}-b")):
        run_dir = args.out / name
        if not (run_dir / "run.json").is_file():
            started = time.perf_counter()
            steps = generate_run(run_dir, args.rows, seed=seed)
            print(f"generated {run_dir} ({steps} steps) in {time.perf_counter() - started:.1f} s")
    catalog = load_catalog(args.out)
    source = catalog.runs[run_name]
    size_mb = sum(size for _p, size, _m in source.filter_parts) / 1e6

    import duckdb
    import streamlit

    print(f"machine: {os.cpu_count()} CPU cores, Python {sys.version.split()[0]}, duckdb {duckdb.__version__}, "
          f"streamlit {streamlit.__version__}")
    print(f"load average at start (1, 5, 15 min): {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"run: {args.rows:,} filter rows requested, {len(source.filter_parts)} filter parts, {size_mb:.0f} MB")
    print_table("queries (cold cache)", time_queries(source, args.repeats))
    print_table("views (AppTest, whole script run)", time_views(args.out, run_name, max(1, args.repeats // 2)))
    print(f"\nlive session: {args.refreshes} redraws of the layers view, a new part before each of the first half")
    print(f"{'redraw':>7s} {'parts':>6s} {'RSS MB':>8s} {'cached summary rows':>20s}")
    for refresh, parts, rss, rows in live_session(args.out, args.refreshes):
        print(f"{refresh:7d} {parts:6d} {rss:8.0f} {rows:20d}")
    print(f"load average at end (1, 5, 15 min): {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
