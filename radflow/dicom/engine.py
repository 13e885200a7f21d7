"""dcm2niix as the pixel and geometry engine of cross-sectional units.

`run_dcm2niix` converts one unit's files (symlinked into a private temporary folder, so
dcm2niix sees exactly the unit) to uncompressed NIfTI plus sidecars; `pick_output` takes
the unit's image among those it wrote. dcm2niix's file-name suffixes say what it split or
corrected: "_e2" (echo), "_ph"/"_real"/"_imaginary", "_ADC" (diffusion with its trace),
"_i00002" (not stackable), "_Eq_1" (equal spacing), "_Tilt_1", "_Tilt_Eq_1". Versions that
differ by "_Eq"/"_Tilt" are one image: the corrected one is taken, or the unit fails when
the config says "reject". Of several distinct images the one whose tokens match the unit's
keys is taken; with no match the unit fails naming dcm2niix's suffixes, never a guess.
The binary is the `dcm2niix` PyPI package's (pinned); its version goes in every sidecar.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: Suffixes of versions of one image (resampled / tilt-corrected), not of other images.
_VARIANT_TOKENS = ("Tilt", "Eq")
_BASE = "unit"


class EngineError(Exception):
    """dcm2niix could not produce the unit; the message is the PHI-free reason."""


@dataclass
class EngineOutput:
    """One image dcm2niix wrote: its .nii, sidecar (.json, may be absent), .bval/.bvec
    (diffusion only) and the suffix tokens of its file name."""

    nii: Path
    tokens: tuple[str, ...]
    json: Path | None = None
    bval: Path | None = None
    bvec: Path | None = None
    notes: dict[str, str] = field(default_factory=dict)


@functools.cache
def dcm2niix_binary() -> str:
    """The dcm2niix executable: the binary inside the `dcm2niix` PyPI package (not its
    console script, a Python wrapper that costs ~40 ms an invocation), else PATH's."""
    try:
        import dcm2niix

        if Path(dcm2niix.bin).is_file():
            return str(dcm2niix.bin)
    except (ImportError, AttributeError):
        pass
    found = shutil.which("dcm2niix")
    if not found:
        raise EngineError("dcm2niix is not installed (pip install dcm2niix, see pyproject.toml)")
    return found


@functools.cache
def dcm2niix_version() -> str:
    """dcm2niix's version string, e.g. "v1.0.20260724"."""
    out = subprocess.run([dcm2niix_binary(), "--version"], capture_output=True, text=True)
    match = re.search(r"v\d+\.\d+\.\d+\w*", out.stdout + out.stderr)
    return match[0] if match else "unknown"


def _tokens(stem: str) -> tuple[str, ...]:
    """Suffix tokens of an output name: "unit_e2_ph_Tilt_Eq_1" -> ("e2", "ph", "Tilt",
    "Eq"); the trailing counter of "_Eq_1"/"_Tilt_1" is dropped."""
    rest = stem[len(_BASE) :].lstrip("_")
    parts = [p for p in rest.split("_") if p]
    if parts and parts[-1].isdigit() and len(parts) > 1 and parts[-2] in _VARIANT_TOKENS:
        parts = parts[:-1]
    return tuple(parts)


def _reason_from_log(log: str) -> str:
    """dcm2niix's own error line(s), without paths (the linked names are counters)."""
    # dcm2niix sometimes prints a warning right after an error, on the same line
    messages = re.split(r"\n|(?=Warning:)|(?=Error:)", log)
    errors = [m.strip() for m in messages if m.strip().startswith("Error")]
    lines = errors or [m.strip() for m in messages if m.strip().startswith("Warning")]
    text = "; ".join(dict.fromkeys(lines))
    return re.sub(r"/\S+", "<file>", text)[:300]


