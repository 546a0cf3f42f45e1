"""``xcnn serve``: the JSON API over loopback, the command's lifecycle, and the page in Chromium."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import xcnn
from xcnn import cli, serve
from xcnn.serve import MAX_SIDE, Predictor, RequestError, parse_request

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROME_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1000",
]


@pytest.fixture(scope="module")
def sample():
    return xcnn.datasets.sample()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The seed net trained by ``xcnn train`` on the embedded sample (3 epochs, seconds)."""
    path = tmp_path_factory.mktemp("ck") / "seed.npz"
    assert cli.main(["train", "--no-progress", "--save", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def model(checkpoint):
    return xcnn.load(checkpoint)


@pytest.fixture(scope="module")
def server(model):
    """A live server on a free loopback port, serving in a thread."""
    srv = serve.make_server(model, port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def post(url, body, content_type="application/json"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + "/api/predict", data=data, method="POST")
    if content_type is not None:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=30) as res:
            return res.status, json.load(res)
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.load(e)


def enlarged(digit, factor=5, pad=(30, 70, 10, 40)):
    """A 28x28 digit drawn big and off-centre on a larger canvas (floats 0..1)."""
    big = np.kron(digit / 255.0, np.ones((factor, factor)))
    top, bottom, left, right = pad
    return np.pad(big, ((top, bottom), (left, right)))


# -- the request parser -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, message",
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"img": []}', "expected a JSON object"),
        (b'{"image": []}', "non-empty list of rows"),
        (b'{"image": [1, 2]}', "non-empty list of rows"),
        (b'{"image": [[]]}', "2-D rows of numbers"),
        (b'{"image": [[0.1, 0.2], [0.3]]}', "same length"),
        (b'{"image": [[[0.1]]]}', "2-D rows"),
        (b'{"image": [["a", "b"]]}', "must be numbers"),
        (b'{"image": [[null, 0]]}', "must be numbers"),
        (b'{"image": [[true, false]]}', "must be numbers"),
        (b'{"image": [[NaN, 0]]}', "finite numbers, got NaN"),
        (b'{"image": [[Infinity]]}', "finite numbers"),
        (b'{"image": [[1e999]]}', "finite numbers"),
        (b'{"image": [[1.5]]}', "in 0..1"),
        (b'{"image": [[-0.5]]}', "in 0..1"),
        (json.dumps({"image": [[0.0] * (MAX_SIDE + 1)]}).encode(), f"at most {MAX_SIDE}"),
    ],
)
def test_parse_request_rejects(body, message):
    with pytest.raises(RequestError, match=re.escape(message)) as info:
        parse_request(body)
    assert info.value.status == 400


def test_parse_request_accepts_ints_and_floats():
    a = parse_request(b'{"image": [[0, 1], [0.5, 0.25]]}')
    assert a.dtype == np.float64 and a.tolist() == [[0, 1], [0.5, 0.25]]


# -- the predictor -------------------------------------------------------------------------------


def test_predictor_frames_digits_as_mnist(model, sample):
    """Digits drawn big and off-centre are read about as well as the test digits themselves."""
    predictor = Predictor(model)
    x, y = sample.x_test[:100, 0], sample.y_test[:100]
    direct = (np.asarray(xcnn.predict(model, sample.x_test[:100])).argmax(axis=1) == y).mean()
    drawn = np.mean(
        [predictor.predict(enlarged(d))["class"] == k for d, k in zip(x, y, strict=True)]
    )
    assert direct > 0.85 and drawn >= direct - 0.05, (drawn, direct)
    reply = predictor.predict(enlarged(x[0]))
    assert np.array(reply["input"]).shape == (28, 28)
    np.testing.assert_allclose(reply["input"], xcnn.digits.center_digit(enlarged(x[0])), atol=1e-3)


