"""End to end: `streamlit run` on 127.0.0.1, driven by a real headless Chromium through Selenium."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from test_dashboard import read_table, record_run

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                       reason="needs /usr/bin/chromium and /usr/bin/chromedriver"),
]


def free_port() -> int:
    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        return probe_socket.getsockname()[1]


def wait_until_healthy(port: int, server: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    url = f"http://127.0.0.1:{port}/_stcore/health"
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"streamlit exited early with code {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"streamlit did not answer on {url} within {timeout_s} s")


def start_browser(profile: Path, downloads: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--no-first-run", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--window-size=1600,1300"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def wait_for(driver, condition, timeout_s: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = condition(driver)
        if result:
            return result
        time.sleep(0.3)
    raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")


FIRST_TRACE_TYPES = (
    "return Array.from(document.querySelectorAll('.js-plotly-plot'))"
    ".map(p => (p.data && p.data.length) ? p.data[0].type : null)"
)


def first_trace_types(driver, count: int) -> list | None:
    """Return the first trace type of every Plotly chart once ``count`` charts have data."""
    types = driver.execute_script(FIRST_TRACE_TYPES)
    if len(types) >= count and all(types[:count]):
        return types
    return None


def test_compare_two_runs_in_chromium(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    runs = tmp_path / "runs"
    record_run(runs / "base", lr=0.05, steps=8, seed=0)
    record_run(runs / "other", lr=0.2, steps=8, seed=1)
    port = free_port()
    env = dict(os.environ, DEEPCONTROL_RUNS_DIR=str(runs))
    command = [sys.executable, "-m", "streamlit", "run", str(REPO / "dashboard" / "app.py"),
               "--server.address", "127.0.0.1", "--server.port", str(port), "--server.headless", "true"]
    log = open(tmp_path / "streamlit.log", "w")
    server = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    driver = None
    try:
        wait_until_healthy(port, server)
        downloads = tmp_path / "downloads"
        downloads.mkdir()
        driver = start_browser(tmp_path / "profile", downloads)
        driver.get(f"http://127.0.0.1:{port}/")

        # The newest run ("other") is picked by default; add "base" through the multiselect.
        box = wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, '[data-testid="stMultiSelect"] input'), what="run picker")[0]
        box.click()
        box.send_keys("base")
        box.send_keys(Keys.ENTER)
        wait_for(driver, lambda d: "run=base" in d.current_url, what="run=base in the URL")

        radio = wait_for(driver, lambda d: [e for e in d.find_elements(By.CSS_SELECTOR, '[data-testid="stRadio"] label') if e.text == "Compare"], what="Compare view")
        radio[0].click()
        wait_for(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")) >= 3, what="three Plotly charts")
        trace_types = wait_for(driver, lambda d: first_trace_types(d, 3), what="heatmap data in three charts")
        assert trace_types[:3] == ["heatmap", "heatmap", "heatmap"]
        assert driver.find_elements(By.CSS_SELECTOR, ".js-plotly-plot .heatmaplayer"), "heatmaps are drawn"
        assert "view=compare" in driver.current_url
        assert "run=other" in driver.current_url
        assert "run=base" in driver.current_url

        time.sleep(1.0)  # let Plotly finish drawing before the screenshot
        screenshot = tmp_path / "compare.png"
        assert driver.save_screenshot(str(screenshot))
        assert screenshot.stat().st_size > 20_000
        keep = os.environ.get("DEEPCONTROL_SCREENSHOT_DIR")
        if keep:
            shutil.copy(screenshot, Path(keep) / "compare.png")

        # The first Download CSV button exports run A's heatmap cells: 3 layers x 8 steps.
        driver.find_elements(By.CSS_SELECTOR, '[data-testid="stDownloadButton"] button')[0].click()
        exported = wait_for(driver, lambda d: list(downloads.glob("*.csv")), what="the CSV download")[0]
        cells = pd.read_csv(exported, dtype={"layer": str})
        assert sorted(cells["layer"].unique()) == ["0", "3", "7"]
        assert len(cells) == 3 * 8
        assert {"bucket_start", "value", "n_nan", "n_posinf", "n_neginf"} <= set(cells.columns)
        expected = read_table(runs / "other", "filters").groupby(["layer", "step"])["gain"].mean()
        exported_values = cells.set_index(["layer", "bucket_start"])["value"].sort_index()
        np.testing.assert_allclose(exported_values.to_numpy(), expected.sort_index().to_numpy(), rtol=1e-5)
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
