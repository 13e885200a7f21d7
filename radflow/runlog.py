"""Send a stage's output to its log file.

Snakemake gives each job a `log:` path; the stage's prints, warnings, `logging` records
and tqdm progress bars (stderr) all belong there, so `snakemake` itself shows a clean
progress of jobs while each log tells what its job did. Nothing written here may contain
PHI: stages log counts and pseudonyms only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def log_to(path: str | os.PathLike | None) -> Iterator[None]:
    """Redirect stdout, stderr and the root logger to `path` (appending) for the block."""
    if path is None:
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", buffering=1) as stream:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        started = time.perf_counter()
        try:
            with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
                yield
        except BaseException:
            logging.exception("stage failed")
            raise
        finally:
            logging.info("stage took %.1f s", time.perf_counter() - started)
            root.removeHandler(handler)


def progress(iterable, *, total: int | None = None, desc: str, unit: str = "it"):
    """tqdm over `iterable`, to stderr, throttled so logs stay readable."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, mininterval=5, file=sys.stderr)
