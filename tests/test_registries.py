"""Camera backends, denoise filters and export formats are registries: a new one is an
entry, used through the same make_camera / denoise / export, and an unknown name is
answered with the known ones. Registries are immutable: an entry added for a test
lives in that test's own copy, never in the built-in table."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import numpy as np
import pytest
from helpers import store_holding

from fieldscope.collect.export import (
    EXPORTERS,
    FORMATS,
    ExportError,
    ExportFormat,
    ExportOptions,
    ExportSummary,
    export,
)
from fieldscope.collect.samples import sample_identification
from fieldscope.collect.store import IdentificationRow, Store
from fieldscope.edge import config
from fieldscope.edge.capture import (
    CAMERA_BACKENDS,
    CAMERAS,
    CameraBackend,
    CameraSupervisor,
    Frame,
    ReplayOptions,
    make_camera,
)
from fieldscope.edge.config import CameraConfig
from fieldscope.edge.denoise import (
    DENOISE_DEFAULTS,
    DENOISE_LIMITS,
    DENOISE_METHODS,
    FILTERS,
    DenoiseFilter,
    DenoiseParam,
    denoise,
)
from fieldscope.edge.errors import ConfigError, RecipeError
from fieldscope.edge.preprocess import PreprocessRecipe, save_png
from fieldscope.edge.registry import Registry
from fieldscope.edge.typed import problems_of

# ── camera backends ──────────────────────────────────────────────────────────────────


class ToyOptions(msgspec.Struct, frozen=True, kw_only=True):
    grey: int = 7


class ToyCamera:
    """A camera that gives one flat grey frame per read."""

    def __init__(self, options: ToyOptions, data_dir: Path) -> None:
        self.name = f"toy:{data_dir.name}"
        self.options = options
        self.opened = False

    def open(self) -> None:
        self.opened = True

    def read(self, timeout: float) -> Frame | None:
        image = np.full((4, 6, 3), self.options.grey, dtype=np.uint8)
        return Frame(image=image, source=self.name, captured_at=datetime.now(UTC))

    def close(self) -> None:
        self.opened = False


TOY = CameraBackend("toy", ToyOptions, lambda o, d, p: ToyCamera(o, d), "a test camera")


def test_a_backend_added_to_a_copy_of_the_registry_runs_through_make_camera(
    tmp_path: Path,
) -> None:
    backends = CAMERAS.adding("toy", TOY)
    camera = make_camera(CameraConfig(backend="toy"), tmp_path, backends=backends)
    assert isinstance(camera, ToyCamera)
    assert camera.options == ToyOptions()  # the configuration carries none: defaults
    supervisor = CameraSupervisor(camera, threading.Event())
    frame = supervisor.read(0.1)
    assert frame is not None
    assert frame.image.shape == (4, 6, 3)
    assert int(frame.image[0, 0, 0]) == 7
    # The built-in table did not change: the toy lived in the test's copy only.
    assert "toy" not in CAMERAS
    assert CAMERA_BACKENDS == ("picamera2", "opencv", "folder", "replay")
    with pytest.raises(ConfigError, match="unknown camera backend 'toy'"):
        make_camera(CameraConfig(backend="toy"), tmp_path)


def test_an_unknown_backend_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        make_camera(CameraConfig(backend="picamera"), tmp_path)
    assert str(caught.value) == (
        "camera.backend: unknown camera backend 'picamera'; known: picamera2, opencv, "
        "folder, replay (did you mean 'picamera2'?)"
    )


def test_a_builtin_backend_is_built_from_its_own_options_model(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    save_png(images / "a.png", np.full((8, 8, 3), 200, dtype=np.uint8))
    options = ReplayOptions(path=images, rate_hz=0)
    camera = make_camera(CameraConfig(backend="replay", replay=options), tmp_path)
    camera.open()
    frame = camera.read(0.5)
    assert frame is not None
    assert int(frame.image[0, 0, 0]) == 200
    camera.close()
    with pytest.raises(ConfigError, match=r"camera.replay.path: required"):
        make_camera(CameraConfig(backend="replay"), tmp_path)


def test_edge_toml_camera_options_are_the_registrys_models(tmp_path: Path) -> None:
    """One copy: each [camera.<backend>] of edge.toml is read as that backend's own
    options model from the registry; an unknown option gets a did-you-mean and a bad
    value its file:line, each problem once (also for options built in code)."""
    fields = {f.name: f.type for f in msgspec.structs.fields(CameraConfig)}
    for name in CAMERA_BACKENDS:
        assert fields[name] is CAMERAS[name].options
    (tmp_path / "in").mkdir()
    path = tmp_path / "edge.toml"
    path.write_text(
        '[device]\nstation = "pond"\nid = "a"\n[model]\nbundle = "b"\n'
        '[mqtt]\nhost = "127.0.0.1"\n'
        '[camera]\nbackend = "folder"\n'
        '[camera.folder]\npath = "in"\nsettle = 2\nhandled = "mvoe"\n'
        "[camera.opencv]\nfps = 0\nwidth = 640\n"
        '[camera.picamera2]\ncontrols = { ExposureTime = "long" }\n',
        encoding="utf-8",
    )
    with pytest.raises(config.ConfigFileError) as caught:
        config.load_config(path, environ={})
    assert str(caught.value).splitlines() == [
        f"{path}:12: camera.folder.settle: unknown key (did you mean 'settle_s'?)",
        f"{path}:13: camera.folder.handled: must be one of keep, move, delete, got 'mvoe' "
        "(did you mean 'move'?)",
        f"{path}:15: camera.opencv.fps: must be in (0, 1000], got 0.0",
        f"{path}:16: camera.opencv.width: needs height as well (width and height go together)",
        f"{path}:18: camera.picamera2.controls.ExposureTime: must be a number, a boolean or "
        "an array of numbers, got a string 'long'",
    ]
    folder = CAMERAS["folder"].options(path=tmp_path / "in", settle_s=-1.0, patterns=())
    assert problems_of(CameraConfig(backend="folder", folder=folder)) == [
        ("folder.settle_s", "must be in [0, 3600] seconds, got -1.0"),
        ("folder.patterns", "must be a non-empty list of non-empty glob patterns"),
    ]


def _path_hook(kind: type, value: object) -> object:
    return Path(str(value)) if kind is Path else value


@pytest.mark.parametrize("name", ["picamera2", "opencv", "folder", "replay"])
def test_the_options_models_decode_from_a_table_and_have_a_json_schema(name: str) -> None:
    """What a generic TOML -> Struct loader needs from each backend's options model."""
    model = CAMERAS[name].options
    schema = msgspec.json.schema(model)
    assert set(schema["$defs"][model.__name__]["properties"]) == set(model.__struct_fields__)
    assert msgspec.convert({}, model) == model()
    table = {
        "picamera2": {"camera_num": 1, "controls": {"ExposureTime": 2000, "ColourGains": [1, 2]}},
        "opencv": {"source": "rtsp://cam/stream", "fps": 5},
        "folder": {"path": "/data/in", "handled": "move", "settle_s": 2},
        "replay": {"path": "/data/specimens", "rate_hz": 0, "loop": True},
    }[name]
    decoded = msgspec.convert(table, model, dec_hook=_path_hook)
    assert not decoded.problems()
    for key, value in table.items():
        got = getattr(decoded, key)
        assert str(got) == value if isinstance(got, Path) else got is not None
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.convert({"not_an_option": 1}, model)


