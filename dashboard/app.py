"""Deep Control dashboard: ``streamlit run dashboard/app.py`` (runs folder from $DEEPCONTROL_RUNS_DIR).

The sidebar picks runs, the view and the refresh interval. The main area is one Streamlit
fragment, so a live refresh reruns only the open view and keeps every selection.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `streamlit run dashboard/app.py` puts dashboard/ (not the repository root) on sys.path.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import streamlit as st  # noqa: E402

from dashboard import state  # noqa: E402
from dashboard.source import load_catalog, runs_dir_from_env  # noqa: E402
from dashboard.views import compare, depth, distribution, empty, filters, health, layers, runs, scalars  # noqa: E402
from dashboard.views.common import Context  # noqa: E402

VIEWS = {
    "runs": ("Runs", runs.render),
    "scalars": ("Scalars", scalars.render),
    "layers": ("Layers x time", layers.render),
    "filters": ("Filters x time", filters.render),
    "distribution": ("Distribution", distribution.render),
    "depth": ("Depth profile", depth.render),
    "compare": ("Compare", compare.render),
    "health": ("Health", health.render),
}
# Seconds between refreshes of the open view; 0 turns refreshing off.
REFRESH_CHOICES = (0, 2, 5, 10, 30, 60)


def sidebar(run_names: list[str]) -> tuple[list[str], str, int]:
    """Draw the run, view and refresh pickers; return their values."""
    with st.sidebar:
        st.title("Deep Control")
        state.choose_many("runs", run_names, run_names[:1])
        picked = st.multiselect("Runs", run_names, key="runs")
        state.choose("view", list(VIEWS), "runs")
        view = st.radio("View", list(VIEWS), key="view", format_func=lambda v: VIEWS[v][0])
        state.choose("refresh", REFRESH_CHOICES, 0, convert=int)
        refresh = st.selectbox(
            "Refresh every", REFRESH_CHOICES, key="refresh", format_func=lambda s: "off" if s == 0 else f"{s} s"
        )
    return picked, view, refresh


def show_skipped(skipped: list[str]) -> None:
    """Warn about files and folders that were left out, naming each as plain text."""
    if not skipped:
        return
    st.warning(f"Skipped {len(skipped)} unreadable file(s) or folder(s); everything else is shown.")
    with st.expander("What was skipped"):
        for line in skipped:
            st.text(line)


def main_area(root: Path, view: str) -> None:
    """Render the open view; runs as a fragment so that a refresh redraws only this part."""
    catalog = load_catalog(root)
    show_skipped(catalog.skipped)
    picked = [catalog.runs[name] for name in st.session_state.get("runs", []) if name in catalog.runs]
    VIEWS[view][1](Context(catalog=catalog, selected=picked))
    state.save_to_url()


def main() -> None:
    st.set_page_config(page_title="Deep Control", layout="wide")
    state.load_url_once()
    root = runs_dir_from_env()
    catalog = load_catalog(root)
    if not catalog.runs:
        show_skipped(catalog.skipped)
        empty.render(root)
        return

    _picked, view, refresh = sidebar(list(catalog.runs))
    st.fragment(run_every=refresh or None)(main_area)(root, view)


main()
