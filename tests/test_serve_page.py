"""The chat page at /, in a real headless Chromium: send a message, watch it stream, stop one.

Needs Debian's ``chromium`` and ``chromium-driver`` (CI: ``apt-get install -y chromium
chromium-driver``) and selenium (in the ``test`` extra); skipped with the reason otherwise.
"""

from __future__ import annotations

import shutil
import time

import pytest
from serve_util import ServerThread
from tiny import make_tiny_model

from pocketlm.serve.app import create_app

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.fixture
def browser():
    if not CHROMIUM or not DRIVER:
        pytest.skip("needs chromium and chromedriver: apt-get install -y chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(fn, timeout=20.0, every=0.03):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out waiting in the browser")


def test_chat_page_streams_and_stops(browser):
    from selenium.webdriver.common.by import By

    tiny = make_tiny_model(seed=11)
    app = create_app({"tiny": tiny}, max_batch=2)
    sched = app.state.schedulers["tiny"]
    sched.on_step = lambda n, active: time.sleep(0.02)  # slow enough to watch it stream
    with ServerThread(app) as url:
        browser.get(url + "/")
        wait_for(lambda: browser.execute_script("return document.getElementById('model').value"))
        assert browser.execute_script("return document.getElementById('model').value") == "tiny"

        def field(name, value):
            el = browser.find_element(By.ID, name)
            el.clear()
            el.send_keys(value)

        field("temperature", "0")
        field("max_tokens", "40")
        browser.find_element(By.ID, "prompt").send_keys("Hello there")
        browser.find_element(By.ID, "send").click()
        reply_js = (
            "const m = document.querySelector('.msg.assistant:last-child');"
            "return m ? [m.dataset.state, m.firstChild ? m.firstChild.nodeValue : ''] : null"
        )
        lengths = set()

        def finished():
            state = browser.execute_script(reply_js)
            if state:
                lengths.add(len(state[1] or ""))
            return state if state and state[0] != "streaming" else None

        state, text = wait_for(finished)
        assert state == "length"
        expected = tiny.chat(
            [{"role": "user", "content": "Hello there"}], max_tokens=40, temperature=0
        )
        assert text == expected
        assert len(lengths) >= 3  # the reply grew piece by piece: it streamed

        # a long answer, stopped: the page says so and the server frees the row
        field("max_tokens", "250")
        browser.find_element(By.ID, "prompt").send_keys("Tell me more")
        browser.find_element(By.ID, "send").click()
        wait_for(lambda: sched.active == 1)
        steps_at_stop = sched.steps
        browser.find_element(By.ID, "stop").click()
        state, text = wait_for(finished)
        assert state == "stopped"
        wait_for(lambda: sched.active == 0, timeout=5)
        assert sched.steps - steps_at_stop < 60  # it did not run on to the end (~140 tokens)
        assert browser.find_element(By.ID, "send").is_enabled()
