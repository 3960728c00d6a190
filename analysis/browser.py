"""A headless Chromium for the live view's test, benchmark and README screenshot.

Selenium drives Debian's ``chromium`` through Debian's ``chromedriver`` (``apt-get install
chromium chromium-driver``; .ci/run does it). Selenium's own driver download is never used: the
build machines have no internet, and the system browser is the one an operator has.
"""

from __future__ import annotations

import shutil
from typing import Any

from agent.errors import MicrographyError

__all__ = ["BrowserMissing", "chromium_paths", "headless_chromium"]


class BrowserMissing(MicrographyError, RuntimeError):
    """No chromium and chromedriver on this machine."""


def chromium_paths() -> tuple[str, str]:
    """The system's chromium and chromedriver executables.

    Raises
    ------
    BrowserMissing
        If either is not on the PATH, with the command that installs them.
    """
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        raise BrowserMissing(
            "a headless browser is needed: apt-get install -y chromium chromium-driver (Debian)"
        )
    return browser, driver


def headless_chromium(width_px: int = 1500, height_px: int = 1300) -> Any:
    """Start a headless Chromium under Selenium (``driver.quit()`` ends it).

    Parameters
    ----------
    width_px, height_px : int
        Window size, CSS pixels (what a screenshot shows).

    Returns
    -------
    selenium.webdriver.Chrome
        The browser.
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root, where chromium's sandbox cannot start
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={width_px},{height_px}",
    ):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)
