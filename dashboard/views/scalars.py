"""Scalars view: loss, accuracy, learning rate and any logged scalar against step or wall time."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import charts, queries, state
from dashboard.views.common import Context, download_csv, plot

# Columns every scalars table carries that are not worth a chart of their own by default.
BOOKKEEPING = ("step", "wall_time", "batch_size", "samples_per_s")
PREFERRED = ("loss", "test_accuracy", "accuracy", "train_accuracy", "lr")


def scalar_frames(context: Context) -> dict[str, pd.DataFrame]:
    """Return run name -> merged scalars (rank 0), for the selected runs."""
    return {source.name: queries.scalars(source.scalar_parts) for source in context.selected}


def with_elapsed(frame: pd.DataFrame, source) -> pd.DataFrame:
    """Add ``elapsed_s``: seconds since the run's first scalar row (its wall_time)."""
    start = queries.scalars(source.scalar_parts)["wall_time"].min()
    return frame.assign(elapsed_s=frame["wall_time"] - start)


def render(context: Context) -> None:
    st.header("Scalars")
    frames = scalar_frames(context)
    columns = []
    for frame in frames.values():
        columns += [c for c in frame.columns if c not in columns and c != "step"]
    if not columns:
        st.info("The selected runs have no scalar rows yet.")
        return

    default = [c for c in PREFERRED if c in columns] or [c for c in columns if c not in BOOKKEEPING][:3]
    state.choose_many("scalars", columns, default)
    chosen = st.multiselect("Scalars", columns, key="scalars")
    left, middle, right = st.columns(3)
    with left:
        state.choose("x_axis", ("step", "wall_time"), "step")
        x_axis = st.radio("x axis", ("step", "wall_time"), key="x_axis", horizontal=True)
    with middle:
        state.choose_number("smoothing", 0.0, 0.99, 0.0)
        smoothing = st.slider("EMA smoothing", 0.0, 0.99, step=0.01, key="smoothing")
    with right:
        state.choose_flag("log_y", False)
        log_y = st.checkbox("log scale", key="log_y")

    for column in chosen:
        series = {s.name: with_elapsed(queries.scalar_series(s.scalar_parts, column), s) for s in context.selected}
        series = {name: frame for name, frame in series.items() if len(frame)}
        if not series:
            st.info(f"No selected run logged {column!r}.")
            continue
        plot(charts.scalar_lines(series, column, x_axis, smoothing, log_y), key=f"scalar_{column}")
        export = pd.concat(
            [f.assign(run=name, smoothed=charts.ema(f[column].to_numpy(dtype=float), smoothing)) for name, f in series.items()],
            ignore_index=True,
        )
        download_csv(export, f"scalar_{column}", key=f"csv_scalar_{column}")
