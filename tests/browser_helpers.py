"""Headless Chromium for the page tests (the playground, the HTML report), driven by selenium.

Uses Debian's ``chromium`` + ``chromium-driver`` (``apt-get install chromium chromium-driver``; .ci/run
installs them when it runs as root). Tests that need the browser skip when either is missing.
Screenshots go to ``test-artifacts/`` (or ``$AETHERIS_TEST_ARTIFACTS``); with
``AETHERIS_DOCS_SCREENSHOTS=1`` they are also written to ``docs/images/`` -- that is how the
screenshots in the docs are made.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import ROOT
# A fresh profile and no background traffic: the tests must not depend on (or reach) the network.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,900"]


def _binary(*names: str) -> str | None:
    return next((path for name in names if (path := shutil.which(name))), None)


def browser_or_skip() -> tuple[str, str]:
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[test]')")
    chromium = _binary("chromium", "chromium-browser", "google-chrome")
    driver = _binary("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("headless Chromium not found: apt-get install chromium chromium-driver")
    return chromium, driver


@contextmanager
def chromium():
    """A selenium WebDriver on headless Chromium with a throwaway profile; browser console kept."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = browser_or_skip()
    with tempfile.TemporaryDirectory(prefix="aetheris-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = binary  # with both paths given, selenium-manager (network) is never run
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={profile}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
        driver.set_page_load_timeout(60)
        try:
            yield driver
        finally:
            driver.quit()


def console_errors(driver) -> list[str]:
    """Browser console messages of level SEVERE since the last call (selenium drains the log)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def save_screenshot(driver, name: str, full_page: bool = False) -> Path:
    """A PNG of the current page in the test artifacts (and docs/images/ when asked); ``full_page``
    grows the window to the document's height first (capped, so a huge page stays a sane image)."""
    if full_page:
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1280, min(int(height) + 100, 6000))
    folder = Path(os.environ.get("AETHERIS_TEST_ARTIFACTS", ROOT / "test-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    assert driver.save_screenshot(str(path)), f"could not write {path}"
    if os.environ.get("AETHERIS_DOCS_SCREENSHOTS") == "1":
        docs = ROOT / "docs" / "images"
        docs.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, docs / f"{name}.png")
    return path
