"""Run folders: create them, update ``run.json`` atomically, list them and read their Parquet parts.

Reading goes through DuckDB over the part files that passed validation, so a run folder that
contains a stray, empty, truncated or unfinished file still returns every good row. What was
skipped is stored in ``Run.skipped`` and reported once with ``warnings.warn``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow.parquet as pq

from probe import schema

log = logging.getLogger(__name__)

IF_EXISTS_MODES = ("error", "resume", "new")

PART_NAME = re.compile(r"^part-(\d+)\.parquet$")
TMP_PART_NAME = re.compile(r"^\.part-(\d+)\.parquet\.tmp$")

# Serialises read-modify-write of run.json between threads of one process (the training loop
# and the writer's heartbeat). Other processes only ever see a complete file thanks to os.replace.
_meta_lock = threading.Lock()

# Part files never change once renamed into place, so a validation result stays true for as
# long as the path, size and modification time match. Key: (path, size, mtime_ns).
_part_check_cache: dict[tuple[str, int, int], str | None] = {}


# --- run.json ----------------------------------------------------------------------------------


def read_meta(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Read ``run.json`` of a run folder; raises FileNotFoundError or ValueError (invalid JSON)."""
    path = Path(run_dir) / schema.RUN_FILE
    text = path.read_text(encoding="utf-8")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); the run cannot be read") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{path} must contain a JSON object, found {type(meta).__name__}")
    return meta


def _write_meta(run_dir: Path, meta: dict[str, Any]) -> None:
    """Write ``run.json`` through a temporary file and os.replace, so readers never see half a file."""
    path = run_dir / schema.RUN_FILE
    tmp = run_dir / f".{schema.RUN_FILE}.{os.getpid()}.{threading.get_ident()}.tmp"
    tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def update_meta(run_dir: str | os.PathLike, **fields: Any) -> dict[str, Any]:
    """Set ``fields`` in ``run.json`` with an atomic rewrite; returns the new metadata."""
    run_dir = Path(run_dir)
    with _meta_lock:
        meta = read_meta(run_dir)
        meta.update(fields)
        _write_meta(run_dir, meta)
    return meta


def heartbeat(run_dir: str | os.PathLike) -> None:
    """Set ``heartbeat`` in ``run.json`` to the current time (unix seconds)."""
    update_meta(run_dir, heartbeat=time.time())


# --- creating runs -----------------------------------------------------------------------------


