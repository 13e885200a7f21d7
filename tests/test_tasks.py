"""The task interface: the registry, the classification task's stage methods, a second
task registered from outside, and settings whose defaults are the schema's."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from radflow import conventions as C
from radflow.augment import AugmentSettings
from radflow.calibration import apply_platt, fit_platt
from radflow.config import SCHEMA_PATH, ConfigError, check_config, schema_defaults
from radflow.inference import load_model
from radflow.models import ModelSettings
from radflow.models.resnet import build_resnet
from radflow.tasks import TASKS, Task, get_task, register
from radflow.tasks.classification import REPORT_DIR, UNCALIBRATED, BinaryClassification
from radflow.train import TrainSettings

REPO = Path(__file__).resolve().parents[1]
TOY = Path(__file__).resolve().with_name("toy_task.py")


def _cases(seed: int = 0, n_val: int = 30, n_test: int = 20, fold: int = 0) -> pd.DataFrame:
    """One fold's cases as the predict stage hands them to a task."""
    rng = np.random.default_rng(seed)
    rows = [(f"v{i}", f"pv{i}", int(rng.random() < 0.5), fold, C.SPLIT_VAL) for i in range(n_val)]
    rows += [(f"t{i}", f"pt{i}", i % 2, fold, C.SPLIT_TEST) for i in range(n_test)]
    return pd.DataFrame(rows, columns=[C.SERIES_PID, C.PATIENT_PID, C.LABEL, C.FOLD, C.SPLIT])


