"""From the field to a better model, end to end with the real parts.

station (the real daemon, archive mode "uncertain") -> real Mosquitto -> the real
collector -> the review queue over the dashboard's HTTP API with a login -> ``collect
export --format folders`` -> ``fieldscope train ORIGINAL REVIEWED`` -> ``convert`` ->
the new bundle is better on held-out field images than the old one.

The data makes the improvement certain rather than likely. Three species of synthetic
specimens; in the lab set two of them, A and B, cannot be told apart: every A image is
filed once under A and once, byte-identical, under B (say, a lab that could not
separate the two). The old model can then only give A and B the same probability on
anything that looks like them, so the station finds those images uncertain and
archives them, and the old bundle gets half of A and B wrong at best. In the field the
station's illumination shows B with a blue cast. Experts review the uncertain images
(each gets its true species here), the export turns the reviews into class folders,
and the model trained on the lab set plus the reviewed images learns that the cast
means B and the plain look A. The held-out field images were never seen by either
model. Everything is seeded, and the margins asserted are well inside the gaps observed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import Broker
from helpers import run_main, running_collector, wait_for
from test_collect_web_api import call, serve

from fieldscope.collect.subscriber import CollectorSettings
from fieldscope.collect.web import DashboardSettings
from fieldscope.edge.broker import BrokerSettings
from fieldscope.edge.bundle import verify_bundle
from fieldscope.edge.classify import Classifier
from fieldscope.edge.preprocess import load_and_preprocess
from fieldscope.edge.species import species_names
from fieldscope.edge.specimens import render_specimen

pytestmark = [pytest.mark.slow, pytest.mark.mqtt]

SPECIES = species_names()[:3]
A, B, C = SPECIES
# What each species looks like: B is drawn as A (the lab cannot tell them apart).
LOOK = {A: A, B: A, C: C}
FIELD_CAST = np.array([0.6, 0.85, 1.3], dtype=np.float32)  # RGB: B's blue cast in the field
SIZE = 64
LAB_PER_CLASS = 16
FIELD_PER_CLASS = 16
HELD_OUT_PER_CLASS = 8
TOKEN = "reviewer-token-for-the-loop"
TRAIN = [
    "--backbone", "efficientnet_lite0", "--weights", "imagenet", "--image-size", "64",
    "--epochs", "15", "--fine-tune-epochs", "0", "--batch-size", "16", "--seed", "0",
    # No randomly augmented copies: A's and B's identical lab images stay identical.
    "--augment-copies", "1",
]  # fmt: skip
# The station accepts at 0.9: the A/B look-alikes (0.5 each) are uncertain, C is not.
# Fidelity is not this test's subject (test_convert_cli.py): no refusal, no float-layer search.
CONVERT = ["--threshold", "0.9", "--max-accuracy-drop", "100", "--no-float-fallback"]


def _specimen(species: str, seed: int, i: int, *, field: bool) -> np.ndarray:
    rng = np.random.default_rng([seed, SPECIES.index(species), i])
    image = render_specimen(LOOK[species], rng, SIZE).astype(np.float32)
    if field and species == B:
        image *= FIELD_CAST
    return np.clip(image, 0, 255).astype(np.uint8)


def _write(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


def _lab_set(root: Path) -> Path:
    """The original set, split into train/val/test so that A and B hold the same images
    in each part (a seeded split of class folders would give them different ones, and
    the old model something to tell them apart by); C its own."""
    parts = {"train": LAB_PER_CLASS - 8, "val": 4, "test": 4}
    i = 0
    for part, n in parts.items():
        for _ in range(n):
            a = _specimen(A, 0, i, field=False)
            _write(root / part / A / f"lab-{i:02d}.png", a)
            _write(root / part / B / f"lab-{i:02d}.png", a)
            _write(root / part / C / f"lab-{i:02d}.png", _specimen(C, 0, i, field=False))
            i += 1
    return root


def _field_images(folder: Path, seed: int, per_class: int) -> dict[str, str]:
    """Field images in one flat folder, shuffled; returns sha256 -> true species."""
    truth: dict[str, str] = {}
    order = np.random.default_rng(seed).permutation(per_class * len(SPECIES))
    for n, k in enumerate(order):
        species, i = SPECIES[k % len(SPECIES)], int(k // len(SPECIES))
        path = _write(folder / f"frame-{n:03d}.png", _specimen(species, seed, i, field=True))
        truth[hashlib.sha256(path.read_bytes()).hexdigest()] = species
    return truth


def _station_config(work: Path, broker: Broker, camera: Path, bundle: Path) -> Path:
    def q(value: object) -> str:
        return json.dumps(str(value))  # a TOML basic string

    path = work / "station.toml"
    path.write_text(
        f"""\
[device]
station = "pond-3"
id = "scope-a"
data_dir = {q(work / "station")}

[camera]
backend = "replay"
trigger = "continuous"
max_rate_hz = 50.0

[camera.replay]
path = {q(camera)}
rate_hz = 0.0
loop = false

[model]
bundle = {q(bundle)}

[mqtt]
host = {q(broker.host)}
port = {broker.port}

[archive]
mode = "uncertain"
""",
        encoding="utf-8",
    )
    return path


@contextlib.contextmanager
def _station(config: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The real daemon (``fieldscope edge run``) in its own process, stopped with SIGTERM."""
    log = config.parent / "station.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "fieldscope.cli", "edge", "run", "--config", str(config)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


