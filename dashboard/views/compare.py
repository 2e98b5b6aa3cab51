"""Compare view: two runs side by side on one colour scale, and their difference A - B."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from dashboard import charts, queries, state
from dashboard.views.common import Context, download_csv, ordered_layers, pick_metric, pick_statistic, plot, union_step_range


def difference(cells_a: pd.DataFrame, cells_b: pd.DataFrame) -> pd.DataFrame:
    """Return A - B per (layer, step bucket) present in both runs; buckets line up by step.

    A cell's NaN/Inf counts are the sum of both runs' counts, so a non-finite value on either
    side stays marked in the difference.
    """
    keys = ["layer", "bucket", "bucket_start"]
    merged = cells_a.merge(cells_b, on=keys, suffixes=("_a", "_b"), how="inner")
    out = merged[keys].copy()
    out["step"] = merged["bucket_start"]
    out["value_a"] = merged["value_a"]
    out["value_b"] = merged["value_b"]
    out["value"] = merged["value_a"] - merged["value_b"]
    for column in ("n_nan", "n_posinf", "n_neginf"):
        out[column] = merged[f"{column}_a"] + merged[f"{column}_b"]
    return out


def shared_range(*frames: pd.DataFrame) -> tuple[float | None, float | None]:
    """Return (min, max) of the finite ``value`` over all frames, or (None, None)."""
    values = np.concatenate([f["value"].to_numpy(dtype=float) for f in frames]) if frames else np.array([])
    values = values[np.isfinite(values)]
    if not len(values):
        return (None, None)
    return (float(values.min()), float(values.max()))


def render(context: Context) -> None:
    st.header("Compare two runs")
    names = list(context.catalog.runs)
    picked = [s.name for s in context.selected]
    if len(names) < 2:
        st.info("Comparing needs two runs; this runs folder has fewer.")
        return
    state.choose("compare_a", names, picked[0] if picked else names[0])
    default_b = picked[1] if len(picked) > 1 else next(n for n in names if n != st.session_state["compare_a"])
    state.choose("compare_b", names, default_b)
    columns = st.columns(4)
    with columns[0]:
        name_a = st.selectbox("Run A", names, key="compare_a")
    with columns[1]:
        name_b = st.selectbox("Run B", names, key="compare_b")
    with columns[2]:
        metric = pick_metric()
    with columns[3]:
        statistic = pick_statistic()
    source_a, source_b = context.catalog.runs[name_a], context.catalog.runs[name_b]

    layers = ordered_layers(source_a) + [l for l in ordered_layers(source_b) if l not in ordered_layers(source_a)]
    if not layers:
        st.info("Neither run has filter rows yet.")
        return
    first, last = union_step_range([source_a, source_b])
    width = queries.bucket_width(first, last, len(layers))
    cells_a = queries.layer_heatmap(source_a.filter_parts, source_a.scalar_parts, metric, statistic, first, width)
    cells_b = queries.layer_heatmap(source_b.filter_parts, source_b.scalar_parts, metric, statistic, first, width)
    zmin, zmax = shared_range(cells_a, cells_b)

    left, right = st.columns(2)
    for column, name, cells, tag in ((left, name_a, cells_a, "a"), (right, name_b, cells_b, "b")):
        with column:
            title = f"{tag.upper()}: {name}, {statistic} of {metric}"
            plot(charts.heatmap(cells, "layer", layers, layers, title, metric, zmin=zmin, zmax=zmax), key=f"heatmap_{tag}")
            download_csv(cells, f"compare_{tag}_{name}_{metric}", key=f"csv_compare_{tag}")

    diff = difference(cells_a, cells_b)
    title = f"A - B: {statistic} of {metric}" + (f" ({width} steps per column)" if width > 1 else "")
    plot(charts.heatmap(diff, "layer", layers, layers, title, f"{metric} A - B", diverging=True), key="heatmap_diff")
    download_csv(diff, f"compare_diff_{metric}", key="csv_compare_diff")
