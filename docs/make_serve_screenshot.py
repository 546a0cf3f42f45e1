"""Make docs/images/serve.png: the ``xcnn serve`` page with a digit drawn on it.

Trains the seed net on the embedded sample (seconds), serves it on a free
loopback port, draws a "3" with the mouse in headless Chromium (Debian's
``chromium`` and ``chromium-driver``) and saves the page::

    python docs/make_serve_screenshot.py [OUT.png]
"""

from __future__ import annotations

import sys
import tempfile
import threading
from pathlib import Path

import xcnn
from xcnn import serve

HERE = Path(__file__).resolve().parent
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1180,760",
]
#: A "3" in canvas pixels (280x280): two bowls open to the left.
THREE = [
    (85, 70), (120, 48), (165, 48), (195, 75), (190, 110), (150, 135), (125, 138),
    (160, 142), (200, 170), (200, 215), (165, 240), (115, 240), (80, 215),
]  # fmt: skip


def main(out: str = str(HERE / "images" / "serve.png")) -> None:
    from selenium import webdriver
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    data = xcnn.datasets.sample()
    model = xcnn.build_model("seed")
    optimizer = xcnn.make_optimizer("adam", model, 0.005)
    xcnn.fit(model, optimizer, data.x_train, data.y_train, epochs=3, lr_decay=0.3, progress=False)
    server = serve.make_server(model, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    with tempfile.TemporaryDirectory() as profile:
        for flag in [*FLAGS, f"--user-data-dir={profile}"]:
            options.add_argument(flag)
        service = webdriver.ChromeService(executable_path="/usr/bin/chromedriver")
        driver = webdriver.Chrome(options=options, service=service)
        try:
            driver.get(f"http://127.0.0.1:{server.server_port}/")
            canvas = driver.find_element(By.ID, "canvas")
            half = canvas.size["width"] / 2
            chain = ActionChains(driver, duration=10)
            points = [(round(x - half), round(y - half)) for x, y in THREE]
            chain.move_to_element_with_offset(canvas, *points[0]).click_and_hold()
            for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
                for i in range(1, 5):
                    x, y = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
                    chain.move_to_element_with_offset(canvas, round(x), round(y))
            chain.release().perform()
            WebDriverWait(driver, 20).until(
                lambda d: d.execute_script(
                    "return document.getElementById('maps').children.length > 0"
                )
            )
            driver.execute_script("return new Promise(r => setTimeout(r, 500))")
            print("prediction:", driver.find_element(By.ID, "prediction").text)
            driver.save_screenshot(out)
        finally:
            driver.quit()
            server.shutdown()
            server.server_close()
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