def test_feature_maps_are_the_first_conv_output(model, sample):
    predictor = Predictor(model)
    image = enlarged(sample.x_test[3, 0])
    maps = np.array(predictor.predict(image)["feature_maps"])
    framed = xcnn.digits.center_digit(image)
    x = model.asarray((framed[None, None] - 0.5).astype(np.float32))  # "centered" scaling
    want = xcnn.to_numpy(model.layers[0].forward(x, train=False))[0]
    assert maps.shape == want.shape == (8, 26, 26)
    np.testing.assert_allclose(maps, want, atol=1e-4)


def test_predictor_for_other_inputs_and_class_names():
    layers = [xcnn.Conv2D(3, 4, 3), xcnn.Flatten(), xcnn.Dense(4 * 14 * 14, 2)]
    model = xcnn.Sequential(layers)
    model.classes = ["cat", "dog"]  # typed in the framework branch; set by hand here
    predictor = Predictor(model, input_shape=(3, 16, 16))
    reply = predictor.predict(np.ones((40, 50)) * 0.5)
    assert reply["classes"] == ["cat", "dog"] and len(reply["probabilities"]) == 2
    assert np.array(reply["input"]).shape == (16, 16)  # a plain resize: not MNIST's framing
    assert np.allclose(reply["input"], 0.5, atol=1e-3)
    assert np.array(reply["feature_maps"]).shape == (4, 14, 14)
    with pytest.raises(ValueError, match=r"does not take images \(3, 28, 28\)"):
        Predictor(model)  # no input shape known: 28x28 is guessed and does not fit
    no_conv = xcnn.Sequential([xcnn.Flatten(), xcnn.Dense(784, 10)])
    assert Predictor(no_conv).predict(np.zeros((5, 5)))["feature_maps"] == []


# -- the API over loopback -------------------------------------------------------------------------


def test_predict_over_http(server, sample, model):
    status, reply = post(server, {"image": enlarged(sample.x_test[0, 0]).tolist()})
    assert status == 200
    assert reply["class"] == int(sample.y_test[0])
    assert len(reply["probabilities"]) == 10 and abs(sum(reply["probabilities"]) - 1) < 1e-4
    assert np.array(reply["feature_maps"]).shape == (8, 26, 26)
    assert "classes" not in reply  # this model has no class names


def test_page_and_model_info(server):
    with urllib.request.urlopen(server + "/", timeout=10) as res:
        page = res.read().decode()
        assert res.headers["Content-Type"].startswith("text/html")
    assert '<canvas id="canvas" width="280" height="280"' in page
    assert "pointerdown" in page and "invert" in page and 'id="clear"' in page
    # One static file: nothing fetched from elsewhere.
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert not re.search(r"""url\(|@import|fetch\(["']https?:""", page)
    with urllib.request.urlopen(server + "/api/model", timeout=10) as res:
        info = json.load(res)
    assert info["input_shape"] == [1, 28, 28] and info["scale"] == "centered"
    assert info["layers"][0].startswith("Conv2D(1, 8")


def raw(server, method, path, headers=(), body=b""):
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.putrequest(method, path, skip_accept_encoding=True)
    for key, value in headers:
        conn.putheader(key, value)
    conn.endheaders()
    if body:
        conn.send(body)
    res = conn.getresponse()
    out = res.status, res.getheader("Content-Type"), json.loads(res.read())
    conn.close()
    return out


