"""Selections shared through the URL: widget keys <-> ``st.query_params``.

On the first script run of a browser session the URL's values are copied into
``st.session_state``, where the widgets read them. After every run the current widget values
are written back to the URL, so copying the address shares the exact view. Every value
read from the URL is validated by the widget helpers below before a widget reads it, and run
names are only ever matched against the runs that ``list_runs`` found.
"""

from __future__ import annotations

from typing import Any, Sequence

import streamlit as st

# Widget key -> URL parameter name; list-valued keys repeat the parameter (?run=a&run=b).
URL_KEYS = {
    "view": "view",
    "runs": "run",
    "metric": "metric",
    "statistic": "stat",
    "layer": "layer",
    "filter": "filter",
    "sort": "sort",
    "scalars": "scalar",
    "x_axis": "x",
    "smoothing": "smooth",
    "log_y": "log",
    "depth_step": "step",
    "compare_a": "a",
    "compare_b": "b",
    "focus_run": "focus",
    "refresh": "refresh",
}
LIST_KEYS = {"runs", "scalars"}
_LOADED = "_url_loaded"


def load_url_once() -> None:
    """Copy the URL's parameters into session state on the first run of this session (raw text)."""
    if st.session_state.get(_LOADED):
        return
    st.session_state[_LOADED] = True
    params = st.query_params
    for key, name in URL_KEYS.items():
        if name not in params:
            continue
        values = params.get_all(name)
        st.session_state[f"_url_{key}"] = values if key in LIST_KEYS else values[-1]


def url_value(key: str) -> Any:
    """Return (once) the raw URL value for ``key``, or None."""
    return st.session_state.pop(f"_url_{key}", None)


def _shadow(key: str) -> str:
    # Streamlit deletes a widget's state when a run does not draw it (another view is open).
    # The shadow copy keeps the selection for the URL and for when the view comes back.
    return f"_kept_{key}"


def remembered(key: str) -> Any:
    """Return the widget's current value, or the last one it had when it was drawn."""
    if key in st.session_state:
        return st.session_state[key]
    return st.session_state.get(_shadow(key))


def save_to_url() -> None:
    """Write the current (or remembered) widget values to the URL."""
    requested: dict[str, list[str]] = {}
    for key, name in URL_KEYS.items():
        if key in st.session_state:
            st.session_state[_shadow(key)] = st.session_state[key]
        value = remembered(key)
        if value is None or value == []:
            continue
        if isinstance(value, bool):
            value = int(value)
        requested[name] = [str(v) for v in value] if isinstance(value, list) else [str(value)]
    current = {name: st.query_params.get_all(name) for name in st.query_params}
    if current != requested:
        st.query_params.from_dict(requested)


def choose(key: str, options: Sequence, default: Any, convert=str) -> None:
    """Put a valid value for a single-choice widget into session state before it is drawn.

    Order of preference: the URL value, the value already there, ``default``. A value that is
    not one of ``options`` is ignored, so a hand-edited URL can only pick an existing option.
    """
    options = list(options)
    raw = url_value(key)
    if raw is not None:
        try:
            candidate = convert(raw)
        except (TypeError, ValueError):
            candidate = None
        if candidate in options:
            st.session_state[key] = candidate
            return
    if remembered(key) in options:
        st.session_state[key] = remembered(key)
    elif default in options:
        st.session_state[key] = default
    else:
        st.session_state[key] = options[0] if options else None


def choose_many(key: str, options: Sequence, default: list) -> None:
    """Like ``choose`` for a multiselect: keeps the values that are options, in their order."""
    options = list(options)
    raw = url_value(key)
    if raw is not None:
        st.session_state[key] = [v for v in raw if v in options]
        return
    current = remembered(key)
    if current is None:
        st.session_state[key] = [v for v in default if v in options]
    else:
        st.session_state[key] = [v for v in current if v in options]


def choose_number(key: str, low: float, high: float, default: float, convert=float) -> None:
    """Put a number within [low, high] into session state for a slider or number input."""
    raw = url_value(key)
    value = remembered(key)
    value = default if value is None else value
    if raw is not None:
        try:
            value = convert(raw)
        except (TypeError, ValueError):
            value = default
    try:
        value = convert(value)
    except (TypeError, ValueError):
        value = default
    st.session_state[key] = min(max(value, convert(low)), convert(high))


def choose_flag(key: str, default: bool) -> None:
    """Put a boolean into session state for a checkbox; the URL uses 1 and 0."""
    raw = url_value(key)
    if raw is not None:
        st.session_state[key] = raw in ("1", "true", "True")
    else:
        value = remembered(key)
        st.session_state[key] = default if value is None else bool(value)
