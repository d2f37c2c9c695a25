"""Headless Chromium (Debian's chromium + chromium-driver) driven by selenium, for the dashboard
tests. Skips with the reason when the browser is not installed (.ci/run installs it)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-dev-shm-usage", "--window-size=1400,1100")


@contextmanager
def chromium(profile_dir: Path) -> Iterator[object]:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not binary or not driver_path:
        missing = "chromium and chromium-driver (Debian packages) are not installed"
        if os.environ.get("CI"):  # .ci/run installs them: in CI their absence is a failure
            pytest.fail(missing)
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile_dir}")
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(check: Callable[[], bool], timeout_s: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # the element may not exist yet
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what or check}")


def page_text(driver: object, css: str) -> str:
    """The rendered text of the first element matching `css`, read in one script call (the
    page re-renders every refresh, so element handles go stale)."""
    value = driver.execute_script(  # type: ignore[attr-defined]
        "const e = document.querySelector(arguments[0]); return e ? e.innerText : null;", css)
    if value is None:
        raise LookupError(f"no element {css!r} on the page")
    return str(value).strip()
