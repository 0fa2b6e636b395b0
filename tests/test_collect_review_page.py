"""The review page (``/review``) in the real headless Chromium of test_collect_web:
reviews given with the keyboard's access keys, each followed by the next item."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import received
from test_collect_web import Browser
from test_collect_web import browser as browser  # noqa: PLC0414  (the fixture)
from test_collect_web_api import TOKEN

from fieldscope.collect.samples import sample_identification
from fieldscope.collect.store import NOT_A_TAXON, open_store
from fieldscope.collect.web import Dashboard, DashboardSettings
from fieldscope.edge.specimens import SPECIES, render_specimen

LABELS = tuple(s.name for s in SPECIES[:4])
DAY = datetime(2026, 11, 23, 18, 0, tzinfo=UTC)


@pytest.fixture
def review_url(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """Three uncertain identifications (scores 0.30, 0.35, 0.40) with archived images,
    and a dashboard that requires alice's token."""
    db, archive = tmp_path / "c.sqlite", tmp_path / "archive"
    rng = np.random.default_rng(0)
    messages = []
    for seq in range(3):
        path = f"/var/lib/fieldscope/archive/2026-11-23/{seq}.png"
        messages.append(sample_identification(
            seq, label=None, score=0.30 + 0.05 * seq, labels=LABELS, archived_path=path,
            captured_at=DAY + timedelta(minutes=seq),
        ))  # fmt: skip
        folder = archive / "pond-3" / "scope-a" / "2026-11-23"
        folder.mkdir(parents=True, exist_ok=True)
        rgb = render_specimen(LABELS[seq], rng, 128)
        cv2.imwrite(str(folder / f"{seq}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    with open_store(str(db)) as store:
        store.write([received(m) for m in messages])
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice:{TOKEN}\n", encoding="utf-8")
    settings = DashboardSettings(db_url=str(db), port=0, archive=archive, auth_file=tokens)
    dashboard = Dashboard(settings)
    host, port = dashboard.start()
    try:
        yield f"http://{host}:{port}", db
    finally:
        dashboard.stop()


def press_access_key(browser: Browser, key: str) -> None:
    """Alt+key, the access-key chord of Chromium on Linux, and wait for the next page."""
    browser.events.clear()
    code = f"Digit{key}" if key.isdigit() else f"Key{key.upper()}"
    for kind in ("keyDown", "keyUp"):
        browser.call(
            "Input.dispatchKeyEvent", session=True, type=kind, modifiers=1, key=key, code=code,
            windowsVirtualKeyCode=ord(key.upper()), unmodifiedText=key,
        )  # fmt: skip
    browser.wait_event("Page.loadEventFired")


def shown(browser: Browser) -> int:
    return int(browser.js("document.querySelector('#review-item').dataset.id"))


@pytest.mark.slow
def test_reviews_by_access_key_show_the_next_item(
    review_url: tuple[str, Path], browser: Browser
) -> None:
    url, db = review_url
    basic = base64.b64encode(f"alice:{TOKEN}".encode()).decode()
    browser.call("Network.enable", session=True)
    browser.call(
        "Network.setExtraHTTPHeaders", session=True, headers={"Authorization": f"Basic {basic}"}
    )
    browser.goto(url + "/")
    assert browser.js("document.querySelector('nav a[href=\"/review\"]').innerText") == "Review"
    browser.goto(url + "/review")
    with open_store(str(db), create=False) as store:
        ids = [r.id for r in store.iter_identifications()]
        first = store.identification(ids[0])
    assert first is not None
    assert shown(browser) == ids[0]  # the lowest score first
    assert browser.js("document.querySelector('img.review-image').naturalWidth") > 0
    assert browser.js("document.querySelectorAll('script').length") == 0
    assert browser.js("document.querySelectorAll('#top-k tbody tr').length") == 3

    press_access_key(browser, "2")  # the second of the top-k
    assert "Saved the review of" in browser.js("document.querySelector('#saved').innerText")
    assert shown(browser) == ids[1]
    press_access_key(browser, "s")  # skip: the next one, nothing stored
    assert shown(browser) == ids[2]
    press_access_key(browser, "n")  # not a taxon
    assert "Nothing is waiting" not in browser.js("document.body.innerText")
    assert browser.js("document.querySelector('#queue-empty').innerText").startswith(
        "No more items after 1 skipped"
    )
    with open_store(str(db), create=False) as store:
        assert [(a.label, a.reviewer) for a in store.annotations(ids[0])] == [
            (first.top_k[1][0], "alice")
        ]
        assert store.annotations(ids[1]) == []
        assert [a.label for a in store.annotations(ids[2])] == [NOT_A_TAXON]
