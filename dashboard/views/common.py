"""Pieces every view uses: the context of a page run, layer order, pickers and CSV export."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pandas as pd
import streamlit as st

from dashboard import queries, state
from dashboard.source import Catalog, RunSource


@dataclass
class Context:
    """The runs folder's catalog and the runs picked in the sidebar (in the order picked)."""

    catalog: Catalog
    selected: list[RunSource]


def ordered_layers(source: RunSource) -> list[str]:
    """Return the run's layer names in depth order (from run.json).

    Only a run.json without a layer list (written by another tool) makes this read the data;
    its layers are then sorted by name.
    """
    if source.layers:
        return list(source.layers)
    return sorted(queries.layer_filter_counts(source.filter_parts)["layer"].tolist())


def filter_counts(source: RunSource) -> dict[str, int]:
    """Return layer name -> number of filters, from run.json or else from the data."""
    counts = {str(layer.get("name")): int(layer.get("filters") or 0) for layer in source.meta.get("layers") or []}
    if counts and all(counts.values()):
        return counts
    frame = queries.layer_filter_counts(source.filter_parts)
    return dict(zip(frame["layer"], frame["filters"].astype(int)))


def union_step_range(sources: list[RunSource]) -> tuple[int, int]:
    """Return (first, last) recorded step over ``sources``; (0, 0) when none has filter rows."""
    ranges = [queries.step_range(s.filter_parts) for s in sources]
    ranges = [r for r in ranges if r[2] > 0]
    if not ranges:
        return (0, 0)
    return (min(r[0] for r in ranges), max(r[1] for r in ranges))


def pick_run(context: Context, label: str = "Run", key: str = "focus_run") -> RunSource | None:
    """Draw a run picker over the selected runs and return the chosen one."""
    names = [s.name for s in context.selected]
    if not names:
        st.info("Pick at least one run in the sidebar.")
        return None
    state.choose(key, names, names[0])
    name = st.selectbox(label, names, key=key)
    return context.catalog.runs[name]


def pick_metric(options: tuple[str, ...] = queries.HEATMAP_METRICS, default: str = "gain") -> str:
    """Draw the metric picker (one heatmap per metric) and return the choice."""
    state.choose("metric", options, default)
    return st.selectbox("Metric", options, key="metric")


def pick_statistic() -> str:
    """Draw the picker of the statistic over filters and return the choice."""
    options = tuple(queries.STATISTICS)
    state.choose("statistic", options, "mean")
    return st.selectbox("Statistic over filters", options, key="statistic")


def pick_layer(source: RunSource) -> str | None:
    """Draw a layer picker (depth order) for ``source`` and return the choice."""
    layers = ordered_layers(source)
    if not layers:
        st.info("This run has no filter rows yet.")
        return None
    state.choose("layer", layers, layers[0])
    return st.selectbox("Layer", layers, key="layer")


def download_csv(frame: pd.DataFrame, name: str, key: str) -> None:
    """Offer ``frame`` (the data behind one chart) as a CSV download.

    The CSV text is built only when the button is clicked, because building it for every chart
    on every rerun costs more than drawing the chart.
    """
    file_name = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:120] + ".csv"
    st.download_button(
        "Download CSV", lambda: frame.to_csv(index=False).encode("utf-8"), file_name=file_name,
        mime="text/csv", key=key, on_click="ignore",
    )


def plot(figure, key: str) -> None:
    """Draw a Plotly figure at full width."""
    st.plotly_chart(figure, key=key)