def test_malformed_requests_get_4xx_json_and_the_server_keeps_serving(server, sample, monkeypatch):
    cases = [
        (post(server, b"{oops"), 400, "not valid JSON"),
        (post(server, {"image": [[0.1, 0.2], [0.3]]}), 400, "same length"),
        (post(server, b'{"image": [[NaN]]}'), 400, "NaN"),
        (post(server, {"image": [[2.0]]}), 400, "0..1"),
        (post(server, {"image": [[0.5]]}, "text/plain"), 415, "application/json"),
        (post(server, {"image": [[0.5]]}, None), 415, "application/json"),
        (raw(server, "POST", "/api/predict", [("Content-Type", "application/json")]), 411, ""),
        (
            raw(
                server,
                "POST",
                "/api/predict",
                [("Content-Type", "application/json"), ("Content-Length", "zz")],
            ),
            400,
            "Content-Length",
        ),
        (raw(server, "GET", "/api/predict"), 405, "POST"),
        (raw(server, "DELETE", "/api/predict"), 405, ""),
        (raw(server, "GET", "/nope"), 404, "/nope"),
        (raw(server, "POST", "/x", [("Content-Length", "0")]), 404, "/x"),
    ]
    # Over the size limit: refused from the header, before reading the body.
    huge = [("Content-Type", "application/json"), ("Content-Length", str(serve.MAX_BODY + 1))]
    cases.append((raw(server, "POST", "/api/predict", huge), 413, "over"))
    monkeypatch.setattr(serve, "MAX_BODY", 1000)
    cases.append((post(server, {"image": [[0.0] * 400]}), 413, "over 1,000"))
    for result, status, fragment in cases:
        got_status, reply = result[0], result[-1]
        assert got_status == status, (result, status)
        assert set(reply) == {"error"} and fragment in reply["error"], reply
    monkeypatch.undo()
    status, reply = post(server, {"image": enlarged(sample.x_test[1, 0]).tolist()})
    assert status == 200 and reply["class"] == int(sample.y_test[1])


def test_concurrent_requests(server, sample):
    images = [enlarged(d).tolist() for d in sample.x_test[:8, 0]]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda im: post(server, {"image": im}), images * 2))
    assert all(status == 200 for status, _ in replies)
    first, again = replies[:8], replies[8:]
    assert [r["probabilities"] for _, r in first] == [r["probabilities"] for _, r in again]


