"""The study configuration's schema defaults, and the checks a JSON schema cannot express.

The schema (config/schema.yaml) checks types, ranges, unknown keys and fills defaults;
it is the one place where a default is written down: the settings dataclasses
(`radflow.models.ModelSettings`, `radflow.train.TrainSettings`,
`radflow.augment.AugmentSettings`) take their field defaults from it through
`schema_defaults`. `check_config` checks what depends on the file system, on several
keys at once or on the study's task. Each message names the config key, the offending
value and what to do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from radflow import conventions as C

RESULTS_DIR = "results"
#: The workflow's schema, next to the package (radflow runs from its workflow checkout).
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "config" / "schema.yaml"


class ConfigError(ValueError):
    pass


#: The config `preprocess:` keys each preprocessed layout reads (the preprocess rule's
#: params, in config order: a key of the other layout changes nothing). The volumes
#: layout's target spacing is read by its plan (radflow.plan), not per shard.
PREPROCESS_KEYS = {
    C.LAYOUT_GRID: ("target_shape_px", "target_spacing_mm", "xray_percentiles",
                    "ct_window_hu", "mr_foreground_fraction", "intensity"),
    C.LAYOUT_VOLUMES: ("intensity", "ct_window_hu", "xray_percentiles",
                       "mr_foreground_fraction", "ct_foreground_hu", "crop_margin_mm",
                       "image_interpolation", "mask_interpolation", "dtype"),
}  # fmt: skip


def preprocess_params(config: Mapping[str, Any], layout: str) -> dict[str, Any]:
    """The config `preprocess:` settings that `layout` reads, in config order."""
    return {k: v for k, v in config["preprocess"].items() if k in PREPROCESS_KEYS[layout]}


@cache
def _schema() -> dict[str, Any]:
    import yaml

    return yaml.safe_load(SCHEMA_PATH.read_text())


def schema_defaults(*section: str) -> dict[str, Any]:
    """{key: default} of the schema object at `section`, e.g. ``schema_defaults("model")``
    or ``schema_defaults("train", "augment")``; ``schema_defaults()`` is the top level.

    Lists come back as tuples (the settings dataclasses are frozen and hold tuples);
    keys without a default are left out. A fresh dict on every call.
    """
    node = _schema()
    for key in section:
        node = node["properties"][key]
    return {
        key: tuple(spec["default"]) if isinstance(spec["default"], list) else spec["default"]
        for key, spec in node["properties"].items()
        if "default" in spec
    }


def check_keys(cls: type, cfg: Mapping[str, Any], section: str) -> None:
    """Raise ConfigError if `cfg` has a key that the settings dataclass `cls` lacks
    (a typo must not fall back to a default silently)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ConfigError(
            f"{section}: unknown key(s) {unknown}; the known keys are {sorted(known)}"
        )


def _inside(path: str, folder: str) -> bool:
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
        return True
    except ValueError:
        return False


def _case_problems(data: Mapping[str, Any]) -> list[str]:
    """The multi-series case and mask settings (data.case_key, channels,
    reference_channel, masks_*) against the input they need."""
    keys = ("case_key", "channels", "masks_table", "masks_key", "mask_labels")
    used = [k for k in keys if data.get(k)]
    if data.get("images_table"):
        return [f"data.{used[0]}: DICOM input only; an images table names its channels and "
                "masks in its own columns (data.columns)"] if used else []  # fmt: skip
    from radflow.dicom.channels import channel_problems

    problems = channel_problems(data.get("case_key"), data.get("channels"),
                                data.get("reference_channel"))  # fmt: skip
    if data.get("reference_channel") and data.get("dicom_root") and not data.get("channels"):
        problems.append("data.reference_channel: a DICOM tree has channels only with "
                        "data.case_key and data.channels")  # fmt: skip
    for key in ("masks_key", "mask_labels"):
        if data.get(key) and not data.get("masks_table"):
            problems.append(f"data.{key}: set only with data.masks_table")
    return problems