def _scores(cases: pd.DataFrame, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(
        0.3 + 0.4 * cases[C.LABEL].to_numpy() + rng.normal(0, 0.2, len(cases)), 0.01, 0.99
    )


# ---------------------------------------------------------------------- registry
def test_planning_imports_no_torch_pandas_or_matplotlib():
    """The workflow imports the task while it plans (every dry run, every cluster job):
    the task's declarations must not pull in the heavy libraries."""
    code = (
        "import sys\n"
        "from radflow.tasks import get_task\n"
        f"for name, modules in (('classification', []), ('segmentation', []),\n"
        f"                      ('toy_regression', [{str(TOY)!r}])):\n"
        "    task = get_task(name, modules=modules)\n"
        "    task.evaluation_files(), task.figure_files(), task.case_figure_files()\n"
        "heavy = sorted({'torch', 'pandas', 'matplotlib'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr


def test_unknown_task_names_both_config_keys():
    with pytest.raises(ConfigError, match="'task' must be one of .*'classification'.*task_modules"):
        get_task("localisation")


def test_a_task_module_given_as_a_file_registers_its_task(tmp_path, monkeypatch):
    toy = get_task("toy_regression", modules=[str(TOY)])
    assert isinstance(toy, Task) and toy.name == "toy_regression" and toy.monitor == "val_r2"
    # a second import of the same file registers nothing twice; relative paths start
    # from the working directory
    monkeypatch.chdir(TOY.parent)
    assert type(get_task("toy_regression", modules=[TOY.name])) is type(toy)
    assert TASKS["classification"] is BinaryClassification


def test_task_modules_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="task_modules: cannot import 'no_such_radflow_tasks'"):
        get_task("classification", modules=["no_such_radflow_tasks"])
    with pytest.raises(ConfigError, match="task_modules: file .*missing.py.* does not exist"):
        get_task("classification", modules=[str(tmp_path / "missing.py")])


def test_register_refuses_a_taken_name_and_non_tasks():
    class Impostor(BinaryClassification):
        name = "classification"

    with pytest.raises(ValueError, match="'classification' is taken by"):
        register(Impostor)
    assert TASKS["classification"] is BinaryClassification
    assert register(BinaryClassification) is BinaryClassification  # the same class: no-op
    with pytest.raises(TypeError, match="subclass of radflow.tasks.Task"):
        register(dict)


def test_calibration_must_be_one_the_task_implements():
    config = {
        "data": {"dicom_root": "x", "labels_table": "y", "annotations_table": "z"},
        "synthesize": {"enabled": True, "min_matrix_px": 64, "max_matrix_px": 64},
        "deid": {"key_file": "private/k", "private_dir": "private"},
        "evaluate": {"calibration": "platt"},
    }
    check_config(config, get_task("classification"))
    with pytest.raises(ConfigError, match="evaluate.calibration: 'platt' does not apply to task"):
        check_config(config, get_task("toy_regression", modules=[str(TOY)]))


# ---------------------------------------------------------------- classification
def test_classification_predictions_are_platt_scaled_on_validation_rows_only():
    task = get_task("classification")
    cases = _cases()
    raw = _scores(cases)
    table = task.prediction_table(cases, raw)
    assert list(table.columns) == [*cases.columns, C.PROB, UNCALIBRATED]
    np.testing.assert_array_equal(table[C.PROB], raw)
    calibrated = task.calibrate(table, "platt")
    val = cases[C.SPLIT] == C.SPLIT_VAL
    a, b = fit_platt(cases.loc[val, C.LABEL].to_numpy(), raw[val.to_numpy()])
    np.testing.assert_allclose(calibrated[C.PROB], apply_platt(raw, a, b))
    np.testing.assert_array_equal(calibrated[UNCALIBRATED], raw)
    assert not np.allclose(calibrated[C.PROB], raw)
    # test rows do not take part in the fit: changing them changes no validation row
    shuffled = table.copy()
    test = ~val.to_numpy()
    shuffled.loc[test, C.PROB] = shuffled.loc[test, UNCALIBRATED] = raw[test][::-1]
    again = task.calibrate(shuffled, "platt")
    np.testing.assert_allclose(again.loc[val, C.PROB], calibrated.loc[val, C.PROB])
    # "none" leaves the model's probabilities; anything else is refused
    np.testing.assert_array_equal(task.calibrate(table, "none")[C.PROB], raw)
    with pytest.raises(ValueError, match="evaluate.calibration: 'isotonic'"):
        task.calibrate(table, "isotonic")


def test_predictions_round_trip_through_the_task(tmp_path):
    task = get_task("classification")
    cases = _cases()
    cases[C.SERIES_PID] = [f"{i:04d}" for i in range(len(cases))]  # ids that look numeric
    table = task.calibrate(task.prediction_table(cases, _scores(cases)), "platt")
    task.write_predictions(table, tmp_path / "fold0.tsv")
    task.write_predictions(table.assign(**{C.FOLD: 1}), tmp_path / "fold1.tsv")
    back = task.read_predictions([tmp_path / "fold0.tsv", tmp_path / "fold1.tsv"])
    assert len(back) == 2 * len(table) and back[C.SERIES_PID].iloc[0] == "0000"
    np.testing.assert_allclose(back[C.PROB].iloc[: len(table)], table[C.PROB], atol=1e-6)


def _fold_predictions(task, n_folds: int = 2) -> pd.DataFrame:
    """Every fold's predictions: fold k validates its own cases and predicts every test case."""
    frames = []
    for k in range(n_folds):
        cases = _cases(seed=k, fold=k)
        cases.loc[cases[C.SPLIT] == C.SPLIT_VAL, [C.SERIES_PID, C.PATIENT_PID]] = [
            (f"v{k}-{i}", f"pv{k}-{i}") for i in range(int((cases[C.SPLIT] == C.SPLIT_VAL).sum()))
        ]
        frames.append(task.prediction_table(cases, _scores(cases, seed=10 + k)))
    return pd.concat(frames, ignore_index=True)


def test_classification_evaluates_and_draws_the_files_it_declares(tmp_path):
    task = get_task("classification")
    evaluation = tmp_path / "evaluate"
    settings = {"n_boot": 100, "alpha": 0.05, "calibration_bins": 5, "calibration": "platt"}
    headline = task.evaluate(_fold_predictions(task), settings, evaluation)
    assert headline.startswith("ensemble test AUROC ") and "95% CI" in headline
    declared = {spec.file for spec in task.evaluation_files().values()}
    assert {p.name for p in evaluation.iterdir()} == declared
    assert json.loads((evaluation / C.EVAL_METRICS_JSON).read_text())["ensemble_test"]["n_folds"]
    figures = tmp_path / "figures"
    out = {name: figures / spec.file for name, spec in task.figure_files().items()}
    task.draw_figures(evaluation, out)
    assert sorted(p.name for p in figures.iterdir()) == sorted(p.name for p in out.values())
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in out.values())


