"""DuckDB queries behind every chart, aggregated so that no chart receives raw filter rows.

Each query takes the run's part files as ``Parts`` (path, size, mtime) tuples, so
``st.cache_data`` keys on the files' identity and a new or rewritten part invalidates the entry.
Values are always passed as SQL parameters. Metric and statistic names cannot be parameters
(they are identifiers), so they are checked against the fixed lists below before use.

Non-finite values are never averaged in or dropped silently. Every aggregate is taken over the
finite values only, and each result row has ``n_nan``, ``n_posinf`` and ``n_neginf``: the counts
of NaN, +Inf and -Inf values it covered. The charts draw those counts as a separate layer.
"""

from __future__ import annotations

import math
from pathlib import Path

import duckdb
import pandas as pd
import streamlit as st

from dashboard import summaries
from dashboard.source import Parts
from probe import schema

# At most this many cells (rows x step buckets) go into one heatmap sent to the browser.
MAX_CELLS = 100_000
# At most this many points per line in the per-filter history and quantile band charts.
MAX_POINTS = 2_000

# Effective batch divided by the step's batch size (scalar column batch_size), in [0, 1].
EFFECTIVE_BATCH_FRACTION = "effective_batch_fraction"
HEATMAP_METRICS = (
    "gain",
    "sparsity",
    "active_samples",
    "effective_batch",
    EFFECTIVE_BATCH_FRACTION,
    "grad_norm",
    "update_ratio",
    "out_rms",
    "out_mean",
    "weight_norm",
)

# Statistic over the filters of a layer (and the recorded steps of a step bucket).
STATISTICS = {
    "mean": "avg(v)",
    "median": "median(v)",
    "p10": "quantile_cont(v, 0.1)",
    "p90": "quantile_cont(v, 0.9)",
    "max": "max(v)",
    "min": "min(v)",
}
# Suffix of the helper column that marks a scalar as logged at a step (see _merged_scalars).
LOGGED_SUFFIX = ":logged"
BAND_QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)

# Bounds of st.cache_data. A live refresh creates new keys, so without them the server's memory
# would grow with every refresh. A heatmap result can have MAX_CELLS rows (about 7 MB), so the
# functions that return heatmap cells keep fewer entries.
CACHE = dict(max_entries=16, ttl=600, show_spinner=False)
HEATMAP_CACHE = dict(max_entries=6, ttl=600, show_spinner=False)

NONFINITE_COUNTS = """
    count(*) FILTER (WHERE isnan(v)) AS n_nan,
    count(*) FILTER (WHERE v = 'inf'::DOUBLE) AS n_posinf,
    count(*) FILTER (WHERE v = '-inf'::DOUBLE) AS n_neginf
"""


def quote_identifier(name: str) -> str:
    """Quote a column name for SQL; user scalar names come from the training script."""
    return '"' + name.replace('"', '""') + '"'


def part_paths(parts: Parts) -> list[str]:
    """Return the file paths of ``parts``."""
    return [path for path, _size, _mtime in parts]


def _check_metric(metric: str) -> None:
    if metric not in HEATMAP_METRICS:
        raise ValueError(f"invalid metric {metric!r}; choose one of {HEATMAP_METRICS}")


def _check_statistic(statistic: str) -> None:
    if statistic not in STATISTICS:
        raise ValueError(f"invalid statistic {statistic!r}; choose one of {tuple(STATISTICS)}")


def _filters_source(filter_parts: Parts, scalar_parts: Parts, metric: str) -> tuple[str, dict]:
    """Return a FROM clause with columns step, rank, layer, filter and v (the metric as DOUBLE)."""
    _check_metric(metric)
    params: dict = {"filter_files": part_paths(filter_parts)}
    rows = "read_parquet($filter_files, hive_partitioning=true, union_by_name=true)"

    if metric != EFFECTIVE_BATCH_FRACTION:
        sql = f'(SELECT step, rank, layer, filter, CAST("{metric}" AS DOUBLE) AS v FROM {rows})'
        return sql, params

    if scalar_parts:
        params["scalar_files"] = part_paths(scalar_parts)
        batch = (
            "(SELECT step, rank, any_value(batch_size) AS batch_size FROM read_parquet("
            "$scalar_files, hive_partitioning=true, union_by_name=true) GROUP BY step, rank)"
        )
    else:
        batch = "(SELECT NULL::BIGINT AS step, NULL::BIGINT AS rank, NULL::DOUBLE AS batch_size WHERE false)"
    sql = (
        f"(SELECT f.step, f.rank, f.layer, f.filter, "
        f"CAST(f.effective_batch AS DOUBLE) / b.batch_size AS v "
        f"FROM {rows} AS f LEFT JOIN {batch} AS b ON f.step = b.step AND f.rank = b.rank)"
    )
    return sql, params


