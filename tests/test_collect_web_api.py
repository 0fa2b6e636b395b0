"""The dashboard's JSON API (/api/v1), its OpenAPI document, upload tokens and the chart,
against a real server (uvicorn on 127.0.0.1) over a real SQLite collector database."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import cv2
import msgspec
import pytest
from conftest import TinyBundles, TinyModels
from helpers import received

from fieldscope.cli.main import main
from fieldscope.collect.charts import bucket_range, series_from_counts, stacked_bars
from fieldscope.collect.records import decode
from fieldscope.collect.samples import sample_heartbeat, sample_identification
from fieldscope.collect.store import open_store
from fieldscope.collect.web import Dashboard, DashboardSettings
from fieldscope.edge.errors import ConfigError
from fieldscope.edge.site import Sample
from fieldscope.edge.topics import Topics

TOKEN = "s3cret-token-for-the-tests"
DAY0 = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)


def fill(db: Path) -> None:
    """Two devices: scope-a 20 identifications on day 0 (scores 0.50..0.975, labels
    alternating A/B), scope-b 10 on day 1 (label C)."""
    records: list[Any] = []
    ta = Topics("fieldscope", "pond-3", "scope-a")
    tb = Topics("fieldscope", "river-1", "scope-b")
    for i in range(20):
        m = sample_identification(
            i, device="scope-a", station="pond-3", label="AB"[i % 2], score=0.5 + i * 0.025,
            captured_at=DAY0 + timedelta(minutes=i), labels=("A", "B", "C"),
        )  # fmt: skip
        records.append(decode(ta.identification, m.to_json(), "fieldscope"))
    for i in range(10):
        m = sample_identification(
            i, device="scope-b", station="river-1", label="C", score=0.9,
            captured_at=DAY0 + timedelta(days=1, minutes=i), labels=("A", "B", "C"),
        )  # fmt: skip
        records.append(decode(tb.identification, m.to_json(), "fieldscope"))
    records += [
        decode(ta.status, b"online", "fieldscope"),
        decode(ta.heartbeat, sample_heartbeat(outbox_depth=3).to_json(), "fieldscope"),
        decode(tb.status, b"offline", "fieldscope"),
    ]
    with open_store(str(db)) as store:
        store.write(records)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "collect.sqlite"
    fill(path)
    return path


@pytest.fixture
def auth_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# who may upload\nalice:{TOKEN}\n", encoding="utf-8")
    return path


def serve(settings: DashboardSettings) -> Iterator[str]:
    dashboard = Dashboard(settings)
    host, port = dashboard.start()
    try:
        yield f"http://{host}:{port}"
    finally:
        dashboard.stop()


@pytest.fixture
def url(db: Path, auth_file: Path) -> Iterator[str]:
    yield from serve(DashboardSettings(db_url=str(db), port=0, auth_file=auth_file))


def call(
    url: str, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, Any, Any]:
    """Status, parsed JSON (or text) and headers of one request."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, raw, got = response.status, response.read(), response.headers
    except urllib.error.HTTPError as exc:
        status, raw, got = exc.code, exc.read(), exc.headers
    if got.get("Content-Type", "").startswith("application/json"):
        return status, json.loads(raw), got
    return status, raw.decode("utf-8", "replace"), got


