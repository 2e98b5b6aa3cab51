"""Run folders: create_run modes, run.json updates, status, listing and reading damaged folders."""

import json
import shutil
import threading
import time
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest

from probe import schema, store
from probe.writer import RunWriter

LAYERS = [{"name": "conv1", "filters": 3, "depth": 0}, {"name": "fc", "filters": 2, "depth": 1}]
ROWS = 5


def write_steps(run_dir, steps, flush_every_steps=2, extra_scalars=None):
    """Write filter rows whose gain is step * 100 + row, and a loss per step."""
    with RunWriter(run_dir, LAYERS, flush_every_steps=flush_every_steps) as writer:
        for step in steps:
            values = np.zeros((ROWS, len(schema.METRICS)), np.float32)
            values[:, 0] = step * 100 + np.arange(ROWS)
            writer.add_filters(step, values)
            row = {"step": step, "wall_time": 1000.0 + step, "batch_size": 8, "samples_per_s": 1.0,
                   "loss": 1.0 / (step + 1)}
            row.update((extra_scalars or {}).get(step, {}))
            writer.add_scalars(row)
    assert writer.error is None


def make_run(path, steps=range(4), **kwargs):
    run_dir = store.create_run(path, {"layers": LAYERS, "config": {"lr": 0.1}})
    write_steps(run_dir, steps, **kwargs)
    return run_dir


# --- create_run ---------------------------------------------------------------------------------


def test_create_run_writes_meta(tmp_path):
    run_dir = store.create_run(tmp_path / "exp", {"layers": LAYERS, "config": {"lr": 0.1}})
    meta = json.loads((run_dir / schema.RUN_FILE).read_text())
    assert meta["name"] == "exp"
    assert meta["status"] == schema.STATUS_RUNNING
    assert meta["format_version"] == schema.FORMAT_VERSION
    assert meta["config"] == {"lr": 0.1}
    assert abs(meta["created"] - time.time()) < 60
    assert meta["heartbeat"] >= meta["created"]


def test_create_run_existing_folder_error(tmp_path):
    store.create_run(tmp_path / "exp", {})
    with pytest.raises(FileExistsError) as info:
        store.create_run(tmp_path / "exp", {})
    message = str(info.value)
    assert str(tmp_path / "exp") in message
    assert "if_exists='resume'" in message
    assert "if_exists='new'" in message


def test_create_run_empty_folder_is_free(tmp_path):
    (tmp_path / "exp").mkdir()
    assert store.create_run(tmp_path / "exp", {}) == tmp_path / "exp"


def test_create_run_new_picks_next_name(tmp_path):
    first = store.create_run(tmp_path / "exp", {}, if_exists="new")
    second = store.create_run(tmp_path / "exp", {}, if_exists="new")
    third = store.create_run(tmp_path / "exp", {}, if_exists="new")
    assert [first.name, second.name, third.name] == ["exp", "exp-2", "exp-3"]
    assert store.read_meta(third)["name"] == "exp-3"


def test_create_run_resume_keeps_created(tmp_path):
    run_dir = store.create_run(tmp_path / "exp", {"config": {"lr": 0.1}})
    created = store.read_meta(run_dir)["created"]
    store.update_meta(run_dir, status=schema.STATUS_FINISHED, created=created - 50)

    again = store.create_run(run_dir, {"config": {"lr": 0.05}}, if_exists="resume")
    meta = store.read_meta(again)
    assert again == run_dir
    assert meta["status"] == schema.STATUS_RUNNING
    assert meta["created"] == created - 50
    assert meta["config"] == {"lr": 0.05}


def test_create_run_invalid_mode(tmp_path):
    with pytest.raises(ValueError, match="'overwrite'"):
        store.create_run(tmp_path / "exp", {}, if_exists="overwrite")


# --- run.json updates and status -----------------------------------------------------------------


