"""The one atomic-output helper and the one copy: what a reader can see, and what is left behind."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from daqif.atomic import CopyStopped, atomic_output, atomic_write_bytes, atomic_write_json, copy_file


def test_the_output_appears_under_its_name_only_when_the_block_ends(tmp_path: Path) -> None:
    target = tmp_path / "product.h5"
    target.write_bytes(b"old")
    with atomic_output(target) as tmp:
        tmp.write_bytes(b"new")
        assert tmp.parent == tmp_path and tmp.name.startswith(".product.h5.")
        assert target.read_bytes() == b"old"  # a reader still sees the old content
    assert target.read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["product.h5"]


def test_a_failing_block_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "daq.json"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="half way"), atomic_output(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("half way")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["daq.json"]


def test_a_fixed_temp_name_replaces_the_leftover_of_a_crash(tmp_path: Path) -> None:
    target = tmp_path / "x.h5"
    leftover = tmp_path / ".x.h5.part"
    leftover.write_bytes(b"from a crash")
    with atomic_output(target, temp_name=leftover.name) as tmp:
        assert tmp == leftover and not tmp.exists()
        os.link(_source(tmp_path), tmp)
    assert target.read_bytes() == b"source bytes" and not leftover.exists()
    assert os.stat(target).st_ino == os.stat(_source(tmp_path)).st_ino  # a link, made atomically


def test_a_symlink_made_in_the_block_is_renamed_into_place(tmp_path: Path) -> None:
    source = Path(_source(tmp_path))
    target = tmp_path / "link.h5"
    with atomic_output(target) as tmp:
        os.symlink(source, tmp)
    assert target.is_symlink() and target.read_bytes() == b"source bytes"


def test_write_helpers_replace_the_file(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    atomic_write_json(tmp_path / "b.json", {"k": [1, 2]}, durable=False)
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.json").read_text() == '{\n "k": [\n  1,\n  2\n ]\n}'


def test_copy_file_copies_every_byte_and_refuses_to_overwrite(tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    data = os.urandom(3 * 1024 * 1024 + 17)
    source.write_bytes(data)
    assert copy_file(source, tmp_path / "copy.bin") == len(data)
    assert (tmp_path / "copy.bin").read_bytes() == data
    with pytest.raises(FileExistsError):
        copy_file(source, tmp_path / "copy.bin")


def test_copy_file_stops_when_asked(tmp_path: Path) -> None:
    source = Path(_source(tmp_path))
    stop = threading.Event()
    stop.set()
    with pytest.raises(CopyStopped, match=f"copy of {source} was stopped"):
        copy_file(source, tmp_path / "never.bin", stop=stop)


def _source(directory: Path) -> str:
    path = directory / "source.bin"
    if not path.exists():
        path.write_bytes(b"source bytes")
    return str(path)


def test_copy_file_keeps_holes_as_holes_and_every_byte_of_data(tmp_path: Path) -> None:
    # The file of a direct-I/O write stopped early: storage for every frame, most never written.
    source = tmp_path / "sparse.bin"
    head, middle = os.urandom(64 << 10), os.urandom(4096)
    with open(source, "wb") as f:
        f.write(head)
        f.seek(256 << 20)
        f.write(middle)
        f.truncate(512 << 20)  # and a hole at the end
    copy = tmp_path / "copy.bin"

    assert copy_file(source, copy) == 512 << 20
    assert copy.stat().st_size == 512 << 20
    with open(copy, "rb") as f:
        assert f.read(len(head)) == head
        f.seek(256 << 20)
        assert f.read(len(middle)) == middle
        f.seek(100 << 20)
        assert f.read(4096) == bytes(4096)
    assert copy.stat().st_blocks * 512 < 8 << 20, "the holes were written as zeros"


class _CutsTheSource(threading.Event):
    """A `stop` event that is never set; the first time the copy asks it (before its first
    chunk), the source file is cut to `keep` bytes, as a writer truncating its file would."""

    def __init__(self, source: Path, keep: int) -> None:
        super().__init__()
        self.source, self.keep, self.asked = source, keep, 0

    def is_set(self) -> bool:
        self.asked += 1
        if self.asked == 1:
            os.truncate(self.source, self.keep)
        return False


@pytest.mark.parametrize("keep", [0, 4096, 3 << 20])
def test_copy_file_of_a_source_that_shrinks_during_the_copy_is_an_eio_naming_where_it_stopped(
    tmp_path: Path, keep: int
) -> None:
    source = tmp_path / "shrinking.bin"
    source.write_bytes(os.urandom(5 << 20))

    shrank = rf"copy of {source} stopped at byte {keep} of {5 << 20}: it shrank"
    with pytest.raises(OSError, match=shrank) as exc:
        copy_file(source, tmp_path / "copy.bin", stop=_CutsTheSource(source, keep))
    assert exc.value.errno == errno.EIO