def multipart(fields: dict[str, tuple[str | None, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = b""
    for name, (filename, data) in fields.items():
        extra = f'; filename="{filename}"' if filename is not None else ""
        body += (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{extra}\r\n\r\n'
            ).encode()
            + data
            + b"\r\n"
        )
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


# --- reading ---------------------------------------------------------------------------------


def test_devices_lists_each_device_with_status_counts_and_outbox(url: str) -> None:
    status, body, headers = call(url + "/api/v1/devices")
    assert status == 200
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    devices = {d["device"]: d for d in body["devices"]}
    assert set(devices) == {"scope-a", "scope-b"}
    assert devices["scope-a"]["status"] == "online"
    assert devices["scope-a"]["outbox_depth"] == 3
    assert devices["scope-a"]["identifications"] == 20
    assert devices["scope-b"]["status"] == "offline"
    assert devices["scope-b"]["last_capture"].startswith("2026-11-21T08:09")


def test_identifications_filter_by_device_label_time_and_score(url: str) -> None:
    api = url + "/api/v1/identifications"
    _, everything, _ = call(api)
    assert everything["total"] == 30
    assert everything["items"][0]["device"] == "scope-b"  # newest capture first
    _, body, _ = call(api + "?device=scope-a&label=B")
    assert body["total"] == 10
    assert {(i["device"], i["label"]) for i in body["items"]} == {("scope-a", "B")}
    _, body, _ = call(api + "?station=river-1&station=pond-3&label=C")
    assert body["total"] == 10
    _, body, _ = call(api + "?since=2026-11-21")
    assert body["total"] == 10
    _, body, _ = call(api + "?until=2026-11-20")  # a date includes that whole day
    assert body["total"] == 20
    _, body, _ = call(api + "?device=scope-a&min_score=0.8&max_score=0.9")
    scores = sorted(i["score"] for i in body["items"])
    assert scores == pytest.approx([0.8, 0.825, 0.85, 0.875, 0.9])
    item = body["items"][0]
    assert item["top_k"][0] == [item["label"], pytest.approx(item["score"])]  # (label, score)
    status, one, _ = call(f"{url}/api/v1/identifications/{item['id']}")
    assert status == 200
    assert one == item


def test_identifications_page_with_a_cursor_and_a_hard_limit(url: str) -> None:
    api = url + "/api/v1/identifications?device=scope-a&limit=8"
    seen: list[int] = []
    cursor = None
    pages = 0
    while True:
        _, body, _ = call(api + (f"&cursor={cursor}" if cursor else ""))
        pages += 1
        assert body["total"] == 20
        assert len(body["items"]) <= 8
        seen += [i["seq"] for i in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == list(range(19, -1, -1))  # every row once, newest first
    status, body, _ = call(url + "/api/v1/identifications?limit=501")
    assert status == 400
    assert body["error"] == "query parameter limit: Expected `int` <= 500"


@pytest.mark.parametrize(
    ("query", "names"),
    [
        ("limit=abc", "limit"),
        ("limit=0", "limit"),
        ("min_score=1.5", "min_score"),
        ("min_score=0.9&max_score=0.1", "min_score"),
        ("since=yesterday", "since"),
        ("until=31/12/2026", "until"),
        ("since=2026-11-22&until=2026-11-20", "since"),
        ("cursor=%25%25not-a-cursor", "cursor"),
        (
            "cursor="
            + base64.urlsafe_b64encode(b"2026-11-20T08:00:00+00:00|" + b"9" * 30).decode(),
            "cursor",
        ),
    ],
)
def test_a_bad_filter_is_a_400_naming_the_parameter(url: str, query: str, names: str) -> None:
    status, body, _ = call(url + "/api/v1/identifications?" + query)
    assert status == 400, body
    assert body["status"] == 400
    assert names in body["error"]


def test_counts_per_label_device_and_day(url: str) -> None:
    _, body, _ = call(url + "/api/v1/counts?by=label")
    assert {c["key"]: c["count"] for c in body["counts"]} == {"A": 10, "B": 10, "C": 10}
    _, body, _ = call(url + "/api/v1/counts?by=device&label=A")
    assert {c["key"]: c["count"] for c in body["counts"]} == {"scope-a": 10}
    _, body, _ = call(url + "/api/v1/counts?by=day")
    assert body == {
        "by": "day",
        "total": 30,
        "counts": [{"key": "2026-11-20", "count": 20}, {"key": "2026-11-21", "count": 10}],
    }
    status, body, _ = call(url + "/api/v1/counts?by=week")
    assert status == 400
    assert "by" in body["error"]


def test_not_found_is_json_under_the_api_and_a_page_elsewhere(url: str) -> None:
    status, body, _ = call(url + "/api/v1/identifications/987654")
    assert (status, body["error"]) == (404, "no identification with id 987654")
    status, body, _ = call(url + "/api/v1/nothing")
    assert status == 404
    assert body["status"] == 404
    status, text, headers = call(url + "/nothing-here")
    assert status == 404
    assert "No page at /nothing-here" in text
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    status, text, headers = call(url + "/invalid", "HEAD")  # as GET, without the body
    assert (status, text, headers["Content-Type"]) == (200, "", "text/html; charset=utf-8")
    assert int(headers["Content-Length"]) > 100


def test_openapi_document_lists_the_api(url: str) -> None:
    status, doc, _ = call(url + "/api/v1/openapi.json")
    assert status == 200
    assert doc["openapi"].startswith("3.")
    paths = set(doc["paths"])
    assert {
        "/api/v1/devices",
        "/api/v1/identifications",
        "/api/v1/identifications/{ident}",
        "/api/v1/counts",
        "/api/v1/models",
        "/api/v1/classify",
    } <= paths
    assert all(p.startswith("/api/v1/") for p in paths)  # the HTML pages are not in it
    params = {p["name"] for p in doc["paths"]["/api/v1/identifications"]["get"]["parameters"]}
    assert {
        "device",
        "station",
        "label",
        "since",
        "until",
        "min_score",
        "limit",
        "cursor",
    } <= params
    assert "IdentificationRow" in doc["components"]["schemas"]
    # No schema UI: those load their scripts from a CDN, which a field laptop lacks.
    status, _, _ = call(url + "/schema")
    assert status == 404


# --- writing needs a token --------------------------------------------------------------------


def test_uploads_need_a_token_when_an_auth_file_is_given(url: str) -> None:
    body, content_type = multipart({"image": ("x.png", b"not an image")})
    api = url + "/api/v1/classify"
    status, answer, headers = call(api, "POST", body, {"Content-Type": content_type})
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert "token" in answer["error"]
    wrong = {"Content-Type": content_type, "Authorization": "Bearer not-the-token-at-all"}
    assert call(api, "POST", body, wrong)[0] == 403
    right = {"Content-Type": content_type, "Authorization": f"Bearer {TOKEN}"}
    status, answer, _ = call(api, "POST", body, right)
    assert (status, answer["error"]) == (409, "no model is loaded: start with --bundle DIR")

    # The HTML form: the browser's own login (HTTP Basic, user and token).
    status, page, headers = call(url + "/upload")
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Basic")
    basic = base64.b64encode(f"alice:{TOKEN}".encode()).decode()
    status, page, _ = call(url + "/upload", headers={"Authorization": f"Basic {basic}"})
    assert status == 200
    assert "Try a model" in page
    other = base64.b64encode(f"mallory:{TOKEN}".encode()).decode()
    assert call(url + "/upload", headers={"Authorization": f"Basic {other}"})[0] == 401
    # Reading stays open.
    assert call(url + "/api/v1/devices")[0] == 200


def test_refuses_to_listen_beyond_loopback_without_an_auth_file(
    db: Path, auth_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError, match="--auth-file"):
        Dashboard(DashboardSettings(db_url=str(db), host="0.0.0.0", port=0))
    code = main(["collect", "serve", "--db", str(db), "--host", "0.0.0.0", "--port", "0"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "pass --auth-file FILE" in err[0]
    short = auth_file.with_name("short")
    short.write_text("tooshort\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="at least 16"):
        Dashboard(DashboardSettings(db_url=str(db), host="0.0.0.0", port=0, auth_file=short))
    # With a token file it starts on every interface; loopback without one, as before.
    for settings in (
        DashboardSettings(db_url=str(db), host="0.0.0.0", port=0, auth_file=auth_file),
        DashboardSettings(db_url=str(db), port=0),
    ):
        for base in serve(settings):
            port = base.rsplit(":", 1)[1]
            assert call(f"http://127.0.0.1:{port}/api/v1/devices")[0] == 200
            assert call(f"http://127.0.0.1:{port}/upload")[0] == (
                401 if settings.auth_file else 200
            )


# --- the chart -------------------------------------------------------------------------------


def test_the_chart_is_an_accessible_svg_of_stacked_bars_without_inline_styles() -> None:
    buckets = bucket_range(DAY0, DAY0 + timedelta(days=4), timedelta(days=1))
    counts = [(DAY0, "A", 3), (DAY0, "B", 2), (DAY0 + timedelta(days=2), "<b>C</b>", 5)]
    series = series_from_counts(counts, buckets)
    svg = stacked_bars(buckets, series, title="Identifications per label and day")
    root = ElementTree.fromstring(svg)
    ns = {"s": "http://www.w3.org/2000/svg"}
    assert root.get("class") == "chart"
    assert root.get("role") == "img"
    assert root.find("s:title", ns).text == "Identifications per label and day"  # type: ignore[union-attr]
    bars = root.findall(".//*[@class='bar']", ns)
    tips = sorted(b.find("s:title", ns).text for b in bars)  # type: ignore[union-attr,type-var]
    assert tips == ["2026-11-20 — A: 3", "2026-11-20 — B: 2", "2026-11-22 — <b>C</b>: 5"]
    assert "<b>" not in svg  # a label is escaped text
    assert "style=" not in svg
    assert "<style" not in svg  # the page's CSP forbids inline styles
    assert {b.tag for b in bars} == {"{http://www.w3.org/2000/svg}path"}  # drawn by matplotlib
    empty = stacked_bars([], [])
    assert "no identifications match" in empty
    assert 'class="bar"' not in empty


def test_the_identifications_page_inlines_the_chart_and_legend(url: str) -> None:
    status, page, _ = call(url + "/identifications?device=scope-a")
    assert status == 200
    assert '<svg xmlns="http://www.w3.org/2000/svg"' in page
    assert page.count('class="bar"') == 2  # A and B in one hour... of one day
    assert 'class="swatch swatch-0"' in page


# --- classifying an upload through the API (needs the tiny trained bundles) ---------------------


@pytest.mark.slow
def test_classify_api_answers_like_the_upload_page(
    db: Path, auth_file: Path, tiny_bundles: TinyBundles, tiny_models: TinyModels
) -> None:
    settings = DashboardSettings(
        db_url=str(db), port=0, bundles=(tiny_bundles.v1,), auth_file=auth_file,
        max_upload_bytes=1024 * 1024,
    )  # fmt: skip
    for base in serve(settings):
        _, listed, _ = call(base + "/api/v1/models")
        assert [m["index"] for m in listed["models"]] == [0]
        assert listed["models"][0]["labels"]
        red = tiny_models.images(0, 1, seed=3)[0]
        ok, png = cv2.imencode(".png", cv2.cvtColor(red, cv2.COLOR_RGB2BGR))
        assert ok
        body, content_type = multipart({"model": (None, b"0"), "image": ("red.png", png.tobytes())})
        auth = {"Content-Type": content_type, "Authorization": f"Bearer {TOKEN}"}
        status, result, _ = call(base + "/api/v1/classify", "POST", body, auth)
        assert status == 200, result
        assert (result["label"], result["status"], result["filename"]) == ("red", "ok", "red.png")
        assert result["top_k"][0]["label"] == "red"
        assert result["width"] == red.shape[1]

        body, content_type = multipart({"image": ("notes.txt", b"this is not an image")})
        auth["Content-Type"] = content_type
        status, result, _ = call(base + "/api/v1/classify", "POST", body, auth)
        assert status == 400
        assert "notes.txt" in result["error"]
        body, content_type = multipart({"model": (None, b"7"), "image": ("a.png", png.tobytes())})
        auth["Content-Type"] = content_type
        status, result, _ = call(base + "/api/v1/classify", "POST", body, auth)
        assert (status, result["error"]) == (400, "no model number '7' on this dashboard")
        body, content_type = multipart({"image": ("big.png", b"\0" * (2 * 1024 * 1024))})
        auth["Content-Type"] = content_type
        status, result, _ = call(base + "/api/v1/classify", "POST", body, auth)
        assert status == 413
        assert "limit is" in result["error"]


# --- a segmenting station's objects ------------------------------------------------------------


def fill_objects(db: Path) -> None:
    """pond-3/scope-a: a frame of 3 objects (Amoeba ESD 30 µm, Euglena 45, Amoeba 60) and
    a frame without objects, outside any sample; river-1/scope-b: a frame of 2 (Euglena
    30 and 45) in sample river-1-a."""
    from fieldscope.collect.samples import sample_objects

    river = Sample(id="river-1-a", started_at=datetime(2026, 11, 23, 9, tzinfo=UTC))
    messages = [
        *sample_objects(0, 3, labels=("Amoeba", "Euglena")),
        *sample_objects(10, 0),
        *(
            msgspec.structs.replace(m, sample=river)
            for m in sample_objects(20, 2, device="scope-b", station="river-1", labels=("Euglena",))
        ),
    ]
    with open_store(str(db)) as store:
        store.write([received(m) for m in messages])


@pytest.fixture
def objects_url(tmp_path: Path) -> Iterator[str]:
    db = tmp_path / "objects.sqlite"
    fill_objects(db)
    yield from serve(DashboardSettings(db_url=str(db), port=0))


def test_object_summary_counts_frames_objects_and_labels(objects_url: str) -> None:
    status, body, _ = call(objects_url + "/api/v1/objects/summary")
    assert status == 200, body
    (group,) = body["groups"]
    assert body["by"] == []
    assert (group["frames"], group["frames_without_objects"], group["objects"]) == (3, 1, 5)
    assert group["objects_per_frame"] == pytest.approx(1.6667)
    assert group["rejected_by_size"] == 6
    assert [(x["label"], x["objects"]) for x in group["labels"]] == [("Euglena", 3), ("Amoeba", 2)]
    assert group["labels"][1]["esd_mean_um"] == pytest.approx(45.0, abs=0.02)

    _, body, _ = call(objects_url + "/api/v1/objects/summary?by=station&label=Amoeba")
    pond, river = body["groups"]
    assert pond["key"] == {"station": "pond-3"}
    assert (pond["frames"], pond["objects"], pond["objects_per_frame"]) == (2, 2, 1.0)
    assert (river["key"], river["frames"], river["objects"], river["labels"]) == (
        {"station": "river-1"}, 1, 0, [],
    )  # fmt: skip
    _, body, _ = call(objects_url + "/api/v1/objects/summary?device=scope-b&since=2027-01-01")
    assert body["groups"] == []
    # Per sample: objects taken outside any sample group under "".
    _, body, _ = call(objects_url + "/api/v1/objects/summary?by=sample")
    assert [(g["key"], g["frames"], g["objects"]) for g in body["groups"]] == [
        ({"sample": ""}, 2, 3), ({"sample": "river-1-a"}, 1, 2),
    ]  # fmt: skip
    _, body, _ = call(objects_url + "/api/v1/identifications?sample=river-1-a")
    assert (body["total"], {i["sample_id"] for i in body["items"]}) == (2, {"river-1-a"})
    _, body, _ = call(objects_url + "/api/v1/objects/sizes?sample=river-1-a")
    assert [(s["label"], s["objects"]) for s in body["labels"]] == [("Euglena", 2)]


def test_object_sizes_are_esd_histograms_per_label(objects_url: str) -> None:
    status, body, _ = call(objects_url + "/api/v1/objects/sizes?bins=3")
    assert status == 200, body
    assert (body["scale"], body["edges_um"], body["objects"]) == ("linear", [20, 40, 60, 80], 5)
    assert [(s["label"], s["counts"]) for s in body["labels"]] == [
        ("Euglena", [1, 2, 0]),
        ("Amoeba", [1, 0, 1]),
    ]
    _, body, _ = call(objects_url + "/api/v1/objects/sizes?bins=3&label=Amoeba&scale=log")
    assert body["scale"] == "log"
    assert [(s["label"], sum(s["counts"])) for s in body["labels"]] == [("Amoeba", 2)]
    assert len(body["edges_um"]) == len(body["labels"][0]["counts"]) + 1


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ("sizes?bins=0", "bins"),
        ("sizes?bins=many", "bins"),
        ("sizes?scale=cubic", "scale"),
        ("summary?by=site", "by"),
        ("summary?since=yesterday", "since"),
        ("sizes?since=2026-12-01&until=2026-11-01", "since"),
    ],
)
def test_bad_object_parameters_are_a_400_naming_them(
    objects_url: str, query: str, name: str
) -> None:
    status, body, _ = call(objects_url + "/api/v1/objects/" + query)
    assert status == 400, body
    assert f"parameter {name}" in body["error"]


def test_object_endpoints_without_objects_and_in_the_openapi_document(url: str) -> None:
    _, body, _ = call(url + "/api/v1/objects/summary")
    assert body == {"by": [], "groups": []}
    _, body, _ = call(url + "/api/v1/objects/sizes")
    assert body == {"scale": "linear", "edges_um": [], "objects": 0, "labels": []}
    _, doc, _ = call(url + "/api/v1/openapi.json")
    assert {"/api/v1/objects/summary", "/api/v1/objects/sizes"} <= set(doc["paths"])
    params = {p["name"] for p in doc["paths"]["/api/v1/objects/sizes"]["get"]["parameters"]}
    assert {"device", "station", "label", "sample", "since", "until", "bins", "scale"} <= params
    assert "min_score" not in params
