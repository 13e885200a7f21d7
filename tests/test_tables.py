"""radflow.tables: the one atomic writer every stage uses."""

import os

import pytest

from radflow.tables import atomic_path, write_bytes_atomic


def test_atomic_path_publishes_only_a_complete_file(tmp_path):
    target = tmp_path / "sub" / "table.tsv"
    with atomic_path(target) as tmp:
        tmp.write_text("a\tb\n1\t2\n")
        assert not target.exists()  # nothing published while writing
        assert tmp.parent == target.parent and tmp.name.startswith(".table.tsv.")
    assert target.read_text() == "a\tb\n1\t2\n"
    assert os.listdir(target.parent) == ["table.tsv"]  # the temporary name is gone


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "table.tsv"
    target.write_text("old\n")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half a tab")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["table.tsv"]


def test_unchanged_bytes_leave_the_file_untouched(tmp_path):
    target = write_bytes_atomic(tmp_path / "x.json", b"{}\n")
    os.utime(target, ns=(1_000_000_000, 1_000_000_000))
    write_bytes_atomic(target, b"{}\n")
    assert target.stat().st_mtime_ns == 1_000_000_000  # Snakemake sees no change
    write_bytes_atomic(target, b"{1}\n")
    assert target.read_bytes() == b"{1}\n"


def test_atomic_path_keeps_an_identical_file_untouched(tmp_path):
    import os

    from radflow.tables import atomic_path

    target = tmp_path / "a.bin"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"same")
    os.utime(target, ns=(1, 1))
    with atomic_path(target, keep_identical=True) as tmp:
        tmp.write_bytes(b"same")
    assert target.stat().st_mtime_ns == 1  # left alone
    with atomic_path(target, keep_identical=True) as tmp:
        tmp.write_bytes(b"different")
    assert target.read_bytes() == b"different" and target.stat().st_mtime_ns != 1
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]  # no temporary left