def test_classification_report_entries_are_the_demo_report_entries():
    """What the rules used to spell out, now the task's: same files, captions, categories
    and labels (so the demo's report is unchanged)."""
    task = get_task("classification")

    def entries(files):
        return {
            spec.file: (spec.category, spec.caption and Path(spec.caption).name, dict(spec.labels))
            for spec in files.values()
        }

    assert entries(task.evaluation_files()) == {
        "metrics.json": (None, None, {}),
        "metrics.tsv": ("Metrics", "metrics.rst", {"table": "ensemble on the test set"}),
        "per_case.tsv": (None, None, {}),
        "curves.json": (None, None, {}),
    }
    assert entries(task.figure_files()) == {
        "roc.png": ("Performance", "roc.rst", {"figure": "ROC"}),
        "precision_recall.png": (
            "Performance",
            "precision_recall.rst",
            {"figure": "precision-recall"},
        ),
        "calibration.png": ("Performance", "calibration.rst", {"figure": "calibration"}),
        "confusion.png": ("Performance", "confusion.rst", {"figure": "confusion matrix"}),
    }
    assert entries(task.case_figure_files()) == {
        "gradcam_true_positives.png": (
            "Explanations",
            "gradcam.rst",
            {"figure": "Grad-CAM, true positives"},
        ),
        "gradcam_false_positives.png": (
            "Explanations",
            "gradcam.rst",
            {"figure": "Grad-CAM, false positives"},
        ),
    }
    captions = [
        Path(spec.caption)
        for files in (task.evaluation_files(), task.figure_files(), task.case_figure_files())
        for spec in files.values()
        if spec.caption
    ]
    assert all(p.is_absolute() and p.parent == REPORT_DIR and p.is_file() for p in captions)


def test_classification_builds_its_network_from_model_settings():
    task = get_task("classification")
    model = task.build_model(
        ModelSettings(depth=18, base_width=8, pooling="avgmax"), in_channels=3, spatial_dims=3
    )
    assert model.fc.in_features == 2 * 64 and model.fc.out_features == 2
    assert model.eval()(torch.zeros(1, 3, 16, 16, 16)).shape == (1, 2)


def test_label_smoothing_reaches_the_loss():
    logits, targets = torch.tensor([[4.0, -4.0]]), torch.tensor([0])
    plain = get_task("classification").loss(logits, targets)
    smoothed = get_task("classification", train=TrainSettings(label_smoothing=0.2))
    assert smoothed.loss(logits, targets) > plain + 0.1


# ---------------------------------------------------------------- the toy task
def test_the_toy_task_runs_through_every_stage_method(tmp_path):
    """A second task implements the interface with outputs, evaluation and figures of its
    own; the workflow run of it is in tests/test_workflow.py."""
    toy = get_task("toy_regression", modules=[str(TOY)])
    logits = torch.tensor([[0.2], [0.9], [0.4]])
    assert toy.outputs(logits).shape == (3,)
    assert toy.loss(logits, torch.tensor([0, 1, 0])) == pytest.approx((0.04 + 0.01 + 0.16) / 3)
    assert toy.monitor_value(np.array([0, 1, 0]), np.array([0, 1, 0])) == 1.0
    predictions = _fold_predictions(toy)
    assert "score" in predictions and C.PROB not in predictions
    with pytest.raises(ValueError, match="'platt' does not apply to task 'toy_regression'"):
        toy.calibrate(predictions, "platt")
    headline = toy.evaluate(toy.calibrate(predictions, "none"), {}, tmp_path / "evaluate")
    assert headline.startswith("test MAE ")
    metrics = json.loads((tmp_path / "evaluate" / "regression.json").read_text())
    assert set(metrics) == {C.SPLIT_VAL, C.SPLIT_TEST} and metrics[C.SPLIT_TEST]["n_cases"] == 20
    out = {"scatter": tmp_path / "figures" / "toy_scatter.png"}
    toy.draw_figures(tmp_path / "evaluate", out)
    assert out["scatter"].read_bytes()[:4] == b"\x89PNG"
    assert toy.case_figure_files() == {}
    with pytest.raises(NotImplementedError, match="no case figures"):
        toy.draw_case_figures(
            models=[], preprocessed=[], evaluation_dir=tmp_path, annotations=tmp_path,
            settings={}, out={}, threads=1,
        )  # fmt: skip


