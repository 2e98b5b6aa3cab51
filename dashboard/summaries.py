"""Per-part summaries of the filter rows, computed once per part file and kept in a bounded cache.

A part file never changes after it is renamed into place, so what a query learns from it stays
true. Each summary here is computed for the parts not seen before, in one DuckDB query over
those files (DuckDB reads them in parallel), and stored per part. A live run that adds a part
costs one small query over the new file; a 10-million-row run pays its scan once per metric.

The cache is bounded by the total number of summary rows it holds, not by entries, so a long
live session with many small parts cannot grow the server's memory without limit.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import duckdb
import pandas as pd

from dashboard.source import Part, Parts

# About 100 MB, estimated: a summary row contains about a dozen 8-byte values.
MAX_CACHED_ROWS = 1_000_000

SOURCE = "read_parquet($files, hive_partitioning=true, union_by_name=true, filename=true)"


class PartCache:
    """Least-recently-used store of per-part DataFrames, bounded by their total row count."""

    def __init__(self, max_rows: int):
        self.max_rows = max_rows
        self._entries: OrderedDict[tuple, pd.DataFrame] = OrderedDict()
        self._rows = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def rows(self) -> int:
        return self._rows

    def get(self, key: tuple) -> pd.DataFrame | None:
        with self._lock:
            frame = self._entries.get(key)
            if frame is not None:
                self._entries.move_to_end(key)
            return frame

    def put(self, key: tuple, frame: pd.DataFrame) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._rows -= max(1, len(old))
            self._entries[key] = frame
            self._rows += max(1, len(frame))
            while self._rows > self.max_rows and len(self._entries) > 1:
                _key, evicted = self._entries.popitem(last=False)
                self._rows -= max(1, len(evicted))

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._rows = 0


CACHE = PartCache(MAX_CACHED_ROWS)


def per_part(parts: Parts, kind: tuple, sql: str, params: dict | None = None) -> pd.DataFrame:
    """Return ``sql``'s rows for every part, concatenated in part order.

    ``sql`` reads ``FROM {source}`` (or its own read_parquet of ``$files`` with filename=true)
    and must output a ``filename`` column, which splits the result by part and is dropped. ``kind`` names the summary in the cache key,
    with every parameter that changes the result.
    """
    frames: dict[Part, pd.DataFrame] = {}
    missing = []
    for part in parts:
        hit = CACHE.get((part, kind))
        if hit is None:
            missing.append(part)
        else:
            frames[part] = hit

    if missing:
        query_params = {**(params or {}), "files": [path for path, _size, _mtime in missing]}
        with duckdb.connect() as con:
            result = con.execute(sql.format(source=SOURCE), query_params).df()
        by_file = {name: group.drop(columns="filename") for name, group in result.groupby("filename", sort=False)}
        empty = result.iloc[0:0].drop(columns="filename")
        for part in missing:
            frame = by_file.get(part[0], empty).reset_index(drop=True)
            CACHE.put((part, kind), frame)
            frames[part] = frame

    if not parts:
        return pd.DataFrame()
    return pd.concat([frames[part] for part in parts], ignore_index=True)


def _value(metric: str) -> str:
    # metric is checked against the fixed metric list by every caller before it gets here.
    return f'CAST("{metric}" AS DOUBLE)'


def basic_stats(parts: Parts, metric: str) -> pd.DataFrame:
    """Return per (rank, layer, step): n, n_finite, and mean, min, max, sumsq over the finite
    values of ``metric``, with n_nan, n_posinf, n_neginf."""
    v = _value(metric)
    sql = f"""
        SELECT filename, rank, layer, step, count(*) AS n, count(*) FILTER (WHERE isfinite({v})) AS n_finite,
               avg({v}) FILTER (WHERE isfinite({v})) AS mean, min({v}) FILTER (WHERE isfinite({v})) AS min,
               max({v}) FILTER (WHERE isfinite({v})) AS max, sum({v} * {v}) FILTER (WHERE isfinite({v})) AS sumsq,
               count(*) FILTER (WHERE isnan({v})) AS n_nan, count(*) FILTER (WHERE {v} = 'inf'::DOUBLE) AS n_posinf,
               count(*) FILTER (WHERE {v} = '-inf'::DOUBLE) AS n_neginf
        FROM {{source}} GROUP BY filename, rank, layer, step
    """
    return per_part(parts, ("basic", metric), sql)


def quantile_stats(parts: Parts, metric: str) -> pd.DataFrame:
    """Return per (rank, layer, step): p10, median and p90 of the finite values of ``metric``."""
    v = _value(metric)
    sql = f"""
        SELECT filename, rank, layer, step, q[1] AS p10, q[2] AS median, q[3] AS p90 FROM (
            SELECT filename, rank, layer, step, quantile_cont({v}, [0.1, 0.5, 0.9]) FILTER (WHERE isfinite({v})) AS q
            FROM {{source}} GROUP BY filename, rank, layer, step
        )
    """
    return per_part(parts, ("quantiles", metric), sql)


def batch_sizes(scalar_parts: Parts) -> pd.DataFrame:
    """Return rank, step, batch_size from scalar parts, one row per step of each part.

    ``batch_size`` is one of the columns every scalars row has, so the first non-null value of
    a step within a part is its batch size.
    """
    sql = """
        SELECT filename, rank, step, any_value(batch_size ORDER BY file_row_number) AS batch_size
        FROM read_parquet($files, hive_partitioning=true, union_by_name=true, filename=true, file_row_number=true)
        WHERE batch_size IS NOT NULL GROUP BY filename, rank, step
    """
    return per_part(scalar_parts, ("batch_size",), sql)


def filter_bucket_sums(parts: Parts, layer: str, metric: str, first: int, width: int) -> pd.DataFrame:
    """Return per (filter, step bucket) of one layer: step (first in bucket), total and
    n_finite (sum and count of the finite values), n, n_nan, n_posinf, n_neginf.

    Sums rather than means are stored so that buckets split across parts add up exactly.
    """
    v = _value(metric)
    sql = f"""
        SELECT filename, filter, (step - $first) // $width AS bucket, min(step) AS step,
               sum({v}) FILTER (WHERE isfinite({v})) AS total, count(*) FILTER (WHERE isfinite({v})) AS n_finite,
               count(*) AS n, count(*) FILTER (WHERE isnan({v})) AS n_nan,
               count(*) FILTER (WHERE {v} = 'inf'::DOUBLE) AS n_posinf, count(*) FILTER (WHERE {v} = '-inf'::DOUBLE) AS n_neginf
        FROM {{source}} WHERE layer = $layer GROUP BY filename, filter, bucket
    """
    params = {"layer": str(layer), "first": int(first), "width": int(width)}
    return per_part(parts, ("filter_buckets", layer, metric, int(first), int(width)), sql, params)


def recorded_steps(parts: Parts) -> pd.Series:
    """Return the distinct recorded steps over all parts, ascending."""
    frame = per_part(parts, ("steps",), "SELECT DISTINCT filename, step FROM {source}")
    if frame.empty:
        return pd.Series([], dtype="int64")
    return pd.Series(sorted(frame["step"].unique()), dtype="int64")


def layer_filters(parts: Parts) -> pd.DataFrame:
    """Return layer and filters (number of distinct filter indices seen) per layer."""
    sql = "SELECT filename, layer, count(DISTINCT filter) AS filters FROM {source} GROUP BY filename, layer"
    frame = per_part(parts, ("layers",), sql)
    if frame.empty:
        return pd.DataFrame({"layer": pd.Series(dtype=object), "filters": pd.Series(dtype="int64")})
    return frame.groupby("layer", as_index=False, sort=False)["filters"].max()


def inactive_rows(parts: Parts) -> pd.DataFrame:
    """Return (layer, filter, step) of every row with no active sample (active_samples == 0)."""
    sql = "SELECT filename, layer, filter, step FROM {source} WHERE active_samples = 0"
    return per_part(parts, ("inactive",), sql)


def last_active(parts: Parts) -> pd.DataFrame:
    """Return layer, filter, last_active: the last step with at least one active sample."""
    sql = """
        SELECT filename, layer, filter, max(step) AS last_active FROM {source}
        WHERE active_samples > 0 GROUP BY filename, layer, filter
    """
    frame = per_part(parts, ("last_active",), sql)
    if frame.empty:
        return pd.DataFrame(columns=["layer", "filter", "last_active"])
    return frame.groupby(["layer", "filter"], as_index=False)["last_active"].max()


def first_nonfinite_rows(parts: Parts, metrics: tuple[str, ...]) -> pd.DataFrame:
    """Return, per part, the first row (by step, layer, filter) with a NaN or Inf in any metric.

    Columns: step, layer, filter and one boolean per metric, True where that value is not finite.
    """
    flags = ", ".join(f'NOT isfinite({_value(m)}) AS "{m}"' for m in metrics)
    any_bad = " OR ".join(f"NOT isfinite({_value(m)})" for m in metrics)
    sql = f"""
        SELECT filename, step, layer, filter, {flags} FROM {{source}} WHERE {any_bad}
        QUALIFY row_number() OVER (PARTITION BY filename ORDER BY step, layer, filter) = 1
    """
    return per_part(parts, ("nonfinite", metrics), sql)
