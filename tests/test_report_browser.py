"""`dnd report` in headless Chromium: the index lists and filters units, a unit page shows
its label, images and candidate scores. Skips when Chromium, chromedriver or selenium is
missing (Debian: apt-get install chromium chromium-driver; pip install selenium)."""

from __future__ import annotations

import shutil

import pytest
from test_report import XSS, make_run

from dnd.report import build_report

webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed (pip install selenium)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="headless browser test needs chromium and chromedriver on PATH "
           "(Debian: apt-get install -y chromium chromium-driver)")


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--window-size=1280,1000",
                 "--disable-dev-shm-usage"):  # small /dev/shm in containers crashes tabs
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def _cards(driver):
    return driver.find_elements(By.CSS_SELECTOR, "#grid .card")


def test_browse_index_search_and_unit_page(tmp_path, browser):
    run = make_run(tmp_path)
    index = build_report(run)
    browser.get(index.as_uri())
    wait = WebDriverWait(browser, 10)
    wait.until(lambda d: len(_cards(d)) == 3)
    labels = [c.find_element(By.CSS_SELECTOR, "h3").text for c in _cards(browser)]
    assert labels[:2] == ["red circle", XSS]  # a script label shows as text, never runs
    assert browser.find_element(By.ID, "count").text == "3 of 3 units"

    browser.find_element(By.ID, "q").send_keys("circle")
    wait.until(lambda d: len(_cards(d)) == 1)
    assert _cards(browser)[0].find_element(By.CSS_SELECTOR, "h3").text == "red circle"
    thumbs = _cards(browser)[0].find_elements(By.CSS_SELECTOR, ".thumbs img")
    assert thumbs and all(t.get_attribute("loading") == "lazy" for t in thumbs)

    _cards(browser)[0].click()
    wait.until(lambda d: d.current_url.endswith("/units/fc/0.html"))
    assert browser.find_element(By.ID, "label").text == "red circle"
    table = browser.find_element(By.ID, "candidates")
    assert table.is_displayed() and "final score" in table.text
    assert browser.find_element(By.ID, "why").text.startswith("\u201cred circle\u201d won")
    for img in browser.find_elements(By.CSS_SELECTOR, "main img")[:6]:
        browser.execute_script("arguments[0].scrollIntoView()", img)
        wait.until(lambda d, i=img: d.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth > 0", i))
    assert browser.find_elements(By.CSS_SELECTOR, ".boxed svg rect")  # the crop box
    shot = tmp_path / "unit_page.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 0

    browser.get((run / "report" / "units" / "fc" / "1.html").as_uri())
    assert browser.find_element(By.ID, "label").text == XSS
