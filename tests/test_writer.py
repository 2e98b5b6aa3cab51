"""RunWriter against real Parquet files: exact round trip, flush triggers, resume, failures, readers."""

import logging
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from probe import schema, store
from probe.writer import RunWriter

LAYERS = [
    {"name": "features.0", "filters": 6, "depth": 0},
    {"name": "features.3", "filters": 4, "depth": 1},
    {"name": "classifier", "filters": 3, "depth": 2},
]
N_METRICS = len(schema.METRICS)
ACTIVE = schema.METRICS.index("active_samples")


def step_values(rng, rows):
    """Random [rows, N_METRICS] float32 with NaN (also with payloads), +-Inf and -0.0 in the float metrics."""
    values = rng.normal(0, 10, (rows, N_METRICS)).astype(np.float32)
    payload_nans = np.array([0x7FC00001, 0xFFC00000], dtype=np.uint32).view(np.float32)
    specials = np.concatenate([np.array([np.nan, np.inf, -np.inf, -0.0], dtype=np.float32), payload_nans])
    hit = rng.random((rows, N_METRICS)) < 0.15
    values[hit] = rng.choice(specials, size=hit.sum())
    values[:, ACTIVE] = rng.integers(0, 129, rows)
    return values


def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def finished_parts(run_dir, table=schema.FILTERS_DIR):
    return sorted((run_dir / table / "rank=0").glob(schema.PART_GLOB))


def test_round_trip_exact_bits(tmp_path):
    run_dir = store.create_run(tmp_path / "run", {"layers": LAYERS})
    rng = np.random.default_rng(1)
    masks = [None, np.array([True, False, True]), np.array([False, True, False])]
    expected = {}  # (step, layer, filter) -> row of metric values
    with RunWriter(run_dir, LAYERS, flush_every_steps=3) as writer:
        for step in range(10):
            mask = masks[step % 3]
            present = [layer for i, layer in enumerate(LAYERS) if mask is None or mask[i]]
            values = step_values(rng, sum(layer["filters"] for layer in present))
            row = 0
            for layer in present:
                for f in range(layer["filters"]):
                    expected[(step * 7, layer["name"], f)] = values[row].copy()
                    row += 1
            writer.add_filters(step * 7, values, mask)
    assert writer.error is None

    frame = store.open_run(run_dir).filters()
    assert len(frame) == len(expected)
    keys = list(zip(frame["step"], frame["layer"], frame["filter"]))
    assert sorted(keys) == sorted(expected)
    for metric_index, metric in enumerate(schema.METRICS):
        want = np.array([expected[key][metric_index] for key in keys], dtype=np.float32)
        got = frame[metric].to_numpy()
        if metric == "active_samples":
            assert np.array_equal(got, want.astype(np.int32)), metric
        else:
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), metric


def test_scalars_round_trip_and_merge(tmp_path):
    run_dir = store.create_run(tmp_path / "run", {"layers": LAYERS})
    with RunWriter(run_dir, LAYERS, flush_every_steps=2) as writer:
        for step in range(5):
            writer.add_scalars({"step": step, "wall_time": 100.0 + step, "batch_size": 32,
                                "samples_per_s": 64.0, "loss": float("nan") if step == 2 else 1.0 / (step + 1)})
        writer.add_scalars({"step": 4, "test_accuracy": 0.75, "loss": 99.0})

    scalars = store.open_run(run_dir).scalars()
    assert list(scalars["step"]) == [0, 1, 2, 3, 4]
    assert list(scalars.columns[:4]) == list(schema.SCALAR_KEYS)
    assert scalars.loc[4, "loss"] == pytest.approx(0.2)  # the first value written wins
    assert scalars.loc[4, "test_accuracy"] == 0.75
    assert np.isnan(scalars.loc[2, "loss"])
    assert list(scalars["batch_size"]) == [32] * 5


def test_scalar_that_is_not_a_number(tmp_path):
    with RunWriter(tmp_path / "run", LAYERS) as writer:
        with pytest.raises(TypeError, match="'lr'"):
            writer.add_scalars({"step": 0, "lr": "fast"})


def test_values_of_wrong_shape(tmp_path):
    with RunWriter(tmp_path / "run", LAYERS) as writer:
        with pytest.raises(ValueError, match=r"\(13, 9\)"):
            writer.add_filters(0, np.zeros((12, N_METRICS), np.float32))
        with pytest.raises(ValueError, match="float32"):
            writer.add_filters(0, np.zeros((13, N_METRICS), np.float64))


def test_flush_by_steps(tmp_path):
    rng = np.random.default_rng(2)
    writer = RunWriter(tmp_path / "run", LAYERS, flush_every_steps=3, flush_every_s=600)
    for step in range(3):
        writer.add_filters(step, step_values(rng, 13))
        writer.add_scalars({"step": step, "loss": 1.0})
    time.sleep(0.2)
    assert finished_parts(tmp_path / "run") == []

    # The part of steps 0-2 is written when step 3 begins.
    writer.add_filters(3, step_values(rng, 13))
    assert wait_for(lambda: writer.last_flushed_step == 2)
    assert len(finished_parts(tmp_path / "run")) == 1
    assert len(finished_parts(tmp_path / "run", schema.SCALARS_DIR)) == 1

    writer.add_filters(4, step_values(rng, 13))
    time.sleep(0.2)
    assert len(finished_parts(tmp_path / "run")) == 1

    writer.close()
    assert len(finished_parts(tmp_path / "run")) == 2
    assert writer.last_flushed_step == 4


