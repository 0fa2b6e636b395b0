"""The edge daemon's TOML configuration: defaults, every mistake as one clear line, secrets."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import pytest
from helpers import MINIMAL_EDGE_CONFIG
from msgspec.structs import replace

from fieldscope.edge.config import (
    ArchiveConfig,
    CameraConfig,
    ConfigFileError,
    DeviceConfig,
    EdgeConfig,
    ModelConfig,
    MqttConfig,
    OutboxConfig,
    PreprocessingOverrides,
    check_config,
    config_summary,
    load_config,
    parse_size,
)
from fieldscope.edge.errors import ConfigError, RecipeError
from fieldscope.edge.preprocess import PreprocessRecipe

MINIMAL = MINIMAL_EDGE_CONFIG


def write(tmp_path: Path, text: str, name: str = "edge.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def add(text: str, section: str, line: str) -> str:
    """``text`` with ``line`` set in ``[section]``: replacing the key if it is there,
    else added as the section's first key (the section appended if absent)."""
    header = f"[{section}]\n"
    if header not in text:
        return text + f"\n{header}{line}\n"
    start = text.index(header) + len(header)
    end = text.find("\n[", start)
    end = len(text) if end < 0 else end + 1
    body = text[start:end]
    key = line.split("=", maxsplit=1)[0].strip()
    lines = body.splitlines(keepends=True)
    for i, existing in enumerate(lines):
        if existing.split("=")[0].strip() == key:
            lines[i] = line + "\n"
            return text[:start] + "".join(lines) + text[end:]
    return text[:start] + line + "\n" + body + text[end:]


def problems_of(path: Path, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigFileError) as info:
        load_config(path, environ={} if environ is None else environ)
    return [str(p) for p in info.value.problems]


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), start=1) if needle in line)


def test_minimal_config_gets_documented_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL), environ={})
    assert cfg.device.data_dir == tmp_path / "data"
    assert cfg.outbox.path == tmp_path / "data" / "outbox.sqlite"
    assert cfg.archive.dir == tmp_path / "data" / "archive"
    assert cfg.archive.mode == "none"
    assert cfg.camera.replay.path == tmp_path / "images"
    assert cfg.model.bundle == tmp_path / "bundles" / "current"
    assert (cfg.mqtt.port, cfg.mqtt.tls, cfg.mqtt.prefix) == (1883, None, "fieldscope")
    assert cfg.mqtt.client_id == "fieldscope-pond-3-scope-a"
    assert cfg.topics.identification == "fieldscope/pond-3/scope-a/identification"
    assert cfg.preprocessing.empty
    assert cfg.quality.enabled
    assert cfg.validate() == []
    assert cfg.source == tmp_path / "edge.toml"


def test_relative_paths_follow_the_file_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    conf = tmp_path / "etc"
    conf.mkdir()
    cfg = load_config(write(conf, add(MINIMAL, "device", 'data_dir = "../state"')), environ={})
    assert cfg.device.data_dir == conf / ".." / "state"
    assert cfg.outbox.path.parent == conf / ".." / "state"


def test_bundle_symlink_is_kept_not_resolved(tmp_path: Path) -> None:
    (tmp_path / "bundles" / "v1").mkdir(parents=True)
    (tmp_path / "bundles" / "current").symlink_to("v1")
    cfg = load_config(write(tmp_path, MINIMAL), environ={})
    assert cfg.model.bundle.name == "current"
    assert cfg.model.bundle.is_symlink()


def test_tls_table_switches_the_default_port(tmp_path: Path) -> None:
    ca = write(tmp_path, "not really a CA", "ca.pem")
    text = MINIMAL + f'\n[mqtt.tls]\nca = "{ca.name}"\n'
    cfg = load_config(write(tmp_path, text), environ={})
    assert cfg.mqtt.port == 8883
    assert cfg.mqtt.tls is not None
    assert cfg.mqtt.tls.ca == ca
    empty = load_config(write(tmp_path, MINIMAL + "\n[mqtt.tls]\n"), environ={})
    assert empty.mqtt.tls is not None
    assert empty.mqtt.port == 8883
    tls_lines = config_summary(empty).split("[mqtt.tls]\n")[1].splitlines()
    assert tls_lines[:3] == ["ca = (the system's CA store)", "cert = (not set)", "key = (not set)"]