def test_a_registry_is_immutable_and_refuses_a_name_twice() -> None:
    with pytest.raises(ValueError, match="'folder' is registered twice"):
        CAMERAS.adding("folder", TOY)
    with pytest.raises(TypeError):
        CAMERAS._entries["toy"] = TOY  # type: ignore[index]
    assert Registry("thing", [("a", 1)]).adding("b", 2).names() == ("a", "b")


# ── denoise filters ──────────────────────────────────────────────────────────────────


def _invert(rgb: np.ndarray, params: object) -> np.ndarray:
    amount = int(params["amount"])  # type: ignore[index]
    return (amount - rgb.astype(np.int16)).clip(0, 255).astype(np.uint8)


INVERT = DenoiseFilter(
    name="invert",
    summary="a test filter",
    params=(DenoiseParam("amount", 255, 0, 255, window=True),),
    apply=_invert,
)


def test_a_filter_added_to_a_copy_of_the_registry_runs_through_denoise() -> None:
    image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    filters = FILTERS.adding("invert", INVERT)
    np.testing.assert_array_equal(denoise(image, "invert", filters=filters), 255 - image)
    np.testing.assert_array_equal(
        denoise(image, "invert", {"amount": 100.0}, filters=filters),
        (100 - image.astype(np.int16)).clip(0, 255),
    )
    # Its parameters are validated from its declaration, like the built-in ones.
    with pytest.raises(RecipeError, match=r"denoise_params\.amount .*255"):
        denoise(image, "invert", {"amount": 300}, filters=filters)
    with pytest.raises(RecipeError, match=r"denoise_params\.amount must be an integer"):
        denoise(image, "invert", {"amount": 2.5}, filters=filters)
    with pytest.raises(RecipeError, match=r"not a parameter of 'invert' \(it takes amount\)"):
        denoise(image, "invert", {"ksize": 3}, filters=filters)
    # Not in the built-in table: denoise and recipes (bundles) do not know it.
    assert "invert" not in FILTERS
    with pytest.raises(
        RecipeError,
        match="denoise must be one of none, bilateral, median, gaussian, nlmeans, got 'invert'",
    ):
        denoise(image, "invert")
    with pytest.raises(RecipeError, match="denoise must be one of"):
        PreprocessRecipe(denoise="invert")


