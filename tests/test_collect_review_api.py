"""The review API of the dashboard (``/api/v1/review/queue``, annotations), served by the
real server on 127.0.0.1 over a real SQLite store."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from test_collect_web_api import DAY0, TOKEN, call, fill, serve

from fieldscope.collect.records import decode
from fieldscope.collect.samples import sample_identification
from fieldscope.collect.store import open_store
from fieldscope.collect.web import DashboardSettings
from fieldscope.edge.topics import Topics

JSON = {"Content-Type": "application/json"}
BEARER = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


@pytest.fixture
def review_db(tmp_path: Path) -> Path:
    """The API tests' data (scope-a: scores 0.50.. ascending, A/B; scope-b: C at 0.9)
    plus one uncertain identification of scope-b."""
    path = tmp_path / "collect.sqlite"
    fill(path)
    t = Topics("fieldscope", "river-1", "scope-b")
    m = sample_identification(
        50, device="scope-b", station="river-1", label=None, score=0.45,
        captured_at=DAY0 + timedelta(days=1, hours=2), labels=("A", "B", "C"),
    )  # fmt: skip
    with open_store(str(path)) as store:
        store.write([decode(t.identification, m.to_json(), "fieldscope")])
    return path


@pytest.fixture
def url(review_db: Path, tmp_path: Path) -> Iterator[str]:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice:{TOKEN}\n", encoding="utf-8")
    yield from serve(DashboardSettings(db_url=str(review_db), port=0, auth_file=tokens))


def _post(url: str, ident: int, body: object, headers: dict[str, str] = BEARER) -> tuple:
    target = f"{url}/api/v1/identifications/{ident}/annotations"
    return call(target, "POST", json.dumps(body).encode(), headers)


def test_queue_puts_uncertain_and_low_scores_first_and_is_paged_and_filtered(url: str) -> None:
    status, page, _ = call(url + "/api/v1/review/queue?qc_share=0")
    assert status == 200
    whys = [(i["identification"]["device"], i["identification"]["score"], i["why"])
            for i in page["items"]]  # fmt: skip
    assert whys == [
        ("scope-b", 0.45, "uncertain"),
        ("scope-a", 0.5, "low_score"),
        ("scope-a", 0.525, "low_score"),
        ("scope-a", 0.55, "low_score"),
        ("scope-a", 0.575, "low_score"),
    ]
    assert page["total"] == 5
    # The quality-control sample: confident ones, the same for the same seed.
    _, full, _ = call(url + "/api/v1/review/queue?qc_share=0.5&seed=3&limit=100")
    qc = [i["identification"]["id"] for i in full["items"] if i["why"] == "quality_control"]
    assert 5 <= len(qc) <= 20
    assert all(i["identification"]["score"] >= 0.6 for i in full["items"][5:])
    _, again, _ = call(url + "/api/v1/review/queue?qc_share=0.5&seed=3&limit=100")
    assert [i["identification"]["id"] for i in again["items"]] == [
        i["identification"]["id"] for i in full["items"]
    ]
    _, second, _ = call(url + "/api/v1/review/queue?qc_share=0&limit=2&offset=2")
    assert [i["identification"]["score"] for i in second["items"]] == [0.525, 0.55]
    _, only_b, _ = call(url + "/api/v1/review/queue?qc_share=0&device=scope-b")
    assert only_b["total"] == 1
    status, bad, _ = call(url + "/api/v1/review/queue?qc_share=2")
    assert status == 400
    assert "qc_share" in bad["error"]


def test_posting_a_review_needs_the_token_and_names_its_user(url: str) -> None:
    _, page, _ = call(url + "/api/v1/review/queue?qc_share=0")
    ident = page["items"][0]["identification"]["id"]
    status, _, headers = _post(url, ident, {"label": "B"}, JSON)
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Bearer")
    wrong = {**BEARER, "Authorization": "Bearer not-the-token-at-all"}
    assert _post(url, ident, {"label": "B"}, wrong)[0] == 403
    # A stranger's malformed body is still a 401, not a 400 telling them about it.
    assert _post(url, ident, {"nonsense": 1}, JSON)[0] == 401

    status, made, _ = _post(url, ident, {"label": "B", "note": "cilia"})
    assert status == 201
    assert (made["label"], made["reviewer"], made["note"]) == ("B", "alice", "cilia")
    status, made, _ = _post(url, ident, {"label": "_not_a_taxon"})
    assert status == 201
    status, listed, _ = call(f"{url}/api/v1/identifications/{ident}/annotations")
    assert status == 200
    assert listed["status"] == "not_a_taxon"  # the latest review wins
    assert [a["label"] for a in listed["annotations"]] == ["B", "_not_a_taxon"]
    # The prediction stays; the reviewed one left the queue.
    _, row, _ = call(f"{url}/api/v1/identifications/{ident}")
    assert row["label"] is None
    assert row["status"] == "uncertain"
    _, page, _ = call(url + "/api/v1/review/queue?qc_share=0")
    assert ident not in [i["identification"]["id"] for i in page["items"]]
    # The HTTP Basic login works too (a browser).
    basic = base64.b64encode(f"alice:{TOKEN}".encode()).decode()
    headers = {"Authorization": f"Basic {basic}", "Content-Type": "application/json"}
    assert _post(url, ident, {"label": "C"}, headers)[0] == 201


def test_unknown_labels_and_identifications_are_400_and_404(url: str) -> None:
    status, answer, _ = _post(url, 1, {"label": "Dragon"})
    assert status == 400
    assert "unknown label 'Dragon'; known labels: A, B, C" in answer["error"]
    assert "_not_a_taxon" in answer["error"]
    status, answer, _ = _post(url, 1, {"label": ""})
    assert (status, answer["error"]) == (400, "the review's label is empty; give a label")
    status, answer, _ = _post(url, 1, {"label": 3})
    assert status == 400
    status, answer, _ = _post(url, 999999, {"label": "A"})
    assert (status, answer["error"]) == (404, "no identification with id 999999")
    status, answer, _ = call(f"{url}/api/v1/identifications/999999/annotations")
    assert (status, answer["error"]) == (404, "no identification with id 999999")
    status, answer, _ = call(f"{url}/api/v1/identifications/1/annotations")
    assert (status, answer["status"], answer["annotations"]) == (200, "predicted", [])


def test_reviews_need_a_login_even_on_loopback(review_db: Path) -> None:
    for base in serve(DashboardSettings(db_url=str(review_db), port=0)):
        status, answer, _ = _post(base, 1, {"label": "A"}, JSON)
        assert status == 403
        assert "--auth-file" in answer["error"]
        assert call(base + "/api/v1/review/queue")[0] == 200


def test_openapi_lists_the_review_endpoints(url: str) -> None:
    _, doc, _ = call(url + "/api/v1/openapi.json")
    paths = doc["paths"]
    assert "get" in paths["/api/v1/review/queue"]
    assert {"get", "post"} <= set(paths["/api/v1/identifications/{ident}/annotations"])
    assert {"ReviewQueue", "AnnotationRow", "NewAnnotation"} <= set(doc["components"]["schemas"])


# --- the HTML page: its login and its form, without a browser ------------------------------


def _form(url: str, fields: str, headers: dict[str, str]) -> tuple[int, str, str | None]:
    """POST the review form; status, text and Location (redirects are not followed)."""

    class Keep(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    form = {**headers, "Content-Type": "application/x-www-form-urlencoded"}
    request = urllib.request.Request(url + "/review", fields.encode(), form, method="POST")
    try:
        with urllib.request.build_opener(Keep).open(request, timeout=30) as response:
            return response.status, response.read().decode(), response.headers.get("Location")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), exc.headers.get("Location")


def test_review_page_needs_a_login_and_refuses_other_sites(url: str, review_db: Path) -> None:
    status, _, headers = call(url + "/review")
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Basic")
    basic = {"Authorization": "Basic " + base64.b64encode(f"alice:{TOKEN}".encode()).decode()}
    status, page, _ = call(url + "/review?device=scope-a", headers=basic)
    assert status == 200
    assert 'accesskey="1"' in page
    assert "low score" in page
    # An answer keeps the filters and the position; the page then shows the next one.
    status, _, location = _form(url, "ident=1&answer=B&device=scope-a&n=0", basic)
    assert (status, location) == (303, "/review?device=scope-a&n=0&saved=1")
    with open_store(str(review_db), create=False) as store:
        assert [(a.label, a.reviewer) for a in store.annotations(1)] == [("B", "alice")]
    status, page, _ = _form(url, "ident=2&other=Dragon&n=0", basic)
    assert status == 400
    assert "unknown label &#39;Dragon&#39;; known labels: A, B, C" in page
    status, page, _ = _form(url, "ident=2&answer=A", {**basic, "Sec-Fetch-Site": "cross-site"})
    assert status == 403
    assert "must come from this dashboard" in page
    assert _form(url, "ident=2&answer=A", {})[0] == 401


def test_review_page_without_an_auth_file_says_how_to_get_one(review_db: Path) -> None:
    for base in serve(DashboardSettings(db_url=str(review_db), port=0)):
        status, page, _ = call(base + "/review")
        assert status == 403
        assert "--auth-file" in page
