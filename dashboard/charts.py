"""Plotly figures from the small DataFrames that ``dashboard.queries`` returns.

Non-finite values get their own layer in every chart. A heatmap cell or a line point that
covered a NaN gets an ``x`` marker on top of the finite data, +Inf a triangle up and -Inf a
triangle down. Run, layer and config strings come from the user, so every string
placed in a figure goes through ``html.escape`` (Plotly renders a subset of HTML in labels).
"""

from __future__ import annotations

import html

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

# Count column, legend label, marker symbol and colour of each kind of non-finite value. The
# colours are chosen to stand out against the Viridis and RdBu heatmap scales.
NONFINITE_MARKERS = (
    ("n_nan", "NaN", "x", "#ff0000"),
    ("n_posinf", "+Inf", "triangle-up", "#ff7f0e"),
    ("n_neginf", "-Inf", "triangle-down", "#ff00ff"),
)
MARKER_SIZE = 12
SEQUENTIAL = "Viridis"
DIVERGING = "RdBu_r"


def text(value: object) -> str:
    """Return ``value`` as a string that Plotly shows literally."""
    return html.escape(str(value), quote=False)


def _layout(figure: go.Figure, title: str, height: int = 420) -> go.Figure:
    figure.update_layout(title=text(title), height=height, margin=dict(l=10, r=10, t=50, b=10))
    return figure


def heatmap_matrix(cells: pd.DataFrame, row: str, rows: list) -> tuple[list, list, np.ndarray]:
    """Pivot cells (row, bucket_start, value) to a [len(rows), buckets] matrix; NaN where empty."""
    if not len(cells):
        return rows, [], np.full((len(rows), 0), np.nan)
    table = cells.pivot_table(index=row, columns="bucket_start", values="value", aggfunc="first", dropna=False)
    table = table.reindex(index=rows)
    return rows, table.columns.tolist(), table.to_numpy(dtype=float, na_value=np.nan)


def _nonfinite_traces(cells: pd.DataFrame, x: str, y_of) -> list[go.Scatter]:
    traces = []
    for column, label, symbol, colour in NONFINITE_MARKERS:
        if column not in cells:
            continue
        hit = cells[cells[column] > 0]
        if hit.empty:
            continue
        traces.append(
            go.Scatter(
                x=hit[x], y=[y_of(v) for v in y_values(hit)], mode="markers", name=label,
                marker=dict(symbol=symbol, color=colour, size=MARKER_SIZE, line=dict(width=1, color="black")),
                customdata=hit[column], hovertemplate=f"{label}: %{{customdata}} value(s)<extra></extra>",
            )
        )
    return traces


def y_values(frame: pd.DataFrame):
    """Return the row key column of a cells frame (layer or filter)."""
    return frame["layer"] if "layer" in frame else frame["filter"]


def heatmap(
    cells: pd.DataFrame,
    row: str,
    rows: list,
    labels: list[str],
    title: str,
    colour_title: str,
    zmin: float | None = None,
    zmax: float | None = None,
    diverging: bool = False,
    height: int | None = None,
) -> go.Figure:
    """Draw ``cells`` as a heatmap with rows in the given order (``labels`` shown), steps across.

    Cells without a finite value stay blank. Cells that covered NaN/Inf values get a marker on
    top, so a non-finite value is never hidden behind a colour.
    """
    rows, columns, matrix = heatmap_matrix(cells, row, rows)
    shown = [text(label) for label in labels]
    label_of = dict(zip(rows, shown))
    figure = go.Figure(
        go.Heatmap(
            z=matrix, x=columns, y=shown, zmin=zmin, zmax=zmax, zmid=0.0 if diverging else None,
            colorscale=DIVERGING if diverging else SEQUENTIAL, colorbar=dict(title=text(colour_title)),
            hovertemplate="step %{x}<br>%{y}<br>%{z:.4g}<extra></extra>", hoverongaps=False,
        )
    )
    for trace in _nonfinite_traces(cells, "bucket_start", lambda key: label_of.get(key)):
        figure.add_trace(trace)
    figure.update_yaxes(type="category", autorange="reversed", categoryorder="array", categoryarray=shown)
    figure.update_xaxes(title="step")
    # Plotly hides a legend with a single entry; the marker legend must show even then.
    figure.update_layout(showlegend=bool(figure.data[1:]), legend=dict(orientation="h", y=-0.2))
    return _layout(figure, title, height or max(320, min(900, 60 + 14 * len(rows))))


