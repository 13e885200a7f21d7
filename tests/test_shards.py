"""Shard assignment: stable across processes and machines; `shards: auto` in coarse steps."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from radflow import conventions as C


def test_shard_of_is_stable_across_processes():
    """Python's hash() of a str is salted per process; shard_of must not be."""
    pids = [f"ser-{i:016x}" for i in range(200)]
    here = [C.shard_of(p, 7) for p in pids]
    code = (
        "from radflow import conventions as C; "
        "print([C.shard_of(f'ser-{i:016x}', 7) for i in range(200)])"
    )
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert eval(out.stdout) == here
    # and it is the documented function of the pseudonym: SHA-256, first 8 bytes, mod n
    expected = int.from_bytes(hashlib.sha256(b"ser-00000000000000ff").digest()[:8], "big") % 7
    assert C.shard_of("ser-00000000000000ff", 7) == expected
    assert len(set(here)) == 7  # and it spreads


@pytest.mark.parametrize(
    ("n_files", "shards"),
    [(0, 1), (150, 1), (1000, 1), (1001, 2), (2000, 2), (2001, 4), (100_000, 128), (10**8, 1024)],
)
def test_auto_shard_count_steps(n_files, shards):
    assert C.auto_shard_count(n_files) == shards


def test_auto_shard_count_ignores_a_few_more_files():
    """Adding a few files changes the count only at the power-of-two boundaries."""
    counts = [C.auto_shard_count(n) for n in range(1, 300_000, 97)]
    changes = sum(a != b for a, b in zip(counts, counts[1:], strict=False))
    assert changes == 9  # 1 -> 2 -> 4 ... -> 512 over 1..300,000 files
    assert all(C.auto_shard_count(n) <= max(1, n / 500) for n in range(1, 300_000, 97))
