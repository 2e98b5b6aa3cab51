"""Health findings of a run: dead filters, stuck or oscillating gains, vanishing or exploding
gradients, a small effective batch and the first NaN/Inf, ranked by severity.

Windows are counted in recorded steps (rows of one filter), not in training steps, because a
probe recording every k steps records each filter once per k steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlencode

import duckdb
import numpy as np
import pandas as pd
import streamlit as st

from dashboard import queries, summaries
from dashboard.queries import CACHE, Parts, part_paths
from probe import schema

ROWS = "read_parquet($files, hive_partitioning=true, union_by_name=true)"


@dataclass(frozen=True)
class Thresholds:
    """Rules of every finding; windows in recorded steps."""

    dead_window: int = 10            # consecutive records with active_samples == 0
    recent_window: int = 20          # last records examined for stuck or oscillating gains
    stuck_relative_range: float = 1e-6   # (max - min) / |mean| of a stuck gain
    oscillation_flip_fraction: float = 0.8   # share of consecutive changes that flip sign
    oscillation_relative_range: float = 0.2  # (max - min) / |mean| of an oscillating gain
    grad_baseline_fraction: float = 0.1      # first share of records that sets the baseline
    exploding_factor: float = 100.0
    vanishing_factor: float = 1e-3
    effective_batch_fraction: float = 0.1


SEVERITY = {
    "first NaN/Inf": 100,
    "exploding gradient": 90,
    "dead filter": 70,
    "vanishing gradient": 60,
    "gain stuck": 50,
    "small effective batch": 45,
    "dead filter (revived)": 40,
    "gain oscillating": 30,
}

COLUMNS = ["severity", "finding", "run", "step", "layer", "filter", "detail", "view", "metric", "link"]


def view_link(view: str, run: str, layer: str | None, filter_index: int | None, metric: str) -> str:
    """Return the query string that opens ``view`` on this run, layer, filter and metric."""
    params: dict = {"view": view, "run": run, "metric": metric}
    if layer is not None:
        params["layer"] = layer
    if filter_index is not None:
        params["filter"] = int(filter_index)
    return "?" + urlencode(params)


def _run(sql: str, params: dict) -> pd.DataFrame:
    with duckdb.connect() as con:
        return con.execute(sql, params).df()


@st.cache_data(**CACHE)
def dead_episodes(filter_parts: Parts, window: int) -> pd.DataFrame:
    """Return each filter's first stretch of >= ``window`` consecutive records without an active sample.

    Columns: layer, filter, died (first step of the stretch), dead_until (its last step),
    last_active (last step with an active sample, NaN if never), revived (active after
    dead_until). Only rows with ``active_samples == 0`` are read back from the per-part cache,
    so the cost follows the number of inactive rows, not the size of the run.
    """
    columns = ["layer", "filter", "died", "dead_until", "last_active", "revived"]
    inactive = summaries.inactive_rows(filter_parts)
    if inactive.empty:
        return pd.DataFrame(columns=columns)

    # Consecutive records of one filter have consecutive step indices, so index minus the
    # row's rank within its filter is constant along a stretch (the classic gaps-and-islands).
    # NOTE: the index counts steps recorded for any layer; a layer skipped at some steps (a
    # layer mask) has its stretches split there.
    steps = summaries.recorded_steps(filter_parts)
    index = pd.Series(np.arange(len(steps)), index=steps.to_numpy())
    inactive = inactive.sort_values(["layer", "filter", "step"], kind="stable")
    inactive["island"] = index.reindex(inactive["step"].to_numpy()).to_numpy() - inactive.groupby(["layer", "filter"]).cumcount().to_numpy()
    stretches = inactive.groupby(["layer", "filter", "island"], as_index=False).agg(
        died=("step", "min"), dead_until=("step", "max"), records=("step", "size")
    )
    stretches = stretches[stretches["records"] >= int(window)]
    first = stretches.sort_values("died").groupby(["layer", "filter"], as_index=False).first()
    first = first.merge(summaries.last_active(filter_parts), on=["layer", "filter"], how="left")
    first["revived"] = (first["last_active"] > first["dead_until"]).fillna(False).astype(bool)
    return first[columns].sort_values(["died", "layer", "filter"]).reset_index(drop=True)


@st.cache_data(**CACHE)
def first_nonfinite(filter_parts: Parts) -> pd.DataFrame:
    """Return the first filter row (by step, layer, filter) that has a NaN or Inf in any metric.

    Columns: step, layer, filter and one boolean per metric, True where that value is not finite.
    """
    rows = summaries.first_nonfinite_rows(filter_parts, schema.METRICS)
    if rows.empty:
        return pd.DataFrame(columns=["step", "layer", "filter", *schema.METRICS])
    return rows.sort_values(["step", "layer", "filter"]).head(1).reset_index(drop=True)


@st.cache_data(**CACHE)
def recent_gains(filter_parts: Parts, records: int) -> pd.DataFrame:
    """Gain statistics of every filter over its last ``records`` recorded steps.

    Columns: layer, filter, first_step, gain_min, gain_max, gain_mean, flips (sign changes
    between consecutive differences), changes (non-zero differences), n.
    """
    if not filter_parts:
        return pd.DataFrame(columns=["layer", "filter", "first_step", "gain_min", "gain_max", "gain_mean", "flips", "changes", "n"])
    sql = f"""
        WITH cut AS (
            SELECT min(step) AS step FROM (SELECT DISTINCT step FROM {ROWS} ORDER BY step DESC LIMIT $records)
        ),
        recent AS (
            SELECT layer, filter, step, CAST(gain AS DOUBLE) AS gain FROM {ROWS}
            WHERE step >= (SELECT step FROM cut) AND isfinite(gain)
        ),
        diffs AS (
            SELECT *, gain - lag(gain) OVER w AS d FROM recent WINDOW w AS (PARTITION BY layer, filter ORDER BY step)
        ),
        signs AS (
            SELECT *, sign(d) AS s, lag(sign(d)) OVER (PARTITION BY layer, filter ORDER BY step) AS s_prev FROM diffs
        )
        SELECT layer, filter, min(step) AS first_step, min(gain) AS gain_min, max(gain) AS gain_max,
               avg(gain) AS gain_mean, count(*) FILTER (WHERE s * s_prev < 0) AS flips,
               count(*) FILTER (WHERE s != 0) AS changes, count(*) AS n
        FROM signs GROUP BY layer, filter
    """
    return _run(sql, {"files": part_paths(filter_parts), "records": int(records)})


@st.cache_data(**CACHE)
def layer_series(filter_parts: Parts, scalar_parts: Parts) -> pd.DataFrame:
    """Per (layer, step): the layer's gradient norm and its mean effective batch fraction.

    ``grad_norm`` is the L2 norm over the layer's filters, sqrt(sum of squared filter norms),
    over finite values. ``batch_fraction`` is the mean over filters of effective_batch /
    batch_size (NaN without a batch_size scalar); the mean needs no quantile pass over the run. Columns: layer, step, grad_norm,
    batch_fraction, batch_size.
    """
    grads = summaries.basic_stats(filter_parts, "grad_norm")
    if grads.empty:
        return pd.DataFrame(columns=["layer", "step", "grad_norm", "batch_fraction", "batch_size"])
    grads = grads.groupby(["layer", "step"], as_index=False, sort=False)["sumsq"].sum()
    grads["grad_norm"] = np.sqrt(grads["sumsq"])
    fraction = queries.layer_step_stats(filter_parts, scalar_parts, queries.EFFECTIVE_BATCH_FRACTION, "mean")
    fraction = fraction.rename(columns={"value": "batch_fraction"})[["layer", "step", "batch_fraction"]]
    series = grads.drop(columns="sumsq").merge(fraction, on=["layer", "step"], how="left")
    batch = queries.scalars(scalar_parts)
    sizes = batch.set_index("step")["batch_size"] if "batch_size" in batch else pd.Series(dtype=float)
    series["batch_size"] = series["step"].map(sizes)
    return series.sort_values(["layer", "step"]).reset_index(drop=True)


def _finding(kind: str, run: str, step, layer, filter_index, detail: str, view: str, metric: str, extra: float = 0.0) -> dict:
    filter_value = None if filter_index is None or pd.isna(filter_index) else int(filter_index)
    return {
        "severity": SEVERITY[kind] + extra,
        "finding": kind,
        "run": run,
        "step": None if step is None or pd.isna(step) else int(step),
        "layer": layer,
        "filter": filter_value,
        "detail": detail,
        "view": view,
        "metric": metric,
        "link": view_link(view, run, layer, filter_value, metric),
    }


def _dead_findings(run: str, filter_parts: Parts, counts: dict[str, int], rules: Thresholds) -> list[dict]:
    findings = []
    for row in dead_episodes(filter_parts, rules.dead_window).itertuples(index=False):
        share = 1.0 / max(1, counts.get(row.layer, 1))
        if row.revived:
            detail = f"no active sample from step {row.died} to {row.dead_until}, active again by step {int(row.last_active)}"
            kind = "dead filter (revived)"
        else:
            detail = f"no active sample since step {row.died}"
            kind = "dead filter"
        findings.append(_finding(kind, run, row.died, row.layer, row.filter, detail, "filters", "active_samples", share))
    return findings


def _nonfinite_findings(run: str, filter_parts: Parts, scalar_frame: pd.DataFrame) -> list[dict]:
    findings = []
    first = first_nonfinite(filter_parts)
    if len(first):
        row = first.iloc[0]
        metrics = [m for m in schema.METRICS if bool(row[m])]
        detail = "first NaN/Inf among filter values, in " + ", ".join(metrics)
        findings.append(_finding("first NaN/Inf", run, row["step"], row["layer"], row["filter"], detail, "filters", metrics[0]))

    for column in scalar_frame.columns:
        if column == "step" or not pd.api.types.is_float_dtype(scalar_frame[column]):
            continue
        bad = scalar_frame.loc[~np.isfinite(scalar_frame[column].to_numpy(dtype=float)) & scalar_frame[column].notna()]
        if len(bad):
            step = bad["step"].iloc[0]
            findings.append(_finding("first NaN/Inf", run, step, None, None, f"scalar {column} is {bad[column].iloc[0]}", "scalars", "gain"))
    return findings


def _gain_findings(run: str, filter_parts: Parts, normalised: set[str], rules: Thresholds) -> list[dict]:
    findings = []
    gains = recent_gains(filter_parts, rules.recent_window)
    gains = gains[gains["layer"].isin(normalised) & (gains["n"] >= min(5, rules.recent_window))]
    for row in gains.itertuples(index=False):
        scale = max(abs(row.gain_mean), 1e-12)
        spread = (row.gain_max - row.gain_min) / scale
        if spread <= rules.stuck_relative_range:
            detail = f"gain constant at {row.gain_mean:.6g} over the last {row.n} records (at a clamp or not updating)"
            findings.append(_finding("gain stuck", run, row.first_step, row.layer, row.filter, detail, "filters", "gain"))
        elif row.changes >= 4 and row.flips >= rules.oscillation_flip_fraction * (row.changes - 1) and spread >= rules.oscillation_relative_range:
            detail = f"gain changes direction {row.flips} times in {row.n} records, range {spread:.0%} of its mean"
            findings.append(_finding("gain oscillating", run, row.first_step, row.layer, row.filter, detail, "filters", "gain"))
    return findings


def _gradient_findings(run: str, series: pd.DataFrame, rules: Thresholds) -> list[dict]:
    findings = []
    for layer, group in series.groupby("layer", sort=False):
        norms = group["grad_norm"].to_numpy(dtype=float)
        steps = group["step"].to_numpy()
        baseline_records = max(1, int(len(norms) * rules.grad_baseline_fraction))
        baseline = np.nanmedian(np.where(np.isfinite(norms[:baseline_records]), norms[:baseline_records], np.nan)) if len(norms) else np.nan
        if not np.isfinite(baseline) or baseline <= 0:
            continue
        exploding = np.flatnonzero(np.isfinite(norms) & (norms > rules.exploding_factor * baseline))
        vanishing = np.flatnonzero(np.isfinite(norms) & (norms < rules.vanishing_factor * baseline))
        if len(exploding):
            i = exploding[0]
            detail = f"layer gradient norm {norms[i]:.3g} is over {rules.exploding_factor:g}x its early median {baseline:.3g}"
            findings.append(_finding("exploding gradient", run, steps[i], layer, None, detail, "layers", "grad_norm"))
        if len(vanishing):
            i = vanishing[0]
            detail = f"layer gradient norm {norms[i]:.3g} is below {rules.vanishing_factor:g}x its early median {baseline:.3g}"
            findings.append(_finding("vanishing gradient", run, steps[i], layer, None, detail, "layers", "grad_norm"))
    return findings


def _batch_findings(run: str, series: pd.DataFrame, rules: Thresholds) -> list[dict]:
    findings = []
    for layer, group in series.groupby("layer", sort=False):
        low = group[group["batch_fraction"] < rules.effective_batch_fraction]
        if len(low):
            row = low.iloc[0]
            detail = (
                f"mean effective batch {row['batch_fraction']:.1%} of the batch size "
                f"({int(row['batch_size'])}) at {len(low)} of {len(group)} records"
            )
            findings.append(_finding("small effective batch", run, row["step"], layer, None, detail, "layers", "effective_batch_fraction"))
    return findings


def find_issues(source, scalar_frame: pd.DataFrame, counts: dict[str, int], rules: Thresholds = Thresholds()) -> pd.DataFrame:
    """Return every finding of one run (a ``RunSource``) as a DataFrame ranked by severity, then step.

    ``counts`` maps layer name to its number of filters; a dead filter in a small layer ranks
    above one in a large layer.
    """
    normalised = {
        str(layer.get("name"))
        for layer in source.meta.get("layers") or []
        if str(layer.get("normaliser") or "none").lower() not in ("none", "null")
    }
    series = layer_series(source.filter_parts, source.scalar_parts)
    findings = (
        _nonfinite_findings(source.name, source.filter_parts, scalar_frame)
        + _dead_findings(source.name, source.filter_parts, counts, rules)
        + _gain_findings(source.name, source.filter_parts, normalised, rules)
        + _gradient_findings(source.name, series, rules)
        + _batch_findings(source.name, series, rules)
    )
    frame = pd.DataFrame(findings, columns=COLUMNS)
    if frame.empty:
        return frame
    frame = frame.sort_values(["severity", "step"], ascending=[False, True], kind="stable")
    frame["filter"] = frame["filter"].astype("Int64")
    frame["step"] = frame["step"].astype("Int64")
    return frame.reset_index(drop=True)
