"""Distribution view: quantile bands of a metric over the filters of one layer, against step."""

from __future__ import annotations

import streamlit as st

from dashboard import charts, queries, state
from dashboard.views.common import Context, download_csv, pick_layer, pick_metric, pick_run, plot


def render(context: Context) -> None:
    st.header("Distribution over filters")
    source = pick_run(context)
    if source is None:
        return
    left, middle, right = st.columns(3)
    with left:
        layer = pick_layer(source)
    with middle:
        metric = pick_metric()
    with right:
        state.choose_flag("log_y", False)
        log_y = st.checkbox("log scale", key="log_y")
    if layer is None:
        return

    first, last, _recorded = queries.step_range(source.filter_parts)
    width = queries.bucket_width(first, last, 1, queries.MAX_POINTS)
    bands = queries.quantile_bands(source.filter_parts, source.scalar_parts, layer, metric, first, width)
    title = f"{source.name} / {layer}: quantiles of {metric} over filters"
    plot(charts.quantile_bands(bands, title, log_y), key="distribution")
    download_csv(bands, f"{source.name}_{layer}_{metric}_quantiles", key="csv_distribution")
