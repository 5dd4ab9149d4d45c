"""demo in a real browser: `smsanet-jax demo` as a user starts it, driven in headless Chromium.

Uploads a photo, places two hints of two colours by clicking, and checks that the colorization
changed near them more than far away; downloads the PNG and the hints, replays the hints through
`smsanet-jax colorize` to the same PNG, and loads them back into the page. Skipped (with the reason)
where Chromium, its driver or selenium is missing: `apt-get install chromium chromium-driver`.

SMSANET_DEMO_SCREENSHOT=docs/demo.png also saves a screenshot of the page (the one in the docs).
"""

import base64
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import skimage.data
from PIL import Image
from skimage import color

from smsanet_jax import hints
from tests import tiny_checkpoint

pytestmark = pytest.mark.slow

BIN = os.path.dirname(sys.executable)
CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
START_TIMEOUT_S = 180  # Loading the model and compiling it.
UPDATE_TIMEOUT_S = 60
# Two hints: (x, y) in the photo's pixels, and the picked sRGB colour.
HINTS = (((110, 90), "#1e50ff"), ((340, 210), "#10c020"))


def _browser_paths() -> tuple[str, str]:
    """(chromium, chromedriver), or skips the module saying what is missing."""
    try:
        import selenium  # noqa: F401
    except ModuleNotFoundError:
        pytest.skip("selenium is not installed (pip install selenium, or the test extra)")
    browser = next((p for p in map(shutil.which, CHROMIUM) if p), None)
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        missing = " and ".join(n for n, p in (("chromium", browser), ("chromedriver", driver)) if not p)
        pytest.skip(f"{missing} not found: apt-get install chromium chromium-driver")
    return browser, driver


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tiny_checkpoint.trained_workdir(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def server(workdir):
    """The page's URL, with `smsanet-jax demo` running on a free port (--port 0) behind it."""
    process = subprocess.Popen(
        [os.path.join(BIN, "smsanet-jax"), "demo", "--workdir", workdir, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines, found = [], threading.Event()
    url = []

    def read():
        for line in process.stdout:
            lines.append(line)
            match = re.search(r"open (http://\S+) in a browser", line)
            if match:
                url.append(match.group(1))
                found.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not found.wait(START_TIMEOUT_S):
            pytest.fail(f"smsanet-jax demo did not print its URL in {START_TIMEOUT_S} s:\n{''.join(lines)}")
        yield url[0]
    finally:
        process.terminate()
        process.wait(30)
    # uvicorn shuts down on SIGTERM, then lets the signal end the process as it would have.
    assert process.returncode in (0, -signal.SIGTERM), "".join(lines)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, chromedriver = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",  # Chromium refuses to start as root without it.
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,720",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    try:
        driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    except Exception as e:  # pylint: disable=broad-except
        pytest.skip(f"Chromium did not start ({type(e).__name__}: {str(e).splitlines()[0]})")
    driver.downloads = downloads
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """skimage's chelsea, 451x300, as a JPEG."""
    path = tmp_path_factory.mktemp("photo") / "chelsea.jpg"
    Image.fromarray(skimage.data.chelsea()).save(path, quality=92)
    return path


def wait_until_updated(driver) -> None:
    """Waits until the image shown was made with the page's current hints and nothing is pending."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, UPDATE_TIMEOUT_S).until(
        lambda d: d.execute_script(
            "return document.getElementById('status').dataset.state === 'ready'"
            " && document.getElementById('result').dataset.hints === JSON.stringify(hintsJson())"
        )
    )


def shown_image(driver) -> np.ndarray:
    """The PNG the page shows, read back from its blob URL."""
    encoded = driver.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        fetch(document.getElementById('result').src).then((r) => r.arrayBuffer()).then((buffer) => {
          let text = '';
          for (const byte of new Uint8Array(buffer)) text += String.fromCharCode(byte);
          done(btoa(text));
        }).catch((error) => done('failed: ' + error));
        """
    )
    assert not encoded.startswith("failed"), encoded
    return base64.b64decode(encoded)


def decode_png(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)).convert("RGB"))