# --------------------------------------------------- settings: schema defaults
def _schema_section(*keys: str) -> dict:
    node = yaml.safe_load(SCHEMA_PATH.read_text())
    for key in keys:
        node = node["properties"][key]
    return node["properties"]


@pytest.mark.parametrize(
    "cls,section,extra",
    [
        (ModelSettings, ("model",), set()),
        (AugmentSettings, ("train", "augment"), set()),
        (TrainSettings, ("train",), {"seed", "model"}),  # seed: top level; model: `model:`
    ],
)
def test_settings_fields_are_the_schema_keys_with_the_schema_defaults(cls, section, extra):
    properties = _schema_section(*section)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert set(fields) - extra == set(properties)
    assert all("default" in spec for spec in properties.values())
    defaults = schema_defaults(*section)
    made = cls()
    for name in properties:
        if name == "augment":
            assert made.augment == AugmentSettings()
            continue
        assert getattr(made, name) == defaults[name], name
    if cls is TrainSettings:
        assert made.seed == schema_defaults()["seed"] and made.model == ModelSettings()


def test_settings_from_a_validated_config_equal_the_dataclass_defaults():
    """Snakemake fills the schema's defaults into the config; the settings built from that
    config are the dataclasses' defaults (nothing spelled twice can drift)."""
    from snakemake.utils import validate

    config = {"data": {"dicom_root": "d", "labels_table": "l"}}
    validate(config, str(SCHEMA_PATH), set_default=True)
    settings = TrainSettings.from_config(config["train"], config["model"], config["seed"])
    assert settings == TrainSettings()


def test_from_config_fills_missing_keys_and_names_unknown_ones():
    settings = TrainSettings.from_config(
        {"epochs": 3, "augment": {"scale": [0.5, 2.0]}}, {"base_width": 8}, seed=5
    )
    assert (settings.epochs, settings.seed, settings.batch_size) == (
        3,
        5,
        TrainSettings().batch_size,
    )
    assert (
        settings.augment.scale == (0.5, 2.0) and settings.augment.gamma == AugmentSettings().gamma
    )
    assert settings.model == ModelSettings(base_width=8)
    with pytest.raises(ConfigError, match=r"model: unknown key\(s\) \['dept'\]"):
        ModelSettings.from_config({"dept": 34})
    with pytest.raises(ConfigError, match=r"train: unknown key\(s\) \['epoch'\]"):
        TrainSettings.from_config({"epoch": 3}, {}, seed=0)
    with pytest.raises(ConfigError, match=r"train.augment: unknown key\(s\) \['flip'\]"):
        TrainSettings.from_config({"augment": {"flip": 0.5}}, {}, seed=0)


def test_a_checkpoint_from_before_model_settings_still_loads(tmp_path):
    """Older checkpoints stored `model` as the dict {depth, base_width, dropout} (no
    pooling): the missing key takes the schema's default."""
    network = build_resnet(18, in_channels=1, num_classes=2, base_width=8)
    path = tmp_path / "old.pt"
    old_settings = {"epochs": 2, "model": {"depth": 18, "base_width": 8, "dropout": 0.0}}
    torch.save({"state_dict": network.state_dict(), "settings": old_settings, "epoch": 1}, path)
    model, checkpoint = load_model(
        path, get_task("classification"), in_channels=1, spatial_dims=2, device=torch.device("cpu")
    )
    assert checkpoint["epoch"] == 1 and model.fc.in_features == 64
    x = torch.randn(2, 1, 32, 32)
    network.eval()
    torch.testing.assert_close(model(x), network(x))
