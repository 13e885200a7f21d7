"""Parallel gzip: one standard gzip member compressed by several threads (the pigz idea).

The byte stream is cut into chunks of a fixed size (`CHUNK_BYTES`, never derived from the
thread count). Each chunk is compressed independently as raw deflate at the requested
level, primed with the last 32 KiB of the stream before it as preset dictionary so matches
may reach back across the cut. Every chunk but the last ends with a sync flush (its
deflate blocks end on a byte boundary, the stream stays open) and the last one with
Z_FINISH, so the concatenation is one valid deflate stream; the gzip header and the
CRC-32/size trailer wrap it into one gzip member that gzip, zcat, zlib and nibabel read.

The deflate library is zlib-ng (package `zlib-ng`, a dependency: about 2.5x faster than
zlib at level 6 on CT data, and compressing as well), else Python's zlib. The output
depends only on the data, the level, the chunk size and that library: the same for 1 or
16 threads, identical on every run. The library releases the
GIL while it compresses, so the threads run on separate cores. Compared with one deflate
stream at the same level the file is a few bytes per chunk larger (sync-flush markers).
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO

try:
    from zlib_ng import zlib_ng as _lib

    DEFLATE_LIBRARY = f"zlib-ng {_lib.ZLIBNG_VERSION}"
except ImportError:  # pragma: no cover - zlib-ng is a dependency
    import zlib as _lib

    DEFLATE_LIBRARY = f"zlib {_lib.ZLIB_RUNTIME_VERSION}"

#: Bytes of input per independently compressed chunk (pigz uses 128 KiB; larger chunks
#: mean fewer flush markers and less per-chunk overhead in Python).
CHUNK_BYTES = 1 << 20
#: Deflate's window: how far back a match may reach, the size of the preset dictionary.
WINDOW_BYTES = 32 * 1024


def _gzip_header(level: int) -> bytes:
    """The 10-byte gzip header: no name, mtime 0, XFL 2 for level 9, 4 for level 1, else 0,
    OS 255 ("unknown", as Python 3.12's gzip.compress writes it: the same on every system)."""
    xfl = 2 if level == 9 else 4 if level == 1 else 0
    return b"\x1f\x8b\x08\x00" + struct.pack("<I", 0) + bytes([xfl, 255])


def _chunks(pieces: Iterable[bytes | bytearray | memoryview], size: int) -> Iterator[memoryview]:
    """The concatenation of `pieces` cut into chunks of `size` bytes (the last may be
    shorter; none is empty). A chunk inside one piece is a view, not a copy."""
    pending: list[memoryview] = []
    pending_len = 0
    for piece in pieces:
        view = memoryview(piece)
        if view.nbytes == 0:
            continue
        view = view.cast("B")
        start = 0
        if pending:
            take = min(size - pending_len, len(view))
            pending.append(view[:take])
            pending_len += take
            start = take
            if pending_len < size:
                continue
            yield memoryview(b"".join(pending))
            pending, pending_len = [], 0
        while len(view) - start >= size:
            yield view[start : start + size]
            start += size
        if start < len(view):
            pending, pending_len = [view[start:]], len(view) - start
    if pending:
        yield memoryview(b"".join(pending))


def _deflate(chunk: memoryview, dictionary: memoryview | None, level: int, last: bool) -> bytes:
    """Raw deflate of one chunk, primed with `dictionary`, ended by a sync flush (or
    Z_FINISH for the last chunk)."""
    settings = (level, _lib.DEFLATED, -_lib.MAX_WBITS, 8, _lib.Z_DEFAULT_STRATEGY)
    compressor = _lib.compressobj(*settings, *([] if dictionary is None else [dictionary]))
    body = compressor.compress(chunk)
    return body + compressor.flush(_lib.Z_FINISH if last else _lib.Z_SYNC_FLUSH)


def write_gzip(
    out: BinaryIO,
    pieces: Iterable[bytes | bytearray | memoryview],
    *,
    level: int = 6,
    threads: int = 1,
    chunk_bytes: int = CHUNK_BYTES,
) -> int:
    """Write the concatenation of `pieces` to the open binary file `out` as one gzip member.

    Inputs: byte-like pieces (e.g. a header and a C-contiguous array: views are not
    copied), the zlib level 0-9 (6 = gzip's and dcm2niix's default), the number of
    compressing threads and the chunk size (keep the default for reproducible bytes).
    Memory: about 2 x `threads` chunks in flight besides the pieces themselves.
    Returns the number of uncompressed bytes written.
    """
    if not 0 <= level <= 9:
        raise ValueError(f"gzip compression level must be 0-9, got {level}")
    if chunk_bytes < WINDOW_BYTES:
        raise ValueError(f"chunk_bytes must be at least {WINDOW_BYTES}, got {chunk_bytes}")
    threads = max(1, int(threads))
    out.write(_gzip_header(level))
    crc, size = 0, 0
    previous: memoryview | None = None
    chunks = _chunks(pieces, chunk_bytes)
    current = next(chunks, memoryview(b""))
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    in_flight: deque[Future[bytes]] = deque()
    try:
        while current is not None:
            following = next(chunks, None)
            last = following is None
            dictionary = None if previous is None else previous[-WINDOW_BYTES:]
            crc = _lib.crc32(current, crc)
            size += len(current)
            if pool is None:
                out.write(_deflate(current, dictionary, level, last))
            else:
                in_flight.append(pool.submit(_deflate, current, dictionary, level, last))
                while len(in_flight) > 2 * threads or (last and in_flight):
                    out.write(in_flight.popleft().result())
            previous, current = current, following
    finally:
        if pool is not None:
            for future in in_flight:
                future.cancel()
            pool.shutdown(wait=True)
    out.write(struct.pack("<II", crc & 0xFFFFFFFF, size & 0xFFFFFFFF))
    return size
