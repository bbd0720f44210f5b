"""Shards on S3-compatible object storage: moto's S3 server on 127.0.0.1 (tests/s3_server.py),
read natively through s3fs, written by img2dataset; and a proxy in front of it that resets or
stalls reads of chosen objects, to show that a failed read resumes where it stopped and that a
shard which keeps failing is skipped and counted while the run goes on, with exact counts."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("s3fs", reason="s3fs is not installed (pip install -e '.[dev]')")
pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e '.[dev]')")

from data_pipeline.curate.scan import scan_rows  # noqa: E402
from data_pipeline.object_store import READ_STATS, ReadRetry  # noqa: E402
from data_pipeline.shard_format import read_shard  # noqa: E402
from eval.shard_images import ShardImages, shard_urls  # noqa: E402
from s3_server import TEST_ENV, Fault, flaky_proxy, moto_s3  # noqa: E402
from test_data import (  # noqa: E402
    PAD_ID, captions, config, sample, take, tokenize, write_resume_sources, write_source, write_tar,
)
from training.data import build_train_loader  # noqa: E402
from training.data.sources import expand_source, read_shard_sizes  # noqa: E402

BUCKET = "shards"
BLOCK = 8192  # bytes per ranged GET: several per shard, so a read can fail mid-object


def _clear_s3_instances() -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # instances keep the endpoint they were made with


@pytest.fixture(scope="module")
def store():
    """moto on 127.0.0.1 with the flaky proxy in front; every client in this module (and the
    subprocesses it starts) talks to the proxy through AWS_ENDPOINT_URL."""
    with moto_s3() as endpoint, flaky_proxy(endpoint) as proxy, pytest.MonkeyPatch.context() as env:
        for name, value in {**TEST_ENV, "AWS_ENDPOINT_URL": proxy.url}.items():
            env.setenv(name, value)
        _clear_s3_instances()
        import s3fs

        fs = s3fs.S3FileSystem()
        fs.mkdir(BUCKET)
        try:
            yield {"fs": fs, "proxy": proxy, "endpoint": proxy.url, "moto": endpoint}
        finally:
            _clear_s3_instances()


@pytest.fixture
def proxy(store):
    """The proxy, with no faults set and its GET log empty at the start and end of a test."""
    proxy = store["proxy"]
    proxy.faults.clear(), proxy.gets.clear(), proxy.broken.clear()
    yield proxy
    proxy.faults.clear(), proxy.gets.clear(), proxy.broken.clear()


def upload(fs, folder: Path, prefix: str) -> str:
    for path in sorted(folder.iterdir()):
        fs.pipe(f"{BUCKET}/{prefix}/{path.name}", path.read_bytes())
    return f"s3://{BUCKET}/{prefix}"


def _without_url(items):
    return [{k: v for k, v in item.items() if k != "__url__"} for item in items]


def test_s3_shards_list_size_and_read_like_local_ones(store, proxy, tmp_path):
    local = write_source(tmp_path / "local", shards=3, per_shard=5, prefix="a")
    remote = upload(store["fs"], local, "listing")
    urls = expand_source(remote)
    assert urls == [f"{remote}/{i:05d}.tar" for i in range(3)]
    assert expand_source(f"{remote}/{{00001..00002}}.tar") == urls[1:]
    assert read_shard_sizes(urls) == [5, 5, 5]
    for url, path in zip(urls, sorted(local.glob("*.tar"))):
        assert _without_url(read_shard(url)) == _without_url(read_shard(str(path)))
    # eval's reader (search and the eval suites read shards through it): same keys, same order.
    images = ShardImages(shard_urls(remote, "test"), 16, lambda raw: raw["__key__"])
    assert [key for _, key in images] == [f"a{s:03d}{i:03d}" for s in range(3) for i in range(5)]
    # curation's scan of a pool shard
    rows, unreadable, damaged = scan_rows(urls[0])
    assert list(rows["key"]) == [f"a000{i:03d}" for i in range(5)] and (unreadable, damaged) == (0, None)


def test_read_options_are_checked_and_leave_the_resume_fingerprint_alone():
    from training.data import DataConfig

    with pytest.raises(ValueError, match="read retries must be >= 0"):
        DataConfig(train_shards="s3://b/x", read_retries=-1)
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        DataConfig(train_shards="s3://b/x", read_timeout_s=0)
    patient = DataConfig(train_shards="s3://b/x", read_retries=9, read_backoff_s=3)
    assert patient.fingerprint() == DataConfig(train_shards="s3://b/x").fingerprint()
    assert patient.read_retry() == ReadRetry(retries=9, backoff_s=3.0, timeout_s=60.0)
    waits = [ReadRetry(backoff_s=1, max_backoff_s=5).delay(k) for k in (1, 2, 3, 4)]
    assert 0.5 <= waits[0] <= 1 and 1 <= waits[1] <= 2 and 2 <= waits[2] <= 4 and 2.5 <= waits[3] <= 5


def test_missing_object_is_reported_at_once_not_retried(store, proxy):
    retries = READ_STATS.retries
    items = list(read_shard(f"s3://{BUCKET}/nowhere/00000.tar", retry=ReadRetry(backoff_s=0.01)))
    assert len(items) == 1 and "FileNotFoundError" in items[0]["__error__"]
    assert "__unreadable__" not in items[0]  # a wrong path is the user's to fix, not a hiccup
    assert READ_STATS.retries == retries and proxy.gets_of(f"/{BUCKET}/nowhere/00000.tar") == []
    # In training it stops the run, naming the shard (a wrong path, not a hiccup to sit out).
    from training.data import DataError

    loader = build_train_loader(config(f"s3://{BUCKET}/nowhere/{{00000..00001}}.tar"), tokenize, PAD_ID)
    with pytest.raises(DataError, match=r"shard s3://shards/nowhere/0000[01]\.tar yielded no usable "
                                        r"sample .*FileNotFoundError"):
        next(loader)
    loader.close()


def _range_start(header: str) -> int:
    return int(re.fullmatch(r"bytes=(\d+)-\d+", header).group(1))


def _range_end(header: str) -> int:
    return int(re.fullmatch(r"bytes=\d+-(\d+)", header).group(1))


def test_reset_reads_resume_mid_object_and_a_dead_shard_is_skipped_and_counted(
        store, proxy, tmp_path):
    local = write_source(tmp_path / "local", shards=3, per_shard=8, prefix="f")
    remote = upload(store["fs"], local, "flaky")
    once, dead = f"/{BUCKET}/flaky/00001.tar", f"/{BUCKET}/flaky/00002.tar"
    # 00001: its second GET is reset after 1000 bytes, once. 00002: every GET is reset.
    proxy.faults[once] = Fault(cut_after=1000, after_gets=1, times=1)
    proxy.faults[dead] = Fault(cut_after=300)
    cfg = config(remote, batch_size=4, shard_shuffle=False, read_retries=2,
                 read_backoff_s=0.01, read_block_size=BLOCK)
    loader = build_train_loader(cfg, tokenize, PAD_ID)
    batches = take(loader, 5)  # 16 samples, then 00002's give-up record and the next epoch

    expected = [f"f {s} {i}" for s in range(2) for i in range(8)] + [f"f 0 {i}" for i in range(4)]
    assert [c for b in batches for c in captions(b)] == expected  # every sample, in order
    assert loader.read_retries == 1 + 2  # 00001 once, 00002 twice before giving up
    assert loader.shards_given_up == 1
    assert loader.skipped_samples == 1  # 00002's record: skipped and counted, the run goes on
    once_gets = proxy.gets_of(once)
    assert proxy.broken[once] == 1
    # The retry asked again for what the reset GET was to bring, from the byte handed out so
    # far (within the first GET's range), not from byte 0.
    assert 0 < _range_start(once_gets[2]) <= _range_end(once_gets[0]) + 1
    assert _range_end(once_gets[2]) == _range_end(once_gets[1])
    assert len(proxy.gets_of(dead)) == 1 + 2 and proxy.broken[dead] == 3
    window = loader.telemetry()  # what the trainer writes into metrics.jsonl
    assert window["data_read_retries"] == 3 and window["data_shards_given_up"] == 1
    loader.close()


def test_a_store_that_fails_every_read_stops_the_run_in_one_line(store, proxy, tmp_path):
    from training.data import DataError
    from training.data.loader import UNREADABLE_SHARDS_IN_A_ROW

    remote = upload(store["fs"], write_source(tmp_path / "local", shards=3, per_shard=4, prefix="d"),
                    "down")
    for shard in range(3):
        proxy.faults[f"/{BUCKET}/down/{shard:05d}.tar"] = Fault(cut_after=100)
    loader = build_train_loader(config(remote, read_retries=0), tokenize, PAD_ID)
    with pytest.raises(DataError, match=rf"^{UNREADABLE_SHARDS_IN_A_ROW} shards in a row could "
                                        r"not be read from storage, the last s3://.*reachable\?$"):
        next(loader)
    assert loader.skipped_samples == 0  # no batch was handed out
    assert sum(proxy.broken.values()) == UNREADABLE_SHARDS_IN_A_ROW  # retries=0: one GET each
    loader.close()


@pytest.mark.parametrize("mode", ["stall", "503"])
def test_a_stalled_read_or_a_503_is_retried(store, proxy, tmp_path, mode):
    local = tmp_path / "local"
    local.mkdir()
    write_tar(local / "00000.tar", [sample(f"k{i}", f"c {i}") for i in range(6)])
    remote = upload(store["fs"], local, mode)
    proxy.faults[f"/{BUCKET}/{mode}/00000.tar"] = Fault(cut_after=500, mode=mode, times=1)
    retries = READ_STATS.retries
    started = time.monotonic()
    items = list(read_shard(f"{remote}/00000.tar", retry=ReadRetry(timeout_s=1, backoff_s=0.01)))
    assert proxy.broken[f"/{BUCKET}/{mode}/00000.tar"] == 1
    assert [item["__key__"] for item in items] == [f"k{i}" for i in range(6)]
    assert READ_STATS.retries == retries + 1
    assert time.monotonic() - started < 20  # one timeout, not a hang


@pytest.mark.timeout(180)
def test_resume_on_flaky_s3_gives_exactly_the_uninterrupted_batches(store, proxy, tmp_path):
    main, extra = write_resume_sources(tmp_path)
    remote_main, remote_extra = (upload(store["fs"], main, "resume/main"),
                                 upload(store["fs"], extra, "resume/extra"))
    # One shard always fails at byte 5000 (its first samples read, the rest skipped), another
    # fails twice in a row (retried: the uninterrupted run meets the failures, the resumed not).
    proxy.faults[f"/{BUCKET}/resume/main/00003.tar"] = Fault(cut_after=200, at_byte=5000)
    proxy.faults[f"/{BUCKET}/resume/main/00001.tar"] = Fault(cut_after=700, after_gets=1, times=2)
    cfg = config(
        f"{remote_main}::{remote_extra}", train_data_weights=[2.0, 1.0], workers=2,
        batch_size=4, sample_shuffle_buffer=8, scale=(0.5, 1.0), hflip=0.5, seed=3,
        read_retries=3, read_backoff_s=0.01, read_block_size=4096,
    )
    total, stop = 9, 5
    uninterrupted = build_train_loader(cfg, tokenize, PAD_ID)
    expected = take(uninterrupted, total)
    first = build_train_loader(cfg, tokenize, PAD_ID)
    head = take(first, stop)
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    resumed = build_train_loader(dataclasses.replace(cfg, read_retries=5), tokenize, PAD_ID,
                                 states=[state])
    got = head + take(resumed, total - stop)

    assert torch.equal(torch.cat([b["image"] for b in got]), torch.cat([b["image"] for b in expected]))
    assert [captions(b) for b in got] == [captions(b) for b in expected]
    assert resumed.skipped_samples == uninterrupted.skipped_samples >= 2
    assert resumed.state_dict() == uninterrupted.state_dict()
    assert uninterrupted.shards_given_up >= 1 and proxy.broken[f"/{BUCKET}/resume/main/00001.tar"] == 2
    for loader in (uninterrupted, resumed):
        loader.close()


def _shard_args(url_list: Path, output: str, *extra: str) -> list[str]:
    return ["--url-list", str(url_list), "--output", output, "--samples-per-shard", "10",
            "--image-size", "32", "--processes", "1", "--threads", "4", "--timeout", "5", *extra]


@pytest.mark.slow  # three img2dataset runs (60-80 s on 2 cores, mostly its workers' start-up)
@pytest.mark.timeout(400)
def test_img2dataset_shards_into_a_bucket_and_reruns_incrementally(store, proxy, tmp_path, run_cli):
    from data_pipeline.loopback_server import serve_folder
    from test_data import jpeg

    images = tmp_path / "images"
    images.mkdir()
    for i in range(28):
        (images / f"{i}.jpg").write_bytes(jpeg(i, (40, 30)))
    fs, output = store["fs"], f"s3://{BUCKET}/img2dataset"
    with serve_folder(images) as base:
        url_list = tmp_path / "pairs.csv"
        url_list.write_text("url,caption\n" + "".join(
            f"{base}/{i}.jpg,swatch {i}\n" for i in range(28)) + f"{base}/missing.jpg,gone\n")
        first = run_cli("data_pipeline.shards", *_shard_args(url_list, output))
        assert first.returncode == 0, first.stdout + first.stderr
        names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(output, refresh=True))
        assert names == sorted(["00000.parquet", "00000.tar", "00000_stats.json",
                                "00001.parquet", "00001.tar", "00001_stats.json",
                                "00002.parquet", "00002.tar", "00002_stats.json",
                                "manifest.json", "sizes.json"])
        assert json.loads(fs.cat(f"{output}/sizes.json")) == {
            "00000.tar": 10, "00001.tar": 10, "00002.tar": 8}
        manifest = json.loads(fs.cat(f"{output}/manifest.json"))
        assert manifest["complete"] and manifest["totals"]["success"] == 28
        assert manifest["failure_reasons"] == {"http 404": 1}
        # Nothing written beside the working directory or into it: img2dataset's log is local.
        assert not Path(output.replace("s3://", "")).exists()

        # A lost shard: an incremental rerun downloads it, and only it.
        for name in ("00001.tar", "00001.parquet", "00001_stats.json"):
            fs.rm(f"{output}/{name}")
        again = run_cli("data_pipeline.shards", *_shard_args(url_list, output, "--incremental"))
        assert again.returncode == 0, again.stdout + again.stderr
        run = json.loads(fs.cat(f"{output}/manifest.json"))["run"]
        assert run["shards_downloaded"] == 1 and run["shards_skipped"] == 2
        refused = run_cli("data_pipeline.shards", *_shard_args(url_list, output))
        assert refused.returncode == 2 and "--incremental" in refused.stderr
        no_bucket = run_cli("data_pipeline.shards", *_shard_args(url_list, "s3://no-such-bucket/x"))
        assert no_bucket.returncode == 2 and "Traceback" not in no_bucket.stderr
        assert no_bucket.stderr.strip() == ("error: --output s3://no-such-bucket/x: no bucket "
                                            "'no-such-bucket' (or these credentials cannot see it); "
                                            "create it first")

    checked = run_cli("data_pipeline.validate", output)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"{output}: 3 shards, 28 samples: OK" in checked.stdout
    loader = build_train_loader(config(output, num_samples=None, batch_size=7, shard_shuffle=False),
                                tokenize, PAD_ID)
    assert loader.num_samples == 28  # from the bucket's sizes.json
    assert sorted(c for b in take(loader, 4) for c in captions(b)) == sorted(
        f"swatch {i}" for i in range(28))
    loader.close()


@pytest.mark.timeout(300)
def test_a_training_run_on_flaky_s3_logs_its_retries_into_metrics_jsonl(store, proxy, tmp_path):
    from trainer_cli import run

    local = write_source(tmp_path / "local", shards=4, per_shard=16, prefix="t")
    tokenizer = tmp_path / "tokenizer.json"
    made = run("training.text.tokenizer", "--shards", str(local), "--vocab-size", "300",
               "--out", str(tokenizer))
    assert made.returncode == 0, made.stderr[-2000:]
    remote = upload(store["fs"], local, "train")
    for shard in range(4):  # each shard's second GET is reset once
        proxy.faults[f"/{BUCKET}/train/{shard:05d}.tar"] = Fault(cut_after=600, after_gets=1, times=1)
    run_dir = tmp_path / "run"
    result = run("training.main", "--config", "configs/tiny_demo.toml",
                 f"data.train_shards={remote}", f"tokenizer={tokenizer}", "data.image_size=32",
                 "data.batch_size=16", "data.workers=1", "data.sample_shuffle_buffer=16",
                 "data.read_block_size=4096", "data.read_backoff_s=0.01", "optim.warmup_steps=2",
                 "train.steps=6", f"train.run_dir={run_dir}", "checkpoint.every=0", "log.every=1",
                 "log.progress_bar=false")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 6
    # The four first-epoch readings were each retried once; all of them fall in these 6 steps'
    # batches (64 samples = the first 4 steps), none was given up.
    assert sum(r.get("data_read_retries", 0) for r in steps) == 4
    assert all(r.get("data_shards_given_up", 0) == 0 for r in steps)
    assert all(proxy.broken[f"/{BUCKET}/train/{shard:05d}.tar"] == 1 for shard in range(4))
