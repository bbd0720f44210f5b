"""`python -m data_pipeline.validate`: passes real shards, and names shard and key of each defect
planted in a copy of them."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from data_pipeline.validate import main as validate_main
from data_pipeline.validate import validate_folder


@pytest.fixture
def train_copy(demo_shards: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "train"
    shutil.copytree(demo_shards / "train", folder)
    return folder


def _members(tar_path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(tar_path) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]


def _rewrite(tar_path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    with tarfile.open(tar_path, "w") as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _first_key(tar_path: Path) -> str:
    return _members(tar_path)[0][0].name.split(".")[0]


def test_demo_corpus_validates_clean(demo_shards, run_cli):
    result = run_cli("data_pipeline.validate", str(demo_shards))
    assert result.returncode == 0, result.stdout + result.stderr
    for split in ("train", "val", "heldout"):
        assert f"{demo_shards / split}: " in result.stdout
    assert result.stdout.count(": OK") == 3


def test_truncated_tar_is_reported_with_its_shard(train_copy, capsys):
    tar = train_copy / "00001.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2 + 100])  # cut inside a member

    assert validate_main([str(train_copy)]) == 1
    out = capsys.readouterr().out
    assert "00001.tar: unreadable tar" in out or "00001.tar: tar ends without" in out
    assert "00001.tar: sizes.json says" in out


def test_tar_cut_at_a_member_boundary_is_still_caught(train_copy):
    tar = train_copy / "00000.tar"
    # Cut right before the 31st member's header: every remaining header and payload is intact,
    # so only the missing end-of-archive blocks (and sizes.json) give the truncation away.
    with tarfile.open(tar) as reader:
        cut = reader.getmembers()[30].offset
    tar.write_bytes(tar.read_bytes()[:cut])

    report = validate_folder(str(train_copy))
    messages = [p.message for p in report.problems if p.shard == "00000.tar"]
    assert any("end-of-archive marker" in m for m in messages), messages
    assert any("the tar holds 10" in m for m in messages), messages


def test_image_that_is_not_an_image_is_named_by_key(train_copy, capsys):
    tar = train_copy / "00002.tar"
    members = _members(tar)
    victim = members[3][0].name.split(".")[0]
    members = [(i, b"<html>404</html>" if i.name == f"{victim}.jpg" else d) for i, d in members]
    _rewrite(tar, members)

    assert validate_main([str(train_copy)]) == 1
    out = capsys.readouterr().out
    assert f"00002.tar {victim}: jpg: image does not decode" in out
    assert "1 PROBLEMS" in out


def test_sample_without_caption_and_with_empty_caption(train_copy, capsys):
    tar = train_copy / "00003.tar"
    members = _members(tar)
    keys = sorted({i.name.split(".")[0] for i, _ in members})
    no_caption, empty_caption = keys[0], keys[1]
    members = [(i, d) for i, d in members if i.name != f"{no_caption}.txt"]
    members = [(i, b"  \n" if i.name == f"{empty_caption}.txt" else d) for i, d in members]
    _rewrite(tar, members)

    assert validate_main([str(train_copy)]) == 1
    out = capsys.readouterr().out
    assert f"00003.tar {no_caption}: no caption (.txt missing)" in out
    assert f"00003.tar {empty_caption}: empty caption (.txt)" in out


def test_sizes_json_disagreeing_with_the_tars(train_copy, capsys):
    sizes = json.loads((train_copy / "sizes.json").read_text())
    sizes["00000.tar"] += 1
    del sizes["00001.tar"]
    sizes["00099.tar"] = 5
    (train_copy / "sizes.json").write_text(json.dumps(sizes))

    assert validate_main([str(train_copy)]) == 1
    out = capsys.readouterr().out
    assert (
        f"00000.tar: sizes.json says {sizes['00000.tar']} samples, the tar holds {sizes['00000.tar'] - 1}"
        in out
    )
    assert "00001.tar: not listed in sizes.json" in out
    assert "00099.tar: listed in sizes.json but missing" in out


def test_unfinished_shard_is_reported(train_copy, capsys):
    (train_copy / "00002_stats.json").unlink()
    assert validate_main([str(train_copy)]) == 1
    assert "00002.tar: img2dataset did not finish this shard" in capsys.readouterr().out


def test_demo_root_with_one_broken_split_fails(demo_shards, tmp_path, run_cli):
    root = tmp_path / "corpus"
    shutil.copytree(demo_shards, root)
    (root / "heldout" / "00000.tar").write_bytes(b"\0" * 100)
    result = run_cli("data_pipeline.validate", str(root))
    assert result.returncode == 1
    assert f"{root / 'heldout'}: 1 shards, 0 samples:" in result.stdout
    assert f"{root / 'train'}: 4 shards" in result.stdout and ": OK" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_not_a_shard_folder_is_one_line(tmp_path, run_cli, make):
    target = tmp_path / "shards"
    if make == "empty":
        target.mkdir()
    result = run_cli("data_pipeline.validate", str(target))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")


def test_member_declaring_a_terabyte_is_a_corrupt_shard_not_a_memory_error(train_copy, capsys):
    """A GNU base-256 size field may declare any size; reading it whole used to raise
    MemoryError. Validate and the trainer's reader both call the shard corrupt."""
    from data_pipeline.shard_format import read_shard

    tar = train_copy / "00001.tar"
    header = tarfile.TarInfo("0000100.jpg")
    header.size = 1 << 40
    block = header.tobuf(format=tarfile.GNU_FORMAT)
    assert block[124] & 0x80  # the size really is in base-256
    tar.write_bytes(block + b"\xff" * 2048)  # then the file ends

    assert validate_main([str(train_copy)]) == 1
    out = capsys.readouterr().out
    assert "00001.tar: unreadable tar" in out and "declares 1099511627776 bytes" in out
    items = list(read_shard(str(tar)))
    assert items[-1]["__error__"].startswith("unreadable tar")


