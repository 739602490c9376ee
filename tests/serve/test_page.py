"""The page at ``/`` in a real headless Chromium: what it shows, the live figures, a prompt that streams a completion.

Static checks read the DOM Chromium builds (``--dump-dom``); the interactive part drives the page through Selenium
and chromedriver. Both skip when the binaries (or Selenium) are missing. All traffic goes to the server on 127.0.0.1.
Set STRATAPRUNE_PAGE_SCREENSHOT=docs/serve-page.png to refresh the screenshot in the docs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from serving import ServerProcess

pytestmark = pytest.mark.slow

# Without these, Chromium on a machine with no network waits on connections it tries to open (sync, updates, QUIC).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)
SPARSITY_TARGET = 0.5
REALISED_SPARSITY = 0.4987


def _binary(*names: str) -> str | None:
    return next((found for found in map(shutil.which, names) if found), None)


CHROMIUM = _binary("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMEDRIVER = _binary("chromedriver")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (apt-get install chromium)")


@pytest.fixture(scope="module")
def page_server(served_dir, tmp_path_factory) -> Iterator[ServerProcess]:
    """The tiny model, with the report.json a pruned run writes (so the page has a sparsity to show)."""
    folder = tmp_path_factory.mktemp("page") / "tiny-sparse"
    shutil.copytree(served_dir, folder)
    report = {"sparsity": {"target": SPARSITY_TARGET, "realised_prunable": REALISED_SPARSITY}}
    (folder / "report.json").write_text(json.dumps(report))
    server = ServerProcess(folder)
    yield server
    server.kill()


def _facts(cells: list[str]) -> dict[str, str]:
    return dict(zip(cells[0::2], cells[1::2]))


@needs_chromium
def test_the_page_as_chromium_renders_it(page_server, tmp_path):
    assert CHROMIUM is not None
    command = [
        CHROMIUM,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",  # let the page's first /health poll land before the DOM is dumped
        "--dump-dom",
        page_server.url + "/",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    from html.parser import HTMLParser

    class Tables(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.table: str | None = None
            self.cells: dict[str, list[str]] = {}
            self.title = ""
            self.in_title = False

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            if tag == "table":
                self.table = dict(attrs).get("id") or ""
                self.cells[self.table] = []
            elif tag == "td" and self.table is not None:
                self.cells[self.table].append("")
            self.in_title = tag == "title"

        def handle_endtag(self, tag: str) -> None:
            if tag == "table":
                self.table = None
            self.in_title = False

        def handle_data(self, data: str) -> None:
            if self.in_title:
                self.title += data
            elif self.table is not None and self.cells[self.table]:
                self.cells[self.table][-1] += data

    tables = Tables()
    tables.feed(done.stdout)
    model_id = "tiny-sparse"
    assert tables.title == f"strataprune serve: {model_id}"
    facts = _facts(tables.cells["facts"])
    assert facts["model"] == model_id and facts["backend"] == "torch" and facts["status"] == "ok"
    assert facts["sparsity target"] == str(SPARSITY_TARGET) and facts["realised sparsity"] == str(REALISED_SPARSITY)
    assert int(facts["context length"]) == 256
    live = _facts(tables.cells["live"])  # filled by the page's script from /health
    assert live.get("status") == "ok", done.stdout[-3000:]
    assert live.keys() >= {"running", "waiting", "kv_cache_bytes"}


@pytest.fixture
def browser(tmp_path, monkeypatch) -> Iterator[Any]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("no chromium or chromedriver binary on PATH (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="the interactive page test needs selenium (the test extra)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,700"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    monkeypatch.setenv("SE_OFFLINE", "true")  # both paths are given: Selenium Manager must not look anything up
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(condition: Any, seconds: float, what: str) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


def test_a_prompt_streams_into_the_page(browser, page_server, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(page_server.url + "/")
    assert "tiny-sparse" in browser.find_element(By.ID, "facts").text
    _wait(lambda: "kv_cache_bytes" in browser.find_element(By.ID, "live").text, 30, "the live figures")

    prompt, max_tokens = "Once upon a time", 24
    box = browser.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(prompt)
    tokens = browser.find_element(By.ID, "max")
    tokens.clear()
    tokens.send_keys(str(max_tokens))
    browser.find_element(By.ID, "go").click()

    status = _wait(lambda: "tokens, first after" in (t := browser.find_element(By.ID, "stat").text) and t, 60, "the stream")
    streamed = browser.execute_script("return document.getElementById('out').textContent")
    # the page's temperature is 0 (greedy): the streamed text must be the text the API gives in one piece
    whole = httpx.post(
        page_server.url + "/v1/completions",
        json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
        timeout=60,
    ).json()
    expected = whole["choices"][0]["text"]
    assert streamed == expected and streamed, (streamed, expected)
    assert status.startswith(f"{whole['usage']['completion_tokens']} tokens"), status
    _wait(lambda: "running 0" in browser.find_element(By.ID, "live").text, 10, "the live figures to show the request done")

    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors

    # the whole page, 1000 px wide, from the top (clicking the button scrolled it)
    height = min(1200, int(browser.execute_script("return document.documentElement.scrollHeight")))
    metrics = {"width": 1000, "height": height, "deviceScaleFactor": 1, "mobile": False}
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    browser.execute_script("window.scrollTo(0, 0)")
    shot = tmp_path / "serve-page.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("STRATAPRUNE_PAGE_SCREENSHOT"):
        shutil.copyfile(shot, Path(os.environ["STRATAPRUNE_PAGE_SCREENSHOT"]))
