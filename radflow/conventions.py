"""The one place that defines radflow's naming conventions.

Column names of the tables that flow between stages, the pseudonym scheme, the shard
assignment and the on-disk layout of each stage's artefacts. Every module imports these
names instead of spelling strings, so a convention changes in one place.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections import defaultdict
from pathlib import Path

# ---------------------------------------------------------------- table columns
PATIENT_PID = "patient_pid"  # keyed-hash pseudonym of the patient identifier
STUDY_PID = "study_pid"  # keyed-hash pseudonym of StudyInstanceUID
SERIES_PID = "series_pid"  # keyed-hash pseudonym of one image unit (series or instance)
LABEL = "label"  # binary target, 0/1, after mapping the user's labels
SHARD = "shard"  # integer shard the unit's work is done in
SPLIT = "split"  # "dev" (cross-validation pool) or "test" (held out)
FOLD = "fold"  # validation fold of a dev case, -1 for test cases
FILE_ID = "file_id"  # keyed-hash pseudonym of a file path, for quarantine listings
REASON = "reason"  # human-readable reason a file or series was left out
PROB = "prob"  # predicted probability of the positive class
MODALITY = "modality"  # DICOM Modality of an image unit (CT, MR, DX...)
PATH = "path"  # file path relative to the DICOM root: PRIVATE tables only (may name patients)
#: Frames of a multi-frame file that belong to a unit: 0-based indices separated by spaces,
#: in file order; empty for a single-frame file or every frame (private shard tables only).
FRAMES = "frames"
#: Private shard tables: the keys that split a unit out of its series ("echo=2/part=P",
#: "" if none), so that convert picks dcm2niix's matching image ("_e2_ph").
UNIT_KEYS = "unit_keys"
#: Private shard tables of multi-channel cases (images tables and DICOM cases): the
#: channel name of a row, its role (ROLE_IMAGE or ROLE_MASK) and, for a mask row, the
#: mask file's content hash (a mask replaced under the same name reconverts its shard) and
#: the mapping of a DICOM SEG's segment labels to label values (JSON; "" for numbers).
CHANNEL = "channel"
ROLE = "role"
ROLE_IMAGE = "image"
ROLE_MASK = "mask"
MASK_SHA256 = "mask_sha256"
MASK_LABELS = "mask_labels"
#: Values of the convert.uneven_spacing and convert.gantry_tilt settings (default first).
UNEVEN_SPACING_CHOICES = ("resample", "reject")
GANTRY_TILT_CHOICES = ("correct", "reject")
ROW_PX = "row_px"  # 0-based row index of an annotated point in the stored DICOM image
COL_PX = "col_px"  # 0-based column index of an annotated point in the stored DICOM image
DIAMETER_MM = "diameter_mm"  # annotated lesion diameter, mm
STATUS = "status"  # per-unit outcome in a manifest: STATUS_OK or STATUS_FAILED

STATUS_OK = "ok"
STATUS_FAILED = "failed"

SPLIT_DEV = "dev"
SPLIT_TEST = "test"

# Modalities whose images are 2D projections: every SOP instance is its own image unit.
PROJECTION_MODALITIES = frozenset({"DX", "CR", "MG", "RF", "XA", "IO", "PX"})

# ------------------------------------------------------------------ pseudonyms
PSEUDONYM_HEX_CHARS = 16  # 64 bits: collision odds ~1e-9 for 1e5 ids; checked anyway


def pseudonym(key: bytes, kind: str, identifier: str) -> str:
    """Keyed pseudonym of `identifier`, e.g. ``pseudonym(k, "pat", "12345") -> "pat-3f0c..."``.

    HMAC-SHA256 keyed by the study's secret: without the key the identifier cannot be
    recovered or confirmed by hashing guesses (an unkeyed hash of a PatientID can).
    `kind` namespaces the ids so a patient and a study never share a pseudonym.
    """
    if not identifier:
        raise ValueError(f"cannot pseudonymise an empty {kind} identifier")
    digest = hmac.new(key, f"{kind}:{identifier}".encode(), hashlib.sha256).hexdigest()
    return f"{kind}-{digest[:PSEUDONYM_HEX_CHARS]}"


def load_or_create_key(
    key_file: str | os.PathLike, *, derive_from: str | None = None
) -> tuple[bytes, bool]:
    """Read the pseudonymisation key, creating it (mode 0600) if absent.

    Returns (key, created). A new key is random, unless `derive_from` is given: then it
    is a hash of that text. Only the synthetic demo uses that (its patients are fake, so
    there is nothing to protect, and a fixed key makes the demo's pseudonyms, and thus
    its split and results, the same on every machine). For real data the key must be
    random, live outside results/ and never be committed: whoever holds it can re-link
    pseudonyms to patients.
    """
    path = Path(key_file)
    if path.exists():
        key = path.read_bytes().strip()
        if len(key) < 16:
            raise ValueError(
                f"pseudonymisation key file {path} holds {len(key)} bytes; "
                "use at least 16 random bytes (delete it to have radflow create one)"
            )
        return key, False
    path.parent.mkdir(parents=True, exist_ok=True)
    if derive_from is None:
        key = secrets.token_hex(32).encode()
    else:
        key = hashlib.sha256(f"radflow-demo-key:{derive_from}".encode()).hexdigest().encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key + b"\n")
    return key, True


# ---------------------------------------------------------------------- shards
def shard_of(series_pid: str, n_shards: int) -> int:
    """Stable shard of an image unit: the same pseudonym lands in the same shard on every
    run and machine (unlike Python's salted hash()), so new data touches few shards."""
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    digest = hashlib.sha256(series_pid.encode()).digest()
    return int.from_bytes(digest[:8], "big") % n_shards


AUTO_FILES_PER_SHARD = 1000  # `shards: auto` aims at no more than this many files a shard
MAX_AUTO_SHARDS = 1024


def auto_shard_count(n_files: int) -> int:
    """Shard count for `shards: auto`: the smallest power of two giving at most
    AUTO_FILES_PER_SHARD files per shard, capped at MAX_AUTO_SHARDS.

    Powers of two are coarse steps: the count only changes when the cohort crosses
    1000, 2000, 4000, ... files, so adding a few files to a study does not re-deal every
    unit to new shards (which would reconvert everything). E.g. 150 files -> 1,
    1000 -> 1, 1001 -> 2, 100,000 -> 128, 10^7 -> 1024.
    """
    if n_files < 0:
        raise ValueError(f"n_files must be >= 0, got {n_files}")
    needed = max(1, -(-n_files // AUTO_FILES_PER_SHARD))  # ceil
    return min(MAX_AUTO_SHARDS, 1 << (needed - 1).bit_length())


def shard_name(shard: int) -> str:
    return f"shard-{shard:03d}"


# ------------------------------------------------------------------- file names
NIFTI_DIR = "nifti"  # results/nifti/<shard>/: convert's output, beside results/preprocessed/
NIFTI_SUFFIX = ".nii.gz"
SIDECAR_SUFFIX = ".json"
MASK_SUFFIX = "_mask.nii.gz"  # convert: a case's label map, on its image's grid
MANIFEST = "manifest.tsv"  # per-shard table written by convert and preprocess
SKIPPED_TABLE = "skipped.tsv"  # preprocess: converted units left out, with the reason
SERIES_TABLE = "series.tsv"  # index: one row per labelled image unit (results, PHI-free)
QUARANTINE_TABLE = "quarantine.tsv"  # index: left-out files and units (results, PHI-free)
ANNOTATIONS_TABLE = "annotations.tsv"  # index: lesion points joined to units (results)
INDEX_SUMMARY = "summary.json"  # index: counts for the log and report (results)
QUARANTINE_PATHS = "quarantine_paths.tsv"  # index: file_id -> path (PRIVATE)
SHARD_INDEX_DIR = "index"  # <private>/index/<shard_name(k)>.tsv: files per shard (PRIVATE)
PREPROCESSED_ARRAY = "images.npy"  # (N, C, *spatial) float16, memory-mappable
#: Layouts of the preprocessed shards, chosen by the task (Task.preprocessed_layout):
#: "grid": every case fitted into one fixed grid, one (N, C, *shape) array per shard;
#: "volumes": nnU-Net style, each case at the plan's spacing, cropped to its foreground,
#: as <pid>_image.npy (C, z, y, x) and <pid>_mask.npy (z, y, x) (radflow/volumes.py).
LAYOUT_GRID = "grid"
LAYOUT_VOLUMES = "volumes"
PREPROCESSED_LAYOUTS = (LAYOUT_GRID, LAYOUT_VOLUMES)
PREPROCESS_PLAN = "plan.json"  # volumes: the decisions (target spacing, channels)
PREPROCESS_FINGERPRINT = "fingerprint.json"  # volumes: the training cases' spacings, shapes
IMAGE_ARRAY_SUFFIX = "_image.npy"  # volumes: <pid>_image.npy, (C, z, y, x)
MASK_ARRAY_SUFFIX = "_mask.npy"  # volumes: <pid>_mask.npy, (z, y, x) uint8

# ------------------------------------------------------------------ evaluation
SPLIT_VAL = "val"  # predictions: a fold model's out-of-fold validation case
TEST_FOLD = -1  # FOLD of a per-case row that belongs to no single fold (test ensemble)
PREDICTED = "predicted"  # 0/1 call at the study's operating threshold
OUTCOME = "outcome"  # "TP", "FP", "TN" or "FN" of that call
EVAL_METRICS_JSON = "metrics.json"  # nested metrics with bootstrap CIs
EVAL_METRICS_TSV = "metrics.tsv"  # flat table of the headline metrics, for the report
EVAL_PER_CASE = "per_case.tsv"  # one row per case and split kind
EVAL_CURVES = "curves.json"  # every number the figures draw


class Pseudonyms:
    """`pseudonym` with a collision check per kind: two identifiers of one kind that hash
    to the same pseudonym raise RuntimeError (raise PSEUDONYM_HEX_CHARS then)."""

    def __init__(self, key: bytes):
        self.key = key
        self.seen: dict[str, dict[str, str]] = defaultdict(dict)

    def __call__(self, kind: str, identifier: str) -> str:
        # undecodable bytes in file names must not break hashing
        identifier = identifier.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        pid = pseudonym(self.key, kind, identifier)
        known = self.seen[kind].setdefault(pid, identifier)
        if known != identifier:
            raise RuntimeError(
                f"pseudonym collision: two distinct {kind!r} identifiers map to {pid}; "
                "raise conventions.PSEUDONYM_HEX_CHARS"
            )
        return pid