def _cli(*argv: str) -> str:
    outcome = run_main(list(argv))
    assert outcome.code == 0, f"fieldscope {' '.join(argv)}: {outcome.err[-2000:]}"
    return outcome.out


def _review_queue(url: str, truth: dict[str, str]) -> dict[str, int]:
    """Review every item of the queue over the API, with its true species; returns the
    number of reviews per species."""
    query = urllib.parse.urlencode({"qc_share": 0, "limit": 500})
    status, page, _ = call(f"{url}/api/v1/review/queue?{query}")
    assert status == 200, page
    assert page["total"] == len(page["items"]) > 0
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    reviewed: dict[str, int] = {}
    for item in page["items"]:
        row = item["identification"]
        species = truth[row["image_sha256"]]
        body = json.dumps({"label": species, "note": "loop test"}).encode()
        target = f"{url}/api/v1/identifications/{row['id']}/annotations"
        status, answer, _ = call(target, "POST", body, headers)
        assert status == 201, answer
        reviewed[species] = reviewed.get(species, 0) + 1
    _, after, _ = call(f"{url}/api/v1/review/queue?{query}")
    assert after["total"] == 0  # every reviewed image left the queue
    return reviewed


def _accuracy(bundle: Path, held_out: Path, truth: dict[str, str]) -> dict[str, float]:
    """Top-1 accuracy of a bundle on the held-out field images, as the station runs it:
    over all of them (``"all"``) and per species."""
    loaded = verify_bundle(bundle)
    classifier = Classifier(loaded, 1)
    recipe = loaded.manifest.preprocessing
    right: dict[str, list[bool]] = {species: [] for species in SPECIES}
    for path in sorted(held_out.glob("*.png")):
        prediction = classifier.classify(load_and_preprocess(path, recipe))
        species = truth[hashlib.sha256(path.read_bytes()).hexdigest()]
        right[species].append(prediction.top_k[0][0] == species)
    every = [hit for hits in right.values() for hit in hits]
    return {"all": sum(every) / len(every)} | {s: sum(h) / len(h) for s, h in right.items()}


def test_reviewed_field_images_train_a_better_model(mosquitto: Broker, tmp_path: Path) -> None:
    lab = _lab_set(tmp_path / "lab")
    camera, held_out = tmp_path / "camera", tmp_path / "held-out"
    field_truth = _field_images(camera, seed=1, per_class=FIELD_PER_CLASS)
    held_out_truth = _field_images(held_out, seed=2, per_class=HELD_OUT_PER_CLASS)
    old_run, old_bundle = tmp_path / "old-run", tmp_path / "old-bundle"
    _cli("train", str(lab), "--out", str(old_run), *TRAIN)
    _cli("convert", str(old_run), "--out", str(old_bundle), *CONVERT)

    # The station identifies the field images with the old bundle; the collector stores them.
    db, tokens = tmp_path / "collect.sqlite", tmp_path / "reviewers"
    tokens.write_text(f"ana:{TOKEN}\n", encoding="utf-8")
    config = _station_config(tmp_path, mosquitto, camera, old_bundle)
    settings = CollectorSettings(
        broker=BrokerSettings(host=mosquitto.host, port=mosquitto.port, client_id="loop")
    )
    with running_collector(db, settings) as collector, _station(config) as station:
        wait_for(
            lambda: collector.stats.stored >= len(field_truth) or station.poll() is not None,
            timeout=120,
            what="the station's identifications in the collector",
        )
        assert collector.stats.stored == len(field_truth), (tmp_path / "station.log").read_text()
    archive = tmp_path / "station" / "archive"
    archived = {hashlib.sha256(p.read_bytes()).hexdigest() for p in archive.rglob("*.png")}
    # The uncertain images were archived: every A/B look-alike, not the distinct C.
    look_alikes = {sha for sha, species in field_truth.items() if species != C}
    assert look_alikes <= archived
    assert len(archived) < len(field_truth)

    # Experts review the queue over the dashboard's API, with their login.
    dashboard = DashboardSettings(db_url=str(db), port=0, auth_file=tokens, archive=archive)
    for url in serve(dashboard):
        reviewed = _review_queue(url, field_truth)
    assert reviewed[A] == reviewed[B] == FIELD_PER_CLASS

    # Back to training: the reviewed images as class folders, beside the lab set.
    folders, new_run, new_bundle = tmp_path / "reviewed", tmp_path / "new-run", tmp_path / "new"
    _cli("collect", "export", "--db", str(db), "--format", "folders", "--out", str(folders),
         "--archive", str(archive))  # fmt: skip
    assert {p.name for p in folders.iterdir() if p.is_dir()} >= {A, B}
    _cli("train", str(lab), str(folders), "--out", str(new_run), *TRAIN)
    record = json.loads((new_run / "run.json").read_text())
    assert record["data_dirs"] == [str(lab.resolve()), str(folders.resolve())]
    assert record["format_version"] == 2
    _cli("convert", str(new_run), "--out", str(new_bundle), *CONVERT)

    old = _accuracy(old_bundle, held_out, held_out_truth)
    new = _accuracy(new_bundle, held_out, held_out_truth)
    # The old model gives A and B the same score, so it answers both alike: right on one
    # of them at most (2/3 over all). The new one tells them apart. Observed: old 0.625
    # (A 0.875, B 0), new 0.875 (A 0.625, B 1.0).
    assert old[A] + old[B] <= 1.0, old
    assert new[A] + new[B] >= old[A] + old[B] + 0.4, (old, new)
    assert new["all"] >= old["all"] + 0.15, (old, new)