def test_shard_problems_come_first_and_the_rest_is_counted_by_kind(train_copy, capsys):
    # 60 captions emptied in shard 00000 and a truncated shard 00003 later in the listing.
    tar = train_copy / "00000.tar"
    members = [(i, b"" if i.name.endswith(".txt") else d) for i, d in _members(tar)][:180]
    _rewrite(tar, members)
    last = train_copy / "00003.tar"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])

    assert validate_main([str(train_copy)]) == 1
    lines = capsys.readouterr().out.splitlines()
    problem_lines = [line for line in lines if line.startswith("  ") and not line.startswith("    ")
                     and not line.startswith("  ...")]
    is_shard_level = [" " not in line.strip().split(":")[0] for line in problem_lines]
    first_sample = is_shard_level.index(False)
    assert all(is_shard_level[:first_sample]) and not any(is_shard_level[first_sample:])
    shard_lines = problem_lines[:first_sample]
    assert any(line.startswith("  00003.tar: unreadable tar") for line in shard_lines)
    assert any(line.startswith("  00000.tar: sizes.json says") for line in shard_lines)
    assert len(problem_lines) == 50
    summary = "\n".join(lines)
    assert "more problems (--all prints every one)" in summary
    assert "x empty caption" in summary

    assert validate_main([str(train_copy), "--all"]) == 1
    everything = capsys.readouterr().out
    assert everything.count(": empty caption (.txt)") == 60 and "more problems" not in everything


def test_validate_and_trainer_agree_on_a_caption_that_is_not_utf8(train_copy, capsys):
    from data_pipeline.shard_format import BadSample, decode_caption, read_shard

    tar = train_copy / "00002.tar"
    members = _members(tar)
    victim = _first_key(tar)
    members = [(i, b"caf\xe9 \xff" if i.name == f"{victim}.txt" else d) for i, d in members]
    _rewrite(tar, members)

    assert validate_main([str(train_copy)]) == 1
    assert f"00002.tar {victim}: caption (.txt) is not UTF-8" in capsys.readouterr().out
    raw = next(r for r in read_shard(str(tar)) if r["__key__"] == victim)
    with pytest.raises(BadSample, match="not UTF-8"):  # the trainer's decode skips it
        decode_caption(raw)