def test_an_internal_error_is_a_500_and_serving_goes_on(model, sample, monkeypatch):
    srv = serve.make_server(model, port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{srv.server_port}"
    try:
        real = srv.predictor.predict
        monkeypatch.setattr(srv.predictor, "predict", lambda image: 1 / 0)
        status, reply = post(url, {"image": [[0.5]]})
        assert status == 500 and "ZeroDivisionError" in reply["error"]
        monkeypatch.setattr(srv.predictor, "predict", real)
        assert post(url, {"image": enlarged(sample.x_test[0, 0]).tolist()})[0] == 200
    finally:
        srv.shutdown()
        srv.server_close()


# -- the command: prints its URL, binds loopback, stops on SIGINT and SIGTERM ---------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_cli_serve_prints_url_and_stops_cleanly(sig, checkpoint, sample):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "xcnn", "serve", str(checkpoint), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        m = re.match(r"serving on (http://127\.0\.0\.1:(\d+)/) \(press Ctrl-C to stop\)", line)
        assert m, line + proc.stderr.read()
        status, reply = post(
            m.group(1).rstrip("/"), {"image": enlarged(sample.x_test[0, 0]).tolist()}
        )
        assert status == 200 and reply["class"] == int(sample.y_test[0])
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert out.strip() == "stopped" and "Traceback" not in err


def test_cli_serve_errors(tmp_path, capsys):
    assert cli.main(["serve", str(tmp_path / "missing.npz")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("xcnn: error: ") and "missing.npz" in err and "\n" not in err
    assert cli.main(["serve", "x.npz", "--port", "-3"]) == 2
    assert "must be >= 0" in capsys.readouterr().err


# -- the page in a real browser -------------------------------------------------------------------


def _browser_missing():
    """Why the browser test cannot run here (None if it can)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (it is in the 'test' extra)"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (os.path.exists(path) and os.access(path, os.X_OK)):
            return f"{path} not found: apt-get install {package} (.ci/run does)"
    return None


@pytest.fixture
def browser(tmp_path):
    why = _browser_missing()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set, so the browser test must run: {why}")
        pytest.skip(why)
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROME_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


#: A "7": a top bar, then a diagonal down to the left (points in canvas pixels, 280x280).
SEVEN = [(80, 70), (200, 70), (170, 130), (140, 190), (120, 240)]


def draw(driver, points, steps=6):
    """Drag the mouse through ``points`` on the canvas (real pointer events via WebDriver)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    canvas = driver.find_element(By.ID, "canvas")
    size = canvas.size
    # Offsets are from the element's centre in Selenium 4.
    to_offset = [(x * size["width"] / 280 - size["width"] / 2,
                  y * size["height"] / 280 - size["height"] / 2) for x, y in points]  # fmt: skip
    chain = ActionChains(driver, duration=10)
    chain.move_to_element_with_offset(canvas, *map(round, to_offset[0])).click_and_hold()
    for (x0, y0), (x1, y1) in zip(to_offset, to_offset[1:], strict=False):
        for i in range(1, steps + 1):
            t = i / steps
            chain.move_to_element_with_offset(
                canvas, round(x0 + t * (x1 - x0)), round(y0 + t * (y1 - y0))
            )
    chain.release().perform()


def wait_for_prediction(driver, timeout=20):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(
        lambda d: d.execute_script(
            "const p = document.getElementById('prediction');"
            "return p.dataset.class !== undefined &&"
            " document.getElementById('maps').children.length > 0;"
        )
    )


def test_page_in_chromium_shows_prediction_and_feature_maps(browser, server):
    from selenium.webdriver.common.by import By

    browser.get(server + "/")
    assert browser.find_element(By.ID, "canvas").size["width"] >= 280
    draw(browser, SEVEN)
    wait_for_prediction(browser)
    prediction = browser.find_element(By.ID, "prediction").text
    assert re.fullmatch(r"[0-9]", prediction), prediction
    assert prediction == "7"  # a drawn seven, framed as MNIST was, is read as one
    bars = browser.find_elements(By.CSS_SELECTOR, "#bars .bar")
    assert len(bars) == 3 and bars[0].find_element(By.CSS_SELECTOR, ".name").text == "7"
    state = browser.execute_script(
        """
        const maps = [...document.querySelectorAll('#maps canvas')];
        const spread = maps.map(c => {
          const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
          let lo = 255, hi = 0;
          for (let i = 0; i < d.length; i += 4) {
            lo = Math.min(lo, d[i]);
            hi = Math.max(hi, d[i]);
          }
          return hi - lo;
        });
        return {count: maps.length, size: [maps[0].width, maps[0].height], spread,
                error: document.getElementById('status').textContent};
        """
    )
    assert state["error"] == ""
    assert state["count"] == 8 and state["size"] == [26, 26]
    assert all(s > 50 for s in state["spread"]), state["spread"]  # maps show the digit
    browser.find_element(By.ID, "clear").click()
    assert browser.find_element(By.ID, "prediction").text == "draw something"
    assert browser.find_elements(By.CSS_SELECTOR, "#maps canvas") == []


def test_page_in_chromium_with_invert_and_touch(browser, server):
    """Dark on light with invert on, drawn with touch-type pointer events: same answer."""
    from selenium.webdriver.common.by import By

    browser.get(server + "/")
    browser.find_element(By.ID, "invert").click()
    browser.execute_script(
        """
        const c = document.getElementById('canvas'), r = c.getBoundingClientRect();
        const pts = arguments[0];
        const fire = (type, [x, y]) => c.dispatchEvent(new PointerEvent(type, {
          pointerId: 7, pointerType: 'touch', isPrimary: true, pressure: 0.5, bubbles: true,
          clientX: r.left + x * r.width / 280, clientY: r.top + y * r.height / 280}));
        c.setPointerCapture = () => {};  // synthetic pointers cannot be captured
        fire('pointerdown', pts[0]);
        for (let i = 1; i < pts.length; i++) {
          const [x0, y0] = pts[i - 1], [x1, y1] = pts[i];
          for (let t = 1; t <= 6; t++) {
            fire('pointermove', [x0 + (x1 - x0) * t / 6, y0 + (y1 - y0) * t / 6]);
          }
        }
        fire('pointerup', pts[pts.length - 1]);
        """,
        SEVEN,
    )
    wait_for_prediction(browser)
    assert browser.find_element(By.ID, "prediction").text == "7"
    corner = browser.execute_script(
        "return [...document.getElementById('canvas').getContext('2d')"
        ".getImageData(2, 2, 1, 1).data].slice(0, 3);"
    )
    assert corner == [255, 255, 255]  # light paper: the page inverted before sending
