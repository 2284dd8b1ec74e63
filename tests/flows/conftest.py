"""The browser the UI tests look through: Debian's headless Chromium driven by Selenium.

`browser` is a fresh headless Chromium (its own profile in tmp, 1600x1000) for one test:

    def test_page(browser):
        browser.get(url)
        WebDriverWait(browser, 30).until(...)
        screenshot(browser, "page")

It uses /usr/bin/chromium and /usr/bin/chromedriver only (Selenium Manager never downloads a
browser or a driver); without them the test is skipped, and `.ci/run` installs them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOTS_ENV = "LLM_FORGE_SCREENSHOTS"
# Headless, as root (no sandbox), in a container (small /dev/shm, no GPU), with no network beyond
# loopback: nothing that phones home (updates, sync, QUIC probes) or waits on a first-run dialog.
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1600,1000")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    """A headless Chromium WebDriver (selenium.webdriver.Chrome), quit after the test."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.skip(f"{' and '.join(missing)} missing: `.ci/run` installs Debian's chromium and chromium-driver "
                    "(apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.screenshot_dir = tmp_path / "screenshots"  # where `screenshot` writes unless the environment says
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: object, name: str) -> Path:
    """Save the page as `<name>.png` in $LLM_FORGE_SCREENSHOTS (else the test's tmp dir); prints
    and returns the path."""
    folder = Path(os.environ.get(SCREENSHOTS_ENV) or driver.screenshot_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    if not driver.save_screenshot(str(path)):
        raise OSError(f"could not save a screenshot to {path}")
    print(f"screenshot: {path}")
    return path


def wait_http(url: str, timeout: float, process: object = None) -> None:
    """Wait until `url` answers 200; fails the test on timeout, or at once when `process` (a Popen
    serving it) has exited."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if process is not None and process.poll() is not None:
            pytest.fail(f"the server for {url} exited with {process.returncode}")
        if time.monotonic() > deadline:
            pytest.fail(f"{url} did not answer within {timeout:.0f} s")
        time.sleep(0.3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(server: subprocess.Popen) -> None:
    """Stop a server started with `start_new_session=True`: its process group (its workers and
    children), that group only; TERM first, KILL if it does not go."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """`prefect server start` on a free loopback port with its own home (a fresh database), once per
    test session: {"api": its API URL, "ui": its UI's address, "env": an environment that talks to
    it}. Tests that use it make their own flows, deployments and blocks, under their own names."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api, "PREFECT_UI_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    with (home / "server.log").open("w") as log:
        server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                   "--port", str(port)], cwd=home, env=env, start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_http(f"{api}/health", 300, server)  # the first start migrates a fresh database
        yield {"api": api, "ui": f"http://127.0.0.1:{port}", "env": env, "log": home / "server.log"}
    finally:
        stop(server)
