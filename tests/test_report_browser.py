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
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

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


def test_cards_tell_the_truth_about_stopped_failed_and_low_units(tmp_path, browser):
    from test_report import CONV4_INTERP, _unit

    from dnd.config import RunConfig, save_config
    from dnd.record import UnitRecord
    from dnd.store import RunStore

    run = make_run(tmp_path)
    store = RunStore(run)
    for unit, score in enumerate(CONV4_INTERP, 3):  # conv4's unit 25 becomes unit 28
        _unit(store, unit, interpretability=score)
    store.write_unit(UnitRecord("fc", 2, stage="captions", failed_at="candidates",
                                error="candidates: 503 " + "retrying " * 120))
    long_name = "n01440764_" + "x" * 70 + ".JPEG"  # no space to break at
    top = [{"index": i, "image": f"{long_name}{i}", "box": None, "activation": 1.0}
           for i in range(3)]
    _unit(store, 40, top_images=top, activating_images=top)
    # Unit 41 is where `--stop-after crops` leaves a unit.
    store.write_unit(UnitRecord.from_json({"layer": "fc", "unit": 41, "stage": "crops",
                                           "top_images": top[:1], "crops": [],
                                           "activating_images": top[:1]}))
    save_config(RunConfig(model="tiny", layer="fc", probe=[str(tmp_path / "probe")],
                          summarizer="consensus", stop_after="crops"), run / "config.yaml")
    browser.get(build_report(run).as_uri())
    wait = WebDriverWait(browser, 10)
    wait.until(lambda d: len(_cards(d)) == 37)
    by_unit = {int(c.get_attribute("data-unit")): c for c in _cards(browser)}
    stopped = by_unit[41].text
    assert "no label yet: stopped after crops" in stopped
    assert "(no label)" not in stopped and "score" not in stopped
    assert "stopped after the crops stage" in browser.find_element(By.ID, "stopped").text
    failed = by_unit[2].text
    assert "failed at candidates" in failed and "full error on the unit page" in failed
    assert len(failed) < 250 and failed.count("retrying") < 20
    assert "low interpretability" in by_unit[28].text  # conv4's unit 25
    assert "low" in by_unit[28].get_attribute("class")
    assert "low interpretability" not in by_unit[4].text

    browser.find_element(By.ID, "lowonly").click()
    wait.until(lambda d: len(_cards(d)) == 2)
    assert {int(c.get_attribute("data-unit")) for c in _cards(browser)} == {3, 28}
    browser.find_element(By.ID, "lowonly").click()
    Select(browser.find_element(By.ID, "sort")).select_by_value("interp_low")
    wait.until(lambda d: _cards(d)[0].get_attribute("data-unit") == "28")
    assert _cards(browser)[-1].get_attribute("data-unit") in {"2", "41"}  # no score: last

    # Long image names wrap inside their figure instead of running under the next one.
    browser.get((run / "report" / "units" / "fc" / "40.html").as_uri())
    figures = browser.find_elements(By.CSS_SELECTOR, "figure")
    assert len(figures) >= 3
    for fig in figures:
        overflow = browser.execute_script(
            "var f=arguments[0].getBoundingClientRect(),w=f.right;"
            "return Array.from(arguments[0].querySelectorAll('div')).map(function(e){"
            "return e.scrollWidth>e.clientWidth||e.getBoundingClientRect().right>w+1;});",
            fig)
        assert not any(overflow), fig.text
