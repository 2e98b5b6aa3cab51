"""Depth profile view: a metric against layer depth at one step, runs overlaid."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import charts, queries, state
from dashboard.views.common import Context, download_csv, ordered_layers, pick_metric, plot, union_step_range

PROFILE_STATISTICS = ("mean", "median", "p10", "p90", "max")


def profile(source, metric: str, step: int) -> pd.DataFrame:
    """Return one row per layer of ``source`` at the last recorded step <= ``step``, with its depth."""
    frame = queries.depth_profile(source.filter_parts, source.scalar_parts, metric, step)
    order = {name: depth for depth, name in enumerate(ordered_layers(source))}
    frame = frame.assign(depth=frame["layer"].map(order)).dropna(subset=["depth"])
    return frame.sort_values("depth").reset_index(drop=True)


def render(context: Context) -> None:
    st.header("Depth profile")
    if not context.selected:
        st.info("Pick at least one run in the sidebar.")
        return
    first, last = union_step_range(context.selected)
    left, middle, right = st.columns(3)
    with left:
        metric = pick_metric()
    with middle:
        state.choose("statistic", PROFILE_STATISTICS, "mean")
        statistic = st.selectbox("Statistic over filters", PROFILE_STATISTICS, key="statistic")
    with right:
        state.choose_flag("log_y", False)
        log_y = st.checkbox("log scale", key="log_y")
    state.choose_number("depth_step", first, max(first, last), last, convert=int)
    if last > first:
        step = st.slider("Step (the last recorded step at or before it is shown)", first, last, key="depth_step")
    else:
        step = last

    frames = {source.name: profile(source, metric, step) for source in context.selected}
    plot(charts.depth_profile(frames, statistic, f"{statistic} of {metric} by depth", log_y), key="depth")
    export = pd.concat([f.assign(run=name) for name, f in frames.items()], ignore_index=True)
    download_csv(export, f"depth_{metric}_{step}", key="csv_depth")