def test_shipped_example_loads_and_states_the_real_defaults(tmp_path: Path) -> None:
    example = resources.files("fieldscope.edge").joinpath("examples", "edge.toml")
    text = example.read_text(encoding="utf-8")
    cfg = load_config(write(tmp_path, text), environ={})
    minimal = load_config(
        write(
            tmp_path,
            '[device]\nstation = "pond-3"\nid = "scope-a"\n[camera]\nbackend = "picamera2"\n'
            '[model]\nbundle = "bundles/current"\n[mqtt]\nhost = "broker.example.org"\n',
            "minimal.toml",
        ),
        environ={},
    )
    # Every value the example writes out is the default a minimal file gets.
    assert replace(cfg, source=None) == replace(minimal, source=None)


@pytest.mark.parametrize(
    ("section", "line", "key", "expected"),
    [
        ("mqtt", "prot = 8883", "mqtt.prot", "unknown key (did you mean 'port'?)"),
        ("mqtt", 'port = "1883"', "mqtt.port", "must be an integer, got a string '1883'"),
        ("mqtt", "port = 70000", "mqtt.port", "must be in 1..65535, got 70000"),
        ("mqtt", "qos = 2", "mqtt.qos", "QoS is fixed per topic"),
        ("mqtt", 'prefix = "a/+/b"', "mqtt.prefix", "must not contain '+'"),
        ("mqtt", "keepalive = 0", "mqtt.keepalive", "must be in 5..65535"),
        ("mqtt", 'client_id = "a/b"', "mqtt.client_id", "must not contain '/'"),
        ("mqtt", 'protocol = "4"', "mqtt.protocol", "must be one of 5, 3.1.1"),
        ("mqtt", "reconnect_backoff_s = [0.5, 2]", "mqtt.reconnect_backoff_s", "whole seconds"),
        ("outbox", "max_bytes = 100", "outbox.max_bytes", "at least 16 KiB"),
        ("mqtt", 'password = "secret"', "mqtt.password", "needs username as well"),
        ("device", 'station = "pond/3"', "device.station", "must not contain '/'"),
        ("camera", 'backend = "opencv2"', "camera.backend", "did you mean 'opencv'?"),
        ("camera", 'trigger = "sometimes"', "camera.trigger", "must be one of continuous"),
        ("camera", "max_rate_hz = -1", "camera.max_rate_hz", "must be in [0, 1000]"),
        ("camera", "reopen_backoff_s = [10, 1]", "camera.reopen_backoff_s", "min <= max"),
        ("camera", "reopen_backoff_s = 5", "camera.reopen_backoff_s", "array of two numbers"),
        ("camera", 'path = "in"', "camera.path", "did you mean camera.folder.path or"),
        ("camera.replay", "rate_hz = -2.0", "camera.replay.rate_hz", "must be in [0, 10000]"),
        ("camera.replay", 'loop = "yes"', "camera.replay.loop", "must be true or false"),
        ("camera.folder", "settle = 2", "camera.folder.settle", "did you mean 'settle_s'?"),
        ("camera.folder", 'handled = "archive"', "camera.folder.handled", "keep, move, delete"),
        ("camera.opencv", "source = 1.5", "camera.opencv.source", "device index"),
        ("camera.opencv", "width = 640", "camera.opencv.width", "needs height as well"),
        ("preprocessing", "size = [96, 96]", "preprocessing.size", "cannot be overridden"),
        ("preprocessing", 'denoise = "blur"', "preprocessing.denoise", "must be one of none"),
        (
            "preprocessing",
            'denoise = "median"\ndenoise_params = { ksize = 4 }',
            "preprocessing.denoise_params.ksize",
            "odd integer",
        ),
        (
            "preprocessing",
            "denoise_params = { ksize = 5 }",
            "preprocessing.denoise_params",
            "needs preprocessing.denoise",
        ),
        ("preprocessing", "fill = [0, 0]", "preprocessing.fill", '"border" or [R, G, B]'),
        ("preprocessing", 'resample = "area"', "preprocessing.resample", "cannot be overridden"),
        ("quality", "min_brightness = 1.5", "quality.min_brightness", "fraction in [0, 1]"),
        ("quality", "max_brightness = 0.01", "quality.max_brightness", "above min_brightness"),
        ("quality", "min_sharpness = nan", "quality.min_sharpness", "finite number"),
        ("model", "threads = 0", "model.threads", "must be in 1..64"),
        ("model", 'runtime = "tflite"', "model.runtime", "ai_edge_litert"),
        ("model", 'public_key = "missing.pem"', "model.public_key", "no such file"),
        ("outbox", 'when_full = "drop-newest"', "outbox.when_full", "drop-oldest, reject-new"),
        ("outbox", "max_messages = 0", "outbox.max_messages", "must be in 1.."),
        ("archive", 'mode = "uncertian"', "archive.mode", "did you mean 'uncertain'?"),
        ("archive", 'max_bytes = "lots"', "archive.max_bytes", "2 GiB"),
        ("archive", 'format = "gif"', "archive.format", "png, jpg"),
        ("heartbeat", "interval_s = 0", "heartbeat.interval_s", "must be in [1, 86400]"),
        ("log", 'level = "verbose"', "log.level", "DEBUG, INFO, WARNING, ERROR"),
        ("log", "summary_interval_s = 0.5", "log.summary_interval_s", "0 (off) or in [1, 86400]"),
        ("camera.replay", 'recursive = "yes"', "camera.replay.recursive", "true or false"),
        ("objects", 'mode = "segmnt"', "objects.mode", "must be one of frame, segment"),
        ("objects", "treshold = 'otsu'", "objects.treshold", "did you mean 'threshold'?"),
        ("objects", "um_per_px = 0", "objects.um_per_px", "um_per_px"),
        ("objects", "blur_px = 4", "objects.blur_px", "odd number of pixels"),
        ("objects", "max_objects = 0", "objects.max_objects", "must be in 1..100000"),
        ("objects", 'blank = "missing.png"', "objects.blank", "only used with background"),
        ("site", "decimal_latitude = 91", "site.decimal_latitude", "[-90, 90] decimal degrees"),
        ("site", "decimal_longitude = 'x'", "site.decimal_longitude", "must be a number"),
        ("site", "depth_m = -1", "site.depth_m", "must be in [0, 11000] metres"),
        ("site", "depth_m = 1\nelevation_m = 2", "site.depth_m", "not come with elevation_m"),
        ("site", 'country_code = "FRA"', "site.country_code", "ISO 3166-1 alpha-2"),
        ("site", 'name = "  "', "site.name", "must not be empty or blank"),
        ("site", "altitude = 3", "site.altitude", "did you mean 'decimal_latitude'?"),
        ("site", "coordinate_uncertainty_m = 30", "site.coordinate_uncertainty_m", "needs"),
        ("sample", "volume_l = 0", "sample.volume_l", "must be in (0, 1e+06] litres"),
        ("mqqt", 'host = "x"', "mqqt", "unknown section (did you mean 'mqtt'?)"),
    ],
)
def test_each_mistake_is_one_line_naming_file_line_and_key(
    tmp_path: Path, section: str, line: str, key: str, expected: str
) -> None:
    text = add(MINIMAL, section, line)
    path = write(tmp_path, text)
    problems = problems_of(path)
    assert len(problems) == 1, problems
    first_line = line.splitlines()[-1] if key.count(".") > 1 else line.splitlines()[0]
    number = line_of(text, first_line.split("=")[0].strip() + " ")
    if key == "mqqt":
        number = line_of(text, "[mqqt]")
    assert problems[0].startswith(f"{path}:{number}: {key}: "), problems[0]
    assert expected in problems[0]
    assert "\n" not in problems[0]


