"""Run discovery for the dashboard: which runs exist, their part files and what was skipped.

Everything here goes through ``probe.store``, and the dashboard never globs run folders itself.
So a run name taken from a URL can only select a folder that ``list_runs`` returned.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from probe import schema
from probe.store import Run, list_runs

log = logging.getLogger(__name__)

RUNS_DIR_ENV = "DEEPCONTROL_RUNS_DIR"
DEFAULT_RUNS_DIR = "runs"

# Columns a part must have to be read; a Parquet file from another tool fails this check.
FILTER_COLUMNS = (*schema.FILTER_KEYS, *schema.METRICS)
SCALAR_COLUMNS = ("step",)
# Results of the column check per part; cleared when it grows past this many parts.
MAX_SCHEMA_CHECKS = 100_000
_schema_checks: dict[tuple[str, int, int], str | None] = {}

# One part file as a cache key: (path, size in bytes, modification time in ns). A part that is
# rewritten or a new part changes the key, so cached query results never go stale.
Part = tuple[str, int, int]
Parts = tuple[Part, ...]


@dataclass(frozen=True)
class RunSource:
    """One run as the dashboard reads it: metadata and the part files that passed validation."""

    name: str
    path: Path
    status: str
    meta: dict[str, Any] = field(hash=False, compare=False)
    layers: tuple[str, ...]
    filter_parts: Parts
    scalar_parts: Parts


@dataclass
class Catalog:
    """All runs under a runs folder, by name, with the reasons anything was skipped."""

    root: Path
    runs: dict[str, RunSource]
    skipped: list[str]


def runs_dir_from_env() -> Path:
    """Return the runs folder: ``$DEEPCONTROL_RUNS_DIR`` or ``runs`` in the working directory."""
    return Path(os.environ.get(RUNS_DIR_ENV) or DEFAULT_RUNS_DIR)


def _schema_problem(part: Part, required: tuple[str, ...]) -> str | None:
    """Return why a part's columns do not fit the table, or None; cached per part identity."""
    if part in _schema_checks:
        return _schema_checks[part]
    if len(_schema_checks) > MAX_SCHEMA_CHECKS:
        _schema_checks.clear()
    try:
        names = set(pq.read_schema(part[0]).names)
        missing = [column for column in required if column not in names]
        problem = f"not a Deep Control part: missing columns {', '.join(missing)}" if missing else None
    except (OSError, pa.ArrowException) as exc:
        problem = f"unreadable Parquet schema: {exc}"
    _schema_checks[part] = problem
    return problem


def _part_keys(run: Run, paths: list[Path], required: tuple[str, ...], skipped: list[str]) -> Parts:
    """Return the cache keys of the parts whose columns fit; add the others to ``skipped``."""
    keys = []
    for path in paths:
        try:
            stat = path.stat()
        except OSError as exc:  # removed between listing and now
            log.warning("part file %s vanished while listing: %s", path, exc)
            continue
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        problem = _schema_problem(key, required)
        if problem is None:
            keys.append(key)
        else:
            skipped.append(f"{run.name}: {path.relative_to(run.path)}: {problem}")
    return tuple(keys)


def _layer_names(run: Run) -> tuple[str, ...]:
    return tuple(str(layer.get("name")) for layer in run.layers() if layer.get("name") is not None)


def _describe_skipped(run: Run) -> list[str]:
    # An unfinished .tmp part of a live run is the writer at work, not a problem to report.
    live = run.status == schema.STATUS_RUNNING
    lines = []
    for path, why in run.skipped:
        if live and path.name.endswith(".tmp"):
            continue
        lines.append(f"{run.name}: {path.relative_to(run.path)}: {why}")
    return lines


def load_catalog(root: Path) -> Catalog:
    """List the runs under ``root``; a missing folder gives an empty catalog, not an error."""
    if not root.is_dir():
        return Catalog(root=root, runs={}, skipped=[])

    # NOTE: catch_warnings changes process-wide state, so two sessions listing at the same
    # moment may each miss the other's warnings; skipped parts still come from Run.skipped.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = list_runs(root)
        sources: dict[str, RunSource] = {}
        skipped: list[str] = []
        for run in runs:
            if run.name in sources:
                skipped.append(f"{run.path.name}: duplicate run name {run.name!r}, kept the newer run")
                continue
            sources[run.name] = RunSource(
                name=run.name,
                path=run.path,
                status=run.status,
                meta=run.meta,
                layers=_layer_names(run),
                filter_parts=_part_keys(run, run.filter_files, FILTER_COLUMNS, skipped),
                scalar_parts=_part_keys(run, run.scalar_files, SCALAR_COLUMNS, skipped),
            )
            skipped.extend(_describe_skipped(run))

    # list_runs names skipped folders only in its warning, so that text is shown as it is.
    skipped.extend(str(w.message) for w in caught if "folder(s) that are not readable runs" in str(w.message))
    return Catalog(root=root, runs=sources, skipped=skipped)
