"""`shardwise serve`: the planner page on a real server (uvicorn on 127.0.0.1), its API, and the
page itself in headless Chromium (the distribution's package, driven by Playwright): load, change
inputs, read the plan, download an export, see a bad field's one-line error while the server
keeps serving. Without Chromium the browser tests skip, except in CI (CI=true), where they fail."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from _export import framework

uvicorn = framework("uvicorn")
framework("starlette")
from shardwise.serve.app import make_app  # noqa: E402  (after the check that starlette is there)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(make_app(), host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    t.join(10)


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_plan_api_answers_as_the_command_line(server):
    status, _, body = get(server + "/api/plan?model=llama-3.1-8b&gpus=16&zero=1")
    d = json.loads(body)
    assert status == 200 and d["recommended"]["plan"]["zero"] == 1 and d["cluster"]["gpus"] == 16


def test_compile_goes_through_to_the_plan(server):
    d = json.loads(get(server + "/api/plan?model=llama-3.1-8b&gpus=16&compile=1")[2])
    assert d["recommended"]["plan"]["compile"] is True
    assert (
        json.loads(get(server + "/api/plan?model=llama-3.1-8b&gpus=16")[2])["recommended"]["plan"]["compile"] is False
    )


@pytest.mark.parametrize(
    "query, words",
    [
        ("gpus=abc", "argument --gpus: invalid int value: 'abc'"),
        ("gpus=16&tp=3", "tp=3 must divide the attention heads"),
        ("config=%7Bnot", "the pasted config.json is not valid JSON"),
        ("model=nope", "nope"),
    ],
)
def test_a_bad_field_is_its_one_line_error_and_the_server_keeps_serving(server, query, words):
    status, _, body = get(server + "/api/plan?" + query)
    err = json.loads(body)["error"]
    assert status == 400 and words in err and "\n" not in err and "Traceback" not in err
    assert get(server + "/api/plan?gpus=8")[0] == 200


def test_export_is_a_download_named_as_the_framework_names_it(server):
    status, headers, body = get(server + "/api/export/deepspeed?gpus=16&zero=2&mbs=1")
    assert status == 200 and headers["content-disposition"] == 'attachment; filename="ds_config.json"'
    d = json.loads(body)
    assert d["zero_optimization"]["stage"] == 2 and d["train_micro_batch_size_per_gpu"] == 1


def test_the_chart_library_is_served_from_here(server):
    status, _, body = get(server + "/vendor/plotly.min.js")
    assert status == 200 and len(body) > 1_000_000 and b"plotly" in body[:2000].lower()
    page = get(server + "/")[2].decode()
    assert "http://" not in page and "https://" not in page  # no CDN: everything from this server


def test_serve_listens_on_this_machine_only_unless_asked():
    from shardwise.cli import build_parser

    a = build_parser().parse_args(["serve"])
    assert a.host == "127.0.0.1"


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI needs chromium for the planner page's tests (apt-get install chromium)")
        pytest.skip("chromium is not installed")
    sync_api = framework("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.mark.slow  # a browser: tens of seconds
def test_the_page_plans_changes_and_exports(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1100, "height": 1400}, accept_downloads=True)
    page.goto(server + "/?model=llama-3.1-8b&gpus=8")
    page.wait_for_function("document.getElementById('recommended').textContent.startsWith('dp')", timeout=60_000)
    first = page.text_content("#recommended")
    page.fill("#gpus", "64")
    page.fill("#tp", "2")
    page.dispatch_event("#tp", "change")
    page.wait_for_function("document.getElementById('recommended').textContent.includes('tp2')", timeout=60_000)
    assert "gpus=64" in page.url and "tp=2" in page.url  # the URL holds the query
    assert page.text_content("#recommended") != first
    assert page.locator("#equivalent tbody tr").count() >= 1
    assert page.locator("#comm tbody tr").count() >= 1
    assert page.locator("#memory .main-svg").count() >= 1 and page.locator("#timeline .main-svg").count() >= 1
    page.check("#compile")  # a switch: into the query, the command line and the export
    page.wait_for_function("document.getElementById('command').textContent.includes('--compile')", timeout=60_000)
    assert "compile=1" in page.url
    with page.expect_download() as dl:
        page.click("#export-shardwise")
    path = tmp_path / dl.value.suggested_filename
    dl.value.save_as(path)
    assert path.name == "shardwise.toml" and "tp = 2" in path.read_text() and "compile = true" in path.read_text()
    if os.environ.get("SHARDWISE_SCREENSHOT"):
        page.screenshot(path=os.environ["SHARDWISE_SCREENSHOT"], full_page=False)
    page.fill("#tp", "3")
    page.dispatch_event("#tp", "change")
    page.wait_for_selector("#error:not([hidden])", timeout=60_000)
    assert "tp=3 must divide" in page.text_content("#error") and page.is_hidden("#result")
    page.fill("#tp", "")
    page.dispatch_event("#tp", "change")
    page.wait_for_selector("#result:not([hidden])", timeout=60_000)  # and it keeps serving
    page.close()