def test_update_meta_is_atomic_for_readers(tmp_path):
    run_dir = store.create_run(tmp_path / "exp", {"config": {"blob": "x" * 20_000}})
    stop = threading.Event()
    failures = []

    def read_repeatedly():
        while not stop.is_set():
            try:
                json.loads((run_dir / schema.RUN_FILE).read_text())
            except json.JSONDecodeError as exc:
                failures.append(exc)

    reader = threading.Thread(target=read_repeatedly)
    reader.start()
    for i in range(300):
        store.update_meta(run_dir, counter=i)
    stop.set()
    reader.join()

    assert failures == []
    assert store.read_meta(run_dir)["counter"] == 299
    assert [p.name for p in run_dir.iterdir()] == [schema.RUN_FILE]


def test_status_interrupted_when_heartbeat_stale(tmp_path):
    run_dir = store.create_run(tmp_path / "exp", {})
    assert store.open_run(run_dir).status == schema.STATUS_RUNNING

    store.update_meta(run_dir, heartbeat=time.time() - schema.HEARTBEAT_STALE_S - 5)
    assert store.open_run(run_dir).status == schema.STATUS_INTERRUPTED

    store.update_meta(run_dir, status=schema.STATUS_FINISHED)
    assert store.open_run(run_dir).status == schema.STATUS_FINISHED


# --- reading ------------------------------------------------------------------------------------


def test_filters_select_steps_and_layers(tmp_path):
    run = store.open_run(make_run(tmp_path / "exp", steps=range(6)))
    frame = run.filters(steps=(2, 4), layers=["fc"])
    assert list(frame["step"]) == [2, 2, 3, 3, 4, 4]
    assert list(frame["layer"]) == ["fc"] * 6
    assert list(frame["filter"]) == [0, 1] * 3
    assert list(frame["gain"]) == [203, 204, 303, 304, 403, 404]
    assert list(frame["rank"]) == [0] * 6


def test_filters_ordered_by_layer_depth(tmp_path):
    run = store.open_run(make_run(tmp_path / "exp", steps=[0]))
    assert list(run.filters()["layer"]) == ["conv1"] * 3 + ["fc"] * 2


def test_empty_run_reads_empty_frames(tmp_path):
    run = store.open_run(store.create_run(tmp_path / "exp", {"layers": LAYERS}))
    filters = run.filters()
    assert len(filters) == 0
    assert list(filters.columns) == list(schema.FILTER_KEYS) + list(schema.METRICS) + ["rank"]
    assert len(run.scalars()) == 0


def test_layers_in_depth_order(tmp_path):
    run_dir = store.create_run(tmp_path / "exp", {"layers": [LAYERS[1], LAYERS[0]]})
    assert [layer["name"] for layer in store.open_run(run_dir).layers()] == ["conv1", "fc"]


def test_open_run_without_run_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="run.json"):
        store.open_run(tmp_path)


def test_scalar_column_added_midway(tmp_path):
    run_dir = make_run(tmp_path / "exp", steps=range(4), extra_scalars={2: {"test_accuracy": 0.5}, 3: {"test_accuracy": 0.7}})
    scalars = store.open_run(run_dir).scalars()
    assert list(scalars["step"]) == [0, 1, 2, 3]
    assert np.isnan(scalars["test_accuracy"][:2]).all()
    assert list(scalars["test_accuracy"][2:]) == [0.5, 0.7]


def damage(run_dir):
    """Add every kind of bad file a run folder can collect; returns the bad paths."""
    folder = run_dir / "filters" / "rank=0"
    good = sorted(folder.glob("part-*.parquet"))[0]
    empty = folder / "part-000090.parquet"
    empty.touch()
    not_parquet = folder / "part-000091.parquet"
    not_parquet.write_text("step,layer\n1,conv1\n")
    unfinished = folder / ".part-000092.parquet.tmp"
    shutil.copy(good, unfinished)
    truncated = folder / "part-000093.parquet"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    scalar_junk = run_dir / "scalars" / "rank=0" / "part-000094.parquet"
    scalar_junk.write_bytes(b"PAR1 but nothing else")
    return {empty, not_parquet, unfinished, truncated, scalar_junk}