def ema(values: np.ndarray, weight: float) -> np.ndarray:
    """Exponential moving average over the finite values; non-finite positions stay NaN.

    ``weight`` in [0, 1): 0 returns the values unchanged. The first value is not biased
    towards zero (the average starts at the first finite value).
    """
    smoothed = np.full(len(values), np.nan)
    running = None
    for i, value in enumerate(values):
        if not np.isfinite(value):
            continue
        running = value if running is None else weight * running + (1.0 - weight) * value
        smoothed[i] = running
    return smoothed


def scalar_lines(
    frames: dict[str, pd.DataFrame], column: str, x: str, smoothing: float, log_y: bool
) -> go.Figure:
    """Draw one line per run of scalar ``column`` against ``x`` (step or wall_time), EMA-smoothed.

    Each frame has step, ``column`` and elapsed_s (seconds since its run started), which the
    wall_time axis uses.

    Non-finite values break nothing: they are left out of the line and the EMA and drawn as
    markers at the run's last finite smoothed value (or 0 when there is none).
    """
    figure = go.Figure()
    for run, frame in frames.items():
        if column not in frame:
            continue
        xs = frame["elapsed_s" if x == "wall_time" else x].to_numpy()
        raw = frame[column].to_numpy(dtype=float)
        smooth = ema(raw, smoothing)
        figure.add_trace(go.Scatter(x=xs, y=smooth, mode="lines", name=text(run), connectgaps=True))
        for label, mask, symbol, colour in _nonfinite_masks(raw):
            if not mask.any():
                continue
            anchor = pd.Series(smooth).ffill().fillna(0.0 if not log_y else 1.0).to_numpy()
            figure.add_trace(
                go.Scatter(
                    x=xs[mask], y=anchor[mask], mode="markers", name=f"{text(run)} {label}",
                    marker=dict(symbol=symbol, color=colour, size=10, line=dict(width=1, color="black")),
                    hovertemplate=f"{label} at step %{{x}}<extra></extra>",
                )
            )
    figure.update_yaxes(type="log" if log_y else "linear", title=text(column))
    figure.update_xaxes(title="wall time since the run started (s)" if x == "wall_time" else "step")
    return _layout(figure, column, 360)


def _nonfinite_masks(values: np.ndarray):
    yield "NaN", np.isnan(values), "x", NONFINITE_MARKERS[0][3]
    yield "+Inf", np.isposinf(values), "triangle-up", NONFINITE_MARKERS[1][3]
    yield "-Inf", np.isneginf(values), "triangle-down", NONFINITE_MARKERS[2][3]


