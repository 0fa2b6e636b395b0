"""The training config: TOML + flags resolve to one typed tree, and mistakes name the key.

None of these tests imports TensorFlow: config errors must reach the user before the
training stack is even loaded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from fieldscope.cli.main import main
from fieldscope.edge.config import load_config as load_edge_config
from fieldscope.edge.errors import ConfigError
from fieldscope.edge.preprocess import PreprocessRecipe, load_image, preprocess, save_png
from fieldscope.edge.recipe import DEFAULT_TABLE, RecipeTable
from fieldscope.edge.typed import ConfigFileError
from fieldscope.train.config import (
    TrainConfig,
    add_config_arguments,
    config_keys,
    overrides_from_args,
    resolve_config,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "train" / "examples" / "train.toml"


def _parse(argv: list[str]) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return resolve_config(None, overrides_from_args(parser.parse_args(argv)))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "train.toml"
    path.write_text(text)
    return path


def test_example_config_documents_exactly_the_defaults() -> None:
    assert resolve_config(EXAMPLE) == TrainConfig()
    text = EXAMPLE.read_text()
    for key in config_keys():
        leaf = key.dotted.split(".")[-1]
        table = ".".join(key.path)  # as the file spells it: [preprocessing.denoise_params]
        assert f"{leaf} =" in text or f"[{table}]" in text, f"{key.dotted} not in example"


# A non-default value for every key, as the user would type it on the command line.
FLAG_VALUES: dict[str, tuple[str, object]] = {
    "backbone": ("resnet50", "resnet50"),
    "alpha": ("0.5", 0.5),
    "weights": ("none", "none"),
    "image_size": ("128", 128),
    "seed": ("7", 7),
    "split": ("60:20:20", (0.6, 0.2, 0.2)),
    "folds": ("3", 3),
    "batch_size": ("8", 8),
    "epochs": ("4", 4),
    "learning_rate": ("0.01", 0.01),
    "fine_tune_epochs": ("0", 0),
    "fine_tune_learning_rate": ("3e-6", 3e-6),
    "fine_tune_layers": ("12", 12),
    "dropout": ("0.5", 0.5),
    "patience": ("0", 0),
    "strategy": ("end-to-end", "end-to-end"),
    "augment_copies": ("2", 2),
    "label_smoothing": ("0", 0.0),
    "class_weight": ("none", "none"),
    "target_precision": ("0.9", 0.9),
    "threshold_confidence": ("0", 0.0),
    "run_eagerly": ("", True),
    "cache_dir": ("/tmp/fs-cache", "/tmp/fs-cache"),
    "preprocess.denoise": ("median", "median"),
    "preprocess.denoise_params": ("ksize=3", {"ksize": 3}),
    "preprocess.resize": ("center-crop", "center-crop"),
    "preprocess.fill": ("255,255,255", (255, 255, 255)),
    "preprocess.resample": ("area", "area"),
    "augment.flip": ("", False),
    "augment.rotate90": ("", False),
    "augment.rotation": ("0.25", 0.25),
    "augment.zoom": ("0", 0.0),
    "augment.contrast": ("0.3", 0.3),
    "augment.brightness": ("0", 0.0),
    "augment.noise": ("1.5", 1.5),
}


def _get(config: TrainConfig, dotted: str) -> object:
    value: object = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def test_every_config_key_has_a_flag_that_overrides_it() -> None:
    keys = list(config_keys())
    assert {k.dotted for k in keys} == set(FLAG_VALUES), "update FLAG_VALUES with the new key"
    for key in keys:
        text, expected = FLAG_VALUES[key.dotted]
        if key.kind == "bool":
            argv = [key.flag if expected else "--no-" + key.flag.removeprefix("--")]
        else:
            argv = [key.flag, text]
        if key.dotted == "preprocess.denoise_params":
            argv = ["--denoise", "median", *argv]
        if key.dotted == "alpha":  # a width multiplier needs a backbone that has one
            argv = ["--backbone", "mobilenet_v2", *argv]
        config = _parse(argv)
        assert _get(config, key.dotted) == expected, key.dotted
        assert _get(TrainConfig(), key.dotted) != expected, f"{key.dotted}: pick a non-default"


def test_flags_override_the_file_which_overrides_defaults(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        'backbone = "efficientnet_b0"\nepochs = 3\n[preprocessing]\ndenoise = "bilateral"\n'
        "[preprocessing.denoise_params]\ndiameter = 5\n[augment]\nzoom = 0.2\n",
    )
    config = resolve_config(path, {"epochs": 5, "preprocess.denoise_params": {"sigma_color": 30}})
    assert config.backbone == "efficientnet_b0"
    assert config.epochs == 5
    assert config.augment.zoom == 0.2
    assert config.batch_size == TrainConfig().batch_size
    recipe = config.recipe()
    assert recipe.denoise == "bilateral"
    # Parameters merge: the file's diameter stays, the flag adds sigma_color.
    assert recipe.denoise_params["diameter"] == 5
    assert recipe.denoise_params["sigma_color"] == 30


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("epoch = 3\n", "epoch: unknown key (did you mean 'epochs'?)"),
        ("[augment]\nzom = 0.1\n", "augment.zom: unknown key (did you mean 'zoom'?)"),
        ("[preprocessing]\nsize = [96, 96]\nresize = 'stretch'\n", "preprocess.size"),
        ("epochs = 'ten'\n", "epochs: must be an integer"),
        ("[augment]\nflip = 1\n", "augment.flip: must be true or false"),
        ("split = [0.7, 0.3]\n", "split: must be three ratios"),
        ("batch_size = 0\n", "batch_size: must be > 0"),
        ("[preprocessing]\ndenoise = 'wavelet'\n", "denoise"),
        (
            "[preprocessing.denoise_params]\nksize = 3\n",
            "denoise_params: needs preprocessing.denoise",
        ),
        ("backbone = 'resnet50'\nalpha = 0.5\n", "alpha applies only to"),
        (
            'backbone = "mobilenet_v2"\nalpha = 0.6\n',
            "ImageNet weights for mobilenet_v2 exist only for alpha",
        ),
        ("epochs = 3\nepochs = 4\n", "not valid TOML"),
    ],
)
def test_config_mistakes_name_the_key(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        resolve_config(_write(tmp_path, text))
    assert needle in str(info.value)


def test_saved_config_round_trips_with_its_recipe() -> None:
    config = _parse(["--denoise", "bilateral", "--image-size", "96", "--fill", "0,0,0"])
    data = json.loads(json.dumps(config.to_dict()))
    assert data["preprocess"] == config.recipe().to_dict()
    assert data["preprocess"]["size"] == [96, 96]
    assert TrainConfig.from_dict(data) == config


def test_a_run_saved_before_resample_existed_keeps_inter_area() -> None:
    # Its model was trained on INTER_AREA pixels: resuming, evaluating or converting it
    # must not switch to the exact resampling new runs use.
    data = json.loads(json.dumps(_parse(["--image-size", "96"]).to_dict()))
    assert data["preprocess"]["resample"] == "exact"
    del data["preprocess"]["resample"]
    assert TrainConfig.from_dict(data).recipe().resample == "area"
    with pytest.raises(ConfigError, match="resample: must be one of exact, area"):
        _parse(["--resample", "bicubic"])


def _run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def test_unknown_backbone_is_one_line_listing_the_known_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _run_cli(
        ["train", str(tmp_path), "--out", str(tmp_path / "run"), "--backbone", "vgg16"], capsys
    )
    assert code == 2
    assert err.count("\n") == 1
    assert "unknown backbone 'vgg16'" in err
    for name in ("mobilenet_v2", "mobilenet_v3_small", "efficientnet_v2_b0", "resnet101"):
        assert name in err
    assert not (tmp_path / "run").exists()


def test_missing_weights_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "backbone.weights.h5"
    code, err = _run_cli(
        ["train", str(tmp_path), "--out", str(tmp_path / "run"), "--weights", str(missing)], capsys
    )
    assert code == 2
    assert err.count("\n") == 1
    assert f"weights file {missing} does not exist" in err


def test_unknown_toml_key_through_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, "[augment]\nshear = 0.1\n")
    code, err = _run_cli(
        ["train", str(tmp_path), "--out", str(tmp_path / "run"), "--config", str(path)], capsys
    )
    assert code == 2
    assert "augment.shear: unknown key" in err
    assert err.count("\n") == 1


def test_resume_refuses_overrides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run_cli(["train", "--resume", str(tmp_path), "--alpha", "0.5"], capsys)
    assert code == 2
    assert "drop --alpha" in err
    assert "--overwrite" in err
    # --epochs may change on a resume, but only of a training run.
    code, err = _run_cli(["train", "--resume", str(tmp_path), "--epochs", "3"], capsys)
    assert code == 2
    assert "is not a fieldscope training run" in err


def test_overwrite_refuses_a_folder_that_is_not_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("years of work")
    data = tmp_path / "data"
    data.mkdir()
    code, err = _run_cli(["train", str(data), "--out", str(out), "--overwrite"], capsys)
    assert code == 2
    assert "replaces only a fieldscope training run" in err
    assert (out / "chapter1.tex").exists()


def test_train_without_out_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _run_cli(["train", str(tmp_path)], capsys)
    assert code == 2
    assert "--out RUN_DIR" in err


def test_the_help_texts_defaults_are_the_recipes() -> None:
    # The help is built without importing OpenCV, from the table's copy of the defaults.
    assert DEFAULT_TABLE.recipe((224, 224)) == PreprocessRecipe()
    assert TrainConfig().preprocess == DEFAULT_TABLE


def test_every_problem_of_the_file_at_once_with_its_line(tmp_path: Path) -> None:
    # Before: the first mistake stopped reading, so a user fixed one per run.
    text = "epoch = 3\nbatch_size = 0\n[augment]\nflip = 1\nzom = 0.1\n"
    path = _write(tmp_path, text)
    with pytest.raises(ConfigFileError) as info:
        resolve_config(path)
    assert [str(p) for p in info.value.problems] == [
        f"{path}:1: epoch: unknown key (did you mean 'epochs'?)",
        f"{path}:2: batch_size: must be > 0, got 0",
        f"{path}:4: augment.flip: must be true or false, got an integer 1",
        f"{path}:5: augment.zom: unknown key (did you mean 'zoom'?)",
    ]


def test_the_old_preprocess_table_is_read_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    table = 'denoise = "median"\n[{}.denoise_params]\nksize = 3\n'
    new = resolve_config(_write(tmp_path, "[preprocessing]\n" + table.format("preprocessing")))
    assert not caplog.records
    old = resolve_config(_write(tmp_path, "[preprocess]\n" + table.format("preprocess")))
    assert old == new
    assert old.recipe().denoise_params == {"ksize": 3}
    [record] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "[preprocess]" in record.getMessage()
    assert "rename it" in record.getMessage()
    assert "[preprocessing]" in record.getMessage()


# The smallest valid station config (see tests/test_edge_config.py).
MINIMAL = (
    '[device]\nstation = "pond-3"\nid = "scope-a"\n[camera]\nbackend = "picamera2"\n'
    '[model]\nbundle = "bundles/current"\n[mqtt]\nhost = "127.0.0.1"\n'
)
RECIPE_TABLE = (
    '[preprocessing]\ndenoise = "median"\nresize = "stretch"\nfill = [0, 0, 0]\n'
    "[preprocessing.denoise_params]\nksize = {ksize}\n"
)


def test_one_recipe_table_serves_train_edge_and_preview(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = resolve_config(_write(tmp_path, "image_size = 48\n" + RECIPE_TABLE.format(ksize=3)))
    station_file = tmp_path / "edge.toml"
    station_file.write_text(MINIMAL + RECIPE_TABLE.format(ksize=3))
    station = load_edge_config(station_file, environ={})
    assert type(train.preprocess) is type(station.preprocessing) is RecipeTable
    # A bundle made by this run carries train.recipe(); the station's identical
    # overrides leave it as it is.
    assert station.preprocessing.apply(train.recipe()) == train.recipe()

    image = tmp_path / "slide.png"
    save_png(image, np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    argv = ["preview", str(image), "--out", str(tmp_path / "out"), "--size", "48"]
    flags = ["--denoise", "median", "--denoise-param", "ksize=3", "--resize", "stretch"]
    assert main([*argv, *flags, "--fill", "0,0,0"]) == 0
    seen = load_image(tmp_path / "out" / "slide.png")
    assert np.array_equal(seen, preprocess(load_image(image), train.recipe()))

    # The same mistake gets the same message from both config files.
    bad = RECIPE_TABLE.format(ksize=4)
    with pytest.raises(ConfigFileError) as from_train:
        resolve_config(_write(tmp_path, bad))
    station_file.write_text(MINIMAL + bad)
    with pytest.raises(ConfigFileError) as from_station:
        load_edge_config(station_file, environ={})
    messages = [
        str(p).split(": ", 1)[1] for p in (*from_train.value.problems, *from_station.value.problems)
    ]
    assert messages[0] == messages[1]
    assert messages[0].startswith("preprocessing.denoise_params.ksize: must be an odd integer")