def click_photo(driver, x: int, y: int, width: int, height: int) -> None:
    """Clicks the gray input at pixel (x, y) of the photo (Selenium offsets are from the centre)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    image = driver.find_element(By.ID, "gray")
    shown = image.size
    dx = (x + 0.5) / width * shown["width"] - shown["width"] / 2
    dy = (y + 0.5) / height * shown["height"] - shown["height"] / 2
    ActionChains(driver).move_to_element_with_offset(image, round(dx), round(dy)).click().perform()


def pick_colour(driver, value: str) -> None:
    """What choosing a colour in the picker does (the native dialog cannot be driven headless)."""
    driver.execute_script(
        "const c = document.getElementById('color'); c.value = arguments[0]; c.dispatchEvent(new Event('input'))",
        value,
    )


def wait_for_download(folder, name: str, timeout: float = 30):
    path = folder / name
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and not list(folder.glob("*.crdownload")):
            return path
        time.sleep(0.1)
    raise AssertionError(f"{name} was not downloaded; the folder has {sorted(os.listdir(folder))}")


def test_hints_by_clicking_downloads_and_replay(browser, server, photo, workdir, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    width, height = Image.open(photo).size
    browser.get(server)
    browser.find_element(By.ID, "file").send_keys(str(photo))
    wait_until_updated(browser)
    plain_png = shown_image(browser)
    plain = decode_png(plain_png)
    assert plain.shape == (height, width, 3)

    # Click a hint, then pick its colour (the new hint is the selected one); twice.
    for (x, y), value in HINTS:
        click_photo(browser, x, y, width, height)
        pick_colour(browser, value)
    wait_until_updated(browser)
    placed = browser.execute_script("return hintsJson()")
    for point, ((x, y), _) in zip(placed, HINTS, strict=True):  # Within rounding of CSS pixels.
        assert abs(point["x"] - x) <= 2 and abs(point["y"] - y) <= 2, (point, x, y)
    for point, (_, value) in zip(placed, HINTS):
        rgb = np.array([int(value[i : i + 2], 16) for i in (1, 3, 5)]) / 255
        np.testing.assert_allclose([point["a"], point["b"]], color.rgb2lab(rgb[None])[0, 1:], atol=0.006)

    hinted_png = shown_image(browser)
    change = np.linalg.norm(color.rgb2lab(decode_png(hinted_png))[..., 1:] - color.rgb2lab(plain)[..., 1:], axis=-1)
    rows, cols = np.mgrid[:height, :width]
    distance = np.min([np.hypot(cols - p["x"], rows - p["y"]) for p in placed], axis=0)
    near, far = change[distance < 6].mean(), change[distance > 120].mean()
    assert near > 3.0 and near > 5 * far, (near, far)

    screenshot = os.environ.get("SMSANET_DEMO_SCREENSHOT")
    if screenshot:
        browser.execute_script(
            "const s = document.getElementById('split'); s.value = 35; s.dispatchEvent(new Event('input'))"
        )
        browser.save_screenshot(screenshot)

    # Downloads: the PNG `colorize` writes for the hints shown, and the hints it reads.
    browser.find_element(By.ID, "download-png").click()
    browser.find_element(By.ID, "download-hints").click()
    png = wait_for_download(browser.downloads, "chelsea.png")
    hints_file = wait_for_download(browser.downloads, "chelsea.hints.json")
    assert np.array_equal(decode_png(png.read_bytes()), decode_png(hinted_png))  # The picture shown.
    assert Image.open(png).size == (width, height)
    loaded = hints.load_hints(str(hints_file))
    assert [(h.x, h.y, h.a, h.b) for h in loaded[None]] == [(p["x"], p["y"], p["a"], p["b"]) for p in placed]
    replay = subprocess.run(
        [os.path.join(BIN, "smsanet-jax"), "colorize", str(photo), "--workdir", workdir]
        + ["--hints", str(hints_file), "--out", str(tmp_path / "replay")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert replay.returncode == 0, replay.stderr
    replayed = (tmp_path / "replay" / "chelsea.png").read_bytes()
    assert replayed == png.read_bytes()  # The very file colorize writes.

    # Loading the hints back gives the same picture.
    browser.find_element(By.ID, "clear").click()
    wait_until_updated(browser)
    assert shown_image(browser) == plain_png
    browser.find_element(By.ID, "load-hints").send_keys(str(hints_file))
    WebDriverWait(browser, UPDATE_TIMEOUT_S).until(lambda d: d.execute_script("return hintsJson().length === 2"))
    wait_until_updated(browser)
    assert browser.execute_script("return hintsJson()") == json.loads(hints_file.read_text())
    assert shown_image(browser) == hinted_png


def test_a_bad_file_shows_an_error_and_the_server_goes_on(browser, server, photo, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server)
    text = tmp_path / "notes.jpg"
    text.write_text("not an image\n")
    browser.find_element(By.ID, "file").send_keys(str(text))
    error = browser.find_element(By.ID, "error")
    WebDriverWait(browser, UPDATE_TIMEOUT_S).until(lambda d: error.is_displayed())
    assert "not an image" in error.text
    browser.find_element(By.ID, "file").send_keys(str(photo))
    wait_until_updated(browser)
    assert not error.is_displayed()


def test_dragging_moves_a_hint_and_delete_removes_it(browser, server, photo):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    width, height = Image.open(photo).size
    browser.get(server)
    browser.find_element(By.ID, "file").send_keys(str(photo))
    wait_until_updated(browser)
    plain_png = shown_image(browser)
    click_photo(browser, 100, 100, width, height)
    wait_until_updated(browser)
    marker = browser.find_element(By.CSS_SELECTOR, "#markers .marker")
    scale = width / browser.find_element(By.ID, "gray").size["width"]  # Photo pixels per CSS pixel.
    ActionChains(browser).click_and_hold(marker).move_by_offset(40, 0).move_by_offset(40, 30).release().perform()
    wait_until_updated(browser)
    (moved,) = browser.execute_script("return hintsJson()")
    assert abs(moved["x"] - (100 + 80 * scale)) <= 3 and abs(moved["y"] - (100 + 30 * scale)) <= 3, moved
    browser.find_element(By.ID, "delete").click()
    wait_until_updated(browser)
    assert browser.execute_script("return hintsJson()") == []
    assert shown_image(browser) == plain_png
