"""Filters x time view for one layer: one row per filter, sortable, with a filter's full history."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import charts, health, queries, state
from dashboard.views.common import Context, download_csv, filter_counts, pick_layer, pick_metric, pick_run, plot
from probe import schema

SORT_ORDERS = ("filter index", "final value", "step it went dead")


def sort_filters(cells: pd.DataFrame, order: str, dead: pd.DataFrame | None) -> list[int]:
    """Return the layer's filter indices in the requested row order.

    "final value": descending by each filter's value in its last non-empty bucket (filters
    without one go last). "step it went dead" needs ``dead`` (see ``health.dead_episodes``):
    filters that died first come first, filters that never died go last. Ties keep filter
    index order.
    """
    filters = sorted(int(f) for f in cells["filter"].unique())
    if order == "final value":
        finite = cells.dropna(subset=["value"]).sort_values("bucket")
        final = finite.groupby("filter")["value"].last()
        return sorted(filters, key=lambda f: (f not in final.index, -final.get(f, 0.0), f))
    if order == "step it went dead":
        died = dict(zip(dead["filter"].astype(int), dead["died"].astype(int)))
        return sorted(filters, key=lambda f: (f not in died, died.get(f, 0), f))
    return filters


def render(context: Context) -> None:
    st.header("Filters x time")
    source = pick_run(context)
    if source is None:
        return
    left, middle, right = st.columns(3)
    with left:
        layer = pick_layer(source)
    with middle:
        metric = pick_metric()
    with right:
        state.choose("sort", SORT_ORDERS, SORT_ORDERS[0])
        order = st.selectbox("Row order", SORT_ORDERS, key="sort")
    if layer is None:
        return

    first, last, _recorded = queries.step_range(source.filter_parts)
    n_filters = max(1, filter_counts(source).get(layer, 1))
    width = queries.bucket_width(first, last, n_filters)
    cells = queries.filter_heatmap(source.filter_parts, source.scalar_parts, layer, metric, first, width)
    dead = None
    if order == "step it went dead":
        dead = health.dead_episodes(source.filter_parts, health.Thresholds().dead_window)
        dead = dead[dead["layer"] == layer]
    rows = sort_filters(cells, order, dead)

    title = f"{source.name} / {layer}: {metric} per filter" + (f" ({width} steps per column)" if width > 1 else "")
    labels = [f"filter {f}" for f in rows]
    plot(charts.heatmap(cells, "filter", rows, labels, title, metric), key="filters_heatmap")
    download_csv(cells, f"{source.name}_{layer}_{metric}_filters", key="csv_filters")
    if dead is not None:
        window = health.Thresholds().dead_window
        st.caption(f"{len(dead)} filter(s) of this layer had no active sample for {window} or more consecutive records.")

    state.choose("filter", rows, rows[0], convert=int)
    chosen = st.selectbox("Filter history", rows, key="filter", format_func=lambda f: f"filter {f}")
    history_width = queries.bucket_width(first, last, 1, queries.MAX_POINTS)
    history = queries.filter_history(source.filter_parts, layer, int(chosen), history_width)
    plot(charts.filter_history(history, schema.METRICS, f"{source.name} / {layer} / filter {chosen}"), key="filter_history")
    download_csv(history, f"{source.name}_{layer}_filter{chosen}_history", key="csv_history")