def test_the_issue_example_message_exactly(tmp_path: Path) -> None:
    path = write(tmp_path, add(MINIMAL, "mqtt", "prot = 8883"))
    assert problems_of(path) == [f"{path}:15: mqtt.prot: unknown key (did you mean 'port'?)"]


def test_all_problems_are_reported_at_once_in_file_order(tmp_path: Path) -> None:
    text = MINIMAL.replace('id = "scope-a"', 'id = "scope/a"').replace(
        'host = "127.0.0.1"', 'host = "mqtt://broker"\nprot = 1'
    )
    text = add(text, "archive", 'mode = "some"')
    path = write(tmp_path, text)
    problems = problems_of(path)
    assert [p.split(": ")[1] for p in problems] == [
        "device.id",
        "mqtt.host",
        "mqtt.prot",
        "archive.mode",
    ]
    with pytest.raises(ConfigError) as info:  # the CLI catches the base type
        load_config(path, environ={})
    assert str(info.value).count("\n") == 3


def test_missing_section_and_keys(tmp_path: Path) -> None:
    no_mqtt = MINIMAL.replace('[mqtt]\nhost = "127.0.0.1"\n', "")
    path = write(tmp_path, no_mqtt)
    assert problems_of(path) == [f"{path}: mqtt: section [mqtt] is missing (host is needed)"]
    no_host = MINIMAL.replace('host = "127.0.0.1"', "port = 1883")
    path = write(tmp_path, no_host)
    problems = problems_of(path)
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}:{line_of(no_host, '[mqtt]')}: mqtt.host: required")
    no_path = MINIMAL.replace('[camera.replay]\npath = "images"\n', "")
    problems = problems_of(write(tmp_path, no_path))
    assert len(problems) == 1
    assert "camera.replay.path: required when camera.backend = 'replay'" in problems[0]


