"""Runs view: one row per run with its status, start time, recorded steps and config."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pandas as pd
import streamlit as st

from dashboard import queries
from dashboard.views.common import Context, download_csv


def _started(meta: dict) -> str:
    try:
        return datetime.fromtimestamp(float(meta.get("created")), tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (TypeError, ValueError, OverflowError):
        return ""


def runs_table(context: Context) -> pd.DataFrame:
    """Return one row per run: name, status, started, first/last step, recorded steps, config."""
    rows = []
    for source in context.catalog.runs.values():
        first, last, recorded = queries.step_range(source.filter_parts)
        rows.append(
            {
                "name": source.name,
                "status": source.status,
                "started": _started(source.meta),
                "first step": first if recorded else None,
                "last step": last if recorded else None,
                "recorded steps": recorded,
                "layers": len(source.layers),
                "selected": source.name in {s.name for s in context.selected},
                "config": json.dumps(source.meta.get("config") or {}, sort_keys=True, default=str),
            }
        )
    frame = pd.DataFrame(rows)
    for column in ("first step", "last step"):
        if column in frame:
            frame[column] = frame[column].astype("Int64")
    return frame


def render(context: Context) -> None:
    st.header("Runs")
    st.caption("Pick the runs to show in the sidebar; every other view uses that selection.")
    table = runs_table(context)
    st.dataframe(table, hide_index=True, key="runs_table")
    download_csv(table, "runs", key="csv_runs")

    for source in context.selected:
        with st.expander(f"Config and layers: {source.name}"):
            st.code(json.dumps(source.meta.get("config") or {}, indent=2, sort_keys=True, default=str), language="json")
            st.dataframe(pd.DataFrame(source.meta.get("layers") or []), hide_index=True)