def _is_taken(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def _claim_new_folder(run_dir: Path) -> Path:
    """Create and return the first free folder among ``run_dir``, ``run_dir-2``, ``run_dir-3``, ...

    os.mkdir is atomic, so two processes starting at once never get the same folder.
    """
    candidates = [run_dir] + [run_dir.with_name(f"{run_dir.name}-{i}") for i in range(2, 10_000)]
    for candidate in candidates:
        if _is_taken(candidate):
            continue
        try:
            candidate.mkdir(parents=True)
        except FileExistsError:
            if _is_taken(candidate):
                continue
        return candidate
    raise FileExistsError(f"no free run folder name left after {run_dir}-9999; choose another name")


def create_run(
    run_dir: str | os.PathLike, meta: dict[str, Any], if_exists: str = "error"
) -> Path:
    """Create a run folder with its ``run.json`` and return the folder actually used.

    Call it on rank 0 only. ``meta`` contains the user fields (config, layers, world_size,
    versions, every, ...); name, status, created, heartbeat and format_version are set here.

    if_exists:
        - "error": raise FileExistsError when the folder exists and is not empty.
        - "resume": reuse the folder, keep ``created`` and set the status back to running.
        - "new": use the first free name among ``<name>``, ``<name>-2``, ``<name>-3``, ...
    """
    if if_exists not in IF_EXISTS_MODES:
        raise ValueError(f"if_exists={if_exists!r} is invalid; use one of {IF_EXISTS_MODES}")
    run_dir = Path(run_dir)
    now = time.time()

    if if_exists == "new":
        run_dir = _claim_new_folder(run_dir)
    elif _is_taken(run_dir) and if_exists == "error":
        raise FileExistsError(
            f"run folder {run_dir} already exists and is not empty. Pass if_exists='resume' to "
            f"continue that run, if_exists='new' to create {run_dir.name}-2 (or the next free "
            f"name), or choose another run_dir."
        )
    run_dir.mkdir(parents=True, exist_ok=True)

    fields = dict(meta)
    fields.update(
        name=run_dir.name,
        status=schema.STATUS_RUNNING,
        heartbeat=now,
        format_version=schema.FORMAT_VERSION,
    )
    with _meta_lock:
        old = _read_meta_if_valid(run_dir) if if_exists == "resume" else None
        if old is not None:
            log.info("resuming run %s (created %s)", run_dir, old.get("created"))
            fields["created"] = old.get("created", now)
            merged = {**old, **fields}
        else:
            merged = {**fields, "created": now}
        _write_meta(run_dir, merged)
    return run_dir


def _read_meta_if_valid(run_dir: Path) -> dict[str, Any] | None:
    try:
        return read_meta(run_dir)
    except FileNotFoundError:
        return None
    except ValueError as exc:
        log.warning("replacing unreadable run.json while resuming: %s", exc)
        return None


# --- part files --------------------------------------------------------------------------------


def next_part_index(run_dir: str | os.PathLike, rank: int = 0) -> int:
    """Return the first part number after every part (finished or .tmp) of this rank."""
    highest = -1
    for table in (schema.FILTERS_DIR, schema.SCALARS_DIR):
        folder = Path(run_dir) / table / f"rank={rank}"
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            match = PART_NAME.match(entry.name) or TMP_PART_NAME.match(entry.name)
            if match:
                highest = max(highest, int(match.group(1)))
    return highest + 1


def _check_part(path: Path) -> str | None:
    """Return why a part file cannot be read, or None when its Parquet footer is valid."""
    try:
        stat = path.stat()
    except OSError as exc:
        return f"cannot stat file: {exc}"
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key in _part_check_cache:
        return _part_check_cache[key]

    if stat.st_size == 0:
        reason: str | None = "empty file (0 bytes)"
    else:
        try:
            pq.ParquetFile(path).metadata
            reason = None
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError and others for bad files
            reason = f"not a readable Parquet file: {exc}"
    _part_check_cache[key] = reason
    return reason


def _scan_parts(folder: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Return the readable part files under ``folder/rank=*/`` and what was skipped, with why."""
    good: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    if not folder.is_dir():
        return good, skipped
    for rank_dir in sorted(folder.glob("rank=*")):
        for path in sorted(rank_dir.iterdir(), key=_part_sort_key):
            if TMP_PART_NAME.match(path.name):
                skipped.append((path, "unfinished part (.tmp): being written, or its writer was killed"))
                continue
            if not PART_NAME.match(path.name):
                continue
            reason = _check_part(path)
            if reason is None:
                good.append(path)
            else:
                skipped.append((path, reason))
    return good, skipped


def _part_sort_key(path: Path) -> tuple[int, str]:
    match = PART_NAME.match(path.name) or TMP_PART_NAME.match(path.name)
    return (int(match.group(1)) if match else -1, path.name)


def part_name(index: int) -> str:
    """Return the file name of part ``index``; zero-padded so that name order is write order."""
    return f"part-{index:06d}.parquet"


def tmp_part_name(index: int) -> str:
    """Return the temporary name a part has while it is being written."""
    return f".{part_name(index)}.tmp"


# --- reading -----------------------------------------------------------------------------------


def _quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _read_parquet_sql(**options: bool) -> str:
    flags = "".join(f", {key}={str(value).lower()}" for key, value in options.items())
    return f"read_parquet($files, hive_partitioning=true, union_by_name=true{flags})"


class Run:
    """One run folder: its metadata, its validated part files and queries over them.

    Part files are scanned on first use and cached; call ``refresh()`` to see parts written
    since then and the current ``run.json``.
    """

    def __init__(self, path: str | os.PathLike, meta: dict[str, Any] | None = None):
        self.path = Path(path)
        self.meta = meta if meta is not None else read_meta(self.path)
        self._parts: dict[str, list[Path]] | None = None
        self._skipped: list[tuple[Path, str]] = []

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, status={self.status!r})"

    @property
    def name(self) -> str:
        return str(self.meta.get("name") or self.path.name)

    @property
    def status(self) -> str:
        """Status from run.json, or "interrupted" for a running run with a stale heartbeat."""
        status = str(self.meta.get("status", schema.STATUS_RUNNING))
        if status == schema.STATUS_RUNNING and self.heartbeat_age_s() > schema.HEARTBEAT_STALE_S:
            return schema.STATUS_INTERRUPTED
        return status

    def heartbeat_age_s(self) -> float:
        """Seconds since the last heartbeat (or since creation when there was none)."""
        last = self.meta.get("heartbeat", self.meta.get("created"))
        try:
            return time.time() - float(last)
        except (TypeError, ValueError):
            return float("inf")

    def layers(self) -> list[dict[str, Any]]:
        """Layer dicts from run.json (name, type, filters, normaliser, activation, depth), by depth."""
        layers = list(self.meta.get("layers") or [])
        return sorted(layers, key=lambda layer: layer.get("depth", 0))

    def refresh(self) -> "Run":
        """Reread run.json and rescan the part files; returns self."""
        self.meta = read_meta(self.path)
        self._parts = None
        return self

    # --- part files ----------------------------------------------------------------------------

    def _scan(self) -> dict[str, list[Path]]:
        if self._parts is not None:
            return self._parts
        filters, filters_skipped = _scan_parts(self.path / schema.FILTERS_DIR)
        scalars, scalars_skipped = _scan_parts(self.path / schema.SCALARS_DIR)
        self._parts = {schema.FILTERS_DIR: filters, schema.SCALARS_DIR: scalars}
        self._skipped = filters_skipped + scalars_skipped
        self._warn_skipped(self._skipped)
        return self._parts

    def _warn_skipped(self, skipped: list[tuple[Path, str]]) -> None:
        # An unfinished .tmp part is normal while the writer of a live run is busy.
        live = self.status == schema.STATUS_RUNNING
        worth_warning = [(p, why) for p, why in skipped if not (live and TMP_PART_NAME.match(p.name))]
        if not worth_warning:
            return
        listing = "; ".join(f"{path.relative_to(self.path)}: {why}" for path, why in worth_warning)
        log.warning("run %s: skipped %d file(s): %s", self.path, len(worth_warning), listing)
        warnings.warn(
            f"run {self.path}: skipped {len(worth_warning)} unreadable file(s), the other parts "
            f"were read ({listing}). Delete or move those files to silence this warning.",
            stacklevel=4,
        )

    @property
    def filter_files(self) -> list[Path]:
        """Readable filter part files of every rank, in write order."""
        return list(self._scan()[schema.FILTERS_DIR])

    @property
    def scalar_files(self) -> list[Path]:
        """Readable scalar part files of every rank, in write order."""
        return list(self._scan()[schema.SCALARS_DIR])

    @property
    def skipped(self) -> list[tuple[Path, str]]:
        """Files left out of every query, with the reason."""
        self._scan()
        return list(self._skipped)

    def _drop_unreadable(self, files: list[Path], sql_for_one_file: str, params: dict) -> list[Path]:
        """Return the files DuckDB can read with ``sql_for_one_file``; record the others as skipped.

        Only called after a query over all files failed: a file with a valid footer can still
        have corrupt pages, which only a full read finds.
        """
        readable = []
        newly_skipped = []
        for path in files:
            try:
                with duckdb.connect() as con:
                    con.execute(sql_for_one_file, {**params, "files": [str(path)]}).fetchall()
                readable.append(path)
            except duckdb.Error as exc:
                newly_skipped.append((path, f"DuckDB could not read it: {exc}"))
        self._skipped.extend(newly_skipped)
        self._warn_skipped(newly_skipped)
        bad = {path for path, _ in newly_skipped}
        for table, parts in self._scan().items():
            self._parts[table] = [path for path in parts if path not in bad]
        return readable

    def _query(self, files: list[Path], sql: str, params: dict) -> pd.DataFrame:
        try:
            return _run_query(files, sql, params)
        except duckdb.Error:
            readable = self._drop_unreadable(files, sql, params)
            if not readable:
                return pd.DataFrame()
            return _run_query(readable, sql, params)

    # --- queries -------------------------------------------------------------------------------

    def filters(
        self,
        steps: tuple[int, int] | None = None,
        layers: list[str] | None = None,
        ranks: list[int] | None = None,
    ) -> pd.DataFrame:
        """Per-filter rows: columns step, layer, filter, the metrics and rank.

        ``steps`` is an inclusive (first, last) range; ``layers`` and ``ranks`` select by name and
        rank. Rows are ordered by step, rank, layer depth and filter.
        """
        files = self.filter_files
        if not files:
            return _empty_filters_frame()

        where, params = [], {"order": [layer["name"] for layer in self.layers()]}
        if steps is not None:
            first, last = steps
            where.append("step BETWEEN $first AND $last")
            params.update(first=int(first), last=int(last))
        if layers is not None:
            if isinstance(layers, str):
                layers = [layers]
            self._check_layer_names(layers, params["order"])
            where.append("list_contains($layers, layer)")
            params["layers"] = [str(name) for name in layers]
        if ranks is not None:
            where.append("list_contains($ranks, rank)")
            params["ranks"] = [int(rank) for rank in ranks]
        sql = (
            f"SELECT * FROM {_read_parquet_sql()}"
            + (f" WHERE {' AND '.join(where)}" if where else "")
            # Integer sort keys: ordering by the layer text is several times slower.
            + " ORDER BY step, rank, list_position($order, layer), filter"
        )
        frame = self._query(files, sql, params)
        if frame.empty and len(frame.columns) == 0:
            return _empty_filters_frame()
        return _order_columns(frame, list(schema.FILTER_KEYS) + list(schema.METRICS) + ["rank"])

    def _check_layer_names(self, requested: list[str], known: list[str]) -> None:
        """Raise ValueError naming requested layers that run.json does not list."""
        if not known:  # a run that stopped before its first recorded step lists no layers
            return
        unknown = [name for name in requested if str(name) not in known]
        if unknown:
            raise ValueError(
                f"layer(s) {unknown} not found in run {self.name}; its layers are {known}"
            )

    def scalars(self, rank: int = 0) -> pd.DataFrame:
        """Per-step scalars of one rank, one row per step ordered by step.

        A step written in several rows (``Probe.log`` after the step) is merged: each column
        takes its first non-null value in write order.
        """
        files = [p for p in self.scalar_files if p.parent.name == f"rank={rank}"]
        if not files:
            return pd.DataFrame({key: pd.Series(dtype="float64") for key in schema.SCALAR_KEYS})

        columns = self._scalar_columns(files)
        merged = ", ".join(
            f"any_value({_quote_identifier(c)} ORDER BY filename, file_row_number) AS {_quote_identifier(c)}"
            for c in columns
            if c not in ("step", "rank")
        )
        source = _read_parquet_sql(filename=True, file_row_number=True)
        sql = f"SELECT step, {merged} FROM {source} WHERE rank = $rank GROUP BY step ORDER BY step"
        frame = self._query(files, sql, {"rank": int(rank)})
        return _order_columns(frame, list(schema.SCALAR_KEYS))

    def _scalar_columns(self, files: list[Path]) -> list[str]:
        names: list[str] = []
        for path in files:
            for name in pq.ParquetFile(path).schema_arrow.names:
                if name not in names:
                    names.append(name)
        return names


def _run_query(files: list[Path], sql: str, params: dict) -> pd.DataFrame:
    """Run ``sql`` over ``files`` (the ``$files`` parameter) on a fresh connection.

    Going through Arrow keeps float32 and int32 columns and is several times faster than
    DuckDB's direct DataFrame conversion for text columns.
    """
    with duckdb.connect() as con:
        result = con.sql(sql, params={**params, "files": [str(path) for path in files]})
        return result.to_arrow_table().to_pandas()


def _order_columns(frame: pd.DataFrame, first: list[str]) -> pd.DataFrame:
    leading = [c for c in first if c in frame.columns]
    return frame[leading + [c for c in frame.columns if c not in leading]]


def _empty_filters_frame() -> pd.DataFrame:
    columns = {"step": "int64", "layer": "object", "filter": "int32"}
    columns.update({m: "int32" if m in schema.INTEGER_METRICS else "float32" for m in schema.METRICS})
    columns["rank"] = "int64"
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in columns.items()})


def open_run(path: str | os.PathLike) -> Run:
    """Open the run stored in folder ``path``; raises FileNotFoundError without a run.json."""
    path = Path(path)
    if not (path / schema.RUN_FILE).is_file():
        raise FileNotFoundError(
            f"{path} contains no {schema.RUN_FILE}, so it is not a run folder; "
            f"pass the folder that a Probe or create_run wrote"
        )
    return Run(path)


def list_runs(root: str | os.PathLike) -> list[Run]:
    """Return the runs in the sub-folders of ``root``, newest first (by ``created``).

    Folders without a readable run.json are skipped and named in one warning.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"runs folder {root} does not exist; pass the folder that contains your runs")

    runs, skipped = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            runs.append(Run(folder, read_meta(folder)))
        except FileNotFoundError:
            skipped.append((folder, f"no {schema.RUN_FILE}"))
        except (ValueError, OSError) as exc:
            skipped.append((folder, str(exc)))

    if skipped:
        listing = "; ".join(f"{path.name}: {why}" for path, why in skipped)
        log.warning("skipped %d folder(s) under %s: %s", len(skipped), root, listing)
        warnings.warn(f"{root}: skipped {len(skipped)} folder(s) that are not readable runs ({listing})", stacklevel=2)
    runs.sort(key=lambda run: _created(run.meta), reverse=True)
    return runs


def _created(meta: dict[str, Any]) -> float:
    try:
        return float(meta.get("created", 0.0))
    except (TypeError, ValueError):
        return 0.0
