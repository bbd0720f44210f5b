"""Our sequential tar reader (data_pipeline.tar_stream) against Python's tarfile on the same
archives: every format tarfile writes, long and non-ASCII names, non-file members; and damage."""

from __future__ import annotations

import io
import tarfile

import pytest

from data_pipeline.tar_stream import TarError, read_members


def _archive(fmt: int, mtime: float = 1_700_000_000.5) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        def add(name: str, data: bytes | None, kind: bytes = tarfile.REGTYPE) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mtime = kind, mtime
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)

        add("000001.jpg", bytes(range(256)) * 3)
        add("000001.txt", b"a red circle")
        add("folder", None, tarfile.DIRTYPE)
        add("folder/" + "x" * 150 + ".txt", b"a long name (> 100 bytes)")
        add("a" * 120 + "/b.txt", b"a long directory part (ustar prefix)")
        add("caf\u00e9/\u56fe.txt", "non-ASCII name".encode())
        add("empty.txt", b"")
        add("exactly_one_block.bin", b"z" * 512)
        link = tarfile.TarInfo("link.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "000001.txt"
        tar.addfile(link)
    return out.getvalue()


def _tarfile_members(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        return [(info.name, tar.extractfile(info).read()) for info in tar if info.isreg()]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_same_members_as_tarfile_in_every_format(fmt):
    if fmt == tarfile.USTAR_FORMAT:
        data = io.BytesIO()  # ustar cannot hold a 150-byte file name: only the names it can
        with tarfile.open(fileobj=data, mode="w", format=fmt) as tar:
            for name, payload in [("k.jpg", b"\xff\xd8" * 300), ("a" * 120 + "/b.txt", b"p")]:
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        data = data.getvalue()
    else:
        data = _archive(fmt)
    expected = _tarfile_members(data)
    assert len(expected) >= 2
    assert list(read_members(io.BytesIO(data), 1 << 20)) == expected


def test_bytes_already_read_are_read_again():
    data = _archive(tarfile.PAX_FORMAT)
    stream = io.BytesIO(data)
    head = stream.read(6)
    assert list(read_members(stream, 1 << 20, first=head)) == _tarfile_members(data)


@pytest.mark.parametrize("cut, message", [
    (0, "empty file"),
    (700, "cut short"),  # inside the first member's data
    (1536 + 100, "cut off inside the header at byte 1536"),  # the second header
])
def test_a_cut_tar_is_an_error_with_its_offset(cut, message):
    data = _archive(tarfile.GNU_FORMAT)
    with pytest.raises(TarError, match=message):
        list(read_members(io.BytesIO(data[:cut]), 1 << 20))


def test_missing_end_marker_and_garbled_header_are_errors():
    data = _archive(tarfile.GNU_FORMAT)
    members = _tarfile_members(data)
    # Cut exactly after the second member (header 512 + 768 data padded to 1024, then 512 + 512):
    # the header loop finds no end-of-archive block.
    first_two = 512 + 1024 + 512 + 512
    with pytest.raises(TarError, match="without its end-of-archive marker at byte 2560"):
        list(read_members(io.BytesIO(data[:first_two]), 1 << 20))
    # A flipped byte in the second header: tarfile would end the archive there silently.
    garbled = bytearray(data)
    garbled[1536 + 10] ^= 0xFF
    with tarfile.open(fileobj=io.BytesIO(bytes(garbled)), mode="r|") as tar:
        assert len([i for i in tar if i.isreg()]) == 1 < len(members)
    with pytest.raises(TarError, match="bad header checksum at byte 1536"):
        list(read_members(io.BytesIO(bytes(garbled)), 1 << 20))


def test_a_member_larger_than_the_limit_is_refused_before_reading():
    data = _archive(tarfile.PAX_FORMAT)
    with pytest.raises(TarError, match="declares 768 bytes"):
        list(read_members(io.BytesIO(data), max_member_bytes=700))
