"""Checks of a study configuration that a JSON schema cannot express.

The schema (config/schema.yaml) checks types, ranges, unknown keys and fills defaults;
this module checks what depends on the file system or on several keys at once. Each
message names the config key, the offending value and what to do.
"""

from __future__ import annotations

from pathlib import Path

from radflow import conventions as C

RESULTS_DIR = "results"


class ConfigError(ValueError):
    pass


def _inside(path: str, folder: str) -> bool:
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
        return True
    except ValueError:
        return False


def check_config(config: dict) -> None:
    """Raise ConfigError listing every problem found (not just the first)."""
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

    need_file("dicom_root", data["dicom_root"], "folder")
    need_file("labels_table", data["labels_table"], "file")
    need_file("annotations_table", data.get("annotations_table"), "file")
    if synthetic and not data.get("annotations_table"):
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
        ("data.dicom_root", data["dicom_root"]),
        ("data.labels_table", data["labels_table"]),
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
    if problems:
        raise ConfigError("invalid radflow configuration:\n  - " + "\n  - ".join(problems))