def test_flush_by_time(tmp_path):
    writer = RunWriter(tmp_path / "run", LAYERS, flush_every_steps=1000, flush_every_s=0.4)
    writer.add_filters(0, step_values(np.random.default_rng(3), 13))
    time.sleep(0.1)
    assert finished_parts(tmp_path / "run") == []
    assert wait_for(lambda: len(finished_parts(tmp_path / "run")) == 1)
    writer.close()


def test_flush_writes_heartbeat(tmp_path):
    run_dir = store.create_run(tmp_path / "run", {"layers": LAYERS})
    store.update_meta(run_dir, heartbeat=0.0)
    with RunWriter(run_dir, LAYERS) as writer:
        writer.add_scalars({"step": 0})
        assert writer.flush()
        assert store.read_meta(run_dir)["heartbeat"] > time.time() - 60


def test_resume_continues_part_numbers(tmp_path):
    rng = np.random.default_rng(4)
    run_dir = store.create_run(tmp_path / "run", {"layers": LAYERS})
    with RunWriter(run_dir, LAYERS, flush_every_steps=2) as writer:
        for step in range(4):
            writer.add_filters(step, step_values(rng, 13))
    (run_dir / "filters" / "rank=0" / ".part-000002.parquet.tmp").write_bytes(b"left by a killed writer")

    store.create_run(run_dir, {"layers": LAYERS}, if_exists="resume")
    with RunWriter(run_dir, LAYERS, flush_every_steps=2) as writer:
        for step in range(4, 6):
            writer.add_filters(step, step_values(rng, 13))

    names = [path.name for path in finished_parts(run_dir)]
    assert names == ["part-000000.parquet", "part-000001.parquet", "part-000003.parquet"]
    frame = store.open_run(run_dir).filters()
    assert sorted(set(frame["step"])) == [0, 1, 2, 3, 4, 5]


def test_full_queue_drops_and_counts(tmp_path, caplog):
    rng = np.random.default_rng(5)
    one_step_bytes = 13 * N_METRICS * 4
    writer = RunWriter(tmp_path / "run", LAYERS, max_queue_bytes=one_step_bytes - 1)
    with caplog.at_level(logging.WARNING, logger="probe.writer"):
        accepted = [writer.add_filters(step, step_values(rng, 13)) for step in range(5)]
        writer.add_scalars({"step": 4, "loss": 1.0})
        writer.close()

    assert accepted == [False] * 5
    assert writer.dropped_steps == 5
    assert writer.dropped_rows == 5 * 13
    assert len([r for r in caplog.records if "queue" in r.getMessage() and "step 0" in r.getMessage()]) == 1
    assert finished_parts(tmp_path / "run") == []
    assert len(finished_parts(tmp_path / "run", schema.SCALARS_DIR)) == 1


def test_thread_failure_is_stored(tmp_path, caplog):
    writer = RunWriter(tmp_path / "run", LAYERS, flush_every_steps=1)
    rank_dir = tmp_path / "run" / "filters" / "rank=0"
    rank_dir.rmdir()
    rank_dir.write_text("a file where the writer expects its folder")

    with caplog.at_level(logging.ERROR, logger="probe.writer"):
        assert writer.add_filters(0, step_values(np.random.default_rng(6), 13)) is True
        assert writer.flush(timeout=5) is False
        assert writer.add_filters(1, step_values(np.random.default_rng(7), 13)) is False
        writer.add_scalars({"step": 1, "loss": 1.0})
        writer.close()

    assert isinstance(writer.error, OSError)
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1


def test_reader_never_sees_partial_parts(tmp_path):
    run_dir = store.create_run(tmp_path / "run", {"layers": LAYERS})
    big_layers = [{"name": f"conv{i}", "filters": 500} for i in range(4)]
    store.update_meta(run_dir, layers=big_layers)
    values = step_values(np.random.default_rng(8), 2000)
    writer = RunWriter(run_dir, big_layers, flush_every_steps=1)
    stop = threading.Event()

    def produce():
        step = 0
        while not stop.is_set():
            writer.add_filters(step, values.copy())
            writer.flush()
            step += 1

    producer = threading.Thread(target=produce)
    producer.start()
    reads = 0
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            run = store.open_run(run_dir)
            frame = run.filters()
            assert all(path.name.endswith(".tmp") for path, _ in run.skipped)
            assert len(frame) % 2000 == 0
            assert (frame.groupby("step").size() == 2000).all()
            reads += 1
    finally:
        stop.set()
        producer.join()
        writer.close()
    assert reads > 3
    assert writer.error is None


def test_layer_names_must_be_unique(tmp_path):
    with pytest.raises(ValueError, match="unique"):
        RunWriter(tmp_path / "run", [{"name": "a", "filters": 1}, {"name": "a", "filters": 2}])


def test_part_sorted_when_steps_arrive_unordered(tmp_path):
    with RunWriter(tmp_path / "run", LAYERS, flush_every_steps=10) as writer:
        for step in (5, 3, 4):
            writer.add_filters(step, np.full((13, N_METRICS), step, dtype=np.float32))
    table = pq.read_table(finished_parts(tmp_path / "run")[0])
    assert table["step"].to_pylist()[:3] == [3, 4, 5]
    assert table["gain"].to_pylist()[:3] == [3.0, 4.0, 5.0]
    assert table["filter"].to_pylist()[:4] == [0, 0, 0, 1]