def test_syntax_errors_and_unreadable_files_name_the_file(tmp_path: Path) -> None:
    broken = write(tmp_path, MINIMAL + "\n[log]\nlevel = \n")
    problems = problems_of(broken)
    assert problems == [f"{broken}:18: not valid TOML: Invalid value"]
    missing = tmp_path / "nope.toml"
    assert problems_of(missing) == [f"{missing}: no such file"]
    assert problems_of(tmp_path) == [f"{tmp_path}: is a directory, not a file"]
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe[device]")
    assert "is not UTF-8 text" in problems_of(binary)[0]


def test_key_lines_are_found_in_their_own_section(tmp_path: Path) -> None:
    # 'path' appears in three tables; the problem must point at the right one.
    text = MINIMAL + '\n[outbox]\npath = "q.sqlite"\n\n[archive]\npath = "x"\n'
    path = write(tmp_path, text)
    problems = problems_of(path)
    assert problems == [
        f"{path}:{len(text.splitlines())}: archive.path: unknown key "
        "(known here: dir, format, max_bytes, mode)"
    ]


def test_password_from_environment_variable(tmp_path: Path) -> None:
    text = MINIMAL + 'username = "scope"\npassword_env = "FIELDSCOPE_MQTT_PASSWORD"\n'
    path = write(tmp_path, text)
    cfg = load_config(path, environ={"FIELDSCOPE_MQTT_PASSWORD": "hunter2"})
    assert cfg.mqtt.password == "hunter2"
    assert cfg.mqtt.password_env == "FIELDSCOPE_MQTT_PASSWORD"
    # The secret never shows in the summary nor in a repr that might be logged.
    summary = config_summary(cfg)
    assert "hunter2" not in summary
    assert "hunter2" not in repr(cfg)
    assert "password = *** (from $FIELDSCOPE_MQTT_PASSWORD)" in summary
    problems = problems_of(path, environ={})
    assert problems == [
        f"{path}:17: mqtt.password_env: environment variable FIELDSCOPE_MQTT_PASSWORD is not "
        "set (set it in the service's EnvironmentFile=, or export it)"
    ]


def test_password_reference_form_and_conflicts(tmp_path: Path) -> None:
    text = MINIMAL + 'username = "${MQTT_USER}"\npassword = "${MQTT_PASS}"\n'
    path = write(tmp_path, text)
    cfg = load_config(path, environ={"MQTT_USER": "scope", "MQTT_PASS": "s3cret"})
    assert (cfg.mqtt.username, cfg.mqtt.password) == ("scope", "s3cret")
    problems = problems_of(path, environ={"MQTT_USER": "scope", "MQTT_PASS": ""})
    assert len(problems) == 1
    assert "mqtt.password: environment variable MQTT_PASS is empty" in problems[0]
    both = write(tmp_path, MINIMAL + 'username = "u"\npassword = "p"\npassword_env = "P"\n')
    assert "give either password or password_env, not both" in problems_of(both)[0]
    literal = load_config(
        write(tmp_path, MINIMAL + 'username = "u"\npassword = "$plain{x}"\n'), environ={}
    )
    assert literal.mqtt.password == "$plain{x}"


def test_stream_url_password_is_masked_in_the_summary(tmp_path: Path) -> None:
    text = MINIMAL.replace('backend = "replay"', 'backend = "opencv"') + (
        '\n[camera.opencv]\nsource = "rtsp://admin:topsecret@10.0.0.5/stream1"\n'
    )
    cfg = load_config(write(tmp_path, text), environ={})
    assert cfg.camera.opencv.source == "rtsp://admin:topsecret@10.0.0.5/stream1"
    summary = config_summary(cfg)
    assert "topsecret" not in summary
    assert 'source = "rtsp://admin:***@10.0.0.5/stream1"' in summary