def run_dcm2niix(
    files: Sequence[str | os.PathLike], work_dir: str | os.PathLike
) -> tuple[list[EngineOutput], str]:
    """Convert `files` (absolute paths of one unit) with dcm2niix into `work_dir`/out.

    The files are symlinked as numbered names into `work_dir`/in (nothing is copied; the
    names carry nothing of the originals), and dcm2niix runs with uncompressed output,
    BIDS sidecars and its file name fixed to "unit" plus its suffixes. Returns the images
    written and dcm2niix's console log. Raises EngineError when it wrote none.
    """
    work = Path(work_dir)
    src, out = work / "in", work / "out"
    src.mkdir(parents=True)
    out.mkdir()
    for n, path in enumerate(files):
        os.symlink(os.path.abspath(path), src / f"{n:06d}.dcm")
    command = [dcm2niix_binary(), "-z", "n", "-b", "y", "-ba", "y", "-f", _BASE,
               "-w", "1", "-o", str(out), str(src)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, errors="replace")
    log = done.stdout + done.stderr
    outputs = []
    for nii in sorted(out.glob(f"{_BASE}*.nii")):
        stem = nii.name[: -len(".nii")]
        found = EngineOutput(nii, _tokens(stem))
        # dcm2niix writes the sidecar (and bval/bvec) of the uncorrected image only: an
        # "_Eq_1"/"_Tilt_1"/"_Tilt_Eq_1" version shares its base image's files
        base = re.sub(r"(_Tilt)?(_Eq)?_\d+$", "", stem) if found.tokens[-1:] in (
            ("Tilt",), ("Eq",)) else stem  # fmt: skip
        for attr, suffix in (("json", ".json"), ("bval", ".bval"), ("bvec", ".bvec")):
            for name in dict.fromkeys((stem, base)):
                candidate = nii.with_name(name + suffix)
                if candidate.exists():
                    setattr(found, attr, candidate)
                    break
        outputs.append(found)
    if not outputs:
        detail = _reason_from_log(log) or f"exit status {done.returncode}"
        raise EngineError(f"dcm2niix wrote no image ({detail})")
    return outputs, log


def pick_output(
    outputs: Sequence[EngineOutput],
    wanted: set[str],
    *,
    uneven_spacing: str = "resample",
    gantry_tilt: str = "correct",
) -> EngineOutput:
    """The image of the unit among dcm2niix's outputs (see the module docstring).

    wanted: the tokens the unit's keys call for (`units.dcm2niix_tokens`).
    Raises EngineError with the reason when the unit cannot be told apart or a
    correction it needs is set to "reject".
    """
    images: dict[tuple[str, ...], list[EngineOutput]] = {}
    for found in outputs:
        identity = tuple(t for t in found.tokens if t not in _VARIANT_TOKENS)
        images.setdefault(identity, []).append(found)
    if len(images) > 1:
        matching = [k for k in images if set(k) == wanted]
        if len(matching) != 1:
            shown = ", ".join("_" + "_".join(k) if k else "(no suffix)" for k in sorted(images))
            raise EngineError(
                f"dcm2niix wrote {len(images)} distinct images for this unit ({shown}) and "
                "none matches its keys; radflow's grouping does not separate them"
            )
        versions = images[matching[0]]
    else:
        versions = next(iter(images.values()))
    by_variant = {tuple(t for t in v.tokens if t in _VARIANT_TOKENS): v for v in versions}
    tilted = any("Tilt" in k for k in by_variant)
    uneven = any("Eq" in k for k in by_variant)
    if tilted and gantry_tilt == "reject":
        raise EngineError(
            "gantry tilt (dcm2niix wrote a tilt-corrected version); set convert.gantry_tilt: "
            "correct to use it"
        )
    if uneven and uneven_spacing == "reject":
        raise EngineError(
            "uneven slice spacing (dcm2niix wrote an equally spaced version); set "
            "convert.uneven_spacing: resample to use it"
        )
    want = tuple(t for t in _VARIANT_TOKENS if (t == "Tilt" and tilted) or (t == "Eq" and uneven))
    chosen = by_variant.get(want)
    if chosen is None:  # e.g. tilt and uneven, but no combined file: take the most corrected
        chosen = max(by_variant.items(), key=lambda kv: len(kv[0]))[1]
    notes = {}
    if tilted:
        notes["gantry_tilt"] = "corrected by dcm2niix (_Tilt)"
    if uneven:
        notes["uneven_spacing"] = "resampled to equal spacing by dcm2niix (_Eq)"
    chosen.notes = notes
    return chosen


def engine_temp_dir() -> tempfile.TemporaryDirectory:
    """A private temporary folder for one dcm2niix run (under $TMPDIR: node-local on
    clusters), removed on exit."""
    return tempfile.TemporaryDirectory(prefix="radflow-dcm2niix-")