def check_config(config: dict, task=None) -> None:
    """Raise ConfigError listing every problem found (not just the first).

    `task` (a `radflow.tasks.Task`), when given, also checks the settings whose valid
    values depend on the task (evaluate.calibration).
    """
    problems = []
    data, synth, deid = config["data"], config["synthesize"], config["deid"]
    synthetic = synth["enabled"]

    def need_file(key: str, path: str | None, kind: str) -> None:
        if not path or synthetic:  # None or "" means not given
            return
        p = Path(path)
        exists = p.is_dir() if kind == "folder" else p.is_file()
        if not exists:
            problems.append(
                f"data.{key}: {kind} {path!r} does not exist (relative paths start from the "
                f"working directory {Path.cwd()}); point it at your {kind} or enable synthesize"
            )

    need_file("dicom_root", data.get("dicom_root"), "folder")
    need_file("labels_table", data.get("labels_table"), "file")
    need_file("images_table", data.get("images_table"), "file")
    need_file("annotations_table", data.get("annotations_table"), "file")
    need_file("lesions_table", data.get("lesions_table"), "file")
    need_file("excluded_lesions_table", data.get("excluded_lesions_table"), "file")
    need_file("masks_table", data.get("masks_table"), "file")
    if bool(data.get("dicom_root")) == bool(data.get("images_table")):
        problems.append(
            "data: give exactly one input, data.dicom_root (a DICOM tree, with "
            "data.labels_table) or data.images_table (a table of image files)"
        )
    if (data.get("dicom_root") and not data.get("labels_table") and not data.get("masks_table")
            and not data.get("lesions_table")):  # fmt: skip
        problems.append("data.labels_table: a DICOM tree needs a labels table (or, for "
                        "segmentation, a data.masks_table; for localisation, a "
                        "data.lesions_table); set its path")  # fmt: skip
    problems += _case_problems(data)
    if data.get("images_table") and synthetic:
        problems.append(
            "synthesize.enabled writes a DICOM cohort: it needs data.dicom_root, not "
            "data.images_table; disable synthesize to run an images table"
        )
    if data.get("images_table") and data.get("annotations_table"):
        problems.append(
            "data.annotations_table: lesion points are read for DICOM input only (keyed "
            "by label_key); remove it for an images table"
        )
    split_table = config.get("split", {}).get("table")
    if split_table and not Path(split_table).is_file():
        problems.append(
            f"split.table: file {split_table!r} does not exist (relative paths start from the "
            f"working directory {Path.cwd()}); point it at your split table or remove it"
        )
    brain = synthetic and synth.get("cohort") == "brain_mri"
    if brain:
        root = Path(data.get("dicom_root") or "")
        if root.name != "dicom":
            problems.append(
                f"data.dicom_root: the brain_mri cohort writes its DICOM to a folder named "
                f"'dicom' (its masks beside it); got {str(root)!r}, use e.g. data/demo-seg/dicom"
            )
        expected = root.parent / "labels.csv"
        if Path(data.get("masks_table") or "") != expected:
            problems.append(
                f"data.masks_table: the brain_mri cohort writes its masks table to "
                f"{str(expected)!r}; set data.masks_table to it"
            )
    lung = synthetic and synth.get("cohort") == "lung_ct"
    if lung and Path(data.get("dicom_root") or "").name != "dicom":
        problems.append(
            f"data.dicom_root: the lung_ct cohort writes its DICOM to a folder named 'dicom' "
            f"(its annotation tables beside it); got {data.get('dicom_root')!r}, use e.g. "
            "data/demo-lung/dicom"
        )
    if synthetic and not brain and not lung and not data.get("annotations_table"):
        problems.append(
            "data.annotations_table: synthesize.enabled writes the lesion ground truth there; "
            "set a path such as data/demo/lesions.csv"
        )
    if synth["min_matrix_px"] > synth["max_matrix_px"]:
        problems.append(
            f"synthesize.min_matrix_px ({synth['min_matrix_px']}) exceeds "
            f"synthesize.max_matrix_px ({synth['max_matrix_px']})"
        )
    # Everything under results/ is promised PHI-free: inputs holding identifiers and the
    # pseudonymisation secret must live elsewhere.
    for key, path in (
        ("data.dicom_root", data.get("dicom_root")),
        ("data.labels_table", data.get("labels_table")),
        ("data.images_table", data.get("images_table")),
        ("data.lesions_table", data.get("lesions_table")),
        ("data.excluded_lesions_table", data.get("excluded_lesions_table")),
        ("data.masks_table", data.get("masks_table")),
        ("split.table", split_table),
        ("data.annotations_table", data.get("annotations_table")),
        ("deid.key_file", deid["key_file"]),
        ("deid.private_dir", deid["private_dir"]),
    ):
        if path and _inside(path, RESULTS_DIR):
            problems.append(
                f"{key}: {path!r} lies inside {RESULTS_DIR}/, which must stay free of "
                "identifiers; move it outside results/"
            )
    # The schema's enums say the same; repeated here for configs checked without it.
    convert = config.get("convert", {})
    for key, choices in (("uneven_spacing", C.UNEVEN_SPACING_CHOICES),
                         ("gantry_tilt", C.GANTRY_TILT_CHOICES)):  # fmt: skip
        value = convert.get(key, choices[0])
        if value not in choices:
            problems.append(
                f"convert.{key}: {value!r} is not one of {', '.join(choices)}; choose one"
            )
    layout = getattr(task, "preprocessed_layout", C.LAYOUT_GRID)
    if layout not in C.PREPROCESSED_LAYOUTS:
        problems.append(
            f"task {task.name!r}: preprocessed_layout {layout!r} is not one of "
            f"{', '.join(C.PREPROCESSED_LAYOUTS)}; fix the task class"
        )
    spacing = config.get("preprocess", {}).get("target_spacing_mm")
    if layout == C.LAYOUT_GRID and isinstance(spacing, list):
        problems.append(
            f"preprocess.target_spacing_mm: {spacing} gives one spacing per axis, which only "
            "the volumes layout (segmentation, localisation) takes; give one number"
        )
    split = config.get("split", {})
    if (task is not None and task.needs_test_set and not split.get("table")
            and split.get("test_fraction", 0.2) == 0):  # fmt: skip
        problems.append(
            f"split.test_fraction: task {task.name!r} evaluates on a held-out test set; "
            "set a fraction above 0 (e.g. 0.2)"
        )
    calibration = config.get("evaluate", {}).get("calibration")
    if task is not None and calibration is not None:
        if calibration not in task.calibration_methods:
            problems.append(
                f"evaluate.calibration: {calibration!r} does not apply to task {task.name!r}; "
                f"choose one of {', '.join(task.calibration_methods)}"
            )
    if problems:
        raise ConfigError("invalid radflow configuration:\n  - " + "\n  - ".join(problems))
