"""Dashboard views driven through Streamlit's AppTest on runs recorded by a real Probe.

Every expected number is computed here from the Parquet parts with pyarrow and pandas, not
through the dashboard's DuckDB queries or ``probe.store``.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from streamlit.testing.v1 import AppTest

from probe import Probe

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")
DEAD_LAYER, DEAD_FILTER = "3", 2
STEPS = 12


def build_model() -> torch.nn.Module:
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 6, 3), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, 3),
    )
    # A bias of -1000 keeps this ReLU filter at zero for every sample: a real dead filter.
    with torch.no_grad():
        model[3].bias[DEAD_FILTER] = -1e3
    return model


def train_steps(probe: Probe, model, optimizer, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 1, 10, 10, generator=generator)
        y = torch.randint(0, 3, (8,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        probe.step(loss=loss, lr=optimizer.param_groups[0]["lr"], batch_size=len(x))


def record_run(run_dir: Path, lr: float, steps: int, seed: int) -> Path:
    """Train the small CNN for ``steps`` SGD steps under a Probe; returns the run folder."""
    torch.manual_seed(seed)
    model = build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    with Probe(model, run_dir=run_dir, config={"lr": lr, "seed": seed}, flush_every_steps=4) as probe:
        train_steps(probe, model, optimizer, steps, seed)
        probe.log(test_accuracy=0.25 + seed / 10)
    return run_dir


@pytest.fixture(scope="session")
def recorded_runs(tmp_path_factory) -> Path:
    """Runs folder with "base", "other" (another seed and rate) and "diverged" (lr 1e12: Inf/NaN)."""
    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        record_run(root / "base", lr=0.05, steps=STEPS, seed=0)
        record_run(root / "other", lr=0.2, steps=STEPS, seed=1)
        record_run(root / "diverged", lr=1e12, steps=6, seed=2)
    finally:
        torch.set_num_threads(threads)
    return root


# --- independent readers and helpers ----------------------------------------------------------


def read_table(run_dir: Path, table: str) -> pd.DataFrame:
    files = sorted((run_dir / table / "rank=0").glob("part-*.parquet"))
    frame = pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)
    if "layer" in frame:
        frame["layer"] = frame["layer"].astype(str)
    return frame


def merged_scalars(run_dir: Path) -> pd.DataFrame:
    frame = read_table(run_dir, "scalars")
    return frame.groupby("step").first().reset_index()


def decode(value):
    """Return a Plotly JSON array (plain list or base64 typed array) as a numpy array."""
    if isinstance(value, dict) and "bdata" in value:
        array = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        if "shape" in value:
            array = array.reshape([int(n) for n in str(value["shape"]).split(",")])
        return array
    return np.array(value, dtype=object if value and isinstance(value[0], str) else float)


def figures(app: AppTest) -> list[dict]:
    return [json.loads(element.proto.spec) for element in app.get("plotly_chart")]


def open_app(root: Path, monkeypatch, **params) -> AppTest:
    """Start the app on runs folder ``root`` with URL query parameters ``params``."""
    monkeypatch.setenv("DEEPCONTROL_RUNS_DIR", str(root))
    app = AppTest.from_file(APP, default_timeout=60)
    for key, value in params.items():
        app.query_params[key] = value
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    return app


# --- views ------------------------------------------------------------------------------------


def test_runs_view_lists_every_run(recorded_runs, monkeypatch):
    app = open_app(recorded_runs, monkeypatch, view="runs")
    table = app.dataframe[0].value.set_index("name")

    assert set(table.index) == {"base", "other", "diverged"}
    for name in table.index:
        filters = read_table(recorded_runs / name, "filters")
        assert table.loc[name, "status"] == "finished"
        assert table.loc[name, "last step"] == filters["step"].max()
        assert table.loc[name, "recorded steps"] == filters["step"].nunique()
    assert json.loads(table.loc["other", "config"]) == {"lr": 0.2, "seed": 1}


def test_scalars_view_plots_loss_and_ema(recorded_runs, monkeypatch):
    app = open_app(recorded_runs, monkeypatch, view="scalars", run=["base", "other"], scalar="loss")
    expected = merged_scalars(recorded_runs / "base")

    loss = figures(app)[0]
    base_trace = next(t for t in loss["data"] if t["name"] == "base")
    assert [t["name"] for t in loss["data"]] == ["base", "other"]
    np.testing.assert_allclose(decode(base_trace["y"]), expected["loss"], rtol=1e-12)

    app.slider(key="smoothing").set_value(0.5).run()
    smoothed = decode(next(t for t in figures(app)[0]["data"] if t["name"] == "base")["y"])
    by_hand = [expected["loss"].iloc[0]]
    for value in expected["loss"].iloc[1:]:
        by_hand.append(0.5 * by_hand[-1] + 0.5 * value)
    np.testing.assert_allclose(smoothed, by_hand, rtol=1e-12)


def test_scalar_logged_once_is_one_point(recorded_runs, monkeypatch):
    app = open_app(recorded_runs, monkeypatch, view="scalars", run="base", scalar="test_accuracy")
    trace = figures(app)[0]["data"]

    assert len(trace) == 1, "a scalar logged at one step must not show NaN markers at the others"
    assert decode(trace[0]["x"]).tolist() == [STEPS - 1]
    assert decode(trace[0]["y"]).tolist() == [0.25]


@pytest.mark.parametrize("statistic", ["mean", "median", "p90", "max"])
def test_layers_view_matches_parquet(recorded_runs, monkeypatch, statistic):
    app = open_app(recorded_runs, monkeypatch, view="layers", run="base", metric="grad_norm", stat=statistic)
    figure = figures(app)[0]
    heat = figure["data"][0]

    filters = read_table(recorded_runs / "base", "filters")
    aggregate = {"mean": "mean", "median": "median", "p90": lambda v: v.quantile(0.9), "max": "max"}[statistic]
    expected = filters.groupby(["layer", "step"])["grad_norm"].agg(aggregate).unstack("step")
    assert decode(heat["y"]).tolist() == ["0", "3", "7"], "layers in depth order"
    assert decode(heat["x"]).tolist() == sorted(filters["step"].unique())
    np.testing.assert_allclose(decode(heat["z"]), expected.loc[["0", "3", "7"]].to_numpy(), rtol=1e-5)


def test_layers_view_effective_batch_fraction(recorded_runs, monkeypatch):
    app = open_app(recorded_runs, monkeypatch, view="layers", run="base", metric="effective_batch_fraction")
    heat = figures(app)[0]["data"][0]

    filters = read_table(recorded_runs / "base", "filters")
    batch = merged_scalars(recorded_runs / "base").set_index("step")["batch_size"]
    filters["fraction"] = filters["effective_batch"] / filters["step"].map(batch)
    expected = filters.groupby(["layer", "step"])["fraction"].mean().unstack("step")
    np.testing.assert_allclose(decode(heat["z"]), expected.loc[["0", "3", "7"]].to_numpy(), rtol=1e-5)
    assert np.nanmax(decode(heat["z"])) <= 1.0


def test_filters_view_rows_sorting_and_history(recorded_runs, monkeypatch):
    app = open_app(recorded_runs, monkeypatch, view="filters", run="base", layer=DEAD_LAYER, metric="active_samples")
    filters = read_table(recorded_runs / "base", "filters")
    layer = filters[filters["layer"] == DEAD_LAYER]

    heat = figures(app)[0]["data"][0]
    expected = layer.pivot(index="filter", columns="step", values="active_samples")
    assert decode(heat["y"]).tolist() == [f"filter {f}" for f in range(6)]
    np.testing.assert_array_equal(decode(heat["z"]), expected.to_numpy(dtype=float))

    app.selectbox(key="sort").set_value("step it went dead").run()
    rows = decode(figures(app)[0]["data"][0]["y"]).tolist()
    assert rows[0] == f"filter {DEAD_FILTER}", "the dead filter sorts first"
    z = decode(figures(app)[0]["data"][0]["z"])
    assert (z[0] == 0).all(), "the same filter's values move with its row"

    app.selectbox(key="filter").set_value(4).run()
    history = figures(app)[1]
    one = layer[layer["filter"] == 4].sort_values("step")
    gain_trace = history["data"][0]
    np.testing.assert_allclose(decode(gain_trace["y"]), one["gain"], rtol=1e-6)
    titles = [a["text"] for a in history["layout"]["annotations"]]
    assert titles[:3] == ["gain", "out_rms", "out_mean"]


def test_distribution_view_quantiles(recorded_runs, monkeypatch):
    app = open_app(recorded_runs, monkeypatch, view="distribution", run="other", layer="3", metric="out_rms")
    data = figures(app)[0]["data"]
    median = next(t for t in data if t.get("name") == "median")

    layer = read_table(recorded_runs / "other", "filters").query("layer == '3'")
    expected = layer.groupby("step")["out_rms"].median()
    np.testing.assert_allclose(decode(median["y"]), expected.to_numpy(), rtol=1e-5)
    upper_p90 = decode(data[2]["y"])
    np.testing.assert_allclose(upper_p90, layer.groupby("step")["out_rms"].quantile(0.9).to_numpy(), rtol=1e-5)


def test_depth_view_profile_at_step(recorded_runs, monkeypatch):
    app = open_app(recorded_runs, monkeypatch, view="depth", run=["base", "other"], metric="weight_norm", step="5")
    traces = [t for t in figures(app)[0]["data"] if t["mode"] == "lines+markers"]

    assert [t["name"] for t in traces] == ["base (step 5)", "other (step 5)"]
    for trace, name in zip(traces, ["base", "other"]):
        at_step = read_table(recorded_runs / name, "filters").query("step == 5")
        expected = at_step.groupby("layer")["weight_norm"].mean().loc[["0", "3", "7"]]
        np.testing.assert_allclose(decode(trace["y"]), expected.to_numpy(), rtol=1e-5)


def test_compare_view_shared_scale_and_difference(recorded_runs, monkeypatch):
    app = open_app(recorded_runs, monkeypatch, view="compare", run=["base", "other"], metric="out_mean")
    a, b, diff = (figure["data"][0] for figure in figures(app)[:3])

    assert a["zmin"] == b["zmin"], "one colour scale for both runs"
    assert a["zmax"] == b["zmax"], "one colour scale for both runs"
    means = {
        name: read_table(recorded_runs / name, "filters").groupby(["layer", "step"])["out_mean"].mean().unstack("step")
        for name in ("base", "other")
    }
    all_values = np.concatenate([m.to_numpy().ravel() for m in means.values()])
    assert a["zmin"] == pytest.approx(all_values.min(), rel=1e-5)
    assert a["zmax"] == pytest.approx(all_values.max(), rel=1e-5)
    expected = (means["base"] - means["other"]).loc[["0", "3", "7"]].to_numpy()
    np.testing.assert_allclose(decode(diff["z"]), expected, rtol=1e-4, atol=1e-7)


def test_health_view_finds_dead_filter(recorded_runs, monkeypatch):
    app = open_app(recorded_runs, monkeypatch, view="health", run="base")
    findings = app.dataframe[0].value

    dead = findings[findings["finding"] == "dead filter"]
    assert len(dead) == 1
    assert dead.iloc[0]["layer"] == DEAD_LAYER
    assert dead.iloc[0]["filter"] == DEAD_FILTER
    assert dead.iloc[0]["step"] == 0
    assert dead.iloc[0]["link"] == f"?view=filters&run=base&metric=active_samples&layer={DEAD_LAYER}&filter={DEAD_FILTER}"


def test_health_view_first_nonfinite_and_ranking(recorded_runs, monkeypatch):
    app = open_app(recorded_runs, monkeypatch, view="health", run="diverged")
    findings = app.dataframe[0].value

    filters = read_table(recorded_runs / "diverged", "filters")
    metrics = [c for c in filters.columns if c not in ("step", "layer", "filter")]
    bad = filters[~np.isfinite(filters[metrics].to_numpy(dtype=float)).all(axis=1)]
    first = bad.sort_values(["step", "layer", "filter"]).iloc[0]
    top = findings.iloc[0]
    assert top["finding"] == "first NaN/Inf"
    assert (top["step"], top["layer"], top["filter"]) == (first["step"], first["layer"], first["filter"])
    assert list(findings["severity"]) == sorted(findings["severity"], reverse=True)


def test_health_finding_opens_its_view(recorded_runs, monkeypatch):
    app = open_app(recorded_runs, monkeypatch, view="health", run="base")
    findings = app.dataframe[0].value
    index = int(findings.index[findings["finding"] == "dead filter"][0])

    app.selectbox(key="finding_choice").set_value(index).run()
    app.button(key="open_finding").click().run()
    assert app.radio(key="view").value == "filters"
    assert app.selectbox(key="layer").value == DEAD_LAYER
    assert app.selectbox(key="filter").value == DEAD_FILTER


def test_nonfinite_cells_get_markers(recorded_runs, monkeypatch):
    app = open_app(recorded_runs, monkeypatch, view="layers", run="diverged", metric="weight_norm")
    data = figures(app)[0]["data"]

    filters = read_table(recorded_runs / "diverged", "filters")
    posinf = filters[np.isposinf(filters["weight_norm"])]
    expected = sorted(set(zip(posinf["step"], posinf["layer"])))
    marker = next(t for t in data if t.get("name") == "+Inf")
    assert sorted(zip(decode(marker["x"]).tolist(), decode(marker["y"]).tolist())) == expected
    assert marker["marker"]["symbol"] == "triangle-up"


# --- URL, live runs, bad files ----------------------------------------------------------------


def test_url_restores_selection(recorded_runs, monkeypatch):
    app = open_app(recorded_runs, monkeypatch, view="filters", run=["other", "base"], focus="base",
                   layer="3", metric="gain", filter="5", sort="final value")

    assert app.multiselect(key="runs").value == ["other", "base"]
    assert app.selectbox(key="focus_run").value == "base"
    assert app.selectbox(key="layer").value == "3"
    assert app.selectbox(key="filter").value == 5
    assert app.selectbox(key="sort").value == "final value"


def test_url_with_unknown_values_is_ignored(recorded_runs, monkeypatch):
    app = open_app(recorded_runs, monkeypatch, view="nope", run=["../../etc", "base"], metric="1; DROP TABLE x")

    assert app.radio(key="view").value == "runs"
    assert app.multiselect(key="runs").value == ["base"]
    app.radio(key="view").set_value("layers").run()
    assert app.selectbox(key="metric").value == "gain"


def test_live_run_refresh_keeps_selection(tmp_path, monkeypatch):
    torch.manual_seed(3)
    model = build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with Probe(model, run_dir=tmp_path / "live", flush_every_steps=1000) as probe:
        train_steps(probe, model, optimizer, 3, seed=3)
        probe.writer.flush()
        app = open_app(tmp_path, monkeypatch, view="layers", run="live", metric="sparsity", stat="max", refresh="2")
        assert len(decode(figures(app)[0]["data"][0]["x"])) == 3

        train_steps(probe, model, optimizer, 4, seed=4)
        probe.writer.flush()
        app.run()
        assert not app.exception
        assert len(decode(figures(app)[0]["data"][0]["x"])) == 7, "new parts show after a refresh"
        assert app.selectbox(key="metric").value == "sparsity"
        assert app.selectbox(key="statistic").value == "max"
        assert app.selectbox(key="refresh").value == 2


def test_bad_files_are_skipped_with_warning(recorded_runs, tmp_path, monkeypatch):
    shutil.copytree(recorded_runs / "base", tmp_path / "base")
    part_dir = tmp_path / "base" / "filters" / "rank=0"
    (part_dir / "part-000900.parquet").write_bytes(b"PAR1 not really parquet")
    (part_dir / "part-000901.parquet").write_bytes(b"")
    pq.write_table(pa.table({"a": [1, 2], "b": ["x", "y"]}), part_dir / "part-000902.parquet")
    (tmp_path / "notes").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "run.json").write_text("{half a file")

    app = open_app(tmp_path, monkeypatch, view="layers", run="base")
    assert "Skipped" in app.warning[0].value
    skipped = "\n".join(t.value for t in app.text)
    assert "part-000900.parquet" in skipped
    assert "part-000901.parquet" in skipped
    assert "part-000902.parquet: not a Deep Control part: missing columns step" in skipped
    assert "broken" in skipped
    heat = figures(app)[0]["data"][0]
    assert len(decode(heat["x"])) == STEPS, "every good part is still shown"


def test_empty_and_missing_runs_dir(tmp_path, monkeypatch):
    for root in (tmp_path, tmp_path / "missing"):
        app = open_app(root, monkeypatch)
        snippet = "\n".join(code.value for code in app.code)
        assert "from probe import Probe" in snippet
        assert "probe.step(" in snippet
        assert str(root.resolve()) in snippet


def test_html_in_run_name_is_text(recorded_runs, tmp_path, monkeypatch):
    name = "<img src=x onerror=alert(1)>"
    shutil.copytree(recorded_runs / "base", tmp_path / "evil")
    meta = json.loads((tmp_path / "evil" / "run.json").read_text())
    meta["name"] = name
    (tmp_path / "evil" / "run.json").write_text(json.dumps(meta))

    app = open_app(tmp_path, monkeypatch, view="layers", run=name)
    title = figures(app)[0]["layout"]["title"]["text"]
    assert "<img" not in title
    assert "&lt;img src=x onerror=alert(1)&gt;" in title
    assert not app.get("html"), "no raw HTML element may carry user data"


def test_scalars_wall_time_axis(recorded_runs, monkeypatch):
    app = open_app(recorded_runs, monkeypatch, view="scalars", run="base", scalar="loss", x="wall_time")
    trace = figures(app)[0]["data"][0]

    scalars = merged_scalars(recorded_runs / "base")
    expected = scalars["wall_time"] - scalars["wall_time"].min()
    np.testing.assert_allclose(decode(trace["x"]), expected.to_numpy(), rtol=1e-9, atol=1e-6)
    assert figures(app)[0]["layout"]["xaxis"]["title"]["text"].startswith("wall time")


def test_scalar_nan_and_inf_markers():
    from dashboard import charts

    frame = pd.DataFrame({"step": [0, 1, 2, 3], "elapsed_s": [0.0, 1.0, 2.0, 3.0],
                          "loss": [2.0, float("nan"), float("inf"), 1.0]})
    figure = charts.scalar_lines({"run": frame}, "loss", "step", 0.0, log_y=False)
    traces = {trace.name: trace for trace in figure.data}

    assert list(traces["run NaN"].x) == [1]
    assert list(traces["run +Inf"].x) == [2]
    assert "run -Inf" not in traces
    np.testing.assert_array_equal(traces["run"].y, [2.0, np.nan, np.nan, 1.0])


def test_part_cache_is_bounded_by_rows():
    from dashboard.summaries import PartCache

    cache = PartCache(max_rows=1_000)
    for i in range(50):
        cache.put((f"part-{i}", "basic"), pd.DataFrame({"x": np.arange(100)}))

    assert cache.rows <= 1_000
    assert len(cache) == 10
    assert cache.get(("part-0", "basic")) is None, "the oldest parts are evicted first"
    assert cache.get(("part-49", "basic")) is not None


def test_step_buckets_when_cells_exceed_limit(recorded_runs, monkeypatch):
    from dashboard import queries

    # 3 layers x 4 columns: 12 steps are merged into buckets of 3 steps.
    monkeypatch.setattr(queries, "MAX_CELLS", 12)
    app = open_app(recorded_runs, monkeypatch, view="layers", run="base", metric="out_rms")
    figure = figures(app)[0]
    heat = figure["data"][0]

    filters = read_table(recorded_runs / "base", "filters")
    filters["bucket"] = filters["step"] // 3 * 3
    expected = filters.groupby(["layer", "bucket"])["out_rms"].mean().unstack("bucket")
    assert decode(heat["x"]).tolist() == [0, 3, 6, 9]
    assert "(3 steps per column)" in figure["layout"]["title"]["text"]
    np.testing.assert_allclose(decode(heat["z"]), expected.loc[["0", "3", "7"]].to_numpy(), rtol=1e-5)

    # 6 filters x 2 columns in the Filters view: buckets of 6 steps.
    monkeypatch.setattr(queries, "MAX_CELLS", 12)
    app.radio(key="view").set_value("filters").run()
    app.selectbox(key="layer").set_value("3").run()
    heat = figures(app)[0]["data"][0]
    layer = filters[filters["layer"] == "3"].assign(bucket=lambda f: f["step"] // 6 * 6)
    expected = layer.groupby(["filter", "bucket"])["out_rms"].mean().unstack("bucket")
    assert decode(heat["x"]).tolist() == [0, 6]
    np.testing.assert_allclose(decode(heat["z"]), expected.to_numpy(), rtol=1e-5)


def test_runs_view_shows_interrupted(recorded_runs, tmp_path, monkeypatch):
    shutil.copytree(recorded_runs / "base", tmp_path / "stale")
    meta = json.loads((tmp_path / "stale" / "run.json").read_text())
    meta.update(status="running", heartbeat=meta["created"] - 3600)
    (tmp_path / "stale" / "run.json").write_text(json.dumps(meta))

    app = open_app(tmp_path, monkeypatch, view="runs")
    table = app.dataframe[0].value.set_index("name")
    assert table.loc["base", "status"] == "interrupted"


def test_ranks_are_pooled(tmp_path, monkeypatch):
    from probe import store
    from probe.writer import RunWriter

    layers = [{"name": "conv", "type": "Conv2d", "filters": 2, "depth": 0}]
    run_dir = store.create_run(tmp_path / "ddp", {"config": {}, "layers": layers, "world_size": 2})
    values = {0: [1.0, 2.0], 1: [4.0, 8.0]}
    for rank, gains in values.items():
        writer = RunWriter(run_dir, layers, rank=rank)
        for step in range(3):
            rows = np.zeros((2, 9), dtype=np.float32)
            rows[:, 0] = np.array(gains) * (step + 1)
            writer.add_filters(step, rows)
            writer.add_scalars({"step": step, "wall_time": float(step), "batch_size": 4, "samples_per_s": 1.0})
        writer.close()

    for statistic, expected in (("mean", 15 / 4), ("max", 8.0), ("min", 1.0)):
        app = open_app(tmp_path, monkeypatch, view="layers", run="ddp", metric="gain", stat=statistic)
        z = decode(figures(app)[0]["data"][0]["z"])
        np.testing.assert_allclose(z[0], [expected, 2 * expected, 3 * expected], err_msg=statistic)
