"""The dashboard in a real headless Chromium (Debian's ``chromium``), driven over the
DevTools protocol through a pipe (``--remote-debugging-pipe``: no network port, no
extra Python package).

Set ``FIELDSCOPE_SCREENSHOTS=docs/screenshots`` to refresh the screenshots kept in
the documentation; otherwise they go to the test's temporary folder.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from conftest import Broker, TinyBundles, TinyModels
from helpers import mqtt_client, running_collector, wait_for
from test_collect_web_api import fill_objects

from fieldscope.collect.records import decode
from fieldscope.collect.samples import (
    sample_day,
    sample_heartbeat,
    sample_identification,
    sample_model_info,
    sample_objects,
)
from fieldscope.collect.store import open_store
from fieldscope.collect.subscriber import BrokerSettings, CollectorSettings
from fieldscope.collect.web import Dashboard, DashboardSettings, parse_multipart, resolve_archived
from fieldscope.edge.specimens import SPECIES, render_specimen
from fieldscope.edge.topics import Topics

CHROMIUM = next(
    (p for p in ("/usr/bin/chromium", shutil.which("chromium") or "") if p and Path(p).exists()),
    None,
)
LABELS = tuple(s.name for s in SPECIES[:6])
XSS_LABEL = '<script>alert("x")</script>'


# --- a minimal DevTools-protocol client over a pipe --------------------------------------------


class Browser:
    """Headless Chromium: navigate, evaluate, upload a file, take a screenshot."""

    def __init__(self, profile: Path) -> None:
        assert CHROMIUM is not None
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        args = [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run", "--no-default-browser-check", "--hide-scrollbars",
            "--font-render-hinting=none", f"--user-data-dir={profile}", "about:blank",
        ]  # fmt: skip
        # The pipe must be fds 3 (commands in) and 4 (replies out) in the browser; bash,
        # because dash cannot redirect from a descriptor above 9.
        shell = f'exec "$@" 3<&{to_chrome_r} 4>&{from_chrome_w}'
        self.process = subprocess.Popen(
            ["/bin/bash", "-c", shell, "bash", *args],
            pass_fds=(to_chrome_r, from_chrome_w),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        self.call("Page.enable", session=True)
        self.call("Runtime.enable", session=True)
        self.call(
            "Emulation.setDeviceMetricsOverride",
            session=True,
            width=1280,
            height=900,
            deviceScaleFactor=1,
            mobile=False,
        )

    def _read_message(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._from_chrome], [], [], max(0.0, left))
            if not ready:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        raw, _, self._buffer = self._buffer.partition(b"\0")
        message: dict[str, Any] = json.loads(raw)
        return message

    def call(self, method: str, session: bool = False, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read_message(30)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                if event.get("method") == method:
                    return self.events.pop(i)
            self.events.append(self._read_message(max(0.1, deadline - time.monotonic())))

    def goto(self, url: str) -> None:
        self.events.clear()
        self.call("Page.navigate", session=True, url=url)
        self.wait_event("Page.loadEventFired")

    def js(self, expression: str) -> Any:
        result = self.call(
            "Runtime.evaluate", session=True, expression=expression, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def upload(self, selector: str, path: Path) -> None:
        root = self.call("DOM.getDocument", session=True)["root"]["nodeId"]
        node = self.call("DOM.querySelector", session=True, nodeId=root, selector=selector)
        self.call("DOM.setFileInputFiles", session=True, files=[str(path)], nodeId=node["nodeId"])

    def click_and_wait(self, selector: str) -> None:
        self.events.clear()
        self.js(f"document.querySelector({json.dumps(selector)}).click()")
        self.wait_event("Page.loadEventFired")

    def screenshot(self, path: Path) -> None:
        metrics = self.call("Page.getLayoutMetrics", session=True)["cssContentSize"]
        height = min(max(900, int(metrics["height"])), 2400)
        data = self.call(
            "Page.captureScreenshot",
            session=True,
            format="png",
            captureBeyondViewport=True,
            clip={"x": 0, "y": 0, "width": 1280, "height": height, "scale": 1},
        )["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):
            self.call("Browser.close")
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        os.close(self._to_chrome)
        os.close(self._from_chrome)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium); .ci/run does")
    b = Browser(tmp_path / "chromium-profile")
    try:
        yield b
    finally:
        b.close()


def screenshots(tmp_path: Path) -> Path:
    target = os.environ.get("FIELDSCOPE_SCREENSHOTS")
    return Path(target) if target else tmp_path / "screenshots"


# --- a collector database that looks like a week in the field ---------------------------------


def fill_database(db: Path, archive: Path) -> None:
    now = datetime.now(UTC)
    start = now - timedelta(days=7)
    fleet = (("pond-3", "scope-a"), ("pond-3", "scope-b"), ("river-1", "scope-c"))
    records: list[Any] = []
    rng = np.random.default_rng(0)
    for i, (station, device) in enumerate(fleet):
        seq = 0
        for day in range(7):
            messages = sample_day(
                device, station, start + timedelta(days=day), 40 + 15 * i,
                seed=day * 10 + i, first_seq=seq, archived=True, labels=LABELS,
            )  # fmt: skip
            seq += len(messages)
            for m in messages:
                t = Topics("fieldscope", station, device)
                records.append(decode(t.identification, m.to_json(), "fieldscope"))
                if m.image.archived_path and m.captured_at > now - timedelta(days=1):
                    day_dir, name = m.image.archived_path.rsplit("/", 2)[-2:]
                    folder = archive / station / device / day_dir
                    folder.mkdir(parents=True, exist_ok=True)
                    rgb = render_specimen(m.label or LABELS[0], rng, 128)
                    cv2.imwrite(str(folder / name), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        t = Topics("fieldscope", station, device)
        status = b"stopped" if device == "scope-c" else b"online"
        warnings = ("outbox: 41 messages waiting for the broker",) if device == "scope-b" else ()
        # scope-c was stopped two hours ago: its last heartbeat is that old.
        heard = now - timedelta(hours=2) if device == "scope-c" else now
        hb = sample_heartbeat(time=heard, outbox_depth=41 if warnings else 0, warnings=warnings)
        records += [
            decode(t.status, status, "fieldscope", heard),
            decode(t.heartbeat, hb.to_json(), "fieldscope", heard),
            decode(t.model, sample_model_info().to_json(), "fieldscope", heard),
        ]
    t = Topics("fieldscope", "pond-3", "scope-a")
    xss = sample_identification(10_000, label=XSS_LABEL, captured_at=now - timedelta(days=3))
    records += [
        decode(t.identification, xss.to_json(), "fieldscope"),
        decode(t.identification, b'{"version": 2, "device": "scope-a"}', "fieldscope"),
        decode("fieldscope/pond-3/scope-a/identification", b"<b>not json</b>", "fieldscope"),
        decode("fieldscope/pond-3/scope-d/status", b"rebooting", "fieldscope"),
    ]
    with open_store(str(db)) as store:
        store.write(records)


@pytest.fixture
def dashboard(tmp_path: Path, tiny_bundles: TinyBundles) -> Iterator[tuple[Dashboard, str]]:
    db = tmp_path / "collect.sqlite"
    archive = tmp_path / "archive"
    fill_database(db, archive)
    d = Dashboard(
        DashboardSettings(
            db_url=str(db), port=0, bundles=(tiny_bundles.v1,), archive=archive,
            max_upload_bytes=2 * 1024 * 1024,
        )
    )  # fmt: skip
    host, port = d.start()
    try:
        yield d, f"http://{host}:{port}"
    finally:
        d.stop()


def post_image(url: str, data: bytes, filename: str = "x.png", model: str = "0") -> tuple[int, str]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{model}\r\n'
            f"--{boundary}\r\nContent-Disposition: form-data; "
            f'name="image"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        url + "/upload",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def get(url: str) -> tuple[int, str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read().decode("utf-8", "replace"), response.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace"), exc.headers


# --- tests ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pages_load_in_chromium_and_upload_classifies(
    dashboard: tuple[Dashboard, str],
    browser: Browser,
    tiny_models: TinyModels,
    tmp_path: Path,
) -> None:
    _, url = dashboard
    shots = screenshots(tmp_path)

    browser.goto(url + "/")
    assert browser.js("document.title").startswith("Fleet")
    rows = browser.js("[...document.querySelectorAll('#fleet tbody tr[data-status]')].length")
    assert rows == 3
    assert browser.js("document.querySelector('#device-scope-c').dataset.status") == "stopped"
    assert "41" in browser.js("document.querySelector('#device-scope-b').innerText")
    browser.screenshot(shots / "fleet.png")

    browser.goto(url + "/identifications")
    assert browser.js("document.querySelectorAll('svg.chart .bar').length") > 10
    assert browser.js("document.querySelectorAll('#identifications tbody tr').length") == 50
    # Thumbnails come from the archive folder and really decode in the browser.
    loaded = browser.js(
        "[...document.querySelectorAll('td.thumb img')].filter(i => i.naturalWidth > 0).length"
    )
    assert loaded > 0
    # A label with markup is shown as text; no script element exists on any page.
    assert browser.js("document.querySelectorAll('script').length") == 0
    assert XSS_LABEL in browser.js("document.body.innerText")
    browser.screenshot(shots / "identifications.png")

    browser.goto(url + "/identifications?station=river-1&label=" + LABELS[0])
    n = browser.js("document.querySelectorAll('#identifications tbody tr').length")
    stations = browser.js(
        "[...document.querySelectorAll('#identifications tbody tr td:nth-child(3)')]"
        ".map(td => td.innerText)"
    )
    assert n > 0
    assert set(stations) == {"river-1"}

    browser.goto(url + "/invalid")
    assert browser.js("document.querySelectorAll('#invalid tbody tr').length") == 3
    assert "<b>not json</b>" in browser.js("document.querySelector('#invalid').innerText")
    browser.screenshot(shots / "invalid.png")

    # The upload page: a real file chosen in the browser and the form submitted.
    image = tmp_path / "green-specimen.png"
    green = tiny_models.images(1, 1, seed=7)[0]
    cv2.imwrite(str(image), cv2.cvtColor(cv2.resize(green, (256, 256)), cv2.COLOR_RGB2BGR))
    browser.goto(url + "/upload")
    browser.screenshot(shots / "upload.png")
    browser.upload("#image", image)
    browser.click_and_wait("#classify")
    assert browser.js("document.querySelector('#result').dataset.status") == "ok"
    assert browser.js("document.querySelector('#result-label').innerText") == "green"
    assert browser.js("document.querySelectorAll('#top-k tbody tr').length") == 3
    browser.screenshot(shots / "upload-result.png")


@pytest.mark.slow
def test_fleet_view_shows_a_device_going_offline(
    mosquitto: Broker, browser: Browser, tmp_path: Path
) -> None:
    db = tmp_path / "collect.sqlite"
    settings = CollectorSettings(
        broker=BrokerSettings(host=mosquitto.host, port=mosquitto.port, client_id="dash")
    )
    t = Topics("fieldscope", "lab", "scope-x")
    with (
        running_collector(db, settings) as collector,
        mqtt_client(mosquitto.host, mosquitto.port, "scope-x") as station,
    ):
        dashboard = Dashboard(DashboardSettings(db_url=str(db), port=0))
        station.publish(t.status, b"online", qos=1, retain=True).wait_for_publish(10)
        wait_for(lambda: collector.stats.device_updates >= 1, 10, "the online status stored")
        host, port = dashboard.start()
        try:
            browser.goto(f"http://{host}:{port}/")
            status = "document.querySelector('#device-scope-x').dataset.status"
            assert browser.js(status) == "online"
            assert browser.js("document.querySelector('#online-count').innerText") == "1"

            # What the broker does when a station dies: publish its retained last will.
            station.publish(t.status, b"offline", qos=1, retain=True).wait_for_publish(10)
            wait_for(lambda: collector.stats.device_updates >= 2, 10, "the offline status")
            browser.goto(f"http://{host}:{port}/")
            assert browser.js(status) == "offline"
            assert browser.js("document.querySelector('#online-count').innerText") == "0"
        finally:
            dashboard.stop()


@pytest.mark.slow
def test_uploads_are_limited_and_bad_requests_get_clear_pages(
    dashboard: tuple[Dashboard, str], tiny_models: TinyModels
) -> None:
    _, url = dashboard
    red = tiny_models.images(0, 1, seed=3)[0]
    ok, png = cv2.imencode(".png", cv2.cvtColor(red, cv2.COLOR_RGB2BGR))
    assert ok
    status, page = post_image(url, png.tobytes(), filename='<img src=x onerror="alert(1)">.png')
    assert status == 200
    assert 'id="result-label">red<' in page
    assert "<img src=x" not in page  # the file name is escaped
    assert "&lt;img src=x" in page

    status, page = post_image(url, b"this is not an image", filename="notes.txt")
    assert status == 400
    assert "notes.txt" in page

    status, page = post_image(url, png.tobytes(), model="7")
    assert status == 400
    assert "no model number" in page

    status, page = post_image(url, b"\0" * (3 * 1024 * 1024))
    assert status == 413
    assert "limit is" in page

    status, page, headers = get(url + "/")
    assert status == 200
    assert "script-src" not in headers["Content-Security-Policy"]  # default-src 'none'
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    for path in ("/thumb/..%2F..%2Fetc%2Fpasswd", "/thumb/999999", "/static/../web.py",
                 "/nothing-here"):  # fmt: skip
        status, page, _ = get(url + path)
        assert status == 404, path
    status, page, _ = get(url + "/identifications?since=yesterday&page=x")
    assert status == 200
    assert "is not a date" in page


def test_archived_images_resolve_only_inside_the_archive(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    image = archive / "pond-3" / "scope-a" / "2026-11-23" / "x.png"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"png")
    (tmp_path / "secret.png").write_bytes(b"secret")
    station_path = "/var/lib/fieldscope/archive/2026-11-23/x.png"
    assert resolve_archived(archive, "pond-3", "scope-a", station_path) == image.resolve()
    assert resolve_archived(archive, "other", "scope-a", station_path) is None
    assert resolve_archived(archive, "pond-3", "scope-a", "/a/../secret.png") is None
    assert resolve_archived(archive, "..", "..", "/x/secret.png") is None


def test_multipart_keeps_binary_parts_exact() -> None:
    payload = bytes(range(256)) * 4 + b"\r\n--not-the-boundary\r\n"
    body = (
        b'--B\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
        + payload
        + b'\r\n--B\r\nContent-Disposition: form-data; name="model"\r\n\r\n1\r\n--B--\r\n'
    )
    fields = parse_multipart("multipart/form-data; boundary=B", body)
    assert fields["image"] == ("a.png", payload)
    assert fields["model"] == (None, b"1")


@contextlib.contextmanager
def serving(db: Path) -> Iterator[str]:
    d = Dashboard(DashboardSettings(db_url=str(db), port=0))
    host, port = d.start()
    try:
        yield f"http://{host}:{port}"
    finally:
        d.stop()


def test_objects_page_without_a_segmenting_station(browser: Browser, tmp_path: Path) -> None:
    db = tmp_path / "collect.sqlite"
    with open_store(str(db)) as store:
        store.write([decode(Topics("fieldscope", "pond-3", "scope-a").identification,
                            sample_identification(1).to_json(), "fieldscope")])  # fmt: skip
    with serving(db) as url:
        browser.goto(url + "/objects")
    assert browser.js("document.querySelector('nav a[aria-current]').innerText") == "Objects"
    assert "No segmenting station yet" in browser.js("document.body.innerText")
    assert browser.js("document.querySelectorAll('svg.sizes, #object-counts').length") == 0


def test_objects_page_shows_counts_and_size_distributions(browser: Browser, tmp_path: Path) -> None:
    db = tmp_path / "objects.sqlite"
    fill_objects(db)  # Euglena 3 objects (30-45 µm), Amoeba 2 (30, 60); 3 frames, 1 empty
    # A coarser station: two Stentor of 400 and 600 µm, so the sizes span over a decade.
    big = sample_objects(
        0, 2, device="scope-c", station="lake-2", labels=("Stentor",), um_per_px=20
    )
    t = Topics("fieldscope", "lake-2", "scope-c")
    with open_store(str(db)) as store:
        store.write([decode(t.identification, m.to_json(), "fieldscope") for m in big])
    with serving(db) as url:
        browser.goto(url + "/objects")
        counts = browser.js(
            "Object.fromEntries([...document.querySelectorAll('#object-counts tbody tr')]"
            ".map(r => [r.dataset.label, +r.dataset.objects]))"
        )
        assert counts == {"Euglena": 3, "Amoeba": 2, "Stentor": 2}
        cards = browser.js(
            "['frames', 'empty-frames', 'objects', 'per-frame']"
            ".map(i => document.getElementById(i).innerText)"
        )
        assert cards == ["4", "1", "7", "1.75"]
        # One chart, a panel per label, a bar per non-empty bin with its tooltip.
        assert browser.js("document.querySelectorAll('svg.chart.sizes').length") == 1
        bars = browser.js(
            "[...document.querySelectorAll('svg.sizes .bar title')].map(t => t.textContent)"
        )
        assert len(bars) == 6  # Euglena 2 bins, Amoeba 2, Stentor 2
        assert any(b.startswith("Stentor: ") and b.endswith(": 1 objects") for b in bars)
        heading = browser.js("document.querySelector('section.chart-box h2').innerText")
        assert "log scale" in heading
        assert browser.js("document.querySelectorAll('script').length") == 0
        browser.screenshot(screenshots(tmp_path) / "objects.png")
        browser.goto(url + "/objects?label=Stentor")
        assert browser.js("document.getElementById('objects').innerText") == "2"
        assert browser.js("document.querySelectorAll('#object-samples tbody tr').length") == 3
        # A sample's row links to that sample's counts and sizes.
        browser.goto(url + "/objects")
        link = "document.querySelector('#object-samples tr[data-sample=\"river-1-a\"] a')"
        assert browser.js(link + ".getAttribute('href')") == "/objects?sample=river-1-a"
        browser.goto(url + "/objects?sample=river-1-a")
        assert browser.js("document.getElementById('objects').innerText") == "2"
