"""Headless Chromium from Debian's packages, driven by Selenium through Debian's chromedriver.

Nothing is downloaded: the browser and driver paths are given, so Selenium Manager never runs. The
flags keep Chromium off the network (the machine has none) and every run starts from an empty
profile. Waits are explicit and bounded; a test never sleeps to synchronise with the page.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = os.environ.get("EGRESS_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("EGRESS_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")
WAIT = 20.0  # upper bound of any one wait for the page
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--no-proxy-server",
    "--window-size=1366,900",
)


def missing() -> str | None:
    """Why the browser cannot run here, or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if shutil.which(path) is None:
            return (
                f"{path} is missing (scripts/install-test-deps installs chromium, chromium-driver)"
            )
    return None


@contextmanager
def chromium(log: Path | None = None) -> Iterator[webdriver.Chrome]:
    profile = tempfile.mkdtemp(prefix="egress-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER, log_output=str(log) if log else os.devnull)
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.set_page_load_timeout(WAIT)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for[T](
    driver: webdriver.Chrome,
    condition: Callable[[webdriver.Chrome], T | bool],
    timeout: float = WAIT,
    message: str = "",
) -> T:
    """``condition`` until it returns something truthy; fails after ``timeout`` seconds."""
    found = WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition, message)
    return found  # type: ignore[return-value]
