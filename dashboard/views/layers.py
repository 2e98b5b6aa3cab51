"""Layers x time view: one heatmap per run, layers in depth order down, step buckets across."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from dashboard import charts, queries, state
from dashboard.views.common import Context, download_csv, ordered_layers, pick_metric, pick_statistic, plot, union_step_range


def log_values(cells: pd.DataFrame) -> pd.DataFrame:
    """Return ``cells`` with ``value`` replaced by log10(value); values <= 0 become blank."""
    cells = cells.copy()
    values = cells["value"].to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        cells["value"] = np.where(values > 0, np.log10(values), np.nan)
    return cells


def layer_cells(source, metric: str, statistic: str, first: int, width: int) -> pd.DataFrame:
    """Return the (layer, step bucket) cells of one run (see ``queries.layer_heatmap``)."""
    return queries.layer_heatmap(source.filter_parts, source.scalar_parts, metric, statistic, first, width)


def render(context: Context) -> None:
    st.header("Layers x time")
    if not context.selected:
        st.info("Pick at least one run in the sidebar.")
        return
    left, middle, right = st.columns(3)
    with left:
        metric = pick_metric()
    with middle:
        statistic = pick_statistic()
    with right:
        state.choose_flag("log_y", False)
        log_scale = st.checkbox("log10 colour scale", key="log_y")

    first, last = union_step_range(context.selected)
    for source in context.selected:
        layers = ordered_layers(source)
        if not layers:
            st.info(f"Run {source.name!r} has no filter rows yet.")
            continue
        width = queries.bucket_width(first, last, len(layers))
        cells = layer_cells(source, metric, statistic, first, width)
        shown = log_values(cells) if log_scale else cells
        title = f"{source.name}: {statistic} of {metric} over filters" + (f" ({width} steps per column)" if width > 1 else "")
        colour = f"log10 {metric}" if log_scale else metric
        plot(charts.heatmap(shown, "layer", layers, layers, title, colour), key=f"layers_{source.name}")
        download_csv(cells, f"{source.name}_{metric}_{statistic}_layers", key=f"csv_layers_{source.name}")