def test_the_filter_table_keeps_its_names_defaults_and_limits() -> None:
    """The values every bundle and run folder was made with."""
    assert DENOISE_METHODS == ("none", "bilateral", "median", "gaussian", "nlmeans")
    assert {k: dict(v) for k, v in DENOISE_DEFAULTS.items()} == {
        "none": {},
        "bilateral": {"diameter": 9, "sigma_color": 75.0, "sigma_space": 75.0},
        "median": {"ksize": 5},
        "gaussian": {"ksize": 5, "sigma": 0.0},
        "nlmeans": {"h": 10.0, "h_color": 10.0, "template_window": 7, "search_window": 21},
    }
    assert {k: dict(v) for k, v in DENOISE_LIMITS.items()} == {
        "none": {},
        "bilateral": {"diameter": (0, 31), "sigma_color": (0, 1000), "sigma_space": (0, 1000)},
        "median": {"ksize": (1, 31)},
        "gaussian": {"ksize": (1, 63), "sigma": (0, 100)},
        "nlmeans": {
            "h": (0, 255),
            "h_color": (0, 255),
            "template_window": (1, 15),
            "search_window": (1, 35),
        },
    }


# ── export formats ───────────────────────────────────────────────────────────────────


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    base = datetime(2026, 11, 20, 6, 30, tzinfo=UTC)
    labels = ["Amoeba", None, "Euglena"]
    messages = [
        sample_identification(
            i, device="a", station="s1", label=label, captured_at=base + timedelta(hours=i)
        )
        for i, label in enumerate(labels)
    ]
    with store_holding(tmp_path / "collect.sqlite", messages) as reader:
        yield reader


def _write_labels(
    rows: Iterable[IdentificationRow], out: Path, options: ExportOptions
) -> ExportSummary:
    lines = [f"{options.dataset_name}:{row.seq}:{row.label or '-'}" for row in rows]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return ExportSummary(out, "labels", len(lines))


def test_a_format_added_to_a_copy_of_the_registry_runs_through_export(
    store: Store, tmp_path: Path
) -> None:
    formats = EXPORTERS.adding("labels", ExportFormat("labels", ".txt", _write_labels))
    out = tmp_path / "labels.txt"
    summary = export(store, "labels", out, dataset_name="pond", formats=formats)
    assert summary.rows == 3
    assert out.read_text(encoding="utf-8").splitlines() == [
        "pond:0:Amoeba",
        "pond:1:-",
        "pond:2:Euglena",
    ]
    assert "labels" not in EXPORTERS
    with pytest.raises(
        ExportError,
        match="unknown export format 'labels'; known: csv, parquet, darwin-core, ecotaxa, folders",
    ):
        export(store, "labels", tmp_path / "again.txt")


def test_the_format_names_and_command_line_choices_come_from_the_registry() -> None:
    from fieldscope.cli.main import build_parser

    names = ("csv", "parquet", "darwin-core", "ecotaxa", "folders")
    assert FORMATS == EXPORTERS.names() == names
    assert [EXPORTERS[name].suffix for name in FORMATS] == [".csv", ".parquet", ".zip", ".zip", ""]
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["collect", "export", "--format", "labels", "--out", "x"])
    args = parser.parse_args(["collect", "export", "--format", "ecotaxa", "--out", "x"])
    assert args.fmt == "ecotaxa"
