"""The front door's pages in a real headless Chromium (Debian's chromium, driven through its chromedriver by
selenium): the chat page at / streams the API's greedy answer and shows a refused key, a draining server and
a stopped server; /docs renders the API description and its "Try it out" on /generate answers 200."""

import json
import os
import shutil
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ready
from selenium.webdriver.support.ui import WebDriverWait

from jaiserve.drain import DRAINING
from jaiserve.openai_api import error_body
from ts_launcher import running_front_door

pytestmark = pytest.mark.e2e

QUESTION = "판교에서 백엔드 개발자 채용하는 곳 알려줘"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,2000"]


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium with a fresh profile; always quit."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_binary = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if binary is None or not os.path.exists(driver_binary):
        message = "chromium/chromedriver not installed (apt-get install chromium chromium-driver; `make test` does)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    profile = tempfile.mkdtemp(prefix="jai-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_binary))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait(driver, seconds=120):
    return WebDriverWait(driver, seconds, poll_frequency=0.1)


def open_chat(driver, url, key, temperature="0", max_tokens="24"):
    driver.get(url + "/")
    driver.execute_script("localStorage.clear()")
    for field, value in (("key", key), ("temperature", temperature), ("max-tokens", max_tokens)):
        element = driver.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)


def ask(driver, question):
    driver.find_element(By.ID, "question").send_keys(question)
    driver.find_element(By.ID, "send").click()


def error_shown(driver) -> str:
    wait(driver, 60).until(ready.visibility_of_element_located((By.ID, "error")))
    return driver.find_element(By.ID, "error").text


def test_the_chat_page_streams_the_greedy_answer_of_the_api(browser, front_door, ts_server):
    expected = requests.post(f"{front_door}/v1/chat/completions", headers=ts_server.headers(), timeout=120, json={
        "model": "jai", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 24, "temperature": 0,
    }).json()
    open_chat(browser, front_door, ts_server.key())
    assert browser.title == "JAI 채팅"
    ask(browser, QUESTION)
    meta = wait(browser).until(ready.presence_of_element_located((By.CSS_SELECTOR, ".assistant .meta[data-finish]")))
    answer = browser.find_element(By.CSS_SELECTOR, ".assistant .text").get_attribute("textContent")
    assert answer == expected["choices"][0]["message"]["content"] and answer.strip()
    assert meta.get_attribute("data-finish") == expected["choices"][0]["finish_reason"]
    assert meta.get_attribute("data-tokens") == str(expected["usage"]["completion_tokens"])
    assert "tokens/s" in meta.text and f"finish: {expected['choices'][0]['finish_reason']}" in meta.text
    assert browser.execute_script("return localStorage.getItem('jai.inferenceKey')") == ts_server.key()
    assert not browser.find_element(By.ID, "error").is_displayed()
    # a wrong key: the page says the key was refused
    open_chat(browser, front_door, "not-the-key")
    ask(browser, QUESTION)
    assert "401" in error_shown(browser)
    assert not browser.find_elements(By.CSS_SELECTOR, ".assistant")


class Draining(BaseHTTPRequestHandler):
    """Stands in for a draining torchserve: every request gets the handler's own 503 (jaiserve.openai_api)."""

    def do_POST(self):
        body = json.dumps(error_body(503, DRAINING, None, "draining")).encode()
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_the_chat_page_shows_a_draining_and_a_stopped_server(browser, tmp_path):
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Draining)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    try:
        with running_front_door(tmp_path, f"127.0.0.1:{upstream.server_address[1]}") as url:
            open_chat(browser, url, "some-key")
            ask(browser, QUESTION)
            assert "503 Draining" in error_shown(browser)
            upstream.shutdown()
            upstream.server_close()  # torchserve stopped, nginx still up: 502
            ask(browser, QUESTION)
            wait(browser, 60).until(lambda d: "502" in d.find_element(By.ID, "error").text)
        ask(browser, QUESTION)  # nothing listens any more: the page is still open
        wait(browser, 60).until(lambda d: "연결할 수 없습니다" in d.find_element(By.ID, "error").text)
    finally:
        upstream.server_close()


def test_docs_render_and_try_it_out_on_generate_answers_200(browser, front_door, ts_server):
    browser.get(front_door + "/docs")
    driver = wait(browser, 60)
    driver.until(ready.presence_of_element_located((By.ID, "operations-seed-generate")))
    assert "JAI Serve API" in browser.find_element(By.CSS_SELECTOR, ".info .title").text
    browser.find_element(By.CSS_SELECTOR, "button.authorize").click()
    key = driver.until(ready.presence_of_element_located((By.CSS_SELECTOR, ".auth-container input")))
    key.send_keys(ts_server.key())
    browser.find_element(By.CSS_SELECTOR, ".auth-btn-wrapper button.authorize").click()
    browser.find_element(By.CSS_SELECTOR, "button.btn-done").click()
    operation = browser.find_element(By.ID, "operations-seed-generate")
    operation.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    driver.until(lambda d: operation.find_elements(By.CSS_SELECTOR, "button.try-out__btn"))[0].click()
    body = operation.find_element(By.CSS_SELECTOR, "textarea.body-param__text")
    body.clear()
    body.send_keys(json.dumps({"prompt": "서울 프론트엔드", "max_tokens": 8, "temperature": 0}, ensure_ascii=False))
    operation.find_element(By.CSS_SELECTOR, "button.execute").click()
    status = driver.until(lambda d: operation.find_elements(By.CSS_SELECTOR,
                                                            ".live-responses-table tbody .response-col_status"))
    assert status[0].text.strip() == "200"
    shown = operation.find_element(By.CSS_SELECTOR, ".live-responses-table tbody .microlight").text
    assert json.loads(shown)["full_text"].startswith("서울 프론트엔드")
    # ReDoc renders the same description
    browser.get(front_door + "/redoc")
    wait(browser, 60).until(lambda d: "JAI Serve API" in d.find_element(By.TAG_NAME, "body").text)
    assert "/v1/chat/completions" in browser.page_source  # rendered: the page itself names only /openapi.yaml