def test_damaged_run_reads_good_parts(tmp_path):
    run_dir = make_run(tmp_path / "exp", steps=range(6))
    bad = damage(run_dir)
    store.update_meta(run_dir, status=schema.STATUS_FAILED)

    with pytest.warns(UserWarning, match="skipped 5") as caught:
        run = store.open_run(run_dir)
        filters = run.filters()
        scalars = run.scalars()
    assert len(caught) == 1
    for path in bad:
        assert path.name in str(caught[0].message)

    assert {path for path, _ in run.skipped} == bad
    assert sorted(set(filters["step"])) == list(range(6))
    assert list(filters["gain"][filters["step"] == 5]) == [500, 501, 502, 503, 504]
    assert list(scalars["step"]) == list(range(6))
    reasons = dict(run.skipped)
    assert "0 bytes" in reasons[run_dir / "filters" / "rank=0" / "part-000090.parquet"]
    assert "Parquet" in reasons[run_dir / "filters" / "rank=0" / "part-000093.parquet"]


def test_corrupt_pages_skipped_at_query(tmp_path):
    run_dir = make_run(tmp_path / "exp", steps=range(4))
    store.update_meta(run_dir, status=schema.STATUS_FINISHED)
    first = sorted((run_dir / "filters" / "rank=0").glob("part-*.parquet"))[0]
    content = bytearray(first.read_bytes())
    # Flip the bytes of every column chunk but keep the footer, so only a full read finds the damage.
    metadata = pq.ParquetFile(first).metadata
    for index in range(metadata.num_columns):
        chunk = metadata.row_group(0).column(index)
        start = chunk.dictionary_page_offset or chunk.data_page_offset
        for i in range(start, start + chunk.total_compressed_size):
            content[i] ^= 0x5A
    first.write_bytes(bytes(content))

    run = store.open_run(run_dir)
    assert first in run.filter_files
    with pytest.warns(UserWarning, match="part-000000.parquet") as caught:
        filters = run.filters()
    assert len(caught) == 1
    assert sorted(set(filters["step"])) == [2, 3]
    assert first not in run.filter_files
    assert first in dict(run.skipped)


def test_live_run_tmp_part_is_not_warned(tmp_path):
    run_dir = make_run(tmp_path / "exp", steps=range(2))
    (run_dir / "filters" / "rank=0" / ".part-000005.parquet.tmp").write_bytes(b"being written")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run = store.open_run(run_dir)
        assert len(run.filters()) == 2 * ROWS
    assert [path.name for path, _ in run.skipped] == [".part-000005.parquet.tmp"]


def test_refresh_sees_new_parts(tmp_path):
    run_dir = make_run(tmp_path / "exp", steps=range(2))
    run = store.open_run(run_dir)
    assert len(run.filter_files) == 1
    write_steps(run_dir, range(2, 4))
    assert len(run.filter_files) == 1
    assert len(run.refresh().filter_files) == 2


def test_ranks_are_separate_partitions(tmp_path):
    run_dir = make_run(tmp_path / "exp", steps=range(2))
    with RunWriter(run_dir, LAYERS, rank=1) as writer:
        writer.add_filters(0, np.full((ROWS, len(schema.METRICS)), -1.0, dtype=np.float32))
        writer.add_scalars({"step": 0, "loss": 9.0})

    run = store.open_run(run_dir)
    assert len(run.filters()) == 3 * ROWS
    rank1 = run.filters(ranks=[1])
    assert list(rank1["rank"]) == [1] * ROWS
    assert list(rank1["gain"]) == [-1.0] * ROWS
    assert list(run.scalars(rank=1)["loss"]) == [9.0]
    assert list(run.scalars()["loss"]) == [1.0, 0.5]


# --- list_runs ----------------------------------------------------------------------------------


def test_list_runs_newest_first_and_names_skipped(tmp_path):
    older = store.create_run(tmp_path / "older", {})
    store.update_meta(older, created=time.time() - 100)
    store.create_run(tmp_path / "newer", {})
    (tmp_path / "no-meta").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / schema.RUN_FILE).write_text("{not json")
    (tmp_path / "README.md").write_text("runs live here")

    with pytest.warns(UserWarning) as caught:
        runs = store.list_runs(tmp_path)
    assert [run.name for run in runs] == ["newer", "older"]
    assert len(caught) == 1
    assert "no-meta" in str(caught[0].message)
    assert "broken" in str(caught[0].message)


def test_list_runs_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        store.list_runs(tmp_path / "nowhere")