def test_opencv_source_forms(tmp_path: Path) -> None:
    def source(value: str) -> int | str:
        text = MINIMAL.replace('backend = "replay"', 'backend = "opencv"')
        text += f"\n[camera.opencv]\nsource = {value}\n"
        return load_config(write(tmp_path, text), environ={}).camera.opencv.source

    assert source("1") == 1
    assert source('"/dev/video2"') == "/dev/video2"
    assert source('"http://cam.local/mjpg"') == "http://cam.local/mjpg"
    assert source('"clips/slide.avi"') == str(tmp_path / "clips" / "slide.avi")


def test_sizes_in_bytes() -> None:
    assert parse_size(1234) == 1234
    assert parse_size("500 MB") == 500_000_000
    assert parse_size("2GiB") == 2 * 1024**3
    assert parse_size("1.5G") == int(1.5 * 1024**3)
    assert parse_size("10 kB") == 10_000
    for bad in ("lots", "-5 MB", "5 iB", True, 2.5):
        with pytest.raises(ValueError, match="2 GiB"):
            parse_size(bad)


def test_preprocessing_overrides_apply_to_the_bundle_recipe() -> None:
    bundle = PreprocessRecipe(size=(96, 96), denoise="bilateral", denoise_params={"diameter": 5})
    assert PreprocessingOverrides().apply(bundle) is bundle
    # Same method: the bundle's parameters stay, updated by the override.
    same = PreprocessingOverrides(denoise="bilateral", denoise_params={"sigma_color": 30.0})
    recipe = same.apply(bundle)
    assert recipe.size == (96, 96)
    assert recipe.denoise_params["diameter"] == 5
    assert recipe.denoise_params["sigma_color"] == 30.0
    # Another method starts from its own defaults.
    other = PreprocessingOverrides(denoise="median", resize="stretch", fill=(0, 0, 0)).apply(bundle)
    assert (other.size, other.denoise, other.resize, other.fill) == (
        (96, 96),
        "median",
        "stretch",
        (0, 0, 0),
    )
    assert other.denoise_params == {"ksize": 5}
    with pytest.raises(RecipeError, match="diameter"):
        PreprocessingOverrides(denoise="median", denoise_params={"diameter": 3}).apply(bundle)


def test_config_built_in_code_validates_itself(tmp_path: Path) -> None:
    cfg = EdgeConfig(
        device=DeviceConfig("pond-3", "scope-a", tmp_path),
        camera=CameraConfig(backend="folder"),
        model=ModelConfig(bundle=tmp_path / "b"),
        mqtt=MqttConfig(host="localhost", client_id="x", port=0),
        outbox=OutboxConfig(path=tmp_path / "o.sqlite"),
        archive=ArchiveConfig(dir=tmp_path / "a", max_bytes=10),
    )
    assert cfg.validate() == [
        "camera.folder.path: required when camera.backend = 'folder' (the image folder)",
        "mqtt.port: must be in 1..65535, got 0",
        "archive.max_bytes: must be at least 1 MiB, got 10 bytes",
    ]


def test_watched_folder_must_not_be_the_data_dir(tmp_path: Path) -> None:
    text = MINIMAL.replace('backend = "replay"', 'backend = "folder"')
    text += '\n[camera.folder]\npath = "data"\n'
    problems = problems_of(write(tmp_path, text))
    assert len(problems) == 1
    assert "camera.folder.path: must not be the daemon's data_dir" in problems[0]


def test_summary_shows_only_the_chosen_backend(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL), environ={})
    summary = config_summary(cfg)
    assert "[camera.replay]" in summary
    assert "[camera.folder]" not in summary
    assert "# topics: fieldscope/pond-3/scope-a/..." in summary
    assert "tls = (off)" in summary
    assert f'path = "{tmp_path / "data" / "outbox.sqlite"}"' in summary


