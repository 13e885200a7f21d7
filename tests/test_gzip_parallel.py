"""radflow.gzip_parallel: one standard gzip member written by several threads."""

from __future__ import annotations

import gzip
import io
import shutil
import subprocess
import zlib

import numpy as np
import pytest

from radflow.gzip_parallel import WINDOW_BYTES, _lib, write_gzip

CHUNK = WINDOW_BYTES  # the smallest allowed chunk: many chunks from small test data


def _gz(pieces, **kwargs) -> bytes:
    out = io.BytesIO()
    size = write_gzip(out, pieces, chunk_bytes=kwargs.pop("chunk_bytes", CHUNK), **kwargs)
    assert size == sum(memoryview(p).nbytes for p in pieces)
    return out.getvalue()


def _ct_like(n_bytes: int) -> bytes:
    """Image-like int16 bytes: noise around a slowly wandering level."""
    rng = np.random.default_rng(0)
    n = n_bytes // 2 + 1
    level = np.cumsum(rng.normal(0, 2, n)) + rng.normal(40, 15, n)
    return level.astype(np.int16).tobytes()[:n_bytes]


@pytest.mark.parametrize("size", [0, 1, 100, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK + 17])
def test_round_trip_gzip_and_zlib(size):
    data = _ct_like(size)
    for threads in (1, 3):
        blob = _gz([data], threads=threads)
        assert gzip.decompress(blob) == data
        assert zlib.decompress(blob, wbits=31) == data  # exactly one gzip member
        assert blob[:3] == b"\x1f\x8b\x08"


def test_pieces_are_one_stream():
    """Pieces (header bytes, numpy arrays) are concatenated, chunks may span them."""
    header = b"H" * 352
    volume = np.arange(3 * 50 * 70, dtype=np.int16).reshape(3, 50, 70)
    empty = np.empty((0, 3, 4), np.int16)
    blob = _gz([header, volume, b"", empty, b"tail"], threads=2)
    assert gzip.decompress(blob) == header + volume.tobytes() + b"tail"


def test_zcat_reads_it(tmp_path):
    if shutil.which("zcat") is None:
        pytest.skip("zcat not installed")
    data = _ct_like(4 * CHUNK + 5)
    path = tmp_path / "x.gz"
    path.write_bytes(_gz([data], threads=2))
    assert subprocess.run(["zcat", str(path)], capture_output=True, check=True).stdout == data


def test_bytes_independent_of_threads_and_runs():
    data = _ct_like(7 * CHUNK + 3)
    blobs = {_gz([data], threads=t) for t in (1, 2, 3, 8, 1)}
    assert len(blobs) == 1


@pytest.mark.parametrize("level", [1, 6, 9])
def test_compression_level_is_honoured(level):
    """Same size as one deflate stream of the same library at the same level, up to the
    flush markers and the cuts (under 1%), and the XFL flag as gzip writes it."""
    data = _ct_like(6 * 8 * CHUNK)
    ours = _gz([data], level=level, threads=2, chunk_bytes=8 * CHUNK)
    one_stream = _lib.compressobj(level, _lib.DEFLATED, -_lib.MAX_WBITS)
    reference = one_stream.compress(data) + one_stream.flush()
    assert abs(len(ours) - 18 - len(reference)) < 0.01 * len(reference) + 64
    assert ours[8] == gzip.compress(b"", compresslevel=level, mtime=0)[8]  # 4 fast, 2 best
    assert len(_gz([data], level=0)) > len(data)  # level 0 stores


def test_dictionary_reaches_across_chunks():
    """Each chunk is primed with the 32 KiB before it: a block repeated through the stream
    costs its size once, not once per chunk."""
    block = np.random.default_rng(1).bytes(20_000)
    data = block * 8  # 160 kB = 5 chunks
    assert len(_gz([data], threads=2)) < 1.3 * len(block)


def test_bad_arguments():
    with pytest.raises(ValueError, match="level must be 0-9, got 10"):
        write_gzip(io.BytesIO(), [b"x"], level=10)
    with pytest.raises(ValueError, match="chunk_bytes must be at least"):
        write_gzip(io.BytesIO(), [b"x"], chunk_bytes=1000)
