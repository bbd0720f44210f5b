"""A sequential reader of uncompressed tars: (name, bytes) of each regular file, from a stream.

Why not tarfile: the loader reads every training sample through here, and tarfile's stream mode
spent ~0.35 ms per sample on headers (img2dataset's writer, Python's tarfile in PAX format, puts
a PAX header before every member for its float mtime; each is parsed into a TarInfo with a dozen
fields we never read). That was a quarter of a loader worker's time, more than resizing.
Here a header is one struct unpack; only the fields a reader needs are decoded (name, size,
type; PAX `path`/`size` and GNU long names override them).

Stricter than tarfile where it matters for training data (each raises TarError with the byte
offset): a stream that ends inside a header or a member, a header whose checksum is wrong (tarfile
in stream mode treats a garbled header after the first as the end of the archive, silently
dropping the rest of the shard), a member declaring more than `max_member_bytes`, and a stream
without the end-of-archive block. tests/test_shards.py checks it against tarfile on tars in the
ustar, GNU and PAX formats, with long and non-ASCII names, directories and links.
"""

from __future__ import annotations

import struct
from typing import BinaryIO, Iterator

BLOCK = 512
# name, mode, uid, gid, size, mtime, chksum, typeflag, linkname, magic, version, uname, gname,
# devmajor, devminor, prefix (POSIX ustar layout; GNU uses the prefix bytes for other fields).
_HEADER = struct.Struct("100s8s8s8s12s12s8s1s100s6s2s32s32s8s8s155s12x")
_REGULAR = (b"0", b"\0", b"7")  # file, old-style file, contiguous file
_PAX, _PAX_GLOBAL, _GNU_LONGNAME, _GNU_LONGLINK = b"x", b"g", b"L", b"K"


class TarError(Exception):
    """The tar is cut short or damaged at a known byte offset."""


def _number(field: bytes) -> int:
    """A numeric header field: octal text, or GNU's base-256 when the high bit is set."""
    if field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        return -value if field[0] & 0x40 else value
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _checksum_ok(block: bytes, stored: bytes) -> bool:
    try:
        expected = _number(stored)
    except ValueError:
        return False
    # The sum of all header bytes with the checksum field counted as spaces; historic writers
    # summed signed bytes, which tarfile also accepts.
    unsigned = sum(block) - sum(block[148:156]) + 8 * 32
    if expected == unsigned:
        return True
    signed = unsigned - 256 * sum(1 for b in block if b > 127) + 256 * sum(
        1 for b in block[148:156] if b > 127)
    return expected == signed


def _pax_records(data: bytes) -> dict[str, str]:
    """'LEN key=value\\n' records (POSIX.1-2001)."""
    records, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space])
        if length <= 0:
            raise ValueError("PAX record of length 0")
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


class _Reader:
    def __init__(self, stream: BinaryIO, first: bytes = b"") -> None:
        self.stream, self.pending, self.offset = stream, first, 0

    def read(self, size: int) -> bytes:
        """Exactly `size` bytes, or fewer only at the end of the stream."""
        if not self.pending:
            # The common case, a buffered file giving all of it in one call (the loop below is
            # for pipes and object storage, which may give less): 18 reads per sample.
            data = self.stream.read(size)
            if len(data) == size:
                self.offset += size
                return data
            self.pending = data
        parts, wanted = [], size
        if self.pending:
            head, self.pending = self.pending[:wanted], self.pending[wanted:]
            parts.append(head)
            wanted -= len(head)
        while wanted > 0:
            chunk = self.stream.read(min(wanted, 1 << 20))
            if not chunk:
                break
            parts.append(chunk)
            wanted -= len(chunk)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self.offset += len(data)
        return data


def read_members(stream: BinaryIO, max_member_bytes: int, first: bytes = b"") -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file, in order. `first`: bytes already read off the stream
    (e.g. to sniff compression), read again before it. Raises TarError on damage."""
    reader = _Reader(stream, first)
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        at = reader.offset
        block = reader.read(BLOCK)
        if not block:
            raise TarError("empty file" if at == 0 else
                           f"tar ends without its end-of-archive marker at byte {at} (truncated file)")
        if len(block) < BLOCK:
            raise TarError(f"tar cut off inside the header at byte {at} (truncated file)")
        if block.count(0) == BLOCK:
            return  # end-of-archive block (a second one may follow; nothing after matters)
        fields = _HEADER.unpack(block)
        if not _checksum_ok(block, fields[6]):
            raise TarError(f"bad header checksum at byte {at} (damaged tar)")
        kind = fields[7]
        try:
            size = int(pax["size"]) if "size" in pax else _number(fields[4])
        except ValueError:
            raise TarError(f"unreadable member size at byte {at} (damaged tar)") from None
        if size < 0 or size > max_member_bytes:
            name = _text(fields[0])
            raise TarError(f"member {name} declares {size} bytes (corrupt header?)")
        data_start = reader.offset
        data = reader.read(size)
        padding = -size % BLOCK
        if len(data) < size or len(reader.read(padding)) < padding:
            raise TarError(f"member {_text(fields[0])} at byte {at} is cut short")
        if kind == _PAX:
            try:
                pax = _pax_records(data)
            except ValueError:
                raise TarError(f"damaged PAX header at byte {data_start}") from None
            continue
        if kind == _GNU_LONGNAME:
            long_name = _text(data)
            continue
        if kind in (_PAX_GLOBAL, _GNU_LONGLINK):
            continue
        if "path" in pax:
            name = pax["path"]
        elif long_name is not None:
            name = long_name
        else:
            name = _text(fields[0])
            prefix = fields[15]
            if fields[9] == b"ustar\0" and prefix[0]:  # POSIX ustar: the path's leading part
                name = f"{_text(prefix)}/{name}"
        long_name, pax = None, {}
        if kind in _REGULAR and not (kind == b"\0" and name.endswith("/")):  # old-style dirs
            yield name, data