def test_environment_defaults_to_os_environ(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(os.environ, "FS_TEST_PW", "from-env")
    path = write(tmp_path, MINIMAL + 'username = "u"\npassword_env = "FS_TEST_PW"\n')
    assert load_config(path).mqtt.password == "from-env"


def test_stray_keys_point_to_where_they_belong(tmp_path: Path) -> None:
    path = write(tmp_path, "interval_s = 5\n" + MINIMAL)
    assert problems_of(path) == [
        f"{path}:1: interval_s: unknown key (did you mean camera.interval_s or "
        "heartbeat.interval_s?)"
    ]


def test_tls_client_certificate_needs_its_key(tmp_path: Path) -> None:
    cert = write(tmp_path, "cert", "scope.crt")
    text = MINIMAL + f'\n[mqtt.tls]\ncert = "{cert.name}"\n'
    path = write(tmp_path, text)
    assert problems_of(path) == [
        f"{path}:18: mqtt.tls.cert: needs key as well (cert and key go together)"
    ]
    text = MINIMAL + '\n[mqtt.tls]\nca = "nope.pem"\n'
    path = write(tmp_path, text)
    assert problems_of(path) == [f"{path}:18: mqtt.tls.ca: no such file: {tmp_path / 'nope.pem'}"]


def test_check_config_prints_the_summary_and_warns_about_missing_parts(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    text = check_config(path, environ={})
    assert text.startswith(f"# {path}\n")
    assert f"# warning: model.bundle: {tmp_path / 'bundles' / 'current'} does not exist" in text
    assert f"# warning: camera.replay.path: {tmp_path / 'images'} is not a directory" in text
    (tmp_path / "bundles" / "current").mkdir(parents=True)
    (tmp_path / "images").mkdir()
    assert "# warning" not in check_config(path, environ={})


def test_a_derived_client_id_that_is_too_long_says_what_to_set(tmp_path: Path) -> None:
    long = "s" * 100
    text = MINIMAL.replace('station = "pond-3"', f'station = "{long}"').replace(
        'id = "scope-a"', f'id = "{long}"'
    )
    problems = problems_of(write(tmp_path, text))
    assert len(problems) == 1
    assert ":14: mqtt.client_id: must be at most 128 bytes" in problems[0]
    assert problems[0].endswith("(derived from device.station and device.id; set it)")
    fixed = load_config(write(tmp_path, text + 'client_id = "scope-a"\n'), environ={})
    assert fixed.mqtt.client_id == "scope-a"


def test_objects_section_defaults_to_frame_mode_and_reads_a_relative_blank(
    tmp_path: Path,
) -> None:
    assert load_config(write(tmp_path, MINIMAL), environ={}).objects.mode == "frame"
    (tmp_path / "blank.png").write_bytes(b"")
    text = MINIMAL + (
        '\n[objects]\nmode = "segment"\nbackground = "blank"\nblank = "blank.png"\n'
        "um_per_px = 1.6\nmin_area_um2 = 400\n"
    )
    cfg = load_config(write(tmp_path, text), environ={})
    assert cfg.objects.mode == "segment"
    assert cfg.objects.blank == tmp_path / "blank.png"  # next to the file, not the cwd
    assert cfg.objects.um_per_px == 1.6
    assert '[objects]\nmode = "segment"' in config_summary(cfg)


def test_objects_mistakes_are_all_reported_at_once(tmp_path: Path) -> None:
    text = MINIMAL + '\n[objects]\nmode = "segmnt"\nblur_px = 4\nmax_are_um2 = 10\n'
    problems = problems_of(write(tmp_path, text))
    assert len(problems) == 3, problems
    joined = "\n".join(problems)
    assert "objects.mode: must be one of frame, segment" in joined
    assert "objects.blur_px: must be an odd number of pixels" in joined
    assert "did you mean 'max_area_um2'?" in joined


def test_upload_section_reads_policy_and_bounds_and_refuses_bad_ones(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, MINIMAL_EDGE_CONFIG), environ={}).upload.policy == "none"
    text = MINIMAL_EDGE_CONFIG + (
        '\n[upload]\npolicy = "percent"\npercent = 25\nmax_side = 800\nmax_bytes = "200 kB"\n'
        'format = "PNG"\n'
    )
    upload = load_config(write(tmp_path, text), environ={}).upload
    assert (upload.policy, upload.percent, upload.max_side) == ("percent", 25.0, 800)
    assert (upload.max_bytes, upload.format, upload.queue) == (200_000, "png", None)
    bad = MINIMAL_EDGE_CONFIG + (
        '\n[upload]\npolicy = "some"\npercent = 0\nmax_bytes = "1 kB"\nqueue_bytes = 1000\n'
    )
    found = "\n".join(problems_of(write(tmp_path, bad)))
    for key in ("upload.policy", "upload.percent", "upload.max_bytes", "upload.queue_bytes"):
        assert key in found


def test_the_image_queue_must_not_be_the_outbox(tmp_path: Path) -> None:
    text = MINIMAL_EDGE_CONFIG + '\n[upload]\npolicy = "all"\nqueue = "data/outbox.sqlite"\n'
    found = problems_of(write(tmp_path, text))
    assert any("upload.queue" in p and "own queue" in p for p in found), found