def quantile_bands(frame: pd.DataFrame, title: str, log_y: bool) -> go.Figure:
    """Draw filled bands min-max, p10-p90 and p25-p75 with the median line, against step."""
    figure = go.Figure()
    bands = (("q0", "q100", "min-max", 0.12), ("q10", "q90", "p10-p90", 0.22), ("q25", "q75", "p25-p75", 0.35))
    for low, high, label, alpha in bands:
        figure.add_trace(go.Scatter(x=frame["step"], y=frame[high], mode="lines", line=dict(width=0), showlegend=False, hoverinfo="skip"))
        figure.add_trace(
            go.Scatter(
                x=frame["step"], y=frame[low], mode="lines", line=dict(width=0), fill="tonexty",
                fillcolor=f"rgba(31,119,180,{alpha})", name=label,
            )
        )
    figure.add_trace(go.Scatter(x=frame["step"], y=frame["q50"], mode="lines", name="median", line=dict(color="#1f77b4")))
    anchor = frame["q50"].ffill().fillna(0.0)
    for column, label, symbol, colour in NONFINITE_MARKERS:
        hit = frame[frame[column] > 0]
        if len(hit):
            figure.add_trace(
                go.Scatter(
                    x=hit["step"], y=anchor[hit.index], mode="markers", name=label, customdata=hit[column],
                    marker=dict(symbol=symbol, color=colour, size=9, line=dict(width=1, color="black")),
                    hovertemplate=f"{label}: %{{customdata}} value(s)<extra></extra>",
                )
            )
    figure.update_yaxes(type="log" if log_y else "linear")
    figure.update_xaxes(title="step")
    return _layout(figure, title)


def depth_profile(frames: dict[str, pd.DataFrame], statistic: str, title: str, log_y: bool) -> go.Figure:
    """Draw ``statistic`` against layer depth, one line per run, with p10-p90 error bars.

    Each frame has columns depth, layer, step, the statistics, n_nan, n_posinf, n_neginf.
    """
    figure = go.Figure()
    for run, frame in frames.items():
        label = f"{text(run)} (step {int(frame['step'].max())})" if len(frame) else text(run)
        figure.add_trace(
            go.Scatter(
                x=frame["depth"], y=frame[statistic], mode="lines+markers", name=label,
                customdata=[text(layer) for layer in frame["layer"]],
                hovertemplate="%{customdata}<br>%{y:.4g}<extra></extra>",
                error_y=dict(type="data", symmetric=False, array=frame["p90"] - frame[statistic],
                             arrayminus=frame[statistic] - frame["p10"], thickness=1),
            )
        )
        anchor = frame[statistic].fillna(0.0)
        for column, marker_label, symbol, colour in NONFINITE_MARKERS:
            hit = frame[frame[column] > 0]
            if len(hit):
                figure.add_trace(
                    go.Scatter(
                        x=hit["depth"], y=anchor[hit.index], mode="markers", name=f"{text(run)} {marker_label}",
                        marker=dict(symbol=symbol, color=colour, size=10, line=dict(width=1, color="black")),
                    )
                )
    figure.update_xaxes(
        title="layer (depth order)", tickmode="array",
        tickvals=list(next(iter(frames.values()))["depth"]) if frames else [],
        ticktext=[text(layer) for layer in next(iter(frames.values()))["layer"]] if frames else [],
    )
    figure.update_yaxes(type="log" if log_y else "linear", title=text(statistic))
    return _layout(figure, title)


def filter_history(frame: pd.DataFrame, metrics: tuple[str, ...], title: str) -> go.Figure:
    """Draw one small line chart per metric of a single filter against step, NaN/Inf marked."""
    columns = 3
    rows = -(-len(metrics) // columns)
    figure = make_subplots(rows=rows, cols=columns, subplot_titles=[text(m) for m in metrics], shared_xaxes=True)
    for i, metric in enumerate(metrics):
        r, c = i // columns + 1, i % columns + 1
        figure.add_trace(go.Scatter(x=frame["step"], y=frame[metric], mode="lines", name=text(metric), showlegend=False), row=r, col=c)
        bad = frame[frame[f"{metric}_nonfinite"] > 0]
        if len(bad):
            figure.add_trace(
                go.Scatter(
                    x=bad["step"], y=frame[metric].ffill().fillna(0.0)[bad.index], mode="markers",
                    marker=dict(symbol="x", color=NONFINITE_MARKERS[0][3], size=9), name="NaN/Inf", showlegend=False,
                ),
                row=r, col=c,
            )
    return _layout(figure, title, 260 * rows)