def _run(sql: str, params: dict) -> pd.DataFrame:
    with duckdb.connect() as con:
        return con.execute(sql, params).df()


def bucket_width(first: int, last: int, n_rows: int, max_cells: int | None = None) -> int:
    """Return the step bucket width (in steps) that keeps rows x buckets within ``max_cells``
    (default ``MAX_CELLS``)."""
    max_cells = MAX_CELLS if max_cells is None else max_cells
    max_columns = max(1, max_cells // max(1, n_rows))
    return max(1, math.ceil((last - first + 1) / max_columns))


def step_range(filter_parts: Parts) -> tuple[int, int, int]:
    """Return (first step, last step, number of recorded steps) of the filter rows; zeros if none."""
    steps = summaries.recorded_steps(filter_parts)
    if steps.empty:
        return (0, 0, 0)
    return (int(steps.iloc[0]), int(steps.iloc[-1]), len(steps))


def recorded_steps(filter_parts: Parts) -> list[int]:
    """Return the distinct recorded steps of the filter rows, ascending."""
    return summaries.recorded_steps(filter_parts).tolist()


def layer_filter_counts(filter_parts: Parts) -> pd.DataFrame:
    """Return one row per layer present in the data: layer, filters (number of filter indices)."""
    return summaries.layer_filters(filter_parts)


def _merged_scalars(scalar_parts: Parts, rank: int) -> pd.DataFrame:
    """Merge the scalar rows of each step: per column its first non-null value in write order.

    Besides each value column ``c`` the result has ``c:logged``, True where the step has a
    non-null value. pandas turns both NULL and NaN into NaN, so only this flag distinguishes them.
    """
    parts = parts_of_rank(scalar_parts, rank)
    if not parts:
        return pd.DataFrame({key: pd.Series(dtype="float64") for key in schema.SCALAR_KEYS})
    source = "read_parquet($files, hive_partitioning=true, union_by_name=true, filename=true, file_row_number=true)"
    params = {"files": part_paths(parts)}
    with duckdb.connect() as con:
        columns = [row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {source}", params).fetchall()]
        values = [c for c in columns if c not in ("step", "rank", "filename", "file_row_number")]
        selected = []
        for column in values:
            merged = f"any_value({quote_identifier(column)} ORDER BY filename, file_row_number)"
            selected.append(f"{merged} AS {quote_identifier(column)}")
            selected.append(f"{merged} IS NOT NULL AS {quote_identifier(column + LOGGED_SUFFIX)}")
        sql = f"SELECT step, {', '.join(selected)} FROM {source} GROUP BY step ORDER BY step"
        return con.execute(sql, params).df()


@st.cache_data(**CACHE)
def scalars(scalar_parts: Parts, rank: int = 0) -> pd.DataFrame:
    """Return one row per step of rank ``rank``: step, wall_time, batch_size, ... and user scalars.

    Rows of one step are merged (``Probe.log`` adds values to a finished step): each column
    takes its first non-null value in write order. A value never logged is NaN here; see
    ``logged_scalar`` for telling it apart from a logged NaN.
    """
    frame = _merged_scalars(scalar_parts, rank)
    return frame[[c for c in frame.columns if not c.endswith(LOGGED_SUFFIX)]]


@st.cache_data(**CACHE)
def scalar_series(scalar_parts: Parts, column: str, rank: int = 0) -> pd.DataFrame:
    """Return step, wall_time and ``column`` for the steps where ``column`` was logged (NaN kept)."""
    frame = _merged_scalars(scalar_parts, rank)
    if column not in frame:
        return pd.DataFrame({"step": pd.Series(dtype="int64"), "wall_time": pd.Series(dtype="float64"), column: pd.Series(dtype="float64")})
    logged = frame[column + LOGGED_SUFFIX].astype(bool)
    return frame.loc[logged, ["step", "wall_time", column]].reset_index(drop=True)


def rank_of(part) -> int:
    """Return the rank of a part from its folder name ``rank=<r>``."""
    return int(Path(part[0]).parent.name.split("=", 1)[1])


def parts_of_rank(parts: Parts, rank: int) -> Parts:
    """Return the parts stored under ``rank=<rank>``."""
    return tuple(part for part in parts if rank_of(part) == int(rank))


def _batch_sizes(scalar_parts: Parts) -> pd.DataFrame:
    """Return rank, step, batch_size (first non-null value of the step) of every rank."""
    frame = summaries.batch_sizes(scalar_parts)
    if frame.empty:
        return pd.DataFrame({"rank": pd.Series(dtype="int64"), "step": pd.Series(dtype="int64"), "batch_size": pd.Series(dtype="float64")})
    return frame.groupby(["rank", "step"], as_index=False, sort=False)["batch_size"].first()


def layer_step_stats(filter_parts: Parts, scalar_parts: Parts, metric: str, statistic: str) -> pd.DataFrame:
    """Return ``statistic`` of ``metric`` over the filters of each (layer, step).

    Columns: layer, step, value, n_finite, n, n_nan, n_posinf, n_neginf. Ranks of a distributed
    run are pooled: means are weighted by finite counts, max and min taken over ranks, and a
    quantile averaged over ranks. The effective batch fraction is the effective batch statistic
    divided by the step's batch size, which is the same as the statistic of the ratios because
    the batch size is one number per step and rank.
    """
    _check_metric(metric)
    _check_statistic(statistic)
    base_metric = "effective_batch" if metric == EFFECTIVE_BATCH_FRACTION else metric
    basic = summaries.basic_stats(filter_parts, base_metric)
    if basic.empty:
        return pd.DataFrame(columns=["layer", "step", "value", "n_finite", "n", "n_nan", "n_posinf", "n_neginf"])
    if statistic in ("median", "p10", "p90"):
        quantiles = summaries.quantile_stats(filter_parts, base_metric)
        basic = basic.merge(quantiles, on=["rank", "layer", "step"], how="left")
    column = {"mean": "mean", "median": "median", "p10": "p10", "p90": "p90", "max": "max", "min": "min"}[statistic]
    frame = basic[["rank", "layer", "step", "n", "n_finite", "n_nan", "n_posinf", "n_neginf"]].copy()
    frame["value"] = basic[column].astype(float)

    if metric == EFFECTIVE_BATCH_FRACTION:
        batch = _batch_sizes(scalar_parts)
        frame = frame.merge(batch, on=["rank", "step"], how="left")
        frame["value"] = frame["value"] / frame["batch_size"].astype(float)
        frame = frame.drop(columns="batch_size")

    if frame["rank"].nunique() > 1:
        frame = _pool_ranks(frame, statistic)
    return frame.drop(columns="rank").reset_index(drop=True)


def _pool_ranks(frame: pd.DataFrame, statistic: str) -> pd.DataFrame:
    frame = frame.assign(weighted=frame["value"] * frame["n_finite"])
    grouped = frame.groupby(["layer", "step"], as_index=False, sort=False)
    pooled = grouped[["n", "n_finite", "n_nan", "n_posinf", "n_neginf", "weighted"]].sum()
    if statistic == "mean":
        pooled["value"] = pooled["weighted"] / pooled["n_finite"].where(pooled["n_finite"] > 0)
    else:
        how = {"max": "max", "min": "min"}.get(statistic, "mean")
        pooled["value"] = grouped["value"].agg(how)["value"]
    return pooled.drop(columns="weighted").assign(rank=0)


@st.cache_data(**HEATMAP_CACHE)
def layer_heatmap(
    filter_parts: Parts, scalar_parts: Parts, metric: str, statistic: str, first: int, width: int
) -> pd.DataFrame:
    """Aggregate ``metric`` per (layer, step bucket) with ``statistic`` over filters.

    The statistic is taken over the filters at each recorded step. A bucket of several steps
    shows the mean of those per-step values, except for "max" and "min" (the max and min of
    them) and "mean" (weighted by finite counts, so it equals the mean over all its values).
    Buckets are ``width`` steps wide starting at step ``first``, so two runs queried with the
    same ``first`` and ``width`` line up bucket by bucket. Columns: layer, bucket,
    bucket_start (first step the bucket covers), step (first recorded step in the bucket),
    value, n, n_nan, n_posinf, n_neginf.
    """
    per_step = layer_step_stats(filter_parts, scalar_parts, metric, statistic)
    if per_step.empty:
        return _empty_cells("layer")
    per_step = per_step.assign(bucket=(per_step["step"].astype("int64") - int(first)) // int(width))
    per_step["weighted"] = per_step["value"] * per_step["n_finite"]
    grouped = per_step.groupby(["layer", "bucket"], as_index=False, sort=True)
    cells = grouped.agg(
        step=("step", "min"), n=("n", "sum"), n_finite=("n_finite", "sum"), weighted=("weighted", "sum"),
        n_nan=("n_nan", "sum"), n_posinf=("n_posinf", "sum"), n_neginf=("n_neginf", "sum"),
    )
    if statistic == "mean":
        cells["value"] = cells["weighted"] / cells["n_finite"].where(cells["n_finite"] > 0)
    else:
        how = {"max": "max", "min": "min"}.get(statistic, "mean")
        cells["value"] = grouped["value"].agg(how)["value"].to_numpy()
    cells["bucket_start"] = int(first) + cells["bucket"] * int(width)
    return cells[["layer", "bucket", "bucket_start", "step", "value", "n", "n_nan", "n_posinf", "n_neginf"]]


@st.cache_data(**HEATMAP_CACHE)
def filter_heatmap(
    filter_parts: Parts, scalar_parts: Parts, layer: str, metric: str, first: int, width: int
) -> pd.DataFrame:
    """Return the mean of ``metric`` per (filter, step bucket) for one layer.

    Columns: filter, bucket, bucket_start, step, value, n, n_nan, n_posinf, n_neginf. With one
    recorded step per bucket the value is the filter's own value at that step. Per-part sums
    are cached (see ``summaries.filter_bucket_sums``), except for the effective batch
    fraction, which needs the scalars and is queried directly.
    """
    if not filter_parts:
        return _empty_cells("filter")
    if metric != EFFECTIVE_BATCH_FRACTION:
        _check_metric(metric)
        return _combine_bucket_sums(summaries.filter_bucket_sums(filter_parts, layer, metric, first, width), first, width)
    source, params = _filters_source(filter_parts, scalar_parts, metric)
    params.update(layer=str(layer), first=int(first), width=int(width))
    sql = f"""
        SELECT filter, (step - $first) // $width AS bucket, $first + bucket * $width AS bucket_start,
               min(step) AS step,
               avg(v) FILTER (WHERE isfinite(v)) AS value, count(*) AS n, {NONFINITE_COUNTS}
        FROM {source} WHERE layer = $layer GROUP BY filter, bucket ORDER BY filter, bucket
    """
    return _run(sql, params)


def _combine_bucket_sums(sums: pd.DataFrame, first: int, width: int) -> pd.DataFrame:
    """Add up per-part bucket sums; a bucket that spans two parts gets both parts' rows."""
    if sums.empty:
        return _empty_cells("filter")
    cells = sums.groupby(["filter", "bucket"], as_index=False, sort=True).agg(
        step=("step", "min"), total=("total", "sum"), n_finite=("n_finite", "sum"), n=("n", "sum"),
        n_nan=("n_nan", "sum"), n_posinf=("n_posinf", "sum"), n_neginf=("n_neginf", "sum"),
    )
    cells["value"] = cells["total"] / cells["n_finite"].where(cells["n_finite"] > 0)
    cells["bucket_start"] = int(first) + cells["bucket"] * int(width)
    return cells[["filter", "bucket", "bucket_start", "step", "value", "n", "n_nan", "n_posinf", "n_neginf"]]


@st.cache_data(**CACHE)
def filter_history(filter_parts: Parts, layer: str, filter_index: int, width: int) -> pd.DataFrame:
    """Return every metric of one filter over time, averaged per step bucket of ``width`` steps.

    Columns: step and one column per metric (mean over the finite values in the bucket) plus
    ``<metric>_nonfinite``, the number of NaN or Inf values the bucket contained.
    """
    if not filter_parts:
        return pd.DataFrame({"step": pd.Series(dtype="int64")})
    columns = []
    for metric in schema.METRICS:
        value = f'CAST("{metric}" AS DOUBLE)'
        columns.append(f'avg({value}) FILTER (WHERE isfinite({value})) AS "{metric}"')
        columns.append(f'count(*) FILTER (WHERE NOT isfinite({value})) AS "{metric}_nonfinite"')
    sql = f"""
        SELECT min(step) AS step, {", ".join(columns)}
        FROM read_parquet($files, hive_partitioning=true, union_by_name=true)
        WHERE layer = $layer AND filter = $filter
        GROUP BY step // $width ORDER BY step
    """
    params = {"files": part_paths(filter_parts), "layer": str(layer), "filter": int(filter_index), "width": int(width)}
    return _run(sql, params)


@st.cache_data(**CACHE)
def quantile_bands(
    filter_parts: Parts, scalar_parts: Parts, layer: str, metric: str, first: int, width: int
) -> pd.DataFrame:
    """Return quantiles of ``metric`` over the filters of one layer per step bucket.

    Columns: step, q0, q10, q25, q50, q75, q90, q100 (over finite values), n, n_nan, n_posinf,
    n_neginf.
    """
    if not filter_parts:
        return pd.DataFrame({"step": pd.Series(dtype="int64")})
    source, params = _filters_source(filter_parts, scalar_parts, metric)
    params.update(layer=str(layer), first=int(first), width=int(width), quantiles=list(BAND_QUANTILES))
    sql = f"""
        SELECT min(step) AS step, quantile_cont(v, $quantiles) FILTER (WHERE isfinite(v)) AS q,
               count(*) AS n, {NONFINITE_COUNTS}
        FROM {source} WHERE layer = $layer GROUP BY (step - $first) // $width ORDER BY step
    """
    frame = _run(sql, params)
    for i, q in enumerate(BAND_QUANTILES):
        frame[f"q{round(q * 100)}"] = [values[i] if values is not None else float("nan") for values in frame["q"]]
    return frame.drop(columns="q")


@st.cache_data(**CACHE)
def depth_profile(filter_parts: Parts, scalar_parts: Parts, metric: str, step: int) -> pd.DataFrame:
    """Return statistics of ``metric`` over each layer's filters at the last recorded step <= ``step``.

    Columns: layer, step, mean, median, p10, p90, max, n, n_nan, n_posinf, n_neginf. Empty
    when no step at or before ``step`` was recorded.
    """
    steps = summaries.recorded_steps(filter_parts)
    steps = steps[steps <= int(step)]
    if steps.empty:
        return pd.DataFrame({"layer": pd.Series(dtype=object), "step": pd.Series(dtype="int64")})
    source, params = _filters_source(filter_parts, scalar_parts, metric)
    # The step comes from the cached step list, so the query needs no scan for max(step).
    params["step"] = int(steps.iloc[-1])
    statistics = ", ".join(
        f"{sql} FILTER (WHERE isfinite(v)) AS {name}" for name, sql in STATISTICS.items() if name != "min"
    )
    sql = f"""
        SELECT layer, any_value(step) AS step, {statistics}, count(*) AS n, {NONFINITE_COUNTS}
        FROM {source} WHERE step = $step GROUP BY layer
    """
    return _run(sql, params)


def _empty_cells(row: str) -> pd.DataFrame:
    columns = [row, "bucket", "bucket_start", "step", "value", "n", "n_nan", "n_posinf", "n_neginf"]
    return pd.DataFrame({c: pd.Series(dtype=object if c == "layer" else "float64") for c in columns})
