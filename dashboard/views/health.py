"""Health view: ranked findings of one run, each linked to the view that shows it."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import health, queries
from dashboard.views.common import Context, download_csv, filter_counts, pick_run


def open_finding(row: dict) -> None:
    """Button callback: switch to the finding's view with its run, layer, filter and metric."""
    st.session_state["view"] = row["view"]
    st.session_state["focus_run"] = row["run"]
    if row["run"] not in st.session_state.get("runs", []):
        st.session_state["runs"] = [*st.session_state.get("runs", []), row["run"]]
    st.session_state["metric"] = row["metric"]
    if row["layer"] is not None:
        st.session_state["layer"] = row["layer"]
    if row["filter"] is not None:
        st.session_state["filter"] = int(row["filter"])


def render(context: Context) -> None:
    st.header("Health")
    source = pick_run(context)
    if source is None:
        return
    findings = health.find_issues(source, queries.scalars(source.scalar_parts), filter_counts(source))
    if findings.empty:
        st.success("No findings: no dead filters, stuck or oscillating gains, gradient blow-ups, small effective batches or NaN/Inf.")
        return

    st.dataframe(
        findings,
        hide_index=True,
        key="findings",
        column_config={"link": st.column_config.LinkColumn("link", display_text="open")},
    )
    download_csv(findings, f"{source.name}_health", key="csv_health")

    labels = [f"{i + 1}. {row.finding} at step {row.step}" for i, row in enumerate(findings.itertuples())]
    chosen = st.selectbox("Finding", range(len(labels)), format_func=lambda i: labels[i], key="finding_choice")
    row = findings.iloc[int(chosen)]
    target = dict(
        view=row["view"],
        run=row["run"],
        layer=row["layer"],
        filter=None if pd.isna(row["filter"]) else int(row["filter"]),
        metric=row["metric"],
    )
    st.button("Open this finding", on_click=open_finding, args=(target,), key="open_finding")
